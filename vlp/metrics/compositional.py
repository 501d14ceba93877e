"""Compositional accuracy of generated shapes-world images, as GenEval checks with a detector.

`vlp.data.shapes_parse` reads each image back into objects and each prompt into its claims;
the prompt's objects are matched one-to-one to the image's (the assignment satisfying the
most claims; a named object may stay unmatched) and each claim is checked. See
`vlp.metrics.generation` for the keys and docs/generation-metrics.md for the parser's
measured honesty.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from vlp.data.shapes import relation
from vlp.data.shapes_parse import CaptionClaims, parse_caption, parse_scene, scene_text

if TYPE_CHECKING:
    from PIL import Image

    from vlp.data.shapes import ShapeObject

ATTRIBUTES = ("count", "color", "shape", "size", "position", "relation")


def _attribute(obj: ShapeObject, attr: str) -> object:
    """An image object's value of a claimed attribute (`position`: its (row, col) cell)."""
    return (obj.row, obj.col) if attr == "position" else getattr(obj, attr)


def _object_claims_held(claims: CaptionClaims, objects: Sequence[ShapeObject]) -> np.ndarray:
    """[named objects, image objects] how many attribute claims each image object satisfies."""
    held = np.zeros((len(claims.objects), len(objects)), dtype=int)
    for i, claim in enumerate(claims.objects):
        for j, obj in enumerate(objects):
            held[i, j] = sum(_attribute(obj, k) == v for k, v in claim.claims().items())
    return held


def _assignments(n: int, m: int) -> Iterator[tuple[int | None, ...]]:
    """Every one-to-one map of n named objects into m image objects (None: left unmatched)."""
    for a in itertools.product([*range(m), None], repeat=n):
        matched = [j for j in a if j is not None]
        if len(matched) == len(set(matched)):
            yield a


def _claims_held(
    claims: CaptionClaims, objects: Sequence[ShapeObject]
) -> dict[str, tuple[int, int]]:
    """Attribute -> (claims held, claims made), under the assignment holding the most."""
    per_object = _object_claims_held(claims, objects)

    def related(a: tuple[int | None, ...]) -> list[bool]:
        pairs = [(a[x], r, a[y]) for x, r, y in claims.relations]
        return [
            i is not None and j is not None and relation(objects[i], objects[j]) == r
            for i, r, j in pairs
        ]

    def total(a: tuple[int | None, ...]) -> int:
        named = sum(int(per_object[i, j]) for i, j in enumerate(a) if j is not None)
        return named + sum(related(a))

    best = max(_assignments(len(claims.objects), len(objects)), key=total)
    held = {k: [0, 0] for k in ATTRIBUTES}
    held["count"] = [int(len(objects) == claims.count), 1]
    for i, j in enumerate(best):
        for attr, value in claims.objects[i].claims().items():
            held[attr][0] += int(j is not None and _attribute(objects[j], attr) == value)
            held[attr][1] += 1
    rel = related(best)
    held["relation"] = [sum(rel), len(rel)]
    return {k: (h, n) for k, (h, n) in held.items()}


def compositional_scores(
    prompts: Sequence[str], images: Sequence[Image.Image]
) -> tuple[dict[str, float], list[dict]]:
    """(metrics in percent, one row per prompt) of each image against the prompt it was drawn
    from, as the module docstring says; `scene_scores` of the parsed images (an image given
    more than once, as the same object, is parsed once).
    """
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
    parsed: dict[int, tuple[ShapeObject, ...]] = {}
    for image in images:
        if id(image) not in parsed:
            parsed[id(image)] = parse_scene(image)
    return scene_scores(prompts, [parsed[id(image)] for image in images])


def scene_scores(
    prompts: Sequence[str], scenes: Sequence[Sequence[ShapeObject]]
) -> tuple[dict[str, float], list[dict]]:
    """(metrics in percent, one row per prompt) of each scene's objects against its prompt.

    A row: `prompt`, `template` (the caption template that read it; None: unparsable),
    `objects` (the scene, as text), `exact` (bool; None when unparsable) and per attribute
    the percent of that prompt's claims that hold (None: no such claim).
    """
    totals = {k: [0, 0] for k in ATTRIBUTES}
    exact: list[bool] = []
    exact_one: list[bool] = []
    rows = []
    for prompt, objects in zip(prompts, scenes, strict=True):
        claims = parse_caption(prompt)
        row: dict[str, Any] = {
            "prompt": prompt,
            "template": None if claims is None else claims.template,
            "objects": scene_text(tuple(objects)),
            "exact": None,
        }
        if claims is not None:
            held = _claims_held(claims, objects)
            row["exact"] = all(h == n for h, n in held.values())
            exact.append(row["exact"])
            if len(claims.objects) == 1:
                exact_one.append(row["exact"])
            for k, (h, n) in held.items():
                totals[k][0] += h
                totals[k][1] += n
                row[k] = 100.0 * h / n if n else None
        rows.append(row)
    metrics: dict[str, float] = {}
    if exact:
        metrics["exact_match"] = 100.0 * float(np.mean(exact))
    if exact_one:
        metrics["exact_match_one_object"] = 100.0 * float(np.mean(exact_one))
    for k, (h, n) in totals.items():
        if n:
            metrics[k] = 100.0 * h / n
    metrics["prompts"] = len(exact)
    metrics["unparsable_prompts"] = len(prompts) - len(exact)
    return metrics, rows
