"""`vlp zeroshot --task captioning|vqa`: checkpoints that write text, scored untrained."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch

from tests.checkpoints.encoder_decoder import write_tiny_vit_gpt2
from tests.checkpoints.t5 import write_tiny_t5
from tests.checkpoints.vlp import IMAGE_SIZE, TRANSFORM, tiny_vlp_dir
from vlp.cli import main
from vlp.config import Config
from vlp.data.manifest import VQA_FILE, read_pairs, read_vqa

PARAMS = str(Path(__file__).resolve().parents[1] / "params.yaml")
BASE = ["--params", PARAMS, "--profile", "smoke", "--set", "runtime.device=cpu"]


@pytest.fixture(scope="module")
def vit_gpt2(tmp_path_factory) -> Path:
    """A tiny ViT-GPT2 captioner whose cross-attention is strong enough that different
    images get different captions."""
    from transformers import VisionEncoderDecoderModel

    path = write_tiny_vit_gpt2(tmp_path_factory.mktemp("ved") / "vit-gpt2")
    model = VisionEncoderDecoderModel.from_pretrained(str(path))
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "crossattention" in name or "enc_to_dec" in name:
                weight.mul_(5.0)
    model.save_pretrained(str(path))
    return path


def _zeroshot(model: Path, data: Path, out: Path, *extra: str, sets: tuple = ()) -> dict:
    args = [*BASE, *sets, "zeroshot", "--model", str(model), "--data", str(data), "--out", str(out)]
    assert main(args + list(extra)) == 0
    return json.loads(out.read_text())


def _runs() -> list:
    """The `vlp zeroshot` runs recorded in the test's MLflow store."""
    return mlflow.search_runs(
        experiment_names=["vlp"],
        filter_string="tags.`vlp.stage` = 'zeroshot'",
        output_format="list",
    )


def _images(data: Path, paths: list[str]) -> list:
    from PIL import Image

    return [Image.open(data / p).convert("RGB") for p in paths]


def test_vit_gpt2_captions_as_transformers_generate_does(
    smoke_data: Path, vit_gpt2: Path, tmp_path: Path, workdir: Path
) -> None:
    from transformers import AutoTokenizer, VisionEncoderDecoderModel, ViTImageProcessor

    from vlp.metrics.caption import score_captions

    pairs = read_pairs(smoke_data, "test")
    images = pairs.drop_duplicates("image_id")
    ref = VisionEncoderDecoderModel.from_pretrained(str(vit_gpt2)).eval()
    tok = AutoTokenizer.from_pretrained(str(vit_gpt2))
    pixels = ViTImageProcessor.from_pretrained(str(vit_gpt2))(
        _images(smoke_data, list(images["image_path"])), return_tensors="pt"
    )["pixel_values"]
    with torch.no_grad():
        out = ref.generate(pixels, num_beams=3, max_new_tokens=6, do_sample=False)
    captions = [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]
    assert len(set(captions)) > 1, "every image got one caption: the check would be vacuous"
    refs = {int(i): list(g) for i, g in pairs.groupby("image_id")["caption"]}
    want = score_captions(dict(zip(images["image_id"].astype(int), captions, strict=True)), refs)

    settings = [
        "--set",
        "finetune.captioning.beam_size=3",
        "--set",
        "finetune.captioning.max_length=6",
    ]
    args = ["--task", "captioning", "--precision", "fp32", "--batch-size", "5"]
    scores = _zeroshot(vit_gpt2, smoke_data, tmp_path / "s.json", *args, sets=tuple(settings))
    assert scores["n_images"] == len(images)
    for key, value in want.items():
        assert scores[key] == pytest.approx(value, abs=1e-9), key
    (run,) = _runs()
    params = run.data.params
    assert (params["mode"], params["beam_size"], params["max_length"]) == ("captioning", "3", "6")
    assert params["checkpoint"] == "vision-encoder-decoder"
    assert run.data.metrics["CIDEr"] == pytest.approx(scores["CIDEr"])


def test_generated_answers_are_scored_against_their_own_questions(
    smoke_cfg: Config, smoke_data: Path, vit_gpt2: Path, tmp_path: Path, workdir: Path
) -> None:
    from vlp.metrics.vqa import vqa_accuracy
    from vlp.models.family import load_model

    # the answers the checkpoint writes, question by question, as `vlp zeroshot` batches them
    frame = read_vqa(smoke_data, "test")
    loaded = load_model(vit_gpt2)
    model = loaded.model.eval()
    length = 3  # the tiny GPT-2 has 40 positions, and the longest question takes 36
    written: list[str] = []
    for start in range(0, len(frame), 4):
        rows = frame.iloc[start : start + 4]
        enc = model.tokenize([str(q) for q in rows["question"]])
        pixels = loaded.transform.pixels(_images(smoke_data, list(rows["image_path"])))
        written += model.generate_answers(pixels, enc["input_ids"], enc["attention_mask"], length)
    assert any(written), "every answer is empty: the check would be vacuous"

    # a copy of the data whose first half of test questions is answered by what it writes
    data = tmp_path / "data"
    shutil.copytree(smoke_data, data)
    table = pd.read_parquet(data / VQA_FILE)
    half = {
        int(q): a
        for q, a in list(zip(frame["question_id"], written, strict=True))[: len(frame) // 2]
    }
    right = table["question_id"].isin(list(half))
    table.loc[right, "answers"] = pd.Series(
        [[half[int(q)]] * 10 for q in table.loc[right, "question_id"]],
        index=table.index[right],
        dtype=object,
    )
    table.to_parquet(data / VQA_FILE)

    scores = _zeroshot(
        vit_gpt2,
        data,
        tmp_path / "v.json",
        "--task",
        "vqa",
        "--batch-size",
        "4",
        "--precision",
        "fp32",
        sets=("--set", f"zeroshot.answer_max_length={length}"),
    )
    truth = {int(q): list(a) for q, a in zip(frame["question_id"], frame["answers"], strict=True)}
    truth.update({q: [a] * 10 for q, a in half.items()})
    predicted = dict(zip((int(q) for q in frame["question_id"]), written, strict=True))
    want = vqa_accuracy(predicted, truth, protocol=smoke_cfg.evaluate.vqa_protocol)
    assert want["overall"] > 0
    assert scores["overall"] == pytest.approx(want["overall"], abs=1e-9)


def test_a_trained_t5_task_model_decodes_with_its_own_settings(
    smoke_cfg: Config, smoke_data: Path, tmp_path: Path, workdir: Path
) -> None:
    from vlp.models.family import build_from_params

    cfg = dataclasses.replace(
        smoke_cfg.model, family="t5", init_from=str(write_tiny_t5(tmp_path / "t5"))
    )
    torch.manual_seed(0)
    model = build_from_params(cfg, None, 0.07)
    info = {
        "task": "captioning",
        "image_size": IMAGE_SIZE,
        "image_transform": TRANSFORM,
        "beam_size": 2,
        "max_length": 4,
    }
    model.save_pretrained(tmp_path / "captioner", {"task.json": info})
    scores = _zeroshot(
        tmp_path / "captioner", smoke_data, tmp_path / "c.json", "--task", "captioning"
    )
    assert {"Bleu_4", "CIDEr", "ROUGE_L"} <= set(scores)
    answers = _zeroshot(tmp_path / "captioner", smoke_data, tmp_path / "a.json", "--task", "vqa")
    assert 0.0 <= answers["overall"] <= 100.0 and any(k.startswith("type_") for k in answers)
    runs = _runs()
    params = {r.data.params["mode"]: r.data.params for r in runs}
    assert (params["captioning"]["beam_size"], params["captioning"]["max_length"]) == ("2", "4")
    assert params["vqa"]["answer_max_length"] == str(smoke_cfg.zeroshot.answer_max_length)


@pytest.mark.parametrize(
    ("model", "task", "message"),
    [
        ("t5", "captioning", "is a T5 text model: its image tower is built from the model params"),
        (
            "vit-gpt2",
            "retrieval",
            "no contrastive embeddings for retrieval; vlp zeroshot measures it on captioning, vqa",
        ),
        ("vit-gpt2", "classification", "no contrastive embeddings for classification"),
        (
            "vlp",
            "captioning",
            "does not measure it on captioning; vlp zeroshot measures it on "
            "retrieval, classification",
        ),
        ("vit-gpt2", "nosuch", "--task: 'nosuch' is not one of retrieval, classification"),
    ],
)
def test_what_a_model_cannot_do_is_a_one_line_error(
    smoke_cfg: Config,
    smoke_data: Path,
    vit_gpt2: Path,
    tmp_path: Path,
    workdir: Path,
    capsys,
    model: str,
    task: str,
    message: str,
) -> None:
    dirs = {
        "t5": lambda: write_tiny_t5(tmp_path / "t5"),
        "vit-gpt2": lambda: vit_gpt2,
        "vlp": lambda: tiny_vlp_dir(smoke_cfg, tmp_path / "vlp"),
    }
    path = dirs[model]()
    capsys.readouterr()  # what writing the checkpoint printed
    args = [*BASE, "zeroshot", "--model", str(path), "--data", str(smoke_data), "--task", task]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
