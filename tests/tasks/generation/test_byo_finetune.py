"""`vlp finetune generation` on a diffusers pipeline of one's own (a tiny random Stable
Diffusion), in full and with LoRA, then evaluated and loaded like vlp's own generator."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.mlflow_helpers import empty_store  # noqa: F401
from vlp.cli import main
from vlp.finetune import NOT_APPLICABLE_FILE
from vlp.tasks.generation.diffusers_pipeline import LORA_WEIGHTS
from vlp.tasks.predictor import load_predictor

pytestmark = pytest.mark.slow  # finetunes and evaluates through the CLI

REPO = Path(__file__).resolve().parents[3]
UNET_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_vlp_finetune_generation_trains_a_pipeline_of_ones_own(
    lora_rank: int,
    tiny_sd_pipeline: Path,
    smoke_data: Path,
    smoke_pretrained: Path,
    empty_store: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    for var in ("VLP_PARENT_RUN_ID", "VLP_PREFECT_FLOW_RUN_ID", "DVC_STAGE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    sets = [
        f"data.root={smoke_data}",
        f"finetune.init_dir={smoke_pretrained}",
        f"finetune.generation.init_from={tiny_sd_pipeline}",
        f"finetune.generation.lora_rank={lora_rank}",
        "finetune.generation.image_size=16",
    ]

    def vlp(*args: str) -> str:
        overrides = [word for s in sets for word in ("--set", s)]
        code = main(
            ["--params", str(REPO / "params.yaml"), "--profile", "smoke", *overrides, *args]
        )
        out = capsys.readouterr()
        assert code == 0, out.err[-3000:]
        return out.out

    vlp("finetune", "generation")
    model_dir = tmp_path / "profiles" / "smoke" / "models" / "finetuned" / "generation-pretrained"
    info = json.loads((model_dir / "task.json").read_text())
    assert (info["generator"], info["steps"], info["generated_size"]) == ("diffusers", 3, 16)
    generator = model_dir / "generator"
    assert (generator / "model_index.json").is_file()  # a pipeline plain diffusers loads
    base = load_file(tiny_sd_pipeline / UNET_WEIGHTS)
    saved = load_file(generator / UNET_WEIGHTS)
    unchanged = all(torch.equal(base[k], saved[k]) for k in base)
    if lora_rank:  # the adapters trained, the base UNet is saved as it was
        assert (generator / LORA_WEIGHTS).is_file() and unchanged
    else:  # the whole UNet trained
        assert not (generator / LORA_WEIGHTS).exists() and not unchanged

    # a pipeline brings its own text encoder: no scratch ablation, evaluated alone
    assert "not applicable" in vlp("finetune", "generation", "--init", "scratch")
    scratch = model_dir.with_name("generation-scratch")
    assert "own text encoder" in (scratch / NOT_APPLICABLE_FILE).read_text()
    vlp("evaluate", "generation")
    doc = json.loads((tmp_path / "profiles" / "smoke" / "metrics" / "generation.json").read_text())
    assert "scratch" not in doc and "delta" not in doc
    assert doc["exact_match"] == doc["pretrained"]["exact_match"]
    assert {"exact_match_no_rerank", "itc_score", "frechet_distance_image_tower"} <= set(
        doc["pretrained"]
    )

    predictor = load_predictor(model_dir)
    images = predictor.generate(["a large red circle at the top left"])
    assert [im.size for im in images] == [(16, 16)]
