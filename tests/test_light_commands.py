"""The light commands stay light: `vlp eval` and `vlp validate` load neither torch, MLflow
nor transformers, and `vlp eval` runs outside a project (no params.yaml in reach).

Each command runs in a fresh interpreter, in an empty folder, through `vlp.cli.main`; the
interpreter then reports which heavy libraries it has loaded.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vlp.data import shapes

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "mlflow", "transformers")

# argv[1:] are the command's words; the last stderr line says what was loaded
_RUN = f"""
import json, sys
from vlp.cli import main
status = main(sys.argv[1:])
loaded = [m for m in {HEAVY!r} if m in sys.modules]
print(json.dumps({{"status": status, "loaded": loaded}}), file=sys.stderr)
"""


def _vlp(cwd: Path, *words: str) -> tuple[dict, str]:
    """(status and heavy libraries loaded, stdout) of `vlp WORDS` run in `cwd`."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", _RUN, *words], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stderr.strip().splitlines()[-1]), done.stdout


def _write(path: Path, obj: object) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """An empty folder: no params.yaml, no profiles.yaml."""
    (tmp_path / "elsewhere").mkdir()
    return tmp_path / "elsewhere"


def test_eval_retrieval(outside: Path, tmp_path: Path) -> None:
    sim = np.zeros((10, 50), dtype=np.float32)
    sim[np.arange(50) // 5, np.arange(50)] = 1.0  # text j belongs to image j // 5
    np.save(tmp_path / "sim.npy", sim)
    report, out = _vlp(outside, "eval", "retrieval", "--similarity", str(tmp_path / "sim.npy"))
    assert report == {"status": 0, "loaded": []}
    assert json.loads(out)["t2i_R@1"] == 100.0


def test_eval_captions(outside: Path, tmp_path: Path) -> None:
    ann = {"annotations": [{"image_id": 1, "id": 1, "caption": "A red car on a road."}]}
    res = [{"image_id": 1, "caption": "a red car on a road"}]
    report, out = _vlp(
        outside,
        "eval", "captions",
        "--results", _write(tmp_path / "res.json", res),
        "--annotations", _write(tmp_path / "ann.json", ann),
    )  # fmt: skip
    assert report == {"status": 0, "loaded": []}
    assert json.loads(out)["Bleu_1"] == pytest.approx(1.0)


def test_eval_vqa(outside: Path, tmp_path: Path) -> None:
    questions = {"questions": [{"question_id": 7, "image_id": 1, "question": "What color?"}]}
    annotations = {
        "annotations": [
            {
                "question_id": 7,
                "image_id": 1,
                "answer_type": "other",
                "question_type": "what color",
                "answers": [{"answer": "red", "answer_id": i + 1} for i in range(10)],
            }
        ]
    }
    report, out = _vlp(
        outside,
        "eval", "vqa",
        "--results", _write(tmp_path / "res.json", [{"question_id": 7, "answer": "red"}]),
        "--questions", _write(tmp_path / "q.json", questions),
        "--annotations", _write(tmp_path / "a.json", annotations),
    )  # fmt: skip
    assert report == {"status": 0, "loaded": []}
    assert json.loads(out)["overall"] == 100.0


def test_eval_generation_without_a_model(outside: Path, tmp_path: Path) -> None:
    rng = random.Random(0)
    (tmp_path / "images").mkdir()
    images, annotations = [], []
    for image_id in range(3):
        scene = shapes.sample_scene(rng)
        shapes.render_scene(scene, 48).save(tmp_path / "images" / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png"})
        caption = shapes.scene_captions(scene, rng, 1)[0]
        annotations.append({"id": image_id, "image_id": image_id, "caption": caption})
    captions = _write(tmp_path / "captions.json", {"images": images, "annotations": annotations})
    report, out = _vlp(
        outside,
        "eval",
        "generation",
        "--annotations",
        captions,
        "--images",
        str(tmp_path / "images"),
    )
    assert report == {"status": 0, "loaded": []}
    assert json.loads(out)["exact_match"] == 100.0


def test_validate(smoke_data: Path, outside: Path, tmp_path: Path) -> None:
    report, out = _vlp(
        outside,
        "--params", str(REPO / "params.yaml"),
        "--profile", "smoke",
        "--set", f"data.root={smoke_data}",
        "--set", f"validate.report_dir={tmp_path / 'reports'}",
        "validate",
    )  # fmt: skip
    assert report == {"status": 0, "loaded": []}
    assert "expectations passed" in out
    assert json.loads((tmp_path / "reports" / "summary.json").read_text())["success"] is True
