"""`vlp eval generation`: a folder of renders and their prompts scored end to end."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.checkpoints.clip import write_tiny_clip
from tests.checkpoints.vlp import tiny_vlp_dir
from vlp.cli import main
from vlp.data import shapes

REPO = Path(__file__).resolve().parents[2]


def _eval(*args: str) -> int:
    return main(["--params", str(REPO / "params.yaml"), "eval", "generation", *args])


@pytest.fixture
def generated(tmp_path: Path) -> tuple[Path, Path]:
    """(COCO captions file, image folder): 6 renders, two captions each, one odd prompt."""
    rng = random.Random(0)
    images, annotations = [], []
    (tmp_path / "images").mkdir()
    for image_id in range(6):
        scene = shapes.sample_scene(rng)
        name = f"sample_{image_id}.png"
        shapes.render_scene(scene, 48).save(tmp_path / "images" / name)
        images.append({"id": image_id, "file_name": name})
        for caption in shapes.scene_captions(scene, rng, 2):
            annotations.append({"id": len(annotations), "image_id": image_id, "caption": caption})
    annotations.append({"id": 99, "image_id": 0, "caption": "a cat asleep on a sofa"})
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path, tmp_path / "images"


def test_scores_renders_against_their_prompts(generated, smoke_cfg, tmp_path: Path, capsys) -> None:
    captions, images = generated
    model = tiny_vlp_dir(smoke_cfg, tmp_path / "vlp")
    clip = write_tiny_clip(tmp_path / "clip")
    out = tmp_path / "scores.json"
    rc = _eval(
        "--annotations", str(captions), "--images", str(images), "--model", str(model),
        "--clip", str(clip), "--reference", str(images), "--out", str(out),
    )  # fmt: skip
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["exact_match"] == 100.0 and printed["count"] == 100.0
    assert printed["prompts"] == 12 and printed["unparsable_prompts"] == 1
    assert printed["images"] == 6
    assert 0.0 <= printed["clip_score"] <= 100.0
    assert -100.0 <= printed["itc_score"] <= 100.0
    assert printed["fid"] == pytest.approx(0.0, abs=1e-3)  # the renders are their own reference
    assert printed["fid_features"] == f"itc:{model.resolve()}"
    assert json.loads(out.read_text()) == printed


def test_compositional_scores_need_no_model(generated, capsys) -> None:
    captions, images = generated
    assert _eval("--annotations", str(captions), "--images", str(images)) == 0
    printed = json.loads(capsys.readouterr().out)
    assert "clip_score" not in printed and "fid" not in printed
    assert printed["exact_match"] == 100.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c, i: (i / "sample_3.png").unlink(), "sample_3.png: image not found"),
        (lambda c, i: (i / "sample_2.png").write_text("not a png"), "sample_2.png: cannot decode"),
        (lambda c, i: c.write_text("{"), "captions.json: not valid JSON"),
        (
            lambda c, i: c.write_text(
                json.dumps({"images": [], "annotations": [{"image_id": 5, "caption": "x"}]})
            ),  # fmt: skip
            "image_id 5 is not in its images",
        ),
    ],
)
def test_bad_files_exit_2_naming_them(generated, change, message: str, capsys) -> None:
    captions, images = generated
    change(captions, images)
    assert _eval("--annotations", str(captions), "--images", str(images)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_reference_needs_features_and_images(generated, smoke_cfg, tmp_path: Path, capsys) -> None:
    captions, images = generated
    rc = _eval("--annotations", str(captions), "--images", str(images), "--reference", str(images))
    assert rc == 2
    assert "FID needs --model" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    model = tiny_vlp_dir(smoke_cfg, tmp_path / "vlp")
    args = ["--annotations", str(captions), "--images", str(images), "--model", str(model)]
    assert _eval(*args, "--reference", str(tmp_path / "empty")) == 2
    assert f"--reference {tmp_path / 'empty'}: 0 images" in capsys.readouterr().err
