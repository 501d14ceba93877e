"""The shapes-world parser is honest: the dataset's own renders read back as their scenes, and
score ~100% against their own captions in every caption style, and low against others'."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from vlp.data import shapes
from vlp.data.shapes import ShapeObject, ShapesScene, canonical_caption, render_scene
from vlp.data.shapes_parse import ObjectClaim, parse_caption, parse_scene
from vlp.metrics.generation import scene_scores

STYLES = {
    "canonical": lambda scene, rng: canonical_caption(scene),
    **{f.__name__.strip("_"): f for f in shapes._VARIANT_TEMPLATES},
}
N_SCENES = {48: 300, 64: 150}  # scenes per image size (48: data.image_size)


def _scenes(n: int, seed: int) -> list[ShapesScene]:
    rng = random.Random(seed)
    return [shapes.sample_scene(rng) for _ in range(n)]


@pytest.fixture(scope="module", params=sorted(N_SCENES))
def parsed(request: pytest.FixtureRequest) -> tuple[list[ShapesScene], list[tuple]]:
    """(scenes, what the parser reads from their renders) at one image size."""
    size = request.param
    scenes = _scenes(N_SCENES[size], seed=size)
    return scenes, [parse_scene(render_scene(s, size)) for s in scenes]


def test_renders_read_back_as_their_scenes(parsed) -> None:
    scenes, objects = parsed
    wrong = [(s.objects, o) for s, o in zip(scenes, objects, strict=True) if s.objects != o]
    assert wrong == []


@pytest.mark.parametrize("style", sorted(STYLES))
def test_renders_score_at_least_99_9_percent_in_every_caption_style(parsed, style) -> None:
    scenes, objects = parsed
    rng = random.Random(1)
    captions = [STYLES[style](s, rng) for s in scenes]
    metrics, rows = scene_scores(captions, objects)
    assert metrics["unparsable_prompts"] == 0
    assert {r["template"] for r in rows} == {style}
    assert metrics["exact_match"] >= 99.9, [r for r in rows if not r["exact"]][:3]
    for key in ("count", "color", "shape", "position", "size", "relation"):
        assert metrics.get(key, 100.0) >= 99.9


def test_captions_claim_exactly_their_scene() -> None:
    """Every caption of many scenes, scored against the true objects: the caption parser."""
    scenes = _scenes(1000, seed=5)
    rng = random.Random(2)
    captions = [c for s in scenes for c in shapes.scene_captions(s, rng, 6)]
    truth = [s.objects for s in scenes for _ in range(6)]
    metrics, _ = scene_scores(captions, truth)
    assert metrics["prompts"] == 6000
    assert metrics["exact_match"] == 100.0


def test_images_with_another_scenes_captions_score_low(parsed) -> None:
    scenes, objects = parsed
    rng = random.Random(3)
    shifted = [*scenes[1:], scenes[0]]  # each image gets the next scene's captions
    for style, template in STYLES.items():
        metrics, _ = scene_scores([template(s, rng) for s in shifted], objects)
        assert metrics["exact_match"] <= 2.0, style
        assert metrics.get("position", 0.0) <= 40.0, style
        assert metrics["color"] <= 50.0, style


def _noisy(img: Image.Image, sigma: float, blur: float, rng: np.random.Generator) -> Image.Image:
    if blur:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, sigma, (*img.size[::-1], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


@pytest.mark.parametrize(("sigma", "blur"), [(8.0, 0.0), (0.0, 0.8), (8.0, 0.5)])
def test_mild_noise_and_blur_keep_renders_scoring_high(sigma: float, blur: float) -> None:
    scenes = _scenes(120, seed=11)
    rng = np.random.default_rng(0)
    objects = [parse_scene(_noisy(render_scene(s, 48), sigma, blur, rng)) for s in scenes]
    metrics, _ = scene_scores([canonical_caption(s) for s in scenes], objects)
    assert metrics["exact_match"] >= 98.0


def test_empty_and_off_palette_images() -> None:
    assert parse_scene(Image.new("RGB", (48, 48))) == ()
    scene = ShapesScene((ShapeObject(2, 0, "large", "red", "square"),), ((0.0, 0.0),))
    img = np.asarray(render_scene(scene, 48)).astype(np.float32) * 0.8  # a darker red
    (obj,) = parse_scene(Image.fromarray(img.astype(np.uint8)))
    assert obj == scene.objects[0]
    assert parse_scene(render_scene(scene, 48).convert("L")) != ()  # grey: still an object


def test_caption_claims_per_template() -> None:
    rel = parse_caption("A small red circle to the left of a large blue square, with a small "
                        "green cross above it.")  # fmt: skip
    assert rel is not None and rel.template == "relational" and rel.count == 3
    assert rel.objects[0] == ObjectClaim("small", "red", "circle", None)
    assert rel.relations == ((0, "to the left of", 1), (2, "above", 1))
    chain = parse_caption(
        "the large red circle is above the blue square and the small blue square is to the "
        "right of the green cross"
    )
    assert chain is not None and chain.template == "the_is"
    assert [o.size for o in chain.objects] == ["large", "small", None]
    assert chain.relations == ((0, "above", 1), (1, "to the right of", 2))
    counted = parse_caption("a picture with two shapes: a red circle at the top and a gray "
                            "cross in the center")  # fmt: skip
    assert counted is not None and counted.count == 2
    assert counted.objects[1] == ObjectClaim(None, "gray", "cross", (1, 1))


@pytest.mark.parametrize(
    "text",
    [
        "a photo of a dog",
        "a large red circle at the top left and a dog",
        "a large pink circle at the top left",
        # a chain whose second pair names an object the first did not
        "the large red circle is above the blue square and the small green cross is below "
        "the red circle",
    ],
)
def test_other_text_is_unparsable(text: str) -> None:
    assert parse_caption(text) is None
