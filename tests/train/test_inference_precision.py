"""`zeroshot.precision`: auto measures a checkpoint in fp32 on CPU; bf16 only when chosen."""

from __future__ import annotations

import pytest
import torch

from vlp.errors import ConfigError
from vlp.train.settings import resolve_inference_precision, resolve_precision

CPU = torch.device("cpu")


def test_auto_is_fp32_on_cpu_whatever_training_would_use() -> None:
    assert resolve_inference_precision("auto", CPU) is None
    assert resolve_inference_precision("fp32", CPU) is None
    assert resolve_inference_precision("bf16", CPU) is torch.bfloat16
    # training's auto may differ (bf16 on CPUs with native bf16); inference's does not follow it
    assert resolve_precision("bf16", CPU) is torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_on_a_gpu_is_trainings_auto() -> None:
    cuda = torch.device("cuda")
    assert resolve_inference_precision("auto", cuda) == resolve_precision("auto", cuda)


def test_zeroshot_precision_param_sets_the_default(smoke_cfg, tmp_path) -> None:
    import dataclasses

    from tests.checkpoints.clip import write_tiny_clip
    from vlp.inference import load_inference

    clip_dir = write_tiny_clip(tmp_path / "clip")
    cpu = dataclasses.replace(
        smoke_cfg, runtime=dataclasses.replace(smoke_cfg.runtime, device="cpu")
    )
    assert load_inference(cpu, clip_dir, None, None).precision == "fp32"
    bf16 = dataclasses.replace(cpu, zeroshot=dataclasses.replace(cpu.zeroshot, precision="bf16"))
    assert load_inference(bf16, clip_dir, None, None).precision == "bf16"
    assert load_inference(bf16, clip_dir, "fp32", None).precision == "fp32"  # --precision wins
    half = dataclasses.replace(cpu, zeroshot=dataclasses.replace(cpu.zeroshot, precision="fp16"))
    with pytest.raises(ConfigError, match="fp16"):
        load_inference(half, clip_dir, None, None)
