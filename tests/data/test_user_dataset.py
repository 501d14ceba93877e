"""`dvc repro` on a user's imported dataset, versioned as docs/reference.md (Data) says.

A real-format dataset (COCO captions, VQA v2; JPEGs and PNGs of mixed modes, sizes and
aspect ratios) is imported with its images inside the dataset, tracked with `dvc add`
under hardlink caching, and the whole pipeline runs on it at smoke sizes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.mlflow_helpers import empty_store  # noqa: F401
from vlp.cli import main
from vlp.config import write_variant_params

pytestmark = pytest.mark.slow  # the whole pipeline through `dvc repro` in subprocesses

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SPLITS = {"pretrain": 16, "train": 8, "test": 6}  # images per split
# (format, mode, size): every mode and aspect ratio the pipeline must read unchanged
LOOKS = [
    ("JPEG", "RGB", (40, 24)),
    ("PNG", "RGBA", (24, 56)),
    ("JPEG", "L", (32, 32)),
    ("PNG", "1", (90, 20)),
    ("PNG", "L", (20, 70)),
    ("PNG", "RGB", (48, 36)),
    ("PNG", "P", (17, 17)),
]
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")


def _dvc(repo: Path, *args: str, timeout: int = 300) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VLP_", "DVC_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(
        [str(BIN / "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=repo, check=True
    )


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _image(path: Path, index: int) -> None:
    fmt, mode, size = LOOKS[index % len(LOOKS)]
    rng = np.random.default_rng(index)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(pixels, "RGB")
    img = img.convert("P", palette=Image.Palette.ADAPTIVE) if mode == "P" else img.convert(mode)
    img.save(path, format=fmt)


def _make_dataset(images: Path, src: Path) -> list[Path]:
    """Images in `images` and COCO/VQA JSON files in `src`; returns the JSON files."""
    images.mkdir(parents=True)
    src.mkdir(parents=True)
    files, image_id, questions, annotations = [], 1, [], []
    for split, n in SPLITS.items():
        doc: dict = {"images": [], "annotations": []}
        for _ in range(n):
            fmt = LOOKS[image_id % len(LOOKS)][0]
            name = f"photo_{image_id:06d}.{'jpg' if fmt == 'JPEG' else 'png'}"
            _image(images / name, image_id)
            doc["images"].append({"id": image_id, "file_name": name})
            color = COLORS[image_id % len(COLORS)]
            for k in range(5):
                doc["annotations"].append(
                    {"id": image_id * 10 + k, "image_id": image_id,
                     "caption": f"photo {image_id} of a {color} scene, take {k}"}
                )  # fmt: skip
            if split != "pretrain":
                for k, (q, a, kind) in enumerate(
                    [(f"is it {color}?", "yes", "yes/no"), ("what colour is it?", color, "other")]
                ):
                    qid = image_id * 10 + k
                    questions.append({"question_id": qid, "image_id": image_id, "question": q})
                    annotations.append(
                        {"question_id": qid, "image_id": image_id, "question_type": q.split()[0],
                         "answer_type": kind, "multiple_choice_answer": a,
                         "answers": [{"answer": a, "answer_id": j + 1} for j in range(10)]}
                    )  # fmt: skip
            image_id += 1
        files.append(src / f"captions_{split}.json")
        files[-1].write_text(json.dumps(doc))
    (src / "questions.json").write_text(json.dumps({"questions": questions}))
    (src / "answers.json").write_text(json.dumps({"annotations": annotations}))
    return files


def _cache_file(repo: Path, path: Path) -> Path:
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    return repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]


def _changed_stages(repo: Path) -> dict[str, list]:
    return json.loads(_dvc(repo, "status", "--json"))


def test_dvc_repro_runs_on_an_imported_dataset_and_never_writes_into_it(
    tmp_path,
    empty_store,  # noqa: F811
    monkeypatch,
):
    repo = tmp_path / "work" / "repo"
    repo.mkdir(parents=True)
    _git(repo, "init", "-q")
    _dvc(repo, "init", "-q")
    shutil.copy(REPO / ".dvc" / "config", repo / ".dvc" / "config")
    for name in (".gitignore", "dvc.yaml", "profiles.yaml"):
        shutil.copy(REPO / name, repo / name)
    shutil.copytree(REPO / "vlp", repo / "vlp", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(empty_store, repo / "mlflow.db")
    write_variant_params(
        REPO / "params.yaml", repo / "params.yaml", "smoke", ["data.root=data/coco"]
    )

    # The documented layout: the image folder lies inside the dataset, imported in place.
    data = repo / "data" / "coco"
    photos = data / "images" / "photos"
    captions = _make_dataset(photos, tmp_path / "downloads")
    images_before = _digests(photos)
    src = tmp_path / "downloads"
    monkeypatch.chdir(repo)
    into = ["--images", "data/coco/images/photos", "--out", "data/coco"]
    for split, ann in zip(SPLITS, captions, strict=True):
        assert main(["import", "coco", "--annotations", str(ann), "--split", split, *into]) == 0
    questions = ["--questions", str(src / "questions.json")]
    assert (
        main(["import", "vqa", *questions, "--annotations", str(src / "answers.json"), *into]) == 0
    )
    assert not (data / "image_folders.json").exists()  # nothing linked from elsewhere

    _dvc(repo, "config", "cache.type", "hardlink,symlink")
    _dvc(repo, "add", "data/coco")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "the coco dataset and the pipeline")
    tracked = yaml.safe_load((repo / "data" / "coco.dvc").read_text())["outs"][0]
    assert tracked["nfiles"] == sum(SPLITS.values()) + 2  # every image and both manifests
    for image in photos.iterdir():  # the cache holds the bytes once: the same inode
        assert image.stat().st_ino == _cache_file(repo, image).stat().st_ino
    dataset_before = _digests(data)

    out = _dvc(repo, "repro", timeout=3000)
    assert "Running stage 'evaluate@vqa'" in out and "Running stage 'promote'" in out

    assert _digests(photos) == images_before  # byte-identical, every image
    assert _digests(data) == dataset_before  # and nothing written into the dataset
    summary = json.loads((repo / "reports" / "validation" / "summary.json").read_text())
    assert summary["data_dir"] == "data/coco" and summary["success"]
    assert summary["manifests"]["pairs.parquet"]["images"] == sum(SPLITS.values())
    for metrics in ("pretrain", "retrieval", "captioning", "vqa", "generation"):
        assert json.loads((repo / "metrics" / f"{metrics}.json").read_text())
    # photos' captions are no shapes scenes: generation is gated by its ITC score
    generation = json.loads((repo / "metrics" / "generation.json").read_text())
    assert "exact_match" not in generation["pretrained"]
    assert generation["itc_score"] == generation["pretrained"]["itc_score"]
    for report in ("registered", "promotion"):
        assert json.loads((repo / "reports" / "registry" / f"{report}.json").read_text())
    assert _changed_stages(repo) == {}

    # `dvc push`/`pull` carry the images.
    _dvc(repo, "push")
    shutil.rmtree(data)
    shutil.rmtree(repo / ".dvc" / "cache")
    _dvc(repo, "pull")
    assert _digests(data) == dataset_before

    # A changed image changes the dataset's hash and every stage that reads it.
    changed = sorted(photos.iterdir())[-1]
    changed.unlink()  # cached files are read-only links: replace, do not edit in place
    Image.new("RGB", (30, 30), (9, 9, 9)).save(changed, format="PNG")
    assert "data/coco.dvc" in _changed_stages(repo)
    _dvc(repo, "add", "data/coco")
    status = _changed_stages(repo)
    stale = {
        name
        for name, changes in status.items()
        if any(c.get("changed deps", {}).get("data/coco") == "modified" for c in changes)
    }
    assert stale == {
        "validate", "pretrain-vision", "pretrain", "probe", *(f"finetune@{t}-{i}" for t in ("retrieval", "captioning", "vqa", "generation")
                                  for i in ("pretrained", "scratch")),
        *(f"evaluate@{t}" for t in ("retrieval", "captioning", "vqa", "generation")),
    }  # fmt: skip
