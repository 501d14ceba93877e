"""Two nodes on loopback: two `torchrun --nnodes 2` launchers meeting at a c10d rendezvous.

Both launchers run in one directory, as nodes sharing a filesystem do (data, the init model
and the work folders at the same paths); rank 0 alone writes outputs and MLflow runs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from tests.mlflow_helpers import empty_store  # noqa: F401
from tests.train.test_ddp import TOLERANCE

pytestmark = pytest.mark.slow  # three training processes, two launchers

REPO_ROOT = Path(__file__).resolve().parents[2]
TRACKING_ENV = ("MLFLOW_TRACKING_URI", "VLP_PARENT_RUN_ID", "VLP_PREFECT_FLOW_RUN_ID", "DVC_STAGE")
# ITC alone on a ViT tower: per-sample terms over the world batch and no BatchNorm, so two
# ranks of 8 equal one process of 16 (ITM draws its negatives per rank, and LM averages over
# each rank's tokens: those two equal one process in expectation only).
EXACT = [
    "model.image_tower=vit",
    "pretrain.itm_weight=0",
    "pretrain.lm_weight=0",
    "pretrain.caption_warmup_steps=0",
    "runtime.precision=fp32",  # bf16 autocast on CPUs that have it rounds beyond the tolerance
]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TRACKING_ENV}
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    return env


def _vlp_args(sets: list[str], command: list[str]) -> list[str]:
    args = ["-m", "vlp.cli", "--params", str(REPO_ROOT / "params.yaml"), "--profile", "smoke"]
    for s in sets:
        args += ["--set", s]
    return args + command


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(cwd: Path, sets: list[str], command: list[str]) -> list[str]:
    """Start both launchers, as each node of a job would; return their stdouts."""
    port = _free_port()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
    launcher += ["--nproc-per-node", "1", "--rdzv-backend", "c10d"]
    launcher += ["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "vlp-test"]
    launcher += ["--local-addr", "127.0.0.1", "--max-restarts", "0"]
    nodes = [
        subprocess.Popen(
            launcher + _vlp_args(sets, command),
            cwd=cwd,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = []
    for node in nodes:
        out, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-3000:]
        outs.append(out)
    return outs


def _stage_runs(cwd: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return [r for r in runs if r.data.tags.get("vlp.kind") == "stage"]


def test_two_node_pretrain_equals_one_process_and_finetune_runs(
    smoke_data: Path,
    smoke_pretrained: Path,
    empty_store: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    # one tokenizer for both runs: a trained one may number unused subwords differently
    tokenizer = f"model.tokenizer_pretrained={smoke_pretrained / 'tokenizer'}"
    sets = [f"data.root={smoke_data}", tokenizer, *EXACT]
    single, multi = tmp_path / "single", tmp_path / "multi"
    for d in (single, multi):
        d.mkdir()
        shutil.copy(empty_store, d / "mlflow.db")
    proc = subprocess.run(
        [sys.executable, *_vlp_args(sets, ["pretrain"])],
        cwd=single,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    outs = _two_nodes(multi, sets, ["pretrain"])
    assert sum(o.count('"world_size": 2') for o in outs) == 1  # rank 0 reports, on one node

    weights = "models/pretrained/model.safetensors"
    one = safetensors.torch.load_file(single / weights)
    two = safetensors.torch.load_file(multi / weights)
    assert one.keys() == two.keys()
    diffs = torch.cat([(a - two[name]).abs().flatten() for name, a in one.items()])
    # the 2-process test's tolerance, but AdamW divides by the gradient's own scale: a
    # float-order difference in a near-zero gradient can move its weight a few times further
    assert (diffs > TOLERANCE).float().mean() < 1e-3
    assert diffs.max() <= 5 * TOLERANCE
    metrics = [json.loads((d / "metrics" / "pretrain.json").read_text()) for d in (single, multi)]
    assert metrics[0]["steps"] == metrics[1]["steps"] > 0
    assert (metrics[0]["world_size"], metrics[1]["world_size"]) == (1, 2)
    assert abs(metrics[0]["loss_itc_last"] - metrics[1]["loss_itc_last"]) < TOLERANCE
    (run,) = _stage_runs(multi)
    assert run.info.run_name == "pretrain" and run.data.params["world_size"] == "2"

    finetune = [f"data.root={smoke_data}", f"finetune.init_dir={smoke_pretrained}"]
    finetune += ["finetune.ablation=false"]
    outs = _two_nodes(multi, finetune, ["finetune", "retrieval"])
    assert sum(o.count('"model_dir"') for o in outs) == 1
    assert (multi / "models" / "finetuned" / "retrieval" / "task.json").is_file()
    runs = {r.info.run_name: r for r in _stage_runs(multi)}
    assert runs.keys() == {"pretrain", "finetune-retrieval-pretrained"}
    assert runs["finetune-retrieval-pretrained"].data.params["world_size"] == "2"
