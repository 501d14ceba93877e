"""Read the shapes world back: images into objects, captions into the claims they make.

`parse_scene` is deterministic and uses no learned weights, so it can judge what a
text-to-image model drew (as GenEval judges with a detector). Per grid cell:

- presence: the fraction of the cell's pixels brighter than `DARK` is at least `PRESENCE`
  (the smallest shape, a small triangle, covers about 11% of its cell);
- colour: the median of the cell's core pixels (at least `CORE` of its bright end), divided
  by its brightest channel, against the palette divided the same way, so a dimmed or
  blurred object keeps its colour;
- shape and size: the renderer's own drawing of each of the 10 (shape, size) candidates in
  that cell and colour, placed so that its centroid falls on the observed one, compared by
  soft mask IoU (coverage = brightness over the colour's brightness, with the faint `FLOOR`
  of noise removed from both); the best candidate wins.

Images of any square size are read at their own size (the renderer draws the candidates at
it); other shapes are resized to a square first. docs/generation-metrics.md has the measured
honesty: the dataset's own renders, clean, noisy and blurred, against their captions.

`parse_caption` reads every caption template of `vlp.data.shapes` (case, surrounding
whitespace and a final full stop aside) into `CaptionClaims`; any other text is None.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageFilter

from vlp.data.shapes import (
    COLORS,
    NUMBER_WORDS,
    POSITION_PHRASE,
    SHAPES,
    SIZES,
    ShapeObject,
    ShapesScene,
    render_scene,
)

DARK = 64.0  # brightness (0-255, brightest channel) above which a pixel is not background
PRESENCE = 0.04  # fraction of a cell's pixels above DARK that makes an object
CORE = 0.75  # colour from pixels at least this fraction of the cell's bright end
FLOOR = 0.15  # coverage below this is noise, not shape
BLURS = (0.0, 0.03, 0.06, 0.09, 0.12)  # Gaussian blurs (in cells) each candidate is tried at


# ---------------------------------------------------------------- images


def _square_rgb(image: Image.Image) -> np.ndarray:
    """Float RGB pixels [S, S, 3] (0-255); a non-square image is resized to its longer side."""
    img = image.convert("RGB")
    if img.width != img.height:
        side = max(img.size)
        img = img.resize((side, side), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32)


def _cell_bounds(index: int, side: int) -> slice:
    """Pixel rows (or columns) of grid row (or column) `index` in an image of `side` pixels."""
    return slice(round(index * side / 3), round((index + 1) * side / 3))


def _coverage(brightness: np.ndarray, color: str) -> np.ndarray:
    """How much of each pixel the object covers, 0-1, with the noise floor removed."""
    cov = np.clip(brightness / max(COLORS[color]), 0.0, 1.0)
    return np.clip((cov - FLOOR) / (1.0 - FLOOR), 0.0, 1.0)


def _centroid(weights: np.ndarray) -> tuple[float, float]:
    """(y, x) weighted centre of a 2-D array, in pixel units (pixel centres at i + 0.5)."""
    total = float(weights.sum())
    ys, xs = np.indices(weights.shape, dtype=np.float64)
    return (
        float((weights * (ys + 0.5)).sum()) / total,
        float((weights * (xs + 0.5)).sum()) / total,
    )


@cache
def _palette_chroma() -> tuple[tuple[str, ...], np.ndarray]:
    names = tuple(COLORS)
    rgb = np.array([COLORS[n] for n in names], dtype=np.float32)
    return names, rgb / rgb.max(axis=1, keepdims=True)


def _color(rgb: np.ndarray, brightness: np.ndarray) -> str:
    """The palette colour of a cell's object: nearest chromaticity of its core pixels' median."""
    core = brightness >= CORE * np.percentile(brightness, 98)
    median = np.median(rgb[core], axis=0)
    names, chroma = _palette_chroma()
    distance = np.linalg.norm(chroma - median / max(float(median.max()), 1.0), axis=1)
    return names[int(np.argmin(distance))]


def _candidate(
    obj: ShapeObject, jitter: tuple[float, float], side: int, ys: slice, xs: slice
) -> np.ndarray:
    """Brightness [h, w] of the renderer's drawing of `obj` alone (jitter in cell fractions)
    in the pixels `ys`, `xs`."""
    img = render_scene(ShapesScene((obj,), (jitter,)), side)
    crop = img.crop((xs.start, ys.start, xs.stop, ys.stop))
    return np.asarray(crop, dtype=np.float32).max(axis=2)


@cache
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """[n, n] Gaussian blur along one axis, black beyond the n pixels (identity for sigma 0)."""
    if sigma == 0:
        return np.eye(n, dtype=np.float32)
    offsets = np.arange(n)[:, None] - np.arange(n)[None, :]
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    full = np.exp(-0.5 * (np.arange(-4 * n, 4 * n + 1) / sigma) ** 2).sum()
    return (kernel / full).astype(np.float32)


def _blurred(stack: np.ndarray, sigma: float) -> np.ndarray:
    """Brightness crops [k, h, w], each Gaussian-blurred by `sigma` pixels."""
    h, w = stack.shape[-2:]
    return _blur_matrix(h, sigma) @ stack @ _blur_matrix(w, sigma).T


@cache
def _centroid_offset(shape: str, size: str, side: int) -> tuple[float, float]:
    """(dy, dx) pixels from a candidate's nominal centre to its drawn centroid (a triangle's
    centroid sits below its centre)."""
    obj = ShapeObject(1, 1, size, "gray", shape)
    cells = _cell_bounds(1, side)
    cy, cx = _centroid(_coverage(_candidate(obj, (0.0, 0.0), side, cells, cells), "gray"))
    middle = 1.5 * side / 3 - cells.start
    return cy - middle, cx - middle


def _shape_and_size(brightness: np.ndarray, row: int, col: int, color: str) -> tuple[str, str]:
    """(shape, size) of the candidate that, drawn in cell (row, col), best matches the cell."""
    side = brightness.shape[0]
    ys, xs = _cell_bounds(row, side), _cell_bounds(col, side)
    observed = _coverage(brightness[ys, xs], color)
    cy, cx = _centroid(observed)
    cy, cx = cy + ys.start, cx + xs.start
    cell = side / 3
    candidates = [(shape, size) for shape in SHAPES for size in SIZES]
    drawn = []
    for shape, size in candidates:
        dy, dx = _centroid_offset(shape, size, side)
        jitter = (
            float(np.clip((cx - dx) / cell - col - 0.5, -0.3, 0.3)),
            float(np.clip((cy - dy) / cell - row - 0.5, -0.3, 0.3)),
        )
        drawn.append(_candidate(ShapeObject(row, col, size, color, shape), jitter, side, ys, xs))
    sharp = np.stack(drawn)
    coverage = _coverage(np.stack([_blurred(sharp, b * cell) for b in BLURS], axis=1), color)
    union = np.maximum(coverage, observed).sum(axis=(2, 3))
    iou = np.minimum(coverage, observed).sum(axis=(2, 3)) / np.maximum(union, 1e-9)
    return candidates[int(np.argmax(iou.max(axis=1)))]


def parse_scene(image: Image.Image) -> tuple[ShapeObject, ...]:
    """The objects a shapes-world image shows, in reading order (row, then column)."""
    rgb = _square_rgb(image)
    brightness = rgb.max(axis=2)
    side = rgb.shape[0]
    objects = []
    for row in range(3):
        for col in range(3):
            ys, xs = _cell_bounds(row, side), _cell_bounds(col, side)
            cell = brightness[ys, xs]
            if float((cell > DARK).mean()) < PRESENCE:
                continue
            color = _color(rgb[ys, xs][cell > DARK], cell[cell > DARK])
            shape, size = _shape_and_size(brightness, row, col, color)
            objects.append(ShapeObject(row, col, size, color, shape))
    return tuple(objects)


def scene_text(objects: tuple[ShapeObject, ...]) -> str:
    """Objects as one line: "large red circle at the top left; small blue cross in the center"."""
    if not objects:
        return "(nothing)"
    return "; ".join(f"{o.text} {POSITION_PHRASE[(o.row, o.col)]}" for o in objects)


# ---------------------------------------------------------------- captions


@dataclass(frozen=True)
class ObjectClaim:
    """One object a caption names, with the attributes it states (None: not stated)."""

    size: str | None
    color: str | None
    shape: str | None
    cell: tuple[int, int] | None  # (row, col)

    def claims(self) -> dict[str, object]:
        """Attribute -> stated value, for the attributes the caption states."""
        stated = {"size": self.size, "color": self.color, "shape": self.shape}
        stated["position"] = self.cell
        return {k: v for k, v in stated.items() if v is not None}


@dataclass(frozen=True)
class CaptionClaims:
    """What a caption claims: objects, relations between them (a, relation, b: indices into
    `objects`, with `relation` as `vlp.data.shapes.relation` words it) and the object count.

    Every template of the shapes world names every object of its scene, so `count` is the
    number of objects (the number word of the counted template, as stated).
    """

    template: str
    objects: tuple[ObjectClaim, ...]
    relations: tuple[tuple[int, str, int], ...]
    count: int


def _alternatives(words: object) -> str:
    return "|".join(sorted(map(re.escape, words), key=len, reverse=True))  # type: ignore[call-overload]


_PHRASE_CELL = {phrase: cell for cell, phrase in POSITION_PHRASE.items()}
_RELATIONS = ("to the left of", "to the right of", "above", "below")
_SIZE = f"(?P<size>{_alternatives(SIZES)})"
_COLOR = f"(?P<color>{_alternatives(COLORS)})"
_SHAPE = f"(?P<shape>{_alternatives(SHAPES)})"
_POS = f"(?P<pos>{_alternatives(_PHRASE_CELL)})"
_REL = _alternatives(_RELATIONS)
_ITEM = {  # one listed object of each list template
    "canonical": re.compile(f"an? {_SIZE} {_COLOR} {_SHAPE} {_POS}"),
    "counted": re.compile(f"an? {_COLOR} {_SHAPE} {_POS}"),
    "sizes_first": re.compile(f"{_SIZE} {_SHAPE} in {_COLOR} {_POS}"),
}
_COUNTED_HEAD = re.compile(
    rf"(?:an image of |a picture with )?(?P<n>{_alternatives(NUMBER_WORDS)}) shapes?: (?P<rest>.*)"
)
_SINGLE = re.compile(f"a single {_SIZE} {_COLOR} {_SHAPE} {_POS}")
_DESC = r"an? (\w+) (\w+) (\w+)"
_RELATIONAL = re.compile(rf"{_DESC} ({_REL}) {_DESC}(?:, with {_DESC} ({_REL}) it)?")
_THE_IS_ONE = re.compile(f"the {_COLOR} {_SHAPE} is {_SIZE} and sits {_POS}")
_THE_IS_PAIR = re.compile(rf"the (\w+) (\w+) (\w+) is ({_REL}) the (\w+) (\w+)")


def _claim(
    size: str | None, color: str | None, shape: str | None, pos: str | None = None
) -> ObjectClaim | None:
    """The object claim of these words, or None where a word is not the world's."""
    if (
        (size is not None and size not in SIZES)
        or (color is not None and color not in COLORS)
        or (shape is not None and shape not in SHAPES)
    ):
        return None
    return ObjectClaim(size, color, shape, None if pos is None else _PHRASE_CELL[pos])


def _listed(text: str, template: str) -> tuple[ObjectClaim, ...] | None:
    """The objects of "X, Y and Z" where each item matches the template's item pattern."""
    items = re.split(r", | and ", text)
    objects = []
    for item in items:
        m = _ITEM[template].fullmatch(item)
        if m is None:
            return None
        fields = m.groupdict()
        objects.append(_claim(fields.get("size"), fields["color"], fields["shape"], fields["pos"]))
    return tuple(o for o in objects if o is not None)


def _list_claims(text: str) -> CaptionClaims | None:
    """The canonical, "there is", counted and sizes-first templates: lists of objects."""
    head = _COUNTED_HEAD.fullmatch(text)
    if head is not None:
        objects = _listed(head["rest"], "counted")
        if objects:
            return CaptionClaims("counted", objects, (), NUMBER_WORDS.index(head["n"]))
        return None
    for template, body in (
        ("there_is", text.removeprefix("there is ") if text.startswith("there is ") else None),
        ("canonical", text),
        ("sizes_first", text),
    ):
        item = "sizes_first" if template == "sizes_first" else "canonical"
        objects = _listed(body, item) if body is not None else None
        if objects:
            return CaptionClaims(template, objects, (), len(objects))
    return None


def _relational_claims(text: str) -> CaptionClaims | None:
    """ "a single X at P", "an X left of a Y" and "an X left of a Y, with a Z above it"."""
    m = _SINGLE.fullmatch(text)
    if m is not None:
        obj = _claim(m["size"], m["color"], m["shape"], m["pos"])
        return CaptionClaims("relational", (obj,), (), 1) if obj else None
    m = _RELATIONAL.fullmatch(text)
    if m is None:
        return None
    g = m.groups()
    a, b = _claim(*g[0:3]), _claim(*g[4:7])
    objects, relations = [a, b], [(0, g[3], 1)]
    if g[7] is not None:
        objects.append(_claim(*g[7:10]))
        relations.append((2, g[10], 1))
    if any(o is None for o in objects):
        return None
    return CaptionClaims("relational", tuple(objects), tuple(relations), len(objects))  # type: ignore[arg-type]


def _the_is_claims(text: str) -> CaptionClaims | None:
    """ "the X is large and sits at P", and chains "the s X is left of the Y and the s Y is ..."
    (each pair's second object is the next pair's first)."""
    m = _THE_IS_ONE.fullmatch(text)
    if m is not None:
        obj = _claim(m["size"], m["color"], m["shape"], m["pos"])
        return CaptionClaims("the_is", (obj,), (), 1) if obj else None
    pairs = [_THE_IS_PAIR.fullmatch(part) for part in text.split(" and ")]
    if not pairs or any(p is None for p in pairs):
        return None
    objects: list[ObjectClaim | None] = []
    relations = []
    for i, p in enumerate(pairs):
        size, color, shape, rel, next_color, next_shape = p.groups()  # type: ignore[union-attr]
        if i > 0 and (color, shape) != (objects[-1].color, objects[-1].shape):  # type: ignore[union-attr]
            return None  # not a chain: a pair names an object the previous one did not
        objects[i:] = [_claim(size, color, shape), _claim(None, next_color, next_shape)]
        relations.append((i, rel, i + 1))
    if any(o is None for o in objects):
        return None
    return CaptionClaims("the_is", tuple(objects), tuple(relations), len(objects))  # type: ignore[arg-type]


def normalise_caption(text: str) -> str:
    """Lower case, single spaces, no surrounding whitespace or final full stop."""
    return " ".join(text.lower().split()).removesuffix(".").strip()


def parse_caption(text: str) -> CaptionClaims | None:
    """The claims of a shapes-world caption, or None if no caption template reads it."""
    text = normalise_caption(text)
    for parse in (_relational_claims, _the_is_claims, _list_claims):
        claims = parse(text)
        if claims is not None:
            return claims
    return None
