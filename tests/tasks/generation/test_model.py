"""vlp's own generator (`UNetGenerator`): training, condition dropout, sampling, save/load, VAE."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from vlp.errors import ConfigError
from vlp.tasks.generation import model as gen_model
from vlp.tasks.generation.model import GENERATOR_DIR, SETTINGS_FILE, UNetGenerator

PROMPTS = ["a red circle at the top left", "is there a red circle?", "a blue square"]
SIZE = 16


def _build(text_model: Any, **over: Any) -> UNetGenerator:
    kwargs = dict(
        image_size=SIZE,
        block_out_channels=[8, 16],
        layers_per_block=1,
        attention_head_dim=8,
        train_timesteps=50,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        cond_dropout=0.0,
        sampler="ddim",
        train_text_encoder=False,
        vae_from=None,
    )
    kwargs.update(over)
    torch.manual_seed(0)
    return UNetGenerator.build(text_model, **kwargs)


def _images(n: int) -> torch.Tensor:
    """n fixed images in [-1, 1]: a bright square on a dark background."""
    x = -torch.ones(n, 3, SIZE, SIZE)
    x[:, 0, 4:12, 4:12] = 1.0
    return x


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _train(gen: UNetGenerator, steps: int, images: torch.Tensor, prompts: list[str]) -> None:
    opt = torch.optim.AdamW(gen.trainable_parameters(), lr=3e-3)
    gen.train()
    for _ in range(steps):
        gen.training_loss(images, prompts).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _loss_at(gen: UNetGenerator, seed: int, images: torch.Tensor, prompts: list[str]) -> float:
    torch.manual_seed(seed)
    with torch.no_grad():
        return float(np.mean([gen.training_loss(images, prompts).item() for _ in range(4)]))


def _arrays(samples: list[list[Any]]) -> np.ndarray:
    return np.stack([np.asarray(im) for row in samples for im in row])


def test_training_lowers_the_loss_and_leaves_a_frozen_text_encoder_bit_identical(tiny_vlp):
    gen = _build(tiny_vlp, cond_dropout=0.2)
    images, prompts = _images(4), [PROMPTS[0]] * 4
    text_before, unet_before = _state(gen.text_model), _state(gen.unet)
    before = _loss_at(gen, 1, images, prompts)
    _train(gen, 20, images, prompts)
    assert _loss_at(gen, 1, images, prompts) < 0.7 * before
    after = gen.text_model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in text_before.items())
    assert any(not torch.equal(gen.unet.state_dict()[k], v) for k, v in unet_before.items())
    # what the training loop's optimizer takes (requires_grad) is the UNet, nothing else
    trainable = {id(p) for p in gen.trainable_parameters()}
    assert trainable == {id(p) for p in gen.unet.parameters()}
    assert not gen.text_model.training  # frozen: dropout off even in train mode


def test_train_text_encoder_trains_the_text_encoder_only(tiny_vlp):
    gen = _build(tiny_vlp, train_text_encoder=True)
    trainable = {id(p) for p in gen.trainable_parameters()}
    assert {id(p) for p in tiny_vlp.text_encoder.embeddings.parameters()} <= trainable
    assert not {id(p) for p in tiny_vlp.image_tower.parameters()} & trainable
    assert not {id(p) for p in tiny_vlp.text_decoder.parameters()} & trainable
    image_before = _state(tiny_vlp.image_tower)
    text_before = _state(tiny_vlp.text_encoder)
    _train(gen, 2, _images(2), PROMPTS[:2])
    assert gen.text_model.training
    assert any(
        not torch.equal(tiny_vlp.text_encoder.state_dict()[k], v) for k, v in text_before.items()
    )
    assert all(
        torch.equal(tiny_vlp.image_tower.state_dict()[k], v) for k, v in image_before.items()
    )


def test_cond_dropout_rows_get_the_empty_prompts_states(tiny_vlp, monkeypatch):
    gen = _build(tiny_vlp, cond_dropout=0.5)
    seen: dict[str, torch.Tensor] = {}
    forward = gen.unet.forward

    def spy(sample, timestep, encoder_hidden_states, **kw):
        seen["states"], seen["mask"] = encoder_hidden_states, kw["encoder_attention_mask"]
        return forward(sample, timestep, encoder_hidden_states, **kw)

    monkeypatch.setattr(gen.unet, "forward", spy)
    prompts = [PROMPTS[i % 3] for i in range(8)]
    torch.manual_seed(3)
    gen.training_loss(_images(8), prompts)
    with torch.no_grad():
        own, own_mask = gen.encode_prompts(prompts)
        empty, empty_mask = gen.encode_prompts([""])
    kinds = []
    for i in range(8):
        mask = seen["mask"][i]
        n = int(mask.sum())
        if n == int(empty_mask.sum()) and torch.equal(seen["states"][i, :n], empty[0, :n]):
            kinds.append("empty")
            assert not seen["states"][i, n:].any() and not mask[n:].any()
        else:
            assert torch.equal(seen["states"][i, : own.shape[1]], own[i])
            assert torch.equal(mask[: own.shape[1]], own_mask[i])
            kinds.append("own")
    assert set(kinds) == {"empty", "own"}
    # no dropout: every row keeps its own prompt
    gen.cond_dropout = 0.0
    gen.training_loss(_images(8), prompts)
    assert torch.equal(seen["states"], own)


def test_sampling_is_deterministic_per_seed_and_independent_of_batching(tiny_vlp, monkeypatch):
    gen = _build(tiny_vlp)

    def run(seed: int) -> np.ndarray:
        return _arrays(
            gen.sample(PROMPTS[:2], num_images_per_prompt=3, steps=4, guidance_scale=3.0, seed=seed)
        )

    first = run(0)
    assert first.shape == (6, SIZE, SIZE, 3) and first.dtype == np.uint8
    assert np.array_equal(first, run(0))
    assert not np.array_equal(first, run(1))
    monkeypatch.setattr(gen_model, "SAMPLE_BATCH", 2)
    assert np.abs(first.astype(int) - run(0).astype(int)).max() <= 1


def test_ddim_and_dpm_solver_both_sample(tiny_vlp):
    gen = _build(tiny_vlp)
    _train(gen, 3, _images(2), PROMPTS[:2])
    out = {}
    for sampler in ("ddim", "dpm_solver"):
        gen.sampler = sampler
        out[sampler] = _arrays(
            gen.sample(PROMPTS[:1], num_images_per_prompt=2, steps=5, guidance_scale=2.0, seed=0)
        )
        assert out[sampler].shape == (2, SIZE, SIZE, 3)
    assert not np.array_equal(out["ddim"], out["dpm_solver"])


def test_guidance_one_is_the_conditional_prediction(tiny_vlp):
    gen = _build(tiny_vlp)
    _train(gen, 3, _images(2), PROMPTS[:2])
    gen.eval()
    x, t = torch.randn(2, 3, SIZE, SIZE), torch.tensor(20)
    with torch.no_grad():
        cond, mask = gen.encode_prompts(PROMPTS[1:3])
        uncond = gen.encode_prompts([""])
        single = gen._guided(x, t, cond, mask, None, 1.0)
        two_pass = gen._guided(x, t, cond, mask, uncond, 1.0)
        guided = gen._guided(x, t, cond, mask, uncond, 4.0)
    torch.testing.assert_close(single, two_pass, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(single, guided, atol=1e-3)

    def run(g: float) -> np.ndarray:
        return _arrays(
            gen.sample(PROMPTS[:1], num_images_per_prompt=1, steps=3, guidance_scale=g, seed=0)
        )

    assert not np.array_equal(run(1.0), run(4.0))


def test_save_then_load_gives_identical_samples(tiny_vlp, tmp_path: Path):
    from vlp.tasks import model_sha256

    gen = _build(tiny_vlp, sampler="dpm_solver", prediction_type="v_prediction", cond_dropout=0.1)
    _train(gen, 2, _images(2), PROMPTS[:2])
    gen.save(tmp_path / "a")
    gen.save(tmp_path / "b")
    assert model_sha256(tmp_path / "a") == model_sha256(tmp_path / "b")  # same weights, same bytes
    g = tmp_path / "a" / GENERATOR_DIR
    for f in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors",
              "scheduler/scheduler_config.json", SETTINGS_FILE):  # fmt: skip
        assert (g / f).is_file(), f
    assert not (g / "vae").exists()
    loaded = UNetGenerator.load(tmp_path / "a")
    assert (loaded.sampler, loaded.cond_dropout, loaded.image_size) == ("dpm_solver", 0.1, SIZE)
    assert loaded.noise_scheduler.config.prediction_type == "v_prediction"

    def run(m: UNetGenerator) -> np.ndarray:
        return _arrays(
            m.sample(PROMPTS, num_images_per_prompt=2, steps=4, guidance_scale=2.5, seed=7)
        )

    assert np.array_equal(run(gen), run(loaded))
    # the caller's already loaded vlp model is used as is
    assert UNetGenerator.load(tmp_path / "a", text_model=tiny_vlp).text_model is tiny_vlp


def test_load_names_what_a_directory_lacks(tiny_vlp, tmp_path: Path):
    tiny_vlp.save_pretrained(tmp_path / "m")
    with pytest.raises(ConfigError, match=SETTINGS_FILE):
        UNetGenerator.load(tmp_path / "m")
    (tmp_path / "m" / GENERATOR_DIR).mkdir()
    (tmp_path / "m" / GENERATOR_DIR / SETTINGS_FILE).write_text(
        '{"kind": "unet", "sampler": "ddim"}'
    )
    with pytest.raises(ConfigError, match=f"{SETTINGS_FILE}: lacks image_size"):
        UNetGenerator.load(tmp_path / "m")


@pytest.fixture
def tiny_vae(tmp_path: Path) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SIZE,
    )
    vae.save_pretrained(tmp_path / "vae")
    return tmp_path / "vae"


def test_latent_mode_trains_and_samples_through_the_vae(tiny_vlp, tiny_vae: Path, tmp_path: Path):
    gen = _build(tiny_vlp, vae_from=str(tiny_vae), beta_schedule="scaled_linear")
    assert gen.unet.config.in_channels == 4 and gen.unet.config.sample_size == SIZE // 2
    assert not any(p.requires_grad for p in gen.vae.parameters())
    vae_before = _state(gen.vae)
    loss = gen.training_loss(_images(2), PROMPTS[:2])
    loss.backward()
    assert torch.isfinite(loss) and gen.unet.conv_in.weight.grad is not None
    samples = gen.sample(PROMPTS[:2], num_images_per_prompt=1, steps=2, guidance_scale=2.0, seed=0)
    assert [im.size for row in samples for im in row] == [(SIZE, SIZE)] * 2
    assert all(torch.equal(gen.vae.state_dict()[k], v) for k, v in vae_before.items())
    gen.save(tmp_path / "m")
    loaded = UNetGenerator.load(tmp_path / "m")
    assert loaded.vae is not None
    again = loaded.sample(PROMPTS[:2], num_images_per_prompt=1, steps=2, guidance_scale=2.0, seed=0)
    assert np.array_equal(_arrays(samples), _arrays(again))


def test_a_bad_vae_from_is_a_config_error_naming_it(tiny_vlp, tmp_path: Path):
    missing = tmp_path / "no_such_vae"
    with pytest.raises(ConfigError, match=rf"finetune\.generation\.vae_from: .*{missing.name}"):
        _build(tiny_vlp, vae_from=str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"vae_from: .*empty.*no config\.json"):
        _build(tiny_vlp, vae_from=str(tmp_path / "empty"))
    gen = _build(tiny_vlp)
    gen.unet.save_pretrained(tmp_path / "a_unet")
    with pytest.raises(ConfigError, match=r"vae_from: .*a_unet holds a 'UNet2DConditionModel'"):
        _build(tiny_vlp, vae_from=str(tmp_path / "a_unet"))


@pytest.mark.parametrize(
    ("over", "key"),
    [
        ({"sampler": "euler"}, "sampler"),
        ({"prediction_type": "sample"}, "prediction_type"),
        ({"cond_dropout": 1.0}, "cond_dropout"),
        ({"block_out_channels": [8, 12]}, "block_out_channels"),
        ({"image_size": 18, "block_out_channels": [8, 16, 16]}, "block_out_channels"),
    ],
)
def test_bad_settings_name_their_key(tiny_vlp, over: dict[str, Any], key: str):
    with pytest.raises(ConfigError, match=rf"finetune\.generation\.{key}"):
        _build(tiny_vlp, **over)


def test_a_clip_family_text_encoder_conditions_it_too(smoke_cfg, tiny_tokenizer, tmp_path: Path):
    import dataclasses

    from vlp.models.clip import build_clip

    torch.manual_seed(0)
    clip = build_clip(dataclasses.replace(smoke_cfg.model, family="clip"), tiny_tokenizer, 0.07)
    gen = _build(clip, train_text_encoder=True)
    assert gen.unet.config.cross_attention_dim == clip.clip.config.text_config.hidden_size
    trainable = {id(p) for p in gen.trainable_parameters()}
    assert {id(p) for p in clip.clip.text_model.parameters()} <= trainable
    assert not {id(p) for p in clip.clip.vision_model.parameters()} & trainable
    _train(gen, 1, _images(2), PROMPTS[:2])
    gen.save(tmp_path / "m")
    loaded = UNetGenerator.load(tmp_path / "m")
    assert type(loaded.text_model) is type(clip)

    def run(m: UNetGenerator) -> np.ndarray:
        return _arrays(
            m.sample(PROMPTS[:2], num_images_per_prompt=1, steps=2, guidance_scale=2.0, seed=0)
        )

    assert np.array_equal(run(gen), run(loaded))
