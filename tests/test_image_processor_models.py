"""A pretrained tower's image processor travels with every model built from it.

A tiny 2-layer ViT saved at 224 px with its ViTImageProcessor: pretraining runs at 224 px
(not data.image_size), the pretrained and finetuned model directories keep the processor, and
the finetuned model predicts, and serves as a registered pyfunc, with the same pixels after the
source checkpoint is gone.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from PIL import Image

from tests.mlflow_helpers import empty_store  # noqa: F401
from vlp.config import Config
from vlp.data.images import image_transforms
from vlp.data.processors import PROCESSOR_FILE, ProcessorTransform
from vlp.models.checkpoints import IMAGE_TRANSFORM_FILE

pytestmark = pytest.mark.slow  # pretrains and finetunes real (tiny) models at 224 px

MEAN, STD = [0.45, 0.4, 0.35], [0.3, 0.25, 0.2]


def _vit_checkpoint(directory: Path) -> Path:
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    config = ViTConfig(
        image_size=224,
        patch_size=32,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
    )
    torch.manual_seed(0)
    ViTModel(config, add_pooling_layer=False).save_pretrained(str(directory))
    ViTImageProcessorPil(
        size={"height": 224, "width": 224}, image_mean=MEAN, image_std=STD
    ).save_pretrained(str(directory))
    return directory


@pytest.fixture
def cfg(
    smoke_cfg: Config,
    smoke_data: Path,
    empty_store: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Config:
    """smoke_cfg on a ViT checkpoint at 224 px, one training step per stage, all in tmp_path."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    for var in ("VLP_PARENT_RUN_ID", "VLP_PREFECT_FLOW_RUN_ID", "DVC_STAGE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    pretrained = str(tmp_path / "models" / "pretrained")
    finetuned = str(tmp_path / "models" / "finetuned")
    c = smoke_cfg
    return dataclasses.replace(
        c,
        runtime=dataclasses.replace(
            c.runtime, metrics_dir=str(tmp_path / "metrics"), plots_dir=str(tmp_path / "plots")
        ),
        model=dataclasses.replace(
            c.model, image_tower="vit", image_pretrained=str(_vit_checkpoint(tmp_path / "vit"))
        ),
        pretrain=dataclasses.replace(
            c.pretrain, out_dir=pretrained, max_steps=1, caption_warmup_steps=0, eval_split=None
        ),
        finetune=dataclasses.replace(
            c.finetune,
            init_dir=pretrained,
            out_dir=finetuned,
            ablation=False,
            captioning=dataclasses.replace(c.finetune.captioning, max_steps=1),
        ),
        tracking=dataclasses.replace(c.tracking, artifact_root=str(tmp_path / "mlartifacts")),
    )


def _params(run_name: str) -> dict[str, str]:
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    return next(r for r in runs if r.info.run_name == run_name).data.params


def test_the_processor_is_the_preprocessing_of_every_model_built_from_it(
    cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoImageProcessor

    from vlp.finetune import finetune
    from vlp.models.towers import ImageTower
    from vlp.pretrain import fingerprint, pretrain
    from vlp.serving import log_task_model
    from vlp.tasks.predictor import load_predictor

    assert cfg.data.image_size == 32 and cfg.images.size is None
    sides = []
    forward = ImageTower.forward

    def spy(self: ImageTower, pixel_values: torch.Tensor) -> torch.Tensor:
        sides.append(tuple(pixel_values.shape[-2:]))
        return forward(self, pixel_values)

    monkeypatch.setattr(ImageTower, "forward", spy)
    source = Path(cfg.model.image_pretrained)
    processor = AutoImageProcessor.from_pretrained(str(source))

    pretrained = pretrain(cfg)
    assert sides and set(sides) == {(224, 224)}  # trained at the processor's size
    assert (pretrained / PROCESSOR_FILE).read_bytes() == (source / PROCESSOR_FILE).read_bytes()
    assert json.loads((pretrained / IMAGE_TRANSFORM_FILE).read_text()) == {
        "size": 224,
        "processor": PROCESSOR_FILE,
    }
    params = _params("pretrain")
    assert (params["image_size"], params["image_processor"]) == ("224", "ViTImageProcessor")
    # the processor is part of what is learned: editing it refuses a resume
    before = fingerprint(cfg)
    edited = json.loads((source / PROCESSOR_FILE).read_text())
    (source / PROCESSOR_FILE).write_text(json.dumps({**edited, "image_mean": [0.5] * 3}))
    assert fingerprint(cfg) != before
    (source / PROCESSOR_FILE).write_text(json.dumps(edited))

    sides.clear()
    out = finetune(cfg, "captioning")
    assert set(sides) == {(224, 224)}
    info = json.loads((out / "task.json").read_text())
    assert info["image_size"] == 224
    assert info["image_transform"] == {"processor": PROCESSOR_FILE}
    assert _params("finetune-captioning-pretrained")["image_size"] == "224"

    shutil.rmtree(source)  # the models need their source checkpoint no more
    shapes = next((Path(cfg.data.root) / "images").rglob("*.png"))
    images = [Image.new("RGB", (300, 170), (200, 30, 60)), Image.open(shapes)]
    predictor = load_predictor(out)
    assert isinstance(predictor.transform, ProcessorTransform)
    expected = processor(images=images, return_tensors="pt")["pixel_values"]
    assert torch.allclose(predictor._pixels(images), expected, atol=1e-6, rtol=0)
    # finetuning from the pretrained directory alone takes its processor
    no_source = dataclasses.replace(cfg.model, image_pretrained=None)
    resolved = image_transforms(dataclasses.replace(cfg, model=no_source), cfg.finetune.init_dir)
    assert resolved[0].size == 224
    captions = predictor.caption(images)

    # the registered model carries the processor and serves with it
    with mlflow.start_run():
        logged = log_task_model("captioning", out, limits=cfg.serving)
    served = mlflow.pyfunc.load_model(logged.model_uri)
    unwrapped = served.unwrap_python_model().predictor
    assert (unwrapped.model_dir / PROCESSOR_FILE).is_file()
    assert isinstance(unwrapped.transform, ProcessorTransform)
    png = []
    for img in images:
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="PNG")
        png.append(buf.getvalue())
    assert list(served.predict(pd.DataFrame({"image": png}))["caption"]) == captions
