"""A user's diffusers pipeline as a generator: full and LoRA finetuning, sampling, save/load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vlp.errors import ConfigError
from vlp.tasks.generation.diffusers_pipeline import (
    LORA_WEIGHTS,
    SETTINGS_FILE,
    DiffusersPipelineGenerator,
)

PROMPTS = ["a red circle", "a blue square", "a green triangle", "two shapes"]
SAMPLING = {"num_images_per_prompt": 2, "steps": 2, "guidance_scale": 3.0}


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models on a shared 2-core machine: thread hand-offs cost more than the maths.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _generator(path: Path, lora_rank: int = 0, **overrides) -> DiffusersPipelineGenerator:
    settings = {
        "lora_rank": lora_rank,
        "lora_alpha": 8,
        "cond_dropout": 0.0,
        "sampler": "ddim",
        "image_size": 16,
        "device": "cpu",
        "dtype": torch.float32,
        **overrides,
    }
    return DiffusersPipelineGenerator.from_directory(path, **settings)


def _batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.rand(len(PROMPTS), 3, 16, 16, generator=g) * 2 - 1


SEED = 11  # of the timesteps, noise and latent samples of the fixed batch


def _loss(gen: DiffusersPipelineGenerator, pixels: torch.Tensor, prompts=PROMPTS) -> float:
    torch.manual_seed(SEED)
    with torch.no_grad():
        return gen.training_loss(pixels, prompts).item()


def _train(gen: DiffusersPipelineGenerator, steps: int, lr: float) -> None:
    pixels = _batch()
    optimizer = torch.optim.Adam(gen.trainable_parameters(), lr=lr)
    for _ in range(steps):
        torch.manual_seed(SEED)  # the fixed batch: the loss _loss measures
        gen.training_loss(pixels, PROMPTS).backward()
        optimizer.step()
        optimizer.zero_grad()


def _arrays(groups) -> list[np.ndarray]:
    return [np.asarray(image) for group in groups for image in group]


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(_arrays(a), _arrays(b), strict=True))


def _unet_file_state(pipeline_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors")


def test_full_finetune_trains_the_unet_and_lowers_the_loss(tiny_sd_pipeline: Path):
    gen = _generator(tiny_sd_pipeline)
    unet = gen.pipeline.unet
    assert {id(p) for p in gen.trainable_parameters()} == {id(p) for p in unet.parameters()}
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    frozen = {k: v.clone() for k, v in gen.pipeline.text_encoder.state_dict().items()}
    pixels = _batch()
    start = _loss(gen, pixels)
    _train(gen, steps=4, lr=1e-3)
    assert _loss(gen, pixels) < 0.9 * start
    assert any(not torch.equal(before[k], v) for k, v in unet.state_dict().items())
    text_after = gen.pipeline.text_encoder.state_dict()
    assert all(torch.equal(frozen[k], text_after[k]) for k in frozen)


def test_lora_trains_only_adapters_and_saves_them_small(tiny_sd_pipeline: Path, tmp_path):
    gen = _generator(tiny_sd_pipeline, lora_rank=4)
    unet = gen.pipeline.unet
    names = {id(p): n for n, p in unet.named_parameters()}
    trainable = [names[id(p)] for p in gen.trainable_parameters()]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in gen.trainable_parameters())
    pixels = _batch()
    start = _loss(gen, pixels)
    _train(gen, steps=4, lr=1e-2)
    assert _loss(gen, pixels) < start

    # the base weights are the source's, bit for bit
    source = _unet_file_state(tiny_sd_pipeline)
    state = unet.state_dict()
    base = {k.replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}
    assert base.keys() == source.keys()
    assert all(torch.equal(base[k], source[k]) for k in source)
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)  # trained

    gen.save(tmp_path / "model")
    saved = tmp_path / "model"
    adapter = (saved / LORA_WEIGHTS).stat().st_size
    unet_bytes = (saved / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert adapter < unet_bytes / 20
    saved_base = _unet_file_state(saved)
    assert all(torch.equal(saved_base[k], source[k]) for k in source)
    assert json.loads((saved / SETTINGS_FILE).read_text())["lora_rank"] == 4


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_save_then_load_gives_identical_samples(tiny_sd_pipeline: Path, tmp_path, lora_rank):
    gen = _generator(tiny_sd_pipeline, lora_rank=lora_rank, sampler="dpm_solver")
    _train(gen, steps=2, lr=1e-2)
    before = gen.sample(PROMPTS[:2], seed=3, **SAMPLING)
    gen.save(tmp_path / "model")
    loaded = DiffusersPipelineGenerator.load(tmp_path / "model", device="cpu", dtype=torch.float32)
    assert loaded.settings == gen.settings
    assert _same(loaded.sample(PROMPTS[:2], seed=3, **SAMPLING), before)
    untrained = _generator(tiny_sd_pipeline, lora_rank=lora_rank, sampler="dpm_solver")
    assert not _same(untrained.sample(PROMPTS[:2], seed=3, **SAMPLING), before)


def test_saved_lora_model_loads_in_plain_diffusers(tiny_sd_pipeline: Path, tmp_path):
    from diffusers import StableDiffusionPipeline

    gen = _generator(tiny_sd_pipeline, lora_rank=4, lora_alpha=2)  # alpha != rank: metadata
    _train(gen, steps=2, lr=1e-2)
    ours = gen.sample(PROMPTS[:2], seed=5, **SAMPLING)
    gen.save(tmp_path / "model")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "model", local_files_only=True)
    pipe.load_lora_weights(tmp_path / "model")
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        PROMPTS[:2],
        height=16,
        width=16,
        num_inference_steps=SAMPLING["steps"],
        guidance_scale=SAMPLING["guidance_scale"],
        num_images_per_prompt=SAMPLING["num_images_per_prompt"],
        generator=torch.Generator("cpu").manual_seed(5),
    ).images
    assert _same([images], [[im for group in ours for im in group]])


def test_save_is_byte_reproducible_and_names_no_source_path(tiny_sd_pipeline: Path, tmp_path):
    gen = _generator(tiny_sd_pipeline, lora_rank=2)
    _train(gen, steps=1, lr=1e-2)
    digests = []
    for name in ("a", "b"):
        gen.save(tmp_path / name)
        files = sorted(p for p in (tmp_path / name).rglob("*") if p.is_file())
        digests.append({str(p.relative_to(tmp_path / name)): p.read_bytes() for p in files})
    assert digests[0] == digests[1]
    for rel, content in digests[0].items():
        assert str(tiny_sd_pipeline).encode() not in content, rel
    for path in (tmp_path / "a").rglob("*.safetensors"):
        assert path.stat().st_mode & 0o044, f"{path} is private"


def test_sampling_is_deterministic_per_seed_and_switches_sampler(tiny_sd_pipeline: Path):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    ddim = _generator(tiny_sd_pipeline, sampler="ddim")
    dpm = _generator(tiny_sd_pipeline, sampler="dpm_solver")
    assert isinstance(ddim.pipeline.scheduler, DDIMScheduler)
    assert isinstance(dpm.pipeline.scheduler, DPMSolverMultistepScheduler)
    assert ddim.pipeline.scheduler.config.clip_sample is False  # latents are never clipped
    first = ddim.sample(PROMPTS[:2], seed=1, **SAMPLING)
    assert [len(group) for group in first] == [2, 2]
    assert all(im.size == (16, 16) and im.mode == "RGB" for group in first for im in group)
    assert _same(ddim.sample(PROMPTS[:2], seed=1, **SAMPLING), first)
    assert not _same(ddim.sample(PROMPTS[:2], seed=2, **SAMPLING), first)
    settings = {**SAMPLING, "steps": 3}
    assert not _same(
        dpm.sample(PROMPTS[:2], seed=1, **settings), ddim.sample(PROMPTS[:2], seed=1, **settings)
    )


def test_cond_dropout_replaces_prompts_by_the_empty_prompt(tiny_sd_pipeline: Path):
    pixels = _batch()
    plain = _generator(tiny_sd_pipeline)
    dropping = _generator(tiny_sd_pipeline, cond_dropout=0.999999)
    empty = _loss(plain, pixels, [""] * len(PROMPTS))
    assert _loss(dropping, pixels) == empty
    assert _loss(plain, pixels) != empty


def test_v_prediction_pipelines_regress_the_velocity(tiny_sd_pipeline: Path, tmp_path):
    copy = tmp_path / "v"
    shutil.copytree(tiny_sd_pipeline, copy)
    config_path = copy / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    pixels = _batch()
    v = _generator(copy)
    assert v.noise_scheduler.config.prediction_type == "v_prediction"
    assert _loss(v, pixels) != _loss(_generator(tiny_sd_pipeline), pixels)

    config_path.write_text(json.dumps({**config, "prediction_type": "sample"}))
    with pytest.raises(ConfigError, match="prediction_type 'sample'"):
        _generator(copy)


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_lower_precision_keeps_trained_weights_in_float32(tiny_sd_pipeline: Path, lora_rank):
    gen = _generator(tiny_sd_pipeline, lora_rank=lora_rank, dtype=torch.bfloat16)
    assert gen.pipeline.vae.dtype == torch.bfloat16
    assert gen.pipeline.text_encoder.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in gen.trainable_parameters())
    if lora_rank == 0:  # the whole UNet trains: its weights as stored, never rounded
        state, source = gen.pipeline.unet.state_dict(), _unet_file_state(tiny_sd_pipeline)
        assert all(torch.equal(state[k], source[k]) for k in source)
    loss = gen.training_loss(_batch(), PROMPTS)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in gen.trainable_parameters())
    groups = gen.sample(PROMPTS[:1], seed=0, **SAMPLING)
    assert len(groups[0]) == 2


def test_a_directory_that_is_no_text_to_image_pipeline_is_refused(tiny_sd_pipeline: Path, tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path / 'missing'}: not a directory"):
        _generator(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty: not a diffusers pipeline.*model_index.json"):
        _generator(tmp_path / "empty")
    unconditional = tmp_path / "ddpm"
    unconditional.mkdir()
    index = {
        "_class_name": "DDPMPipeline",
        "unet": ["diffusers", "UNet2DModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    (unconditional / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(
        ConfigError, match="ddpm: not a text-to-image.*vae, text_encoder, tokenizer"
    ):
        _generator(unconditional)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd_pipeline, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(ConfigError, match="broken: cannot load"):
        _generator(broken)


def test_settings_no_generator_accepts_are_refused(tiny_sd_pipeline: Path):
    with pytest.raises(ConfigError, match="finetune.generation.sampler: 'euler'"):
        _generator(tiny_sd_pipeline, sampler="euler")
    with pytest.raises(ConfigError, match="finetune.generation.image_size: 15 is not a multiple"):
        _generator(tiny_sd_pipeline, image_size=15)
    with pytest.raises(ConfigError, match="finetune.generation.lora_rank"):
        _generator(tiny_sd_pipeline, lora_rank=-1)
