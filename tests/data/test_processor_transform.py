"""A pretrained checkpoint's image processor as the evaluation transform, and the size rule."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from vlp.config import Config
from vlp.data.images import Augmentation, ImageTransform, image_transforms, saved_transform
from vlp.data.processors import PROCESSOR_FILE, ProcessorTransform, save_processor
from vlp.errors import ConfigError

MEAN, STD = [0.3, 0.4, 0.5], [0.2, 0.25, 0.3]


def _processor(kind: str, **overrides: Any) -> Any:
    """A transformers image processor of `kind` with non-default sizes and mean/std."""
    from transformers import (
        BlipImageProcessorPil,
        CLIPImageProcessorPil,
        ConvNextImageProcessorPil,
        ViTImageProcessorPil,
    )

    common = {"image_mean": MEAN, "image_std": STD}
    if kind == "vit":
        settings = {"size": {"height": 40, "width": 40}, "do_convert_rgb": True}
        return ViTImageProcessorPil(**{**common, **settings, **overrides})
    if kind == "clip":
        settings = {"size": {"shortest_edge": 36}, "crop_size": {"height": 32, "width": 32}}
        return CLIPImageProcessorPil(**{**common, **settings, **overrides})
    if kind == "blip":
        return BlipImageProcessorPil(**common, size={"height": 30, "width": 30}, **overrides)
    assert kind == "convnext"
    settings = {"size": {"shortest_edge": 40}, "crop_pct": 0.8, "do_convert_rgb": True}
    return ConvNextImageProcessorPil(**{**common, **settings, **overrides})


def _saved(kind: str, directory: Path, **overrides: Any) -> Any:
    """`kind`'s processor saved in `directory`, and as transformers loads it back."""
    from transformers import AutoImageProcessor

    _processor(kind, **overrides).save_pretrained(str(directory))
    return AutoImageProcessor.from_pretrained(str(directory), local_files_only=True)


def _odd_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for h, w in ((17, 63), (71, 23), (40, 40), (32, 32), (5, 9))
    ]
    images += [
        Image.fromarray(rng.integers(0, 256, (29, 37, 4), dtype=np.uint8), "RGBA"),
        Image.fromarray(rng.integers(0, 256, (33, 21), dtype=np.uint8), "L"),
        Image.fromarray(rng.integers(0, 256, (45, 19, 3), dtype=np.uint8)).convert("P"),
    ]
    return images


@pytest.mark.parametrize(
    ("kind", "side"), [("vit", 40), ("clip", 32), ("blip", 30), ("convnext", 40)]
)
def test_pixels_equal_the_checkpoints_image_processor(kind: str, side: int, tmp_path: Path) -> None:
    processor = _saved(kind, tmp_path)
    transform = ProcessorTransform.load(tmp_path, "model.image_pretrained")
    assert transform.size == side
    images = _odd_images()
    expected = processor(images=images, return_tensors="pt")["pixel_values"]
    got = transform.pixels(images)
    assert got.shape == (len(images), 3, side, side)
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    # fitting first (what datasets and serving do on decoding) changes no pixel
    assert torch.allclose(
        transform.pixels([transform.fit(i) for i in images]), expected, atol=1e-6, rtol=0
    )


def test_a_processor_without_rgb_conversion_matches_on_rgb_images(tmp_path: Path) -> None:
    processor = _saved("vit", tmp_path, do_convert_rgb=None, resample=Image.Resampling.NEAREST)
    transform = ProcessorTransform.load(tmp_path, "k")
    rgb = [i for i in _odd_images() if i.mode == "RGB"]
    expected = processor(images=rgb, return_tensors="pt")["pixel_values"]
    assert torch.allclose(transform.pixels(rgb), expected, atol=1e-6, rtol=0)
    assert transform.pixels([Image.new("L", (12, 7), 9)]).shape == (1, 3, 40, 40)  # made RGB


def test_an_unfitted_image_at_the_output_size_is_still_processed(tmp_path: Path) -> None:
    """ConvNeXt below 384 px resizes to size / crop_pct and crops: not a no-op at 40 x 40."""
    processor = _saved("convnext", tmp_path)
    transform = ProcessorTransform.load(tmp_path, "k")
    img = _odd_images()[2]  # 40 x 40, the output size
    expected = processor(images=[img], return_tensors="pt")["pixel_values"]
    assert torch.allclose(transform.pixels([img]), expected, atol=1e-6, rtol=0)
    assert not torch.allclose(
        transform.pixels([img]), ProcessorTransform(processor, "k").normalise(img)[None]
    )


def test_images_size_scales_the_processors_resize_and_crop(tmp_path: Path) -> None:
    _saved("clip", tmp_path)
    transform = ProcessorTransform.load(tmp_path, "k", size=16)
    assert transform.size == 16
    direct = _processor("clip", size={"shortest_edge": 18}, crop_size={"height": 16, "width": 16})
    images = _odd_images()
    assert torch.allclose(
        transform.pixels(images),
        direct(images=images, return_tensors="pt")["pixel_values"],
        atol=1e-6,
    )


def test_a_processor_without_one_square_size_is_refused(tmp_path: Path) -> None:
    from transformers import CLIPImageProcessorPil

    CLIPImageProcessorPil(size={"shortest_edge": 20}, do_center_crop=False).save_pretrained(
        str(tmp_path)
    )
    with pytest.raises(ConfigError, match="model.init_from.*square"):
        ProcessorTransform.load(tmp_path, "model.init_from")


def test_training_crops_resample_as_the_processor(tmp_path: Path) -> None:
    _saved("vit", tmp_path, resample=Image.Resampling.NEAREST)
    transform = ProcessorTransform.load(tmp_path, "k")
    photo = _odd_images()[0]
    pixels, _ = Augmentation((0.5, 0.5), False, seed=0).apply(photo, transform, 0, 0)
    assert pixels.shape == (3, 40, 40)
    # nearest-neighbour crops only hold colours of the source image
    values = {tuple(v) for v in np.asarray(photo).reshape(-1, 3)}
    mean, std = np.array(MEAN)[:, None, None], np.array(STD)[:, None, None]
    back = np.rint((pixels.numpy() * std + mean) * 255).astype(int).reshape(3, -1).T
    assert {tuple(v) for v in back} <= values


def _tiny_vit(directory: Path, image_size: int, processor: Any = None) -> Path:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        image_size=image_size,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(str(directory))
    if processor is not None:
        processor.save_pretrained(str(directory))
    return directory


def _with(
    cfg: Config, size: int | None, pretrained: Path | None, key: str = "image_pretrained"
) -> Config:
    model = dataclasses.replace(
        cfg.model, image_tower="vit", **{key: str(pretrained) if pretrained else None}
    )
    return dataclasses.replace(cfg, model=model, images=dataclasses.replace(cfg.images, size=size))


def test_the_size_rule(smoke_cfg: Config, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert smoke_cfg.data.image_size == 32 and smoke_cfg.images.size is None
    from transformers import ViTImageProcessorPil

    with_proc = _tiny_vit(
        tmp_path / "p", 40, ViTImageProcessorPil(size={"height": 40, "width": 40})
    )
    with caplog.at_level(logging.INFO, "vlp.data.images"):
        transform = image_transforms(_with(smoke_cfg, None, with_proc))[0]
    assert isinstance(transform, ProcessorTransform) and transform.size == 40
    assert "40 px" in caplog.text and "data.image_size is 32" in caplog.text
    assert image_transforms(_with(smoke_cfg, 24, with_proc))[0].size == 24  # position interpolation
    # init_from is a checkpoint the tower starts from too
    assert image_transforms(_with(smoke_cfg, None, with_proc, "init_from"))[0].size == 40

    bare = _tiny_vit(tmp_path / "b", 40)
    with pytest.raises(ConfigError, match=r"images\.size.*40.*data\.image_size is 32"):
        image_transforms(_with(smoke_cfg, None, bare))
    explicit = image_transforms(_with(smoke_cfg, 32, bare))[0]
    assert explicit == ImageTransform(32, "squash", (0.5,) * 3, (0.5,) * 3)
    assert image_transforms(_with(smoke_cfg, 24, None))[0].size == 24
    with pytest.raises(ConfigError, match="images.size"):
        image_transforms(_with(smoke_cfg, 0, None))
    # the default pipeline is untouched
    assert image_transforms(smoke_cfg)[0] == ImageTransform(32, "squash", (0.5,) * 3, (0.5,) * 3)


def test_a_saved_model_keeps_the_processor_it_was_trained_with(tmp_path: Path) -> None:
    from transformers import AutoImageProcessor

    _saved("blip", tmp_path / "src")
    transform = ProcessorTransform.load(tmp_path / "src", "k", size=24)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    transform.save(model_dir)
    again = saved_transform(model_dir, transform.to_dict())
    images = _odd_images()
    assert torch.equal(again.pixels(images), transform.pixels(images))
    # model_files is what save_pretrained writes, byte for byte
    import json

    content = transform.model_files()[PROCESSOR_FILE]
    assert (
        json.dumps(content, indent=2, sort_keys=True) + "\n"
        == (model_dir / PROCESSOR_FILE).read_text()
    )
    assert AutoImageProcessor.from_pretrained(str(model_dir)).size == {"height": 24, "width": 24}
    with pytest.raises(ConfigError, match="size"):
        saved_transform(model_dir, {"size": 30, "processor": PROCESSOR_FILE})
    (model_dir / PROCESSOR_FILE).unlink()
    with pytest.raises(ConfigError, match=PROCESSOR_FILE):
        saved_transform(model_dir, transform.to_dict())


def test_save_processor_copies_a_checkpoints_processor(smoke_cfg: Config, tmp_path: Path) -> None:
    _saved("clip", tmp_path / "clip")
    assert save_processor(tmp_path / "clip", tmp_path / "out")
    assert (tmp_path / "out" / PROCESSOR_FILE).read_bytes() == (
        tmp_path / "clip" / PROCESSOR_FILE
    ).read_bytes()
    model = dataclasses.replace(smoke_cfg.model, init_from=str(tmp_path / "clip"))
    assert save_processor(model, tmp_path / "out2")
    assert not save_processor(smoke_cfg.model, tmp_path / "out3")
    assert save_processor(model, tmp_path / "out4", size=16)
    assert ProcessorTransform.load(tmp_path / "out4", "k").size == 16
    assert not (tmp_path / "out3").exists()
