"""Two nodes on loopback: two `torchrun --nnodes 2` launchers meeting at a c10d rendezvous.

Both launchers run in one directory, as nodes sharing a filesystem do (data, the init model
and the work folders at the same paths); rank 0 alone writes outputs and MLflow runs. Data
comes from the Parquet + files layout or from `vlp shard` webdataset shards.
"""

from __future__ import annotations

import itertools
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
from vlp.config import profile_dir

pytestmark = pytest.mark.slow  # three training processes, two launchers

REPO_ROOT = Path(__file__).resolve().parents[2]
TRACKING_ENV = ("MLFLOW_TRACKING_URI", "VLP_PARENT_RUN_ID", "VLP_PREFECT_FLOW_RUN_ID", "DVC_STAGE")
OUT = profile_dir("smoke")  # where the smoke profile writes
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


def _two_nodes(
    cwd: Path, sets: list[str], command: list[str], argv: list[str] | None = None
) -> list[str]:
    """Start both launchers, as each node of a job would; return their stdouts.

    `argv` (a script and its arguments) replaces `-m vlp.cli` with `sets` and `command`.
    """
    port = _free_port()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
    launcher += ["--nproc-per-node", "1", "--rdzv-backend", "c10d"]
    launcher += ["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "vlp-test"]
    launcher += ["--local-addr", "127.0.0.1", "--max-restarts", "0"]
    nodes = [
        subprocess.Popen(
            launcher + (argv or _vlp_args(sets, command)),
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

    weights = OUT / "models" / "pretrained" / "model.safetensors"
    one = safetensors.torch.load_file(single / weights)
    two = safetensors.torch.load_file(multi / weights)
    assert one.keys() == two.keys()
    diffs = torch.cat([(a - two[name]).abs().flatten() for name, a in one.items()])
    # the 2-process test's tolerance, but AdamW divides by the gradient's own scale: a
    # float-order difference in a near-zero gradient can move its weight a few times further
    assert (diffs > TOLERANCE).float().mean() < 1e-3
    assert diffs.max() <= 5 * TOLERANCE
    metrics = [
        json.loads((d / OUT / "metrics" / "pretrain.json").read_text()) for d in (single, multi)
    ]
    assert metrics[0]["steps"] == metrics[1]["steps"] > 0
    assert (metrics[0]["world_size"], metrics[1]["world_size"]) == (1, 2)
    assert abs(metrics[0]["loss_itc_last"] - metrics[1]["loss_itc_last"]) < TOLERANCE
    (run,) = _stage_runs(multi)
    assert run.info.run_name == "pretrain" and run.data.params["world_size"] == "2"

    finetune = [f"data.root={smoke_data}", f"finetune.init_dir={smoke_pretrained}"]
    finetune += ["finetune.ablation=false"]
    outs = _two_nodes(multi, finetune, ["finetune", "retrieval"])
    assert sum(o.count('"model_dir"') for o in outs) == 1
    assert (multi / OUT / "models" / "finetuned" / "retrieval-pretrained" / "task.json").is_file()
    runs = {r.info.run_name: r for r in _stage_runs(multi)}
    assert runs.keys() == {"pretrain", "finetune-retrieval-pretrained"}
    assert runs["finetune-retrieval-pretrained"].data.params["world_size"] == "2"


# Run by each launcher in place of `-m vlp.cli`: records, per rank, what its shard streams
# yield to the DataLoader (num_workers 0: exactly the items batched), then runs the CLI.
_RECORDING_CLI = """
import json, os, sys
from vlp.data import shard_stream as shards
from vlp.cli import main

_pairs = shards.ShardPairs._pairs

def _recorded(self, *args):
    path = f"stream-rank{os.environ['RANK']}.jsonl"
    for item in _pairs(self, *args):
        with open(path, "a") as f:
            row = [self.splits, self.first_caption_only, item["image_id"], item["caption_id"]]
            f.write(json.dumps(row) + "\\n")
        yield item

shards.ShardPairs._pairs = _recorded
sys.exit(main())
"""


def _streamed(cwd: Path) -> list[list[tuple]]:
    """Each rank's recorded items, (splits, first caption only, image_id, caption_id); cleared."""
    out = []
    for rank in range(2):
        path = cwd / f"stream-rank{rank}.jsonl"
        lines = path.read_text().splitlines()
        path.unlink()
        out.append([(tuple(s), f, i, c) for s, f, i, c in map(json.loads, lines)])
    return out


def _expected(shards: Path, cfg, rank: int, firsts: bool, n: int, micro: int) -> list[tuple]:
    """The first `n` pretrain items of the (seed, epoch 0, rank, worker 0) stream of 2 ranks."""
    from vlp.data.images import image_transforms
    from vlp.data.shard_stream import ShardPairs

    transform, _ = image_transforms(cfg)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RANK", str(rank))
        env.setenv("WORLD_SIZE", "2")
        ds = ShardPairs(
            shards, cfg.pretrain.splits, transform, seed=cfg.seed, shuffle_buffer=16,
            first_caption_only=firsts,
        )  # fmt: skip
        ds.set_epoch(0, micro)
        items = list(itertools.islice(ds, n))
    return [(tuple(ds.splits), firsts, x["image_id"], x["caption_id"]) for x in items]


def test_two_node_training_from_shards(
    smoke_cfg,
    smoke_data: Path,
    empty_store: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Pretraining, then retrieval finetuning, streamed from `vlp shard` output on 2 nodes.

    Not compared with a 1-process run: shards are resampled with replacement, each rank
    drawing its own stream seeded by (seed, epoch, rank, worker), so a world of 2 trains on
    other samples than a world of 1 (one process draws rank 0's stream alone, a whole global
    batch at a time; rank 1's samples are never in it). What holds
    instead: each rank streams exactly its (seed, epoch, rank) stream, the two ranks' streams
    differ, each rank takes batch_size / 2 items per step, and rank 0 alone writes outputs.
    """
    from vlp.cli import main

    cwd = tmp_path / "nodes"
    cwd.mkdir()
    shutil.copy(empty_store, cwd / "mlflow.db")
    shards = cwd / "shards"
    argv = ["shard", "--data", str(smoke_data), "--out", str(shards), "--samples-per-shard", "8"]
    assert main([*argv, "--split", "pretrain", "--split", "train"]) == 0
    script = tmp_path / "recording_cli.py"
    script.write_text(_RECORDING_CLI)
    sets = [f"data.root={smoke_data}", f"data.shards={shards}", "data.shuffle_buffer=16"]

    def two_nodes(command: list[str], more: tuple[str, ...] = ()) -> list[str]:
        vlp = _vlp_args([*sets, *more], command)
        return _two_nodes(cwd, [], command, argv=[str(script), *vlp[2:]])

    outs = two_nodes(["pretrain"])
    assert sum(o.count('"world_size": 2') for o in outs) == 1  # rank 0 reports, on one node
    p = smoke_cfg.pretrain
    micro = p.batch_size // 2
    streams = _streamed(cwd)
    assert p.caption_warmup_steps > 0  # the smoke recipe: warm-up steps, then joint steps
    for rank, got in enumerate(streams):
        warmup = _expected(shards, smoke_cfg, rank, True, p.caption_warmup_steps * micro, micro)
        joint = _expected(shards, smoke_cfg, rank, False, p.max_steps * micro, micro)
        assert got == warmup + joint
    assert streams[0] != streams[1]
    assert (cwd / OUT / "models" / "pretrained" / "model.safetensors").is_file()
    metrics = json.loads((cwd / OUT / "metrics" / "pretrain.json").read_text())
    assert (metrics["steps"], metrics["world_size"]) == (p.max_steps, 2)
    (run,) = _stage_runs(cwd)
    assert run.info.run_name == "pretrain" and run.data.params["world_size"] == "2"

    outs = two_nodes(["finetune", "retrieval"], ("finetune.ablation=false",))
    assert sum(o.count('"model_dir"') for o in outs) == 1
    assert (cwd / OUT / "models" / "finetuned" / "retrieval-pretrained" / "task.json").is_file()
    ft = smoke_cfg.finetune.retrieval
    streams = _streamed(cwd)
    for got in streams:
        assert len(got) == ft.max_steps * ft.batch_size // 2
        assert {(s, f) for s, f, *_ in got} == {(tuple(sorted(smoke_cfg.finetune.splits)), False)}
    assert streams[0] != streams[1]
    runs = {r.info.run_name: r for r in _stage_runs(cwd)}
    assert runs.keys() == {"pretrain", "finetune-retrieval-pretrained"}
    assert runs["finetune-retrieval-pretrained"].data.params["world_size"] == "2"
