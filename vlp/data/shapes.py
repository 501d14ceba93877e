"""The embedded "shapes" world: deterministic scenes of coloured shapes on a 3x3 grid.

Each image holds 1-3 shapes (5 kinds, 7 colours, 2 sizes) in distinct cells of a
left/center/right x top/middle/bottom grid. Every image gets `captions_per_image`
captions (the first follows one canonical template, the rest vary wording, word order
and use relations such as "to the left of"); downstream images also get
`questions_per_image` VQA questions with 10 annotator answers each, in VQA v2 layout.
The same config gives byte-identical files, so DVC caches the output.

One module past 450 lines on purpose: rendering, captions, questions and the dataset
writer are one world built on the scene record and grid vocabulary above, and the writer,
which draws all of them from one seeded RNG in the order that fixes the bytes, needs each.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw

from vlp.config import DataConfig
from vlp.data.manifest import IMAGES_DIR, PAIRS_FILE, VQA_FILE, write_manifest
from vlp.errors import DataError
from vlp.io import atomic_dir

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 190, 50),
    "blue": (40, 80, 245),
    "yellow": (250, 235, 40),
    "purple": (165, 50, 210),
    "orange": (255, 140, 0),
    "gray": (140, 140, 140),
}
SIZES = {"large": 0.86, "small": 0.5}  # diameter as a fraction of a grid cell
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
POSITION_NAME = {
    (r, c): name
    for (r, c), name in zip(
        [(r, c) for r in range(3) for c in range(3)],
        ["top left", "top", "top right", "left", "center", "right"]
        + ["bottom left", "bottom", "bottom right"],
        strict=True,
    )
}
POSITION_PHRASE = {
    cell: (
        "in the center"
        if n == "center"
        else ("on the " if n in ("left", "right") else "at the ") + n
    )
    for cell, n in POSITION_NAME.items()
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
BACKGROUND = (0, 0, 0)
SUPERSAMPLE = 4  # draw at 4x and box-downsample: anti-aliased edges, still deterministic
_OBJECT_COUNT_WEIGHTS = (0.2, 0.4, 0.4)  # P(1), P(2), P(3) shapes per scene


@dataclass(frozen=True, order=True)
class ShapeObject:
    """One shape in a scene: grid cell, size word, colour word, shape word."""

    row: int
    col: int
    size: str
    color: str
    shape: str

    @property
    def text(self) -> str:
        return f"{self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class ShapesScene:
    """A scene: objects in reading order plus per-object jitter (fractions of a cell)."""

    objects: tuple[ShapeObject, ...]
    jitter: tuple[tuple[float, float], ...]

    @property
    def key(self) -> tuple[ShapeObject, ...]:
        """What a caption can describe; two scenes with equal keys are copies."""
        return self.objects


def sample_scene(rng: random.Random) -> ShapesScene:
    """A random scene of 1-3 shapes in distinct grid cells."""
    n = rng.choices((1, 2, 3), weights=_OBJECT_COUNT_WEIGHTS)[0]
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], n)
    objects = sorted(
        ShapeObject(r, c, rng.choice(list(SIZES)), rng.choice(list(COLORS)), rng.choice(SHAPES))
        for r, c in cells
    )
    jitter = tuple((rng.uniform(-0.08, 0.08), rng.uniform(-0.08, 0.08)) for _ in objects)
    return ShapesScene(tuple(objects), jitter)


def render_scene(scene: ShapesScene, image_size: int) -> Image.Image:
    """Draw a scene as an RGB image of image_size x image_size pixels."""
    big = image_size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell = big / 3
    for obj, (jx, jy) in zip(scene.objects, scene.jitter, strict=True):
        cx, cy = (obj.col + 0.5 + jx) * cell, (obj.row + 0.5 + jy) * cell
        r = SIZES[obj.size] * cell / 2
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif obj.shape == "square":
            h = r * 0.85  # same visual weight as the circle
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
        elif obj.shape == "diamond":
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
        else:  # cross
            t = r * 0.38
            draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
            draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    return img.reduce(SUPERSAMPLE)


# --- captions -------------------------------------------------------------------------


def relation(a: ShapeObject, b: ShapeObject) -> str:
    """Where a is relative to b: left/right dominate, above/below in the same column."""
    if a.col != b.col:
        return "to the left of" if a.col < b.col else "to the right of"
    return "above" if a.row < b.row else "below"


def _a(text: str) -> str:
    """Text with its indefinite article ("an orange circle")."""
    return ("an " if text[0] in "aeiou" else "a ") + text


def _list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _located(o: ShapeObject, with_size: bool = True) -> str:
    desc = o.text if with_size else f"{o.color} {o.shape}"
    return f"{_a(desc)} {POSITION_PHRASE[(o.row, o.col)]}"


def canonical_caption(scene: ShapesScene) -> str:
    """The canonical template: every object with size, colour, shape and cell, reading order."""
    return _list([_located(o) for o in scene.objects])


def _there_is(scene: ShapesScene, rng: random.Random) -> str:
    objs = list(scene.objects)
    rng.shuffle(objs)
    return "there is " + _list([_located(o) for o in objs])


def _relational(scene: ShapesScene, rng: random.Random) -> str:
    objs = list(scene.objects)
    rng.shuffle(objs)
    if len(objs) == 1:
        return f"a single {objs[0].text} {POSITION_PHRASE[(objs[0].row, objs[0].col)]}"
    a, b, *rest = objs
    text = f"{_a(a.text)} {relation(a, b)} {_a(b.text)}"
    if rest:
        c = rest[0]
        text += f", with {_a(c.text)} {relation(c, b)} it"
    return text


def _counted(scene: ShapesScene, rng: random.Random) -> str:
    n = len(scene.objects)
    head = "one shape" if n == 1 else f"{NUMBER_WORDS[n]} shapes"
    lead = rng.choice(("", "an image of ", "a picture with "))
    return f"{lead}{head}: " + _list([_located(o, with_size=False) for o in scene.objects])


def _the_is(scene: ShapesScene, rng: random.Random) -> str:
    objs = list(scene.objects)
    rng.shuffle(objs)
    if len(objs) == 1:
        o = objs[0]
        return f"the {o.color} {o.shape} is {o.size} and sits {POSITION_PHRASE[(o.row, o.col)]}"
    parts = [
        f"the {a.size} {a.color} {a.shape} is {relation(a, b)} the {b.color} {b.shape}"
        for a, b in zip(objs, objs[1:], strict=False)
    ]
    return " and ".join(parts)


def _sizes_first(scene: ShapesScene, rng: random.Random) -> str:
    objs = sorted(scene.objects, key=lambda o: (o.size != "large", o.row, o.col))
    return _list(
        [f"{o.size} {o.shape} in {o.color} {POSITION_PHRASE[(o.row, o.col)]}" for o in objs]
    )


_VARIANT_TEMPLATES: tuple[Callable[[ShapesScene, random.Random], str], ...] = (
    _there_is,
    _relational,
    _counted,
    _the_is,
    _sizes_first,
)


def scene_captions(scene: ShapesScene, rng: random.Random, k: int) -> list[str]:
    """k distinct captions: the canonical one, then varied templates in random order."""
    caps = [canonical_caption(scene)]
    templates = list(_VARIANT_TEMPLATES)
    rng.shuffle(templates)
    tries = 0
    while len(caps) < k:
        text = templates[tries % len(templates)](scene, rng)
        tries += 1
        if text not in caps or tries > 20 * k:
            caps.append(text)
    return caps


# --- VQA ------------------------------------------------------------------------------

Question = tuple[str, str, str, str]  # question, question_type, answer, answer_type

# How annotators phrase the same answer differently; numbers in words are equal to digits
# under the official VQA normalisation, the others count as disagreements.
ANSWER_VARIANTS: dict[str, tuple[str, ...]] = {
    "0": ("zero", "none"),
    "1": ("one",),
    "2": ("two",),
    "3": ("three",),
    "gray": ("grey",),
    "large": ("big",),
    "small": ("tiny",),
    "square": ("box",),
    "diamond": ("rhombus",),
    "cross": ("plus",),
    "top left": ("upper left",),
    "top right": ("upper right",),
    "center": ("middle",),
}
# An annotator's wrong answer is another answer to the same kind of question.
ANSWER_POOLS: tuple[tuple[str, ...], ...] = (
    ("yes", "no"),
    ("0", "1", "2", "3"),
    tuple(COLORS),
    SHAPES,
    tuple(SIZES),
    tuple(POSITION_NAME.values()),
)
_MIN_EXACT_ANSWERS = 4  # >= 4 of 10 equal the truth: official accuracy of the truth is 1.0


def _ref(o: ShapeObject, scene: ShapesScene, fields: tuple[str, ...]) -> str | None:
    """Shortest unambiguous description of o from the given attribute fields, or None."""
    options = [fields[-1:], fields[-2:], fields]
    for chosen in options:
        same = [x for x in scene.objects if all(getattr(x, f) == getattr(o, f) for f in chosen)]
        if len(same) == 1:
            return " ".join(getattr(o, f) for f in chosen)
    return None


def _q_exists(scene: ShapesScene, rng: random.Random) -> Question | None:
    present = {(o.color, o.shape) for o in scene.objects}
    if rng.random() < 0.5:
        color, shape = rng.choice(sorted(present))
    else:
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        color, shape = rng.choice(absent)
    answer = "yes" if (color, shape) in present else "no"
    return f"is there {_a(color)} {shape}?", "is there a", answer, "yes/no"


def _q_relation_yn(scene: ShapesScene, rng: random.Random) -> Question | None:
    if len(scene.objects) < 2:
        return None
    a, b = rng.sample(scene.objects, 2)
    ra, rb = _ref(a, scene, ("size", "color", "shape")), _ref(b, scene, ("size", "color", "shape"))
    if ra is None or rb is None:
        return None
    true_rel = relation(a, b)
    opposite = {
        "to the left of": "to the right of",
        "to the right of": "to the left of",
        "above": "below",
        "below": "above",
    }
    asked = true_rel if rng.random() < 0.5 else opposite[true_rel]
    answer = "yes" if asked == true_rel else "no"
    return f"is the {ra} {asked} the {rb}?", "is the", answer, "yes/no"


def _q_count(scene: ShapesScene, rng: random.Random) -> Question | None:
    kind = rng.randrange(3)
    if kind == 0:
        return "how many shapes are there?", "how many", str(len(scene.objects)), "number"
    if kind == 1:
        shape = rng.choice(SHAPES)
        n = sum(o.shape == shape for o in scene.objects)
        noun = "crosses" if shape == "cross" else shape + "s"
        return f"how many {noun} are there?", "how many", str(n), "number"
    color = rng.choice(list(COLORS))
    n = sum(o.color == color for o in scene.objects)
    return f"how many {color} shapes are there?", "how many", str(n), "number"


def _q_color(scene: ShapesScene, rng: random.Random) -> Question | None:
    o = rng.choice(scene.objects)
    ref = _ref(o, scene, ("size", "shape"))
    if ref is None:
        return None
    return f"what color is the {ref}?", "what color is the", o.color, "other"


def _q_shape(scene: ShapesScene, rng: random.Random) -> Question | None:
    o = rng.choice(scene.objects)
    ref = _ref(o, scene, ("size", "color"))
    if ref is None:
        return None
    return f"what shape is the {ref} object?", "what shape is the", o.shape, "other"


def _q_size(scene: ShapesScene, rng: random.Random) -> Question | None:
    o = rng.choice(scene.objects)
    ref = _ref(o, scene, ("color", "shape"))
    if ref is None:
        return None
    return f"what size is the {ref}?", "what size is the", o.size, "other"


def _q_where(scene: ShapesScene, rng: random.Random) -> Question | None:
    o = rng.choice(scene.objects)
    ref = _ref(o, scene, ("size", "color", "shape"))
    if ref is None:
        return None
    return f"where is the {ref}?", "where is the", POSITION_NAME[(o.row, o.col)], "other"


def _q_what_relation(scene: ShapesScene, rng: random.Random) -> Question | None:
    if len(scene.objects) < 2:
        return None
    b = rng.choice(scene.objects)
    rb = _ref(b, scene, ("size", "color", "shape"))
    rel = rng.choice(("to the left of", "to the right of", "above", "below"))
    hits = [o for o in scene.objects if o is not b and relation(o, b) == rel]
    if rb is None or len(hits) != 1:
        return None
    return f"what shape is {rel} the {rb}?", "what shape is", hits[0].shape, "other"


_QUESTION_KINDS: tuple[
    tuple[Callable[[ShapesScene, random.Random], Question | None], float], ...
] = (
    (_q_exists, 2.0),
    (_q_relation_yn, 1.0),
    (_q_count, 2.0),
    (_q_color, 1.5),
    (_q_shape, 1.0),
    (_q_size, 0.7),
    (_q_where, 0.8),
    (_q_what_relation, 1.0),
)


def annotator_answers(answer: str, rng: random.Random) -> list[str]:
    """Ten answers as human annotators give them: mostly the truth, some variants, rare errors."""
    pool = next(p for p in ANSWER_POOLS if answer in p)
    answers = []
    for _ in range(10):
        u = rng.random()
        if u < 0.8 or (u < 0.94 and answer not in ANSWER_VARIANTS):
            answers.append(answer)
        elif u < 0.94:
            answers.append(rng.choice(ANSWER_VARIANTS[answer]))
        else:
            answers.append(rng.choice([a for a in pool if a != answer]))
    wrong = [i for i, a in enumerate(answers) if a != answer]
    while len(answers) - len(wrong) < _MIN_EXACT_ANSWERS:
        answers[wrong.pop()] = answer
    return answers


def scene_questions(scene: ShapesScene, rng: random.Random, k: int) -> list[Question]:
    """k distinct questions about a scene, mixing yes/no, number and other answer types."""
    makers, weights = zip(*_QUESTION_KINDS, strict=True)
    out: list[Question] = []
    seen: set[str] = set()
    for _ in range(200 * max(k, 1)):
        if len(out) == k:
            break
        q = rng.choices(makers, weights=weights)[0](scene, rng)
        if q is not None and q[0] not in seen:
            seen.add(q[0])
            out.append(q)
    return out


# --- dataset --------------------------------------------------------------------------


def _split_plan(cfg: DataConfig) -> list[tuple[str, int]]:
    return [
        ("pretrain", cfg.n_pretrain),
        ("train", cfg.n_train),
        ("val", cfg.n_val),
        ("test", cfg.n_test),
    ]


def _check_params(cfg: DataConfig) -> None:
    if cfg.image_size < 16:
        raise DataError(f"data.image_size={cfg.image_size}: shapes need at least 16 pixels")
    if cfg.captions_per_image < 1 or cfg.questions_per_image < 0:
        raise DataError("data.captions_per_image must be >= 1 and questions_per_image >= 0")
    for name, n in _split_plan(cfg):
        if n < 0:
            raise DataError(f"data.n_{name}={n}: must be >= 0")


def _new_scene(
    rng: random.Random,
    cfg: DataConfig,
    split: str,
    n: int,
    seen_scenes: set[tuple[ShapeObject, ...]],
    split_captions: set[str] | None,
) -> tuple[ShapesScene, list[str]]:
    """A scene not in `seen_scenes` and its captions; with `split_captions`, none repeated."""
    for _attempt in range(10_000):
        scene = sample_scene(rng)
        if scene.key in seen_scenes:
            continue
        captions = scene_captions(scene, rng, cfg.captions_per_image)
        if split_captions is not None and (
            len(set(captions)) < len(captions) or split_captions & set(captions)
        ):
            continue
        return scene, captions
    raise DataError(f"data.n_{split}={n}: too many images for distinct scenes")


def _pair_rows(
    cfg: DataConfig, image_id: int, rel: str, captions: list[str], split: str
) -> list[dict]:
    return [
        dict(
            caption_id=image_id * cfg.captions_per_image + k,
            image_id=image_id,
            image_path=rel,
            caption=caption,
            split=split,
        )
        for k, caption in enumerate(captions)
    ]


def _vqa_rows(
    cfg: DataConfig, rng: random.Random, scene: ShapesScene, image_id: int, rel: str, split: str
) -> list[dict]:
    questions = scene_questions(scene, rng, cfg.questions_per_image)
    rows = []
    for k, (question, qtype, answer, atype) in enumerate(questions):
        rows.append(
            dict(
                question_id=image_id * max(cfg.questions_per_image, 1) + k,
                image_id=image_id,
                image_path=rel,
                question=question,
                question_type=qtype,
                answers=annotator_answers(answer, rng),
                answer_type=atype,
                multiple_choice_answer=answer,
                split=split,
            )
        )
    return rows


VQA_COLUMNS = [
    "question_id",
    "image_id",
    "image_path",
    "question",
    "question_type",
    "answers",
    "answer_type",
    "multiple_choice_answer",
    "split",
]


def generate_dataset(cfg: DataConfig, out_dir: Path) -> Path:
    """Generate the shapes dataset into out_dir (replaced atomically); returns out_dir.

    No scene occurs twice in the whole dataset, so no test scene copies a training one;
    within val and within test no caption text repeats, so recall@1 = 1 is reachable.
    VQA questions are generated for the downstream splits (train, val, test).
    """
    _check_params(cfg)
    rng = random.Random(cfg.seed)
    seen_scenes: set[tuple[ShapeObject, ...]] = set()
    pairs: list[dict] = []
    vqa: list[dict] = []
    image_id = 0
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, "dataset") as tmp:
        (tmp / IMAGES_DIR).mkdir()
        for split, n in _split_plan(cfg):
            split_captions: set[str] | None = set() if split in ("val", "test") else None
            for _ in range(n):
                scene, captions = _new_scene(rng, cfg, split, n, seen_scenes, split_captions)
                seen_scenes.add(scene.key)
                if split_captions is not None:
                    split_captions.update(captions)
                rel = f"{IMAGES_DIR}/{image_id:06d}.png"
                # Fixed zlib level and no metadata chunks: identical bytes for identical pixels.
                render_scene(scene, cfg.image_size).save(
                    tmp / rel, format="PNG", compress_level=6, optimize=False
                )
                pairs += _pair_rows(cfg, image_id, rel, captions, split)
                if split != "pretrain":
                    vqa += _vqa_rows(cfg, rng, scene, image_id, rel, split)
                image_id += 1
        write_manifest(
            _frame(pairs, ["caption_id", "image_id", "image_path", "caption", "split"]),
            tmp / PAIRS_FILE,
        )
        write_manifest(_frame(vqa, VQA_COLUMNS), tmp / VQA_FILE)
    return out_dir


def _frame(rows: list[dict], columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=columns)


def single_object_labels(pairs: pd.DataFrame) -> pd.DataFrame:
    """(image_id, image_path, shape, color, size) of the one-object scenes among `pairs`.

    The manifests hold no labels: an image's first caption (lowest caption_id) follows the
    canonical template, and for a one-object scene it is exactly one of the finitely many
    canonical captions of a single shape, which names its shape, colour and size. Images
    with more than one shape, and images of other datasets, are left out.
    """
    by_caption = {
        canonical_caption(ShapesScene((obj,), ((0.0, 0.0),))): obj
        for r in range(3)
        for c in range(3)
        for size in SIZES
        for color in COLORS
        for shape in SHAPES
        for obj in (ShapeObject(r, c, size, color, shape),)
    }
    first = pairs.sort_values("caption_id").drop_duplicates("image_id")
    objects = first["caption"].map(by_caption).dropna()
    out = first.loc[objects.index, ["image_id", "image_path"]]
    for field in ("shape", "color", "size"):
        out[field] = [getattr(o, field) for o in objects]
    return out.reset_index(drop=True)


def single_shape_labels(pairs: pd.DataFrame) -> pd.DataFrame:
    """(image_id, image_path, label) of the one-object scenes among `pairs`, labelled by shape.

    For zero-shot classification (`vlp zeroshot --classify --labels shapes`); see
    `single_object_labels`.
    """
    labels = single_object_labels(pairs).rename(columns={"shape": "label"})
    return labels[["image_id", "image_path", "label"]]
