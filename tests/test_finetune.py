"""Finetune + evaluate each task end to end on the smoke profile: models, files, MLflow runs."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.mlflow_helpers import empty_store  # noqa: F401
from vlp.config import Config, profile_dir
from vlp.errors import ConfigError, OutputError
from vlp.evaluate import evaluate
from vlp.finetune import base_model, finetune, is_skipped, model_dir
from vlp.tasks import model_sha256
from vlp.tasks.predictor import load_predictor

pytestmark = pytest.mark.slow  # finetuning and evaluating real models

REPO_ROOT = Path(__file__).resolve().parents[1]
# the environment that would point a stage at another store or parent run
TRACKING_ENV = ("MLFLOW_TRACKING_URI", "VLP_PARENT_RUN_ID", "VLP_PREFECT_FLOW_RUN_ID", "DVC_STAGE")
OUT = profile_dir("smoke")  # where a `--profile smoke` command writes


@pytest.fixture
def cfg(
    smoke_cfg: Config,
    smoke_data: Path,
    smoke_pretrained: Path,
    empty_store: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Config:
    """smoke_cfg writing into tmp_path, tracking into a fresh SQLite store via the env."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    for var in ("VLP_PARENT_RUN_ID", "VLP_PREFECT_FLOW_RUN_ID", "DVC_STAGE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    return dataclasses.replace(
        smoke_cfg,
        runtime=dataclasses.replace(
            smoke_cfg.runtime,
            metrics_dir=str(tmp_path / "metrics"),
            plots_dir=str(tmp_path / "plots"),
        ),
        finetune=dataclasses.replace(
            smoke_cfg.finetune, init_dir=str(smoke_pretrained), out_dir=str(tmp_path / "finetuned")
        ),
        evaluate=dataclasses.replace(
            smoke_cfg.evaluate,
            models_dir=str(tmp_path / "finetuned"),
            results_dir=str(tmp_path / "results"),
            num_examples=3,
        ),
        tracking=dataclasses.replace(
            smoke_cfg.tracking, artifact_root=str(tmp_path / "mlartifacts")
        ),
    )


def _runs(tmp_path: Path) -> dict[str, object]:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exps = [e.experiment_id for e in client.search_experiments()]
    return {r.info.run_name: r for r in client.search_runs(exps)}


def _artifacts(run_id: str, path: str) -> list[str]:
    import mlflow

    return [Path(a.path).name for a in mlflow.MlflowClient().list_artifacts(run_id, path)]


def _images(cfg: Config, n: int) -> list[Image.Image]:
    from vlp.data.manifest import read_pairs

    paths = read_pairs(cfg.data.root, "test").drop_duplicates("image_id")["image_path"][:n]
    return [Image.open(Path(cfg.data.root) / p) for p in paths]


PRIMARY = {
    "retrieval": "rsum",
    "captioning": "CIDEr",
    "vqa": "overall",
    "generation": "exact_match",
}


@pytest.mark.parametrize("task", ["retrieval", "captioning", "vqa", "generation"])
def test_finetune_and_evaluate_write_models_metrics_plots_and_runs(
    cfg: Config, task: str, tmp_path: Path
) -> None:
    for init in ("pretrained", "scratch"):
        out = finetune(cfg, task, init=init)
        assert out == model_dir(cfg, task, init)
        info = json.loads((out / "task.json").read_text())
        assert info["task"] == task and info["init"] == init
        assert info["steps"] == cfg.finetune.task(task).max_steps
        curve = list(csv.DictReader((tmp_path / "plots" / f"finetune_{task}_{init}.csv").open()))
        assert [int(r["step"]) for r in curve] == [1, 2, 3]
        assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no work dirs left

    doc = evaluate(cfg, task)
    on_disk = json.loads((tmp_path / "metrics" / f"{task}.json").read_text())
    assert on_disk == doc
    primary = PRIMARY[task]
    assert doc[primary] == doc["pretrained"][primary]
    assert doc["delta"][primary] == pytest.approx(
        doc["pretrained"][primary] - doc["scratch"][primary]
    )
    for init in ("pretrained", "scratch"):  # each score names the model it measured
        assert doc[init]["model_sha256"] == model_sha256(model_dir(cfg, task, init))
    assert "model_sha256" not in doc["delta"]

    results = json.loads((tmp_path / "results" / task / "pretrained.json").read_text())
    if task == "retrieval":
        for key in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"):
            assert 0.0 <= doc["pretrained"][key] <= 100.0
        assert doc["pretrained"]["rsum"] == pytest.approx(
            sum(
                doc["pretrained"][k]
                for k in doc["pretrained"]
                if k[:4] in ("i2t_", "t2i_") and "R@" in k
            )
        )
        assert len(results["i2t"]) == cfg.data.n_test
        assert len(results["t2i"]) == cfg.data.n_test * cfg.data.captions_per_image
        plot = list(csv.DictReader((tmp_path / "plots" / "retrieval_recall_pretrained.csv").open()))
        assert [int(r["k"]) for r in plot] == [1, 5, 10]
    elif task == "captioning":
        assert set(doc["pretrained"]) >= {"Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"}
        assert len(results) == cfg.data.n_test
        assert set(results[0]) == {"image_id", "caption"}
    elif task == "generation":
        assert set(doc["pretrained"]) >= {
            "exact_match", "exact_match_no_rerank", "rerank_gain", "itc_score",
            "frechet_distance_image_tower",
        }  # fmt: skip
        assert len(results) == cfg.evaluate.generation_prompts
        assert {"prompt", "exact", "objects", "candidate"} <= set(results[0])
        for init in ("pretrained", "scratch"):
            gallery = tmp_path / "results" / task / f"gallery_{init}.png"
            assert Image.open(gallery).format == "PNG"
    else:
        assert set(doc["pretrained"]) >= {"overall", "type_yes/no", "type_number", "type_other"}
        from vlp.data.manifest import read_vqa

        test_types = set(read_vqa(cfg.data.root, "test")["question_type"])
        qtypes = {k for k in doc["pretrained"] if k.startswith("qtype_")}
        assert qtypes == {"qtype_" + "_".join(t.split()) for t in test_types}
        answers = set(json.loads((model_dir(cfg, task) / "task.json").read_text())["answers"])
        assert set(results[0]) == {"question_id", "answer"}
        assert {r["answer"] for r in results} <= answers
        plot = list(csv.DictReader((tmp_path / "plots" / "vqa_accuracy_scratch.csv").open()))
        assert plot[0]["answer_type"] == "overall"
    examples = json.loads((tmp_path / "results" / task / "examples_pretrained.json").read_text())
    assert len(examples) == 3 and all(e["prediction"] for e in examples)
    assert (
        "data:image/png;base64,"
        in (tmp_path / "results" / task / "examples_scratch.html").read_text()
    )

    runs = _runs(tmp_path)
    assert {f"finetune-{task}-pretrained", f"finetune-{task}-scratch", f"evaluate-{task}"} <= set(
        runs
    )
    ev = runs[f"evaluate-{task}"]
    assert ev.data.metrics[primary] == pytest.approx(doc[primary])
    assert f"scratch.{primary}" in ev.data.metrics
    assert ev.data.tags["vlp.task"] == task
    assert ev.data.tags.get("mlflow.parentRunId")  # nested under the pipeline run
    assert {"examples_pretrained.html", "examples_scratch.json"} <= set(
        _artifacts(ev.info.run_id, "examples")
    )
    if task == "generation":  # the galleries are logged with the examples
        assert {"gallery_pretrained.png", "gallery_scratch.html"} <= set(
            _artifacts(ev.info.run_id, "examples")
        )
    assert len(_artifacts(ev.info.run_id, "plots")) == 2
    ft = runs[f"finetune-{task}-pretrained"]
    assert ft.data.tags["vlp.init"] == "pretrained"
    assert "loss" in ft.data.metrics


@pytest.mark.parametrize("task", ["retrieval", "captioning", "vqa", "generation"])
def test_load_predictor_serves_each_task(cfg: Config, task: str) -> None:
    predictor = load_predictor(finetune(cfg, task))
    assert predictor.task == task
    images = _images(cfg, 3)
    texts = ["a red circle", "two shapes", "a blue square at the top"]
    assert predictor.embed_images(images).shape == (3, cfg.model.embed_dim)
    feats = predictor.embed_texts(texts)
    assert feats.shape == (3, cfg.model.embed_dim)
    assert abs(float((feats**2).sum(axis=1).mean()) - 1.0) < 1e-4
    assert predictor.score(images, texts).shape == (3, 3)
    if task == "captioning":
        captions = predictor.caption(images)
        assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    if task == "vqa":
        answers = predictor.answer(images, ["is there a red circle?"] * 3)
        assert len(answers) == 3 and set(answers) <= set(predictor.vqa.answers)
        with pytest.raises(ConfigError):
            predictor.answer(images, ["one question"])
    if task == "generation":
        generated = predictor.generate(texts)
        size = cfg.finetune.generation.image_size
        assert [im.size for im in generated] == [(size, size)] * 3


def test_retrieval_predictor_score_matches_the_evaluated_reranking(cfg: Config) -> None:
    from vlp.tasks.retrieval.ranking import retrieval_scores

    predictor = load_predictor(finetune(cfg, "retrieval"))
    images, texts = _images(cfg, 4), ["a red circle", "a blue square", "two shapes"]
    score = predictor.score(images, texts)
    model = predictor.model
    with torch.no_grad():
        pixels = predictor._pixels(images)
        embeds, feat = model.encode_image(pixels)
        enc = model.tokenize(texts)
        _, text_feat = model.encode_text(enc["input_ids"], enc["attention_mask"])
    s = retrieval_scores(
        model, embeds, feat, enc["input_ids"], enc["attention_mask"], text_feat,
        k=cfg.finetune.retrieval.rerank_k, batch_size=7, score="vlp",
    )  # fmt: skip
    # each image's ranking of texts is the i2t re-ranking the evaluation measures
    assert (score.argmax(axis=1) == s.i2t.argmax(dim=1).numpy()).all()


def test_pretrained_init_loads_the_pretrained_weights_and_scratch_does_not(
    cfg: Config, smoke_pretrained: Path
) -> None:
    from vlp.models import VLPModel

    ref = VLPModel.from_pretrained(smoke_pretrained).state_dict()
    pre = base_model(cfg, "pretrained").state_dict()
    scratch = base_model(cfg, "scratch").state_dict()
    assert all(torch.equal(pre[k], ref[k]) for k in ref)
    assert not all(torch.equal(scratch[k], ref[k]) for k in ref)
    assert (
        base_model(cfg, "scratch").tokenizer.get_vocab()
        == VLPModel.from_pretrained(smoke_pretrained).tokenizer.get_vocab()
    )


def test_ablation_off_writes_a_placeholder_and_evaluates_pretrained_only(
    cfg: Config, tmp_path: Path
) -> None:
    cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, ablation=False))
    finetune(cfg, "vqa")
    assert is_skipped(finetune(cfg, "vqa", init="scratch"))
    assert (tmp_path / "plots" / "finetune_vqa_scratch.csv").read_text() == "step,loss\n"
    doc = evaluate(cfg, "vqa")
    assert set(doc) == {"overall", "pretrained", "evaluated_on"}
    assert (tmp_path / "plots" / "vqa_accuracy_scratch.csv").read_text() == "answer_type,accuracy\n"


def test_errors_name_the_missing_input(cfg: Config, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="finetuned/captioning-pretrained"):
        evaluate(cfg, "captioning")
    with pytest.raises(ConfigError, match="unknown init"):
        finetune(cfg, "vqa", init="imagenet")
    missing = dataclasses.replace(
        cfg, finetune=dataclasses.replace(cfg.finetune, init_dir=str(tmp_path / "nope"))
    )
    with pytest.raises(ConfigError, match="finetune.init_dir: .*nope"):
        finetune(missing, "retrieval")


def test_finetune_trains_on_the_splits_in_params(cfg: Config, tmp_path: Path) -> None:
    from vlp.data.manifest import read_pairs, read_vqa, split_sizes
    from vlp.errors import DataError

    def on(*splits: str) -> Config:
        return dataclasses.replace(
            cfg, finetune=dataclasses.replace(cfg.finetune, splits=list(splits))
        )

    finetune(on("val"), "retrieval")
    params = _runs(tmp_path)["finetune-retrieval-pretrained"].data.params
    assert params["n_train"] == str(len(read_pairs(cfg.data.root, "val")))
    assert params["finetune.splits"] == "['val']"
    # a split the dataset lacks is skipped when another has data (Flickr30k has no restval)...
    finetune(on("test", "restval"), "vqa")
    params = _runs(tmp_path)["finetune-vqa-pretrained"].data.params
    assert params["n_train"] == str(len(read_vqa(cfg.data.root, "test")))
    # ... and refused, naming what the dataset has, when none has
    sizes = split_sizes(cfg.data.root, "vqa.parquet")
    has = ", ".join(f"{name}: {n} rows" for name, n in sizes.items())
    with pytest.raises(
        DataError, match=rf"no VQA questions in split\(s\) restval; its vqa.parquet has {has}$"
    ):
        finetune(on("restval"), "vqa", init="scratch")
    assert "finetune-vqa-scratch" not in _runs(tmp_path)  # refused before training
    with pytest.raises(ConfigError, match="finetune.splits: unknown split 'trian'"):
        finetune(on("trian"), "captioning")


def test_finetune_accumulates_the_gradients_its_task_params_name(cfg: Config) -> None:
    tcfg = dataclasses.replace(cfg.finetune.retrieval, batch_size=8, grad_accum_steps=100)
    accum = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, retrieval=tcfg))
    with pytest.raises(ConfigError, match=r"batch_size \* grad_accum_steps = 800 is larger"):
        finetune(accum, "retrieval")


@pytest.mark.parametrize("protocol", ["official", "lavis"])
def test_vqa_evaluation_scores_and_records_its_protocol(
    cfg: Config, protocol: str, tmp_path: Path
) -> None:
    from vlp.data.manifest import read_vqa
    from vlp.metrics.vqa import vqa_accuracy

    cfg = dataclasses.replace(
        cfg,
        finetune=dataclasses.replace(cfg.finetune, ablation=False),
        evaluate=dataclasses.replace(cfg.evaluate, vqa_protocol=protocol),
    )
    finetune(cfg, "vqa")
    doc = evaluate(cfg, "vqa")
    results = json.loads((tmp_path / "results" / "vqa" / "pretrained.json").read_text())
    frame = read_vqa(cfg.data.root, cfg.evaluate.split)
    expected = vqa_accuracy(
        {r["question_id"]: r["answer"] for r in results},
        {int(q): list(a) for q, a in zip(frame["question_id"], frame["answers"], strict=True)},
        protocol=protocol,
    )
    assert doc["overall"] == expected["overall"]
    assert _runs(tmp_path)["evaluate-vqa"].data.params["vqa_protocol"] == protocol


def test_finetune_and_evaluate_refuse_foreign_output_folders(cfg: Config, tmp_path: Path) -> None:
    out = model_dir(cfg, "retrieval")
    (out / "notes").mkdir(parents=True)
    (out / "important.txt").write_text("keep me\n")
    with pytest.raises(OutputError, match=f"{out}: not empty and not written by vlp"):
        finetune(cfg, "retrieval")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["important.txt", "notes"]
    assert not (tmp_path / "plots").exists()  # refused before training

    results = Path(cfg.evaluate.results_dir) / "retrieval"
    results.mkdir(parents=True)
    (results / "pretrained.json").write_text("my own results\n")
    shutil.rmtree(out)
    finetune(cfg, "retrieval")
    finetune(cfg, "retrieval", init="scratch")
    with pytest.raises(OutputError, match=str(results)):
        evaluate(cfg, "retrieval")
    assert (results / "pretrained.json").read_text() == "my own results\n"


def test_identical_finetune_runs_write_byte_identical_model_dirs(cfg: Config) -> None:
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    first = files(finetune(cfg, "vqa"))
    again = dataclasses.replace(
        cfg, finetune=dataclasses.replace(cfg.finetune, out_dir=cfg.finetune.out_dir + "_again")
    )
    second = files(finetune(again, "vqa"))
    assert {"model.safetensors", "answer_head.safetensors", "task.json", "vlp_config.json"} <= set(
        first
    )
    assert any(name.startswith("tokenizer/") for name in first)
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []


def test_a_model_keeps_its_image_transform_for_prediction(cfg: Config) -> None:
    """Trained with shorter_side_crop and other mean/std, it predicts with them, not params'."""
    from vlp.data.images import ImageTransform

    images = dataclasses.replace(
        cfg.images, resize="shorter_side_crop", mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.4]
    )
    trained = dataclasses.replace(
        cfg, images=images, finetune=dataclasses.replace(cfg.finetune, ablation=False)
    )
    out = finetune(trained, "retrieval")
    info = json.loads((out / "task.json").read_text())
    assert info["image_transform"] == {
        "resize": "shorter_side_crop",
        "mean": [0.4, 0.5, 0.6],
        "std": [0.2, 0.3, 0.4],
    }
    predictor = load_predictor(out)
    wide = Image.new("RGB", (448, 172), (200, 30, 30))
    wide.paste((30, 200, 30), (138, 0, 310, 172))  # the centre square is green
    expected = ImageTransform(32, "shorter_side_crop", (0.4, 0.5, 0.6), (0.2, 0.3, 0.4))
    assert predictor.transform == expected
    assert torch.equal(predictor._pixels([wide]), expected.pixels([wide]))
    squashed = ImageTransform(32, "squash", (0.4, 0.5, 0.6), (0.2, 0.3, 0.4)).pixels([wide])
    assert not torch.equal(predictor._pixels([wide]), squashed)


def test_the_pretrained_model_records_its_image_transform(smoke_pretrained: Path) -> None:
    recorded = json.loads((smoke_pretrained / "image_transform.json").read_text())
    assert recorded == {"size": 32, "resize": "squash", "mean": [0.5] * 3, "std": [0.5] * 3}


def test_evaluate_uses_the_models_task_json_settings_not_params(
    cfg: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vlp.models.vlp_model import VLPModel

    cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, ablation=False))
    out = finetune(cfg, "captioning")
    info = json.loads((out / "task.json").read_text())
    assert (info["image_size"], info["max_length"]) == (32, 8)  # what params say
    info.update(image_size=24, max_length=3, beam_size=1)
    (out / "task.json").write_text(json.dumps(info))
    seen = []
    generate = VLPModel.generate_captions

    def spy(self: VLPModel, pixel_values: torch.Tensor, **kwargs: int) -> list[str]:
        seen.append((tuple(pixel_values.shape[-2:]), kwargs["num_beams"], kwargs["max_length"]))
        return generate(self, pixel_values, **kwargs)

    monkeypatch.setattr(VLPModel, "generate_captions", spy)
    doc = evaluate(cfg, "captioning")
    assert seen and set(seen) == {((24, 24), 1, 3)}
    assert doc["pretrained"]["model_sha256"] == model_sha256(out)
    results = json.loads((tmp_path / "results" / "captioning" / "pretrained.json").read_text())
    seen.clear()
    shipped = load_predictor(out).caption(_images(cfg, cfg.data.n_test))
    assert [r["caption"] for r in results] == shipped  # test image ids are in file order here
    assert set(seen) == {((24, 24), 1, 3)}


def test_evaluation_through_the_predictor_equals_scoring_the_dataset_batches(
    cfg: Config, tmp_path: Path
) -> None:
    """The predictor's preprocessing and batches are the datasets': same numbers, exactly."""
    from torch.utils.data import DataLoader

    from vlp.data.images import image_transforms
    from vlp.data.manifest import read_pairs
    from vlp.data.torch_data import ImagesDataset, VQADataset, collate
    from vlp.metrics.retrieval import recall_at_k
    from vlp.models import VLPModel
    from vlp.models.checkpoints import read_task_info
    from vlp.models.embed import encode_images, encode_texts
    from vlp.tasks.retrieval.ranking import retrieval_scores
    from vlp.tasks.vqa.model import load_vqa_model

    batch = 3  # several image, text and pair batches on the 8 smoke test images
    cfg = dataclasses.replace(
        cfg,
        finetune=dataclasses.replace(cfg.finetune, ablation=False),
        evaluate=dataclasses.replace(cfg.evaluate, batch_size=batch),
    )
    size, split = image_transforms(cfg)[0], cfg.evaluate.split

    out = finetune(cfg, "retrieval")
    doc = evaluate(cfg, "retrieval")["pretrained"]
    model = VLPModel.from_pretrained(out).eval()
    images = ImagesDataset(cfg.data.root, split, size)
    loader = DataLoader(images, batch_size=batch, collate_fn=collate)
    embeds, feat = encode_images(model, (b["pixel_values"] for b in loader))
    pairs = read_pairs(cfg.data.root, split)
    ids, mask, text_feat = encode_texts(model, list(pairs["caption"]), batch)
    k = cfg.finetune.retrieval.rerank_k
    s = retrieval_scores(model, embeds, feat, ids, mask, text_feat, k, batch, score="vlp")
    index = {image_id: i for i, image_id in enumerate(images.image_ids)}
    text_to_image = torch.tensor([index[int(i)] for i in pairs["image_id"]])
    i2t, t2i = recall_at_k(s.i2t.float(), text_to_image), recall_at_k(s.t2i.float(), text_to_image)
    itc = recall_at_k(s.itc.float(), text_to_image)
    for x in (1, 5, 10):
        assert doc[f"i2t_R@{x}"] == i2t[f"i2t_R@{x}"]
        assert doc[f"t2i_R@{x}"] == t2i[f"t2i_R@{x}"]
        assert doc[f"itc_t2i_R@{x}"] == itc[f"t2i_R@{x}"]

    out = finetune(cfg, "vqa")
    evaluate(cfg, "vqa")
    vlp = VLPModel.from_pretrained(out)
    vqa = load_vqa_model(vlp, read_task_info(out), out).eval()
    expected = {}
    for b in DataLoader(VQADataset(cfg.data.root, split, size), batch, collate_fn=collate):
        enc = vlp.tokenize(b["question"])
        with torch.no_grad():
            answers = vqa.predict(b["pixel_values"], enc["input_ids"], enc["attention_mask"])
        expected.update(zip(b["question_id"].tolist(), answers, strict=True))
    results = json.loads((tmp_path / "results" / "vqa" / "pretrained.json").read_text())
    assert {r["question_id"]: r["answer"] for r in results} == expected


def _torchrun(cwd: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    """`torchrun --nproc-per-node 2 -m vlp.cli --profile smoke ...` in `cwd` (gloo on CPU)."""
    env = {k: v for k, v in os.environ.items() if k not in TRACKING_ENV}
    env["PYTHONPATH"] = str(REPO_ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "vlp.cli", "--params", str(REPO_ROOT / "params.yaml"), "--profile", "smoke"]
    proc = subprocess.run(cmd + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]  # torchrun: 0 only if every rank exits 0
    return proc


def test_torchrun_finetune_and_evaluate_write_once_from_rank_0(
    smoke_data: Path,
    smoke_pretrained: Path,
    empty_store: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    from vlp.models import VLPModel

    shutil.copy(empty_store, tmp_path / "mlflow.db")
    sets = ["--set", f"data.root={smoke_data}", "--set", f"finetune.init_dir={smoke_pretrained}"]
    sets += ["--set", "finetune.ablation=false"]  # outputs in the smoke profile's folder

    done = _torchrun(tmp_path, [*sets, "finetune", "retrieval"])
    assert done.stdout.count('"model_dir"') == 1  # one rank reports
    out = tmp_path / OUT / "models" / "finetuned" / "retrieval-pretrained"
    assert sorted(p.name for p in out.parent.iterdir()) == ["retrieval-pretrained"]  # no work dirs
    assert json.loads((out / "task.json").read_text())["steps"] == 3
    assert sorted(p.name for p in (tmp_path / OUT / "plots").iterdir()) == [
        "finetune_retrieval_pretrained.csv",
        "finetune_retrieval_pretrained_val.csv",  # header only: no model selection
    ]
    trained = VLPModel.from_pretrained(out).state_dict()
    start = VLPModel.from_pretrained(smoke_pretrained).state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # it trained

    done = _torchrun(tmp_path, [*sets, "evaluate", "retrieval"])
    assert done.stdout.count('"rsum"') == 2  # one document printed: top level + pretrained
    assert sorted(p.name for p in (tmp_path / OUT / "metrics").iterdir()) == ["retrieval.json"]
    doc = json.loads((tmp_path / OUT / "metrics" / "retrieval.json").read_text())
    assert doc["pretrained"]["model_sha256"] == model_sha256(out)
    assert sorted(p.name for p in (tmp_path / OUT / "results" / "retrieval").iterdir()) == [
        ".vlp-output",
        "examples_pretrained.html",
        "examples_pretrained.json",
        "pretrained.json",
    ]

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    kinds = sorted((r.data.tags.get("vlp.kind"), r.info.run_name) for r in runs)
    assert [k for k in kinds if k[0] == "stage"] == [
        ("stage", "evaluate-retrieval"),
        ("stage", "finetune-retrieval-pretrained"),
    ]
    assert [k for k, _ in kinds].count("pipeline") == 1
    ft = next(r for r in runs if r.info.run_name == "finetune-retrieval-pretrained")
    assert ft.data.params["world_size"] == "2"
    assert [m.step for m in client.get_metric_history(ft.info.run_id, "loss")] == [1, 2, 3]
