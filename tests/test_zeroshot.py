"""`vlp zeroshot`: retrieval and classification of any checkpoint, untrained, recorded in MLflow."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from torch.nn import functional as F

from tests.checkpoints.blip import make_blip_checkpoint
from tests.checkpoints.clip import write_tiny_clip
from tests.checkpoints.vlp import TRANSFORM, tiny_vlp_dir
from vlp.cli import main
from vlp.config import Config
from vlp.data.manifest import read_pairs
from vlp.metrics.retrieval import recall_at_k

PARAMS = str(Path(__file__).resolve().parents[1] / "params.yaml")
RECALL_KEYS = set(recall_at_k(torch.eye(2).repeat_interleave(5, dim=1)))  # `vlp eval retrieval`


def _zeroshot(model: Path, data: Path, out: Path, *extra: str) -> dict:
    args = ["--params", PARAMS, "--profile", "smoke", "--set", "runtime.device=cpu"]
    rc = main(
        [*args, "zeroshot", "--model", str(model), "--data", str(data), "--out", str(out)]
        + list(extra)
    )
    assert rc == 0
    return json.loads(out.read_text())


def _images(data: Path, paths: list[str]) -> list:
    from PIL import Image

    return [Image.open(data / p).convert("RGB") for p in paths]


def _split(data: Path, split: str = "test") -> tuple[list[str], list[str], torch.Tensor]:
    """(image paths, captions, text -> image row) of a split."""
    pairs = read_pairs(data, split)
    images = pairs.drop_duplicates("image_id")
    row = {i: n for n, i in enumerate(images["image_id"])}
    return (
        list(images["image_path"]),
        list(pairs["caption"]),
        torch.tensor([row[i] for i in pairs["image_id"]]),
    )


@pytest.mark.slow  # several zero-shot runs
def test_task_model_scores_as_vlp_evaluate_does_and_the_run_is_recorded(
    smoke_cfg: Config, smoke_data: Path, tmp_path: Path, workdir: Path
) -> None:
    from vlp.tasks import model_sha256
    from vlp.tasks.predictor import load_predictor
    from vlp.tasks.retrieval.task import evaluate

    model_dir = tiny_vlp_dir(smoke_cfg, tmp_path / "retrieval", rerank_k=3)
    scores = _zeroshot(model_dir, smoke_data, tmp_path / "s.json", "--precision", "fp32")
    cfg = dataclasses.replace(
        smoke_cfg, evaluate=dataclasses.replace(smoke_cfg.evaluate, split="test")
    )
    want = evaluate(cfg, load_predictor(model_dir), smoke_data).metrics
    assert RECALL_KEYS <= set(scores) and scores["rerank_k"] == 3
    for key, value in want.items():
        assert scores[key] == pytest.approx(value, abs=1e-6), key

    itc = _zeroshot(
        model_dir, smoke_data, tmp_path / "itc.json", "--rerank-k", "0", "--precision", "fp32"
    )
    assert itc["rerank_k"] == 0
    for key in RECALL_KEYS:
        if "R@" in key or key == "rsum":
            assert itc[key] == pytest.approx(want[f"itc_{key}"], abs=1e-6), key

    runs = mlflow.search_runs(
        experiment_names=["vlp"],
        filter_string="tags.`vlp.stage` = 'zeroshot'",
        output_format="list",
    )
    assert len(runs) == 2
    first = min(runs, key=lambda r: r.info.start_time)
    assert first.data.params["model_sha256"] == model_sha256(model_dir)
    assert first.data.params["model"] == str(model_dir)
    assert first.data.params["data"] == str(smoke_data)
    assert (first.data.params["split"], first.data.params["precision"]) == ("test", "fp32")
    assert first.data.metrics["rsum"] == pytest.approx(scores["rsum"])
    assert first.data.metrics["i2t_R_at_1"] == pytest.approx(scores["i2t_R@1"])


def test_clip_dir_ranks_by_its_own_features(
    smoke_data: Path, tmp_path: Path, workdir: Path
) -> None:
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    clip_dir = write_tiny_clip(tmp_path / "clip")
    scores = _zeroshot(clip_dir, smoke_data, tmp_path / "s.json", "--precision", "fp32")
    model = CLIPModel.from_pretrained(clip_dir).eval()
    tok = AutoTokenizer.from_pretrained(clip_dir)
    proc = AutoImageProcessor.from_pretrained(clip_dir)
    paths, captions, text_to_image = _split(smoke_data)
    with torch.no_grad():
        pixels = proc(images=_images(smoke_data, paths), return_tensors="pt")
        img = F.normalize(model.get_image_features(**pixels).pooler_output, dim=-1)
        enc = tok(captions, padding=True, truncation=True, max_length=40, return_tensors="pt")
        txt = F.normalize(model.get_text_features(**enc).pooler_output, dim=-1)
    want = recall_at_k(img @ txt.T, text_to_image)
    assert scores["rerank_k"] == 0  # no ITM head
    assert {k: scores[k] for k in want} == pytest.approx(want)


@pytest.mark.slow  # several zero-shot runs
def test_blip_retrieval_dir_ranks_by_itc_and_reranks_with_its_itm_head(
    smoke_data: Path, tmp_path: Path, workdir: Path
) -> None:
    from transformers import AutoImageProcessor, AutoTokenizer, BlipForImageTextRetrieval

    blip_dir = make_blip_checkpoint(tmp_path / "blip")
    itc = _zeroshot(
        blip_dir, smoke_data, tmp_path / "itc.json", "--precision", "fp32", "--rerank-k", "0"
    )
    hf = BlipForImageTextRetrieval.from_pretrained(blip_dir).eval()
    tok = AutoTokenizer.from_pretrained(blip_dir)
    proc = AutoImageProcessor.from_pretrained(blip_dir)
    paths, captions, text_to_image = _split(smoke_data)
    with torch.no_grad():
        pixels = proc(images=_images(smoke_data, paths), return_tensors="pt")["pixel_values"]
        enc = tok(captions, padding=True, return_tensors="pt")
        # transformers' own ITC: cosine of every image with every text
        sim = torch.cat(
            [
                hf(
                    input_ids=enc["input_ids"],
                    attention_mask=enc["attention_mask"],
                    pixel_values=pixels[i : i + 1],
                    use_itm_head=False,
                ).itm_score
                for i in range(len(paths))
            ]
        )
    want = recall_at_k(sim, text_to_image)
    assert {k: itc[k] for k in want} == pytest.approx(want)

    reranked = _zeroshot(
        blip_dir, smoke_data, tmp_path / "r.json", "--precision", "fp32", "--rerank-k", "3"
    )
    assert reranked["rerank_k"] == 3
    for key in ("rsum", "i2t_R@1", "t2i_R@1"):
        assert reranked[f"itc_{key}"] == pytest.approx(itc[key])


def _reference_accuracy(
    model_dir: Path, data: Path, paths: list[str], labels: list[str], templates: list[str]
) -> tuple[float, list[str]]:
    """Top-1 accuracy (%) of CLIP's zero-shot recipe, computed here from the model's encoders."""
    from vlp.data.images import ImageTransform
    from vlp.models.vlp_model import VLPModel

    model = VLPModel.from_pretrained(model_dir).eval()
    classes = sorted(set(labels))
    transform = ImageTransform.from_dict({**TRANSFORM, "size": 32})
    with torch.no_grad():
        img = model.encode_image(transform.pixels(_images(data, paths)))[1]
        weights = []
        for c in classes:
            enc = model.tokenize([t.format(c) for t in templates])
            feats = model.encode_text(enc["input_ids"], enc["attention_mask"])[1]
            weights.append(F.normalize(feats.mean(dim=0), dim=-1))
        pred = (img @ torch.stack(weights).T).argmax(dim=1)
    return 100.0 * sum(classes[p] == y for p, y in zip(pred.tolist(), labels, strict=True)) / len(
        labels
    ), classes


@pytest.fixture(scope="module")
def shapes60(smoke_cfg: Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shapes dataset with 60 test images (about 12 single-object scenes)."""
    from vlp.data.shapes import generate_dataset

    data = dataclasses.replace(smoke_cfg.data, n_pretrain=0, n_train=0, n_val=0, n_test=60)
    return generate_dataset(data, tmp_path_factory.mktemp("shapes60") / "shapes")


@pytest.mark.slow  # several zero-shot runs
def test_classification_of_single_shapes_from_every_label_source(
    smoke_cfg: Config, shapes60: Path, tmp_path: Path, workdir: Path
) -> None:
    from vlp.data.shapes import single_shape_labels

    model_dir = tiny_vlp_dir(smoke_cfg, tmp_path / "vlp", seed=3)
    templates = ["a {}.", "there is a {} here."]
    (tmp_path / "templates.txt").write_text("\n".join(templates) + "\n")
    common = ["--classify", "--precision", "fp32", "--templates", str(tmp_path / "templates.txt")]
    by_shapes = _zeroshot(model_dir, shapes60, tmp_path / "a.json", *common, "--labels", "shapes")

    labelled = single_shape_labels(read_pairs(shapes60, "test"))
    paths, labels = list(labelled["image_path"]), list(labelled["label"])
    assert len(paths) >= 8
    want, classes = _reference_accuracy(model_dir, shapes60, paths, labels, templates)
    assert by_shapes["top1_accuracy"] == pytest.approx(want)
    assert by_shapes["n_images"] == len(paths) and by_shapes["n_classes"] == len(classes)
    assert by_shapes["top1_accuracy"] <= by_shapes["top5_accuracy"]
    if len(classes) <= 5:
        assert by_shapes["top5_accuracy"] == 100.0

    # the same images as a labels table, and as an image-folder tree
    labelled[["image_id", "label"]].to_csv(tmp_path / "labels.csv", index=False)
    by_table = _zeroshot(
        model_dir, shapes60, tmp_path / "b.json", *common, "--labels", str(tmp_path / "labels.csv")
    )
    tree = tmp_path / "tree"
    for path, label in zip(paths, labels, strict=True):
        (tree / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(shapes60 / path, tree / label / Path(path).name)
    by_folder = _zeroshot(model_dir, tree, tmp_path / "c.json", *common)
    assert by_table == by_shapes == by_folder


def test_classes_file_adds_distractor_classes(
    smoke_cfg: Config, shapes60: Path, tmp_path: Path, workdir: Path
) -> None:
    model_dir = tiny_vlp_dir(smoke_cfg, tmp_path / "vlp")
    names = ["circle", "square", "triangle", "diamond", "cross", "star", "heart"]
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    out = _zeroshot(
        model_dir,
        shapes60,
        tmp_path / "a.json",
        "--classify",
        "--labels",
        "shapes",
        "--classes",
        str(tmp_path / "classes.txt"),
    )
    assert out["n_classes"] == 7 and out["chance_top1"] == pytest.approx(100 / 7)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--classify"], "pass --labels"),
        (["--labels", "shapes"], "need --classify"),
        (["--classify", "--labels", "shapes", "--templates", "TEMPLATES"], "must hold '{}'"),
        (
            ["--classify", "--labels", "shapes", "--classes", "CLASSES"],
            "is not one of the 2 classes",
        ),
        (["--split", "nosuch"], "unknown split"),
    ],
)
def test_bad_requests_are_one_line_errors(
    smoke_cfg: Config,
    smoke_data: Path,
    tmp_path: Path,
    workdir: Path,
    capsys,
    extra: list[str],
    message: str,
) -> None:
    model_dir = tiny_vlp_dir(smoke_cfg, tmp_path / "vlp")
    (tmp_path / "t.txt").write_text("a photo of a thing\n")
    (tmp_path / "c.txt").write_text("red\nblue\n")
    extra = [
        {"TEMPLATES": str(tmp_path / "t.txt"), "CLASSES": str(tmp_path / "c.txt")}.get(a, a)
        for a in extra
    ]
    args = [
        "--params",
        PARAMS,
        "--profile",
        "smoke",
        "zeroshot",
        "--model",
        str(model_dir),
        "--data",
        str(smoke_data),
    ]
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_model_without_contrastive_embeddings_is_a_one_line_error(
    smoke_data: Path, tmp_path: Path, workdir: Path, capsys
) -> None:
    from tests.checkpoints.encoder_decoder import write_tiny_vit_gpt2

    model_dir = write_tiny_vit_gpt2(tmp_path / "vit-gpt2")
    capsys.readouterr()  # what writing the checkpoint printed
    args = ["--params", PARAMS, "--profile", "smoke", "zeroshot", "--model", str(model_dir)]
    assert main([*args, "--data", str(smoke_data)]) == 2
    err = capsys.readouterr().err
    assert "of the encoder-decoder family" in err and "no contrastive embeddings" in err
    assert err.count("\n") == 1
