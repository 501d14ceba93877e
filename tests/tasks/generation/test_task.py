"""The generation task on a tiny model and the smoke dataset: training set-up through the shared
loop, saving and loading, re-ranking of candidates, scoring and serving."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from vlp.config import Config, ServingConfig
from vlp.errors import RequestError
from vlp.tasks import TASK_FILE
from vlp.tasks.generation.task import (
    Sampling,
    effective_rerank,
    not_applicable,
    save,
    serve,
    setup,
)
from vlp.tasks.predictor import load_predictor

PROMPTS = ["a large red circle at the top left", "a small blue square at the bottom right"]


@pytest.fixture(scope="module")
def gen_cfg(smoke_cfg: Config, smoke_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """smoke_cfg whose pretrained model (the judge) is a tiny random vlp model."""
    from vlp.models import build_model, train_tokenizer
    from vlp.models.checkpoints import IMAGE_TRANSFORM_FILE

    root = tmp_path_factory.mktemp("generation")
    texts = list(pd.read_parquet(smoke_data / "pairs.parquet")["caption"])
    torch.manual_seed(1234)  # not the scratch init's seed (`seed`): the two must differ
    vlp = build_model(smoke_cfg.model, train_tokenizer(texts, 200), 0.07)
    pretrained = root / "pretrained"
    vlp.save_pretrained(pretrained)
    transform = {"size": 32, "resize": "squash", "mean": [0.5] * 3, "std": [0.5] * 3}
    (pretrained / IMAGE_TRANSFORM_FILE).write_text(json.dumps(transform))
    return dataclasses.replace(
        smoke_cfg, finetune=dataclasses.replace(smoke_cfg.finetune, init_dir=str(pretrained))
    )


def _train(cfg: Config, init: str, work: Path):
    """(setup, result) of a few real training steps from `init` through the shared loop."""
    from vlp.finetune import base_model
    from vlp.train.loop import TrainSettings, train

    s = setup(cfg, base_model(cfg, init), init)
    tcfg = cfg.finetune.generation
    settings = TrainSettings.from_config(
        cfg.runtime, tcfg, seed=cfg.seed, checkpoint_every=0, keep_checkpoints=1
    )
    return s, train(s.module, s.dataset, s.collate, settings, work)


@pytest.fixture(scope="module")
def model_dir(gen_cfg: Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generation model directory trained for the smoke profile's 3 steps."""
    root = tmp_path_factory.mktemp("generation_model")
    s, result = _train(gen_cfg, "pretrained", root / "work")
    out = root / "generation-pretrained"
    out.mkdir()
    save(s.module, out)
    info = {"task": "generation", "init": "pretrained", "image_size": 32, "steps": result.steps}
    (out / TASK_FILE).write_text(json.dumps({**info, **s.info}))
    return out


def test_setup_trains_the_denoiser_alone_on_images_in_unit_range(
    gen_cfg: Config, tmp_path: Path
) -> None:
    from vlp.finetune import base_model

    vlp = base_model(gen_cfg, "pretrained")
    s = setup(gen_cfg, vlp, "pretrained")
    item = s.dataset[0]
    size = gen_cfg.finetune.generation.image_size
    assert item["pixel_values"].shape == (3, size, size)
    assert -1.0 <= float(item["pixel_values"].min()) < float(item["pixel_values"].max()) <= 1.0
    batch = s.collate([s.dataset[0], s.dataset[1]])
    assert batch["prompts"] == [s.dataset[0]["caption"], s.dataset[1]["caption"]]
    assert s.info["generator"] == "unet" and s.info["generated_size"] == size
    assert s.info["sample_steps"] == gen_cfg.finetune.generation.sample_steps

    before = {k: v.clone() for k, v in s.module.state_dict().items()}
    s, result = _train(gen_cfg, "pretrained", tmp_path / "work")
    after = s.module.state_dict()
    assert result.steps == gen_cfg.finetune.generation.max_steps
    changed = {k.split(".")[0] for k in after if not torch.equal(after[k], before[k])}
    assert "generator" in changed  # the UNet learned ...
    vlp_changed = [
        k for k in after if k.startswith("vlp.") and not torch.equal(after[k], before[k])
    ]
    assert vlp_changed == []  # ... the text encoder stayed as pretrained (train_text_encoder off)


def test_the_scratch_init_conditions_on_a_fresh_text_encoder(gen_cfg: Config) -> None:
    from vlp.finetune import base_model

    pre = setup(gen_cfg, base_model(gen_cfg, "pretrained"), "pretrained").module
    scratch = setup(gen_cfg, base_model(gen_cfg, "scratch"), "scratch").module
    text = [k for k in pre.vlp.state_dict() if k.startswith("text_encoder.")]
    assert text and any(
        not torch.equal(pre.vlp.state_dict()[k], scratch.vlp.state_dict()[k]) for k in text
    )
    # the same generator initialisation for both: the ablation changes the condition alone
    unet = pre.generator.unet.state_dict()
    assert all(torch.equal(v, scratch.generator.unet.state_dict()[k]) for k, v in unet.items())


def test_itm_reranking_falls_back_to_itc_without_an_itm_head(capsys) -> None:
    assert effective_rerank("itm", "fusion") == "itm"
    assert effective_rerank("itm", "clip") == "itc"
    assert "itm ignored" in capsys.readouterr().out
    assert effective_rerank("none", "clip") == "none"


def test_a_pipeline_of_ones_own_has_no_scratch_ablation(gen_cfg: Config) -> None:
    byo = dataclasses.replace(gen_cfg.finetune.generation, init_from="pipelines/stable-diffusion")
    cfg = dataclasses.replace(
        gen_cfg, finetune=dataclasses.replace(gen_cfg.finetune, generation=byo)
    )
    assert "own text encoder" in not_applicable(cfg, "scratch")
    assert not_applicable(cfg, "pretrained") is None
    assert not_applicable(gen_cfg, "scratch") is None


def test_the_saved_model_loads_as_a_predictor_that_generates(model_dir: Path) -> None:
    assert (model_dir / "generator" / "unet" / "config.json").is_file()
    predictor = load_predictor(model_dir)
    assert predictor.task == "generation"
    assert predictor.sampling == Sampling.of(json.loads((model_dir / TASK_FILE).read_text()))
    images = predictor.generate(PROMPTS)
    assert [im.size for im in images] == [(16, 16)] * 2
    again = predictor.generate(PROMPTS)
    assert [im.tobytes() for im in images] == [im.tobytes() for im in again]  # seeded
    other = predictor.generate(PROMPTS, dataclasses.replace(predictor.sampling, seed=1))
    assert [im.tobytes() for im in other] != [im.tobytes() for im in images]


def test_reranking_keeps_the_candidate_the_model_scores_highest(model_dir: Path) -> None:
    predictor = load_predictor(model_dir)
    colours = [["red", "blue", "green"], ["white", "blue", "red"]]
    candidates = [[Image.new("RGB", (16, 16), c) for c in row] for row in colours]
    itc = predictor.candidate_scores(PROMPTS, candidates, "itc")
    flat = [im for row in candidates for im in row]
    expected = predictor.embed_images(flat) @ predictor.embed_texts(PROMPTS).T
    for p in range(2):
        assert itc[p].numpy() == pytest.approx(expected[3 * p : 3 * p + 3, p], abs=1e-5)
    for how in ("itc", "itm"):
        scores = predictor.candidate_scores(PROMPTS, candidates, how)
        assert scores.shape == (2, 3)
        assert predictor.pick(PROMPTS, candidates, how) == scores.argmax(dim=1).tolist()
    assert predictor.pick(PROMPTS, candidates, "none") == [0, 0]

    predictor.generator.sample = lambda prompts, **kw: candidates  # the samples, fixed
    picks = predictor.pick(PROMPTS, candidates, predictor.sampling.rerank)
    kept = predictor.generate(PROMPTS)
    assert [im.getpixel((0, 0)) for im in kept] == [
        candidates[p][i].getpixel((0, 0)) for p, i in enumerate(picks)
    ]


def _limits(**over) -> ServingConfig:
    base = dict(
        max_image_pixels=100,
        max_rows=8,
        max_text_chars=200,
        max_text_tokens=64,
        max_generation_prompts=2,
        max_generation_steps=4,
        max_guidance_scale=5.0,
    )
    return ServingConfig(**{**base, **over})


def test_serve_answers_a_png_per_prompt_within_the_limits(model_dir: Path) -> None:
    predictor = load_predictor(model_dir)
    out = serve(predictor, [], {"prompt": PROMPTS}, {}, _limits())
    images = [Image.open(io.BytesIO(base64.b64decode(s))) for s in out["image"]]
    assert [(im.format, im.size) for im in images] == [("PNG", (16, 16))] * 2
    own = predictor.generate(PROMPTS)
    assert [im.convert("RGB").tobytes() for im in images] == [im.tobytes() for im in own]
    fewer = serve(predictor, [], {"prompt": PROMPTS[:1]}, {"sample_steps": 1}, _limits())
    assert fewer["image"][0] != out["image"][0]  # the request's steps were used
    for params, limits, why in (
        ({}, _limits(max_generation_prompts=1), "2 prompts, over the limit of 1"),
        ({"sample_steps": 5}, _limits(), "sample_steps is 5, over the limit of 4"),
        ({"sample_steps": 0}, _limits(), "sample_steps must be a positive integer"),
        ({"sample_steps": 2.5}, _limits(), "sample_steps must be a positive integer"),
        ({"guidance_scale": 6.0}, _limits(), "guidance_scale is 6.0, over the limit of 5.0"),
        ({"guidance_scale": -1}, _limits(), "guidance_scale must be a number >= 0"),
    ):
        with pytest.raises(RequestError, match=why):
            serve(predictor, [], {"prompt": PROMPTS}, params, limits)


def test_the_pyfunc_serves_prompts_without_an_image_column(model_dir: Path) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import PythonModelContext

    from vlp.serving import DEFAULT_LOADER, VLPTaskModel, task_signature

    model = VLPTaskModel()
    config = {"task": "generation", "loader": DEFAULT_LOADER, **dataclasses.asdict(_limits())}
    model.load_context(PythonModelContext({"model_dir": str(model_dir)}, config))
    out = model.predict(None, pd.DataFrame({"prompt": PROMPTS}), {"guidance_scale": 1.0})
    assert list(out.columns) == ["image"] and len(out) == 2
    with pytest.raises(MlflowException, match="over the limit of 4"):
        model.predict(None, pd.DataFrame({"prompt": PROMPTS}), {"sample_steps": 9})
    with pytest.raises(MlflowException, match="prompt must be a string"):
        model.predict(None, pd.DataFrame({"prompt": [None]}))
    info = json.loads((model_dir / TASK_FILE).read_text())
    params = {p.name: p.default for p in task_signature("generation", info).params.params}
    assert params == {
        "sample_steps": info["sample_steps"],
        "guidance_scale": info["guidance_scale"],
    }


def test_evaluation_prompts_are_evenly_spaced_over_the_split(smoke_data: Path) -> None:
    from vlp.data.manifest import read_pairs
    from vlp.tasks.generation.evaluation import evaluation_prompts

    test = read_pairs(smoke_data, "test").reset_index(drop=True)
    chosen = evaluation_prompts(smoke_data, "test", 4)
    step = len(test) // 4
    assert list(chosen["caption_id"]) == [int(test["caption_id"][i * step]) for i in range(4)]
    assert len(evaluation_prompts(smoke_data, "test", 10_000)) == len(test)


def test_evaluate_measures_reranking_agreement_distance_and_a_gallery(
    gen_cfg: Config, model_dir: Path, smoke_data: Path
) -> None:
    from vlp.metrics.generation import compositional_scores
    from vlp.tasks.generation.evaluation import evaluation_prompts
    from vlp.tasks.generation.task import evaluate

    predictor = load_predictor(model_dir)
    ev = evaluate(gen_cfg, predictor, smoke_data)
    m = ev.metrics
    n = gen_cfg.evaluate.generation_prompts
    assert m["prompts"] + m["unparsable_prompts"] == n == len(ev.results)
    for key in ("exact_match", "exact_match_no_rerank", "exact_match_rerank_itc", "color"):
        assert 0.0 <= m[key] <= 100.0
    assert m["rerank_gain"] == pytest.approx(m["exact_match"] - m["exact_match_no_rerank"])
    assert m["exact_match_rerank_itm"] == m["exact_match"]  # the model's own way: itm
    assert -100.0 <= m["itc_score"] <= 100.0 and "itc_score_no_rerank" in m
    assert m["frechet_distance_image_tower"] >= 0.0 and m["images_per_s"] > 0
    # what is kept is scored: the first candidates' scores are the no-rerank ones
    prompts = list(evaluation_prompts(smoke_data, "test", n)["caption"])
    first = [group[0] for group in predictor.candidates(prompts, predictor.sampling)]
    assert compositional_scores(prompts, first)[0]["color"] == m["color_no_rerank"]
    assert {r["prompt"] for r in ev.results} == set(prompts)
    assert {row["metric"] for row in ev.plot_rows} >= {"exact_match", "exact_match_no_rerank"}
    assert not any(row["metric"].startswith("frechet") for row in ev.plot_rows)
    assert set(ev.files) == {"gallery.png", "gallery.html"}
    gallery = Image.open(io.BytesIO(ev.files["gallery.png"]))
    assert gallery.format == "PNG" and gallery.size[1] > 16
    assert len(ev.examples) == min(gen_cfg.evaluate.num_examples, n)
