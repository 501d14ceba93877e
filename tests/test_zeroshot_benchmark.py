"""Zero-shot classification as published: CLIP's 80 ImageNet prompts by name, class names
from a file, an image-folder tree, and results in CLIP_benchmark's JSON layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from sklearn.metrics import balanced_accuracy_score
from torch.nn import functional as F

from tests.checkpoints.clip import write_tiny_clip
from vlp.cli import main
from vlp.data.manifest import read_pairs
from vlp.inference import load_inference
from vlp.prompts import template_set, template_set_names
from vlp.zeroshot import class_embeddings

PARAMS = str(Path(__file__).resolve().parents[1] / "params.yaml")
CLASSES = ["red", "green", "blue"]


def _zeroshot(*args: str) -> int:
    base = ["--params", PARAMS, "--profile", "smoke", "--set", "runtime.device=cpu"]
    return main([*base, *args])


def _tree(smoke_data: Path, root: Path) -> tuple[list[Path], list[str]]:
    """An image-folder tree root/<class>/<image> of 12 images, 4 per class."""
    paths = list(dict.fromkeys(read_pairs(smoke_data)["image_path"]))[:12]
    files, labels = [], []
    for n, rel in enumerate(paths):
        label = CLASSES[n % 3]
        (root / label).mkdir(parents=True, exist_ok=True)
        files.append(Path(shutil.copy(smoke_data / rel, root / label / Path(rel).name)))
        labels.append(label)
    return files, labels


def _reference(clip_dir: Path, files: list[Path], labels: list[str], templates: list[str]):
    """(predicted class names, class embeddings) by CLIP's recipe, from transformers'
    CLIPModel itself."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(clip_dir).eval()
    tok, proc = (
        AutoTokenizer.from_pretrained(clip_dir),
        AutoImageProcessor.from_pretrained(clip_dir),
    )
    classes = sorted(set(labels))
    with torch.no_grad():
        pixels = proc(images=[Image.open(f).convert("RGB") for f in files], return_tensors="pt")
        img = F.normalize(model.get_image_features(**pixels).pooler_output, dim=-1)
        weights = []
        for c in classes:
            enc = tok([t.format(c) for t in templates], padding=True, return_tensors="pt")
            feats = F.normalize(model.get_text_features(**enc).pooler_output, dim=-1)
            weights.append(F.normalize(feats.mean(dim=0), dim=-1))
        pred = (img @ torch.stack(weights).T).argmax(dim=1)
    return [classes[p] for p in pred.tolist()], torch.stack(weights)


def test_the_80_imagenet_prompts_are_a_named_set() -> None:
    assert "openai_imagenet" in template_set_names()
    prompts = template_set("openai_imagenet", "--templates")
    assert len(prompts) == len(set(prompts)) == 80
    assert all(p.count("{}") == 1 for p in prompts)
    assert (prompts[0], prompts[-1]) == ("a bad photo of a {}.", "a tattoo of the {}.")


def test_named_prompts_and_class_file_on_a_folder_tree_in_clip_benchmarks_layout(
    smoke_cfg, smoke_data: Path, tmp_path: Path, workdir: Path
) -> None:
    clip_dir = write_tiny_clip(tmp_path / "clip")
    files, labels = _tree(smoke_data, tmp_path / "colours")
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    bench, out = tmp_path / "bench.json", tmp_path / "scores.json"
    args = ["zeroshot", "--model", str(clip_dir), "--data", str(tmp_path / "colours")]
    args += [
        "--classify",
        "--templates",
        "openai_imagenet",
        "--classes",
        str(tmp_path / "classes.txt"),
    ]
    assert _zeroshot(*args, "--out", str(out), "--clip-benchmark", str(bench)) == 0
    scores = json.loads(out.read_text())
    assert (scores["n_templates"], scores["n_classes"], scores["n_images"]) == (80, 3, 12)

    prompts = template_set("openai_imagenet", "t")
    pred, weights = _reference(clip_dir, files, labels, prompts)
    run = load_inference(smoke_cfg, clip_dir, "fp32", None)
    torch.testing.assert_close(class_embeddings(run, sorted(CLASSES), prompts), weights)
    top1 = 100.0 * sum(p == y for p, y in zip(pred, labels, strict=True)) / len(labels)
    assert scores["top1_accuracy"] == pytest.approx(top1)
    balanced = balanced_accuracy_score(labels, pred)
    assert scores["mean_per_class_recall"] == pytest.approx(100.0 * balanced)

    record = json.loads(bench.read_text())
    assert record == {
        "dataset": "colours",
        "model": "clip",
        "pretrained": str(clip_dir),
        "task": "zeroshot_classification",
        "metrics": {
            "acc1": pytest.approx(top1 / 100),
            "acc5": None,  # fewer than 5 classes, as CLIP_benchmark writes it
            "mean_per_class_recall": pytest.approx(balanced),
        },
        "language": "en",
    }

    # the same set named in params
    again = tmp_path / "again.json"
    params_set = ["--set", "zeroshot.templates=openai_imagenet"]
    rc = main(
        ["--params", PARAMS, "--profile", "smoke", "--set", "runtime.device=cpu", *params_set]
        + args[:5]
        + ["--classify", "--classes", str(tmp_path / "classes.txt"), "--out", str(again)]
    )
    assert rc == 0 and json.loads(again.read_text()) == scores


def test_retrieval_in_clip_benchmarks_layout(
    smoke_data: Path, tmp_path: Path, workdir: Path
) -> None:
    clip_dir = write_tiny_clip(tmp_path / "clip")
    bench, out = tmp_path / "bench.json", tmp_path / "scores.json"
    args = ["zeroshot", "--model", str(clip_dir), "--data", str(smoke_data)]
    assert _zeroshot(*args, "--out", str(out), "--clip-benchmark", str(bench)) == 0
    scores, record = json.loads(out.read_text()), json.loads(bench.read_text())
    assert record["task"] == "zeroshot_retrieval"
    for k in (1, 5, 10):
        assert record["metrics"][f"image_retrieval_recall@{k}"] == scores[f"t2i_R@{k}"] / 100
        assert record["metrics"][f"text_retrieval_recall@{k}"] == scores[f"i2t_R@{k}"] / 100


def test_an_unknown_set_is_a_one_line_error_naming_the_sets(
    smoke_data: Path, tmp_path: Path, workdir: Path, capsys: pytest.CaptureFixture
) -> None:
    clip_dir = write_tiny_clip(tmp_path / "clip")
    args = ["zeroshot", "--model", str(clip_dir), "--data", str(smoke_data)]
    rc = _zeroshot(*args, "--classify", "--labels", "shapes", "--templates", "imagenet_81")
    assert rc == 2
    err = capsys.readouterr().err
    assert "--templates: 'imagenet_81' is not a template file or one of the named sets" in err
    assert "openai_imagenet" in err
