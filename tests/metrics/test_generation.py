"""Generation metrics on known inputs: compositional accuracy, CLIP and ITC scores, FID, gallery."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.checkpoints.clip import write_tiny_clip
from tests.checkpoints.vlp import tiny_vlp_dir
from vlp.data.shapes import ShapeObject, ShapesScene, render_scene, sample_scene
from vlp.errors import ConfigError, ResultsError
from vlp.metrics.feature_scores import (
    ImageTowerFeatures,
    clip_score,
    frechet_distance,
    inception_features,
    itc_score,
    model_score_fn,
)
from vlp.metrics.generation import compositional_scores, write_gallery

RED = ShapeObject(0, 0, "large", "red", "circle")
GREEN = ShapeObject(1, 1, "small", "green", "square")


def _render(*objects: ShapeObject, size: int = 48) -> Image.Image:
    return render_scene(ShapesScene(objects, tuple((0.0, 0.0) for _ in objects)), size)


def test_compositional_scores_on_known_inputs() -> None:
    one, two = _render(RED), _render(RED, GREEN)
    prompts = [
        "a large red circle at the top left",  # holds
        "A large blue circle at the top left.",  # colour wrong
        "a large red circle at the top left",  # against `two`: one object too many
        "a large red circle to the right of a small green square",  # relation wrong
        "a dog on a skateboard",  # not a shapes-world prompt
    ]
    metrics, rows = compositional_scores(prompts, [one, one, two, two, one])
    assert metrics == {
        "exact_match": 25.0,
        "exact_match_one_object": pytest.approx(100 / 3),
        "count": 75.0,  # 3 of 4
        "color": 80.0,  # 4 of 5
        "shape": 100.0,
        "size": 100.0,
        "position": 100.0,
        "relation": 0.0,
        "prompts": 4,
        "unparsable_prompts": 1,
    }
    assert [r["exact"] for r in rows] == [True, False, False, False, None]
    assert rows[1]["color"] == 0.0 and rows[1]["shape"] == 100.0
    assert rows[2]["objects"] == (
        "large red circle at the top left; small green square in the center"
    )
    assert rows[4]["template"] is None


def test_a_missing_object_fails_its_claims() -> None:
    metrics, rows = compositional_scores(
        ["a large red circle at the top left and a small green square in the center"],
        [_render(RED)],
    )
    assert metrics["exact_match"] == 0.0 and metrics["color"] == 50.0
    assert metrics["count"] == 0.0 and rows[0]["position"] == 50.0


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="module")
def renders() -> list[Image.Image]:
    rng = random.Random(4)
    return [render_scene(sample_scene(rng), 48) for _ in range(6)]


def test_clip_score_is_torchmetrics_clip_score(tiny_clip: Path, renders) -> None:
    from transformers import CLIPModel, CLIPProcessor

    # short prompts: the tiny tokenizer spells words letter by letter into 40 positions
    prompts = ["red circle", "a blue square", "the cross", "green", "two shapes", "a diamond"]
    model = CLIPModel.from_pretrained(str(tiny_clip)).eval()
    processor = CLIPProcessor.from_pretrained(str(tiny_clip))
    with torch.no_grad():
        image = model.get_image_features(**processor(images=renders, return_tensors="pt"))
        text = model.get_text_features(**processor(text=prompts, return_tensors="pt", padding=True))
    features = [
        out if isinstance(out, torch.Tensor) else out.pooler_output for out in (image, text)
    ]
    expected = max(100 * float(torch.cosine_similarity(*features).mean()), 0.0)
    assert clip_score(renders, prompts, tiny_clip) == pytest.approx(expected, abs=1e-4)
    assert clip_score(renders, prompts, tiny_clip, batch_size=4) == pytest.approx(
        expected, abs=1e-4
    )


def test_clip_score_names_a_bad_clip_directory(tmp_path: Path, renders) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"--clip {tmp_path}")):
        clip_score(renders[:1], ["a red circle"], tmp_path)


def test_itc_score_is_the_mean_diagonal_cosine(smoke_cfg, tmp_path: Path, renders) -> None:
    matrix = np.array([[0.5, 0.9], [0.1, -0.3]])
    assert itc_score(renders[:2], ["a", "b"], lambda i, t: matrix) == pytest.approx(10.0)

    from vlp.models.family import load_model

    encoder = load_model(tiny_vlp_dir(smoke_cfg, tmp_path / "vlp"))
    score_fn = model_score_fn(encoder)
    prompts = ["a large red circle at the top left", "a small blue cross", "two shapes"] * 2
    full = score_fn(renders, prompts)
    assert full.shape == (6, 6) and np.all(np.abs(full) <= 1 + 1e-5)
    expected = 100 * float(np.diag(full).mean())
    for batch_size in (None, 4):
        got = itc_score(renders, prompts, score_fn, batch_size=batch_size)
        assert got == pytest.approx(expected, abs=1e-4)


class _ColourStats(torch.nn.Module):
    """A tiny extractor: per-channel mean and spread of uint8 images."""

    num_features = 6

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance of two Gaussians fitted to feature rows, from its definition."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = np.sqrt(np.linalg.eigvals(cov_a @ cov_b).astype(complex)).real.sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * root)


def test_frechet_distance_with_a_tiny_extractor() -> None:
    rng = random.Random(0)
    small = [render_scene(sample_scene(rng), 48) for _ in range(12)]
    # the other set: the same world drawn brighter and larger
    other = [
        render_scene(sample_scene(rng), 64).point(lambda v: min(255, v + 40)) for _ in range(12)
    ]
    extractor = _ColourStats()
    assert frechet_distance(small, small, extractor, "colour stats") == pytest.approx(0, abs=1e-6)
    fid = frechet_distance(small, other, extractor, "colour stats", batch_size=5)
    assert fid > 0.01
    stack = lambda imgs: extractor(  # noqa: E731
        torch.stack([torch.from_numpy(np.array(i.resize((48, 48), Image.BICUBIC))).permute(2, 0, 1)
                     for i in imgs])
    ).double().numpy()  # fmt: skip
    assert fid == pytest.approx(_frechet(stack(small), stack(other)), rel=1e-4)
    with pytest.raises(ResultsError, match="colour stats"):
        frechet_distance(small[:1], other, extractor, "colour stats")


def test_frechet_distance_under_a_vlp_image_tower(smoke_cfg, tmp_path: Path) -> None:
    from vlp.models.family import load_model

    encoder = load_model(tiny_vlp_dir(smoke_cfg, tmp_path / "vlp"))
    features = ImageTowerFeatures(encoder.model, encoder.transform)
    assert features.num_features == smoke_cfg.model.embed_dim
    rng = random.Random(1)
    a = [render_scene(sample_scene(rng), 48) for _ in range(8)]
    b = [Image.new("RGB", (48, 48), (40 * k, 200, 30 * k)) for k in range(8)]
    assert frechet_distance(a, a, features, "itc") == pytest.approx(0, abs=1e-4)
    assert frechet_distance(a, b, features, "itc") > 0.01


def test_inception_needs_torch_fidelity(tmp_path: Path) -> None:
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if _TORCH_FIDELITY_AVAILABLE:
        with pytest.raises(ConfigError, match="file not found"):
            inception_features(tmp_path / "missing.pth")
    else:
        with pytest.raises(ConfigError, match="torch-fidelity"):
            inception_features(tmp_path / "missing.pth")


def test_gallery_png_and_html(tmp_path: Path, renders) -> None:
    prompts = ["a large red circle <at> the top left", "two shapes"]
    samples = [renders[:3], renders[3:6]]
    png, page = write_gallery(tmp_path / "gallery", prompts, samples)
    assert sorted(p.name for p in (tmp_path / "gallery").iterdir()) == [
        "gallery.html",
        "gallery.png",
    ]
    with Image.open(png) as grid:
        assert grid.width > 3 * 96 and grid.height >= 2 * 96
        # the first sample sits right of the prompt column, enlarged 2x (nearest neighbour)
        tile = np.asarray(grid.convert("RGB"))[4 : 4 + 96, 260 : 260 + 96]
        assert np.array_equal(tile[::2, ::2], np.asarray(renders[0]))
    text = page.read_text()
    assert text.count("<img ") == 6 and "&lt;at&gt;" in text and "<at>" not in text
    with pytest.raises(ValueError):
        write_gallery(tmp_path / "g2", prompts, samples[:1])
