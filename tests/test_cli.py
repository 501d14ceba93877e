"""The `vlp` command as a user runs it: every subcommand answers a malformed input and an
output it cannot write with one line on stderr and exit status 2; output cut short by its
reader ends quietly.

The commands run as subprocesses, exactly as typed in a shell, from a scratch folder.
The cases are checked against the argparse parser itself, so a new command cannot be
left out.

An output location that cannot be written must fail for root too, which ignores
permission bits (a chmod 0o555 folder stays writable for it), and the tests run as root
in CI. Each output therefore lies under a regular file (`blocker/out`): no user can
create anything there (ENOTDIR), on any filesystem, without mounting anything.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlp.cli import build_parser
from vlp.config import Config

REPO = Path(__file__).resolve().parents[1]
VLP = str(Path(sys.executable).with_name("vlp"))

# Commands that write nothing a user names: the registry alone (rollback), or the pipeline
# under dvc (flow, repro), whose own stages are walked here one by one.
NO_OUTPUT = {("rollback",), ("flow",), ("repro",)}

# Commands whose crashes on these inputs are fixed on another branch; strict, so that the
# mark must go once they pass.


def leaf_commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list:
    """Every runnable command of `parser` as its words, e.g. ("eval", "vqa")."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [prefix]
    return [
        leaf
        for name, sub in subs[0].choices.items()
        for leaf in leaf_commands(sub, (*prefix, name))
    ]


def _options(words: tuple[str, ...]) -> set[str]:
    parser = build_parser()
    for word in words:
        (subs,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = subs.choices[word]
    return {opt for a in parser._actions for opt in a.option_strings}


def _dump(path: Path, obj: object) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def _import_inputs(ws: Path) -> None:
    """A valid input of every `vlp import` format, over one image `pics/a.png`."""
    (ws / "pics").mkdir()
    Image.new("RGB", (24, 20), (255, 0, 0)).save(ws / "pics" / "a.png")
    _dump(
        ws / "coco.json",
        {
            "images": [{"id": 1, "file_name": "a.png"}],
            "annotations": [{"id": 1, "image_id": 1, "caption": "a red square"}],
        },
    )
    sentence = {"raw": "a red square", "imgid": 1, "sentid": 1}
    image = {"filename": "a.png", "imgid": 1, "split": "train", "sentences": [sentence]}
    _dump(ws / "karpathy.json", {"images": [image]})
    question = {"image_id": 1, "question": "is it red?", "question_id": 1}
    _dump(ws / "vqa_q.json", {"questions": [question]})
    answers = [{"answer": "yes", "answer_confidence": "yes", "answer_id": 1}]
    annotation = {
        "question_id": 1, "image_id": 1, "question_type": "is it", "answer_type": "yes/no",
        "multiple_choice_answer": "yes", "answers": answers,
    }  # fmt: skip
    _dump(ws / "vqa_a.json", {"annotations": [annotation]})
    (ws / "table.csv").write_text("image_path,caption\na.png,a red square\n")


def _eval_inputs(ws: Path) -> None:
    """Valid inputs of `vlp eval captions|vqa|retrieval`."""
    _dump(ws / "cap_ann.json", {"annotations": [{"image_id": 1, "id": 1, "caption": "a car"}]})
    _dump(ws / "cap_res.json", [{"image_id": 1, "caption": "a car"}])
    answers = [{"answer": "2", "answer_confidence": "yes", "answer_id": i} for i in range(10)]
    annotation = {
        "question_id": 1, "image_id": 9, "answer_type": "number", "question_type": "how many",
        "answers": answers,
    }  # fmt: skip
    _dump(ws / "q.json", {"questions": [{"question_id": 1, "image_id": 9, "question": "?"}]})
    _dump(ws / "a.json", {"annotations": [annotation]})
    _dump(ws / "vqa_res.json", [{"question_id": 1, "answer": "2"}])
    np.save(ws / "sim.npy", np.random.default_rng(0).random((2, 10)))


@pytest.fixture(scope="module")
def ws(smoke_cfg: Config, smoke_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch folder holding a valid input of every command and malformed ones."""
    from tests.checkpoints.vlp import tiny_vlp_dir

    ws = tmp_path_factory.mktemp("cli")
    (ws / "bad.yaml").write_text("seed: [1, 2\n")
    (ws / "bad.json").write_text('{"images": [')
    (ws / "bad.npy").write_bytes(b"not a numpy file")
    (ws / "bad.parquet").write_bytes(b"PAR1 not really")
    (ws / "bad_metrics").mkdir()
    (ws / "bad_metrics" / "retrieval.json").write_text("{")
    (ws / "notdata").mkdir()
    (ws / "blocker").write_text("a file: nothing can be created under it\n")
    (ws / "data").symlink_to(smoke_data)
    _import_inputs(ws)
    _eval_inputs(ws)
    tiny_vlp_dir(smoke_cfg, ws / "pretrained")
    tiny_vlp_dir(smoke_cfg, ws / "finetuned" / "retrieval-pretrained", rerank_k=0)
    return ws


# Each case: the arguments after `vlp --params <repo>/params.yaml --profile smoke`, and a
# word the one line on stderr must hold (the input or output at fault).
Case = tuple[list[str], str]

MALFORMED: dict[tuple[str, ...], Case] = {
    ("generate",): (["--params", "bad.yaml", "--profile", "default", "generate"], "bad.yaml"),
    ("import", "coco"): (
        ["import", "coco", "--annotations", "bad.json", "--images", "pics", "--out", "o"],
        "bad.json",
    ),
    ("import", "karpathy"): (
        ["import", "karpathy", "--split-json", "bad.json", "--images", "pics", "--out", "o"],
        "bad.json",
    ),
    ("import", "vqa"): (
        ["import", "vqa", "--questions", "bad.json", "--annotations", "vqa_a.json"]
        + ["--images", "pics", "--out", "o"],
        "bad.json",
    ),
    ("import", "table"): (
        ["import", "table", "--table", "bad.parquet", "--images", "pics", "--out", "o"],
        "bad.parquet",
    ),
    ("validate",): (["validate", "--data", "notdata"], "notdata"),
    ("shard",): (["shard", "--data", "notdata", "--out", "shards"], "notdata"),
    ("pretrain",): (["--set", "data.root=notdata", "pretrain"], "notdata"),
    ("pretrain-vision",): (
        ["--set", "data.root=notdata", "--set", "pretrain_vision.enabled=true"]
        + ["--set", "model.image_tower=vit", "pretrain-vision"],
        "notdata",
    ),
    ("probe",): (["--set", "data.root=notdata", "probe"], "notdata"),
    ("finetune",): (
        ["--set", "data.root=data", "--set", "finetune.init_dir=notdata", "finetune", "retrieval"],
        "notdata",
    ),
    ("evaluate",): (
        [
            "--set",
            "data.root=data",
            "--set",
            "evaluate.models_dir=notdata",
            "evaluate",
            "retrieval",
        ],
        "notdata",
    ),
    ("eval", "captions"): (
        ["eval", "captions", "--results", "bad.json", "--annotations", "cap_ann.json"],
        "bad.json",
    ),
    ("eval", "vqa"): (
        [
            "eval",
            "vqa",
            "--results",
            "bad.json",
            "--questions",
            "q.json",
            "--annotations",
            "a.json",
        ],
        "bad.json",
    ),
    ("eval", "retrieval"): (["eval", "retrieval", "--similarity", "bad.npy"], "bad.npy"),
    ("eval", "generation"): (
        ["eval", "generation", "--annotations", "bad.json", "--images", "pics"],
        "bad.json",
    ),
    ("zeroshot",): (["zeroshot", "--model", "notdata", "--data", "data"], "notdata"),
    ("embed",): (
        ["embed", "--model", "pretrained", "--data", "notdata", "--out", "e.parquet"],
        "notdata",
    ),
    ("register",): (["--set", "runtime.metrics_dir=bad_metrics", "register", "retrieval"], "bad_"),
    ("promote",): (["--set", "tracking.uri=sqlite:///bad.json", "promote", "all"], "bad.json"),
    ("rollback",): (["--set", "tracking.uri=sqlite:///bad.json", "rollback", "vqa"], "bad.json"),
    ("flow",): (["--params", "bad.yaml", "--profile", "default", "flow", "run"], "bad.yaml"),
    ("repro",): (["repro", "--profile", "nosuch"], "nosuch"),
}

OUT = "blocker/out"
READ_ONLY: dict[tuple[str, ...], Case] = {
    ("generate",): (["generate", "--out", OUT], "blocker"),
    ("import", "coco"): (
        ["import", "coco", "--annotations", "coco.json", "--images", "pics", "--out", OUT],
        "blocker",
    ),
    ("import", "karpathy"): (
        ["import", "karpathy", "--split-json", "karpathy.json", "--images", "pics", "--out", OUT],
        "blocker",
    ),
    ("import", "vqa"): (
        ["import", "vqa", "--questions", "vqa_q.json", "--annotations", "vqa_a.json"]
        + ["--images", "pics", "--out", OUT],
        "blocker",
    ),
    ("import", "table"): (
        ["import", "table", "--table", "table.csv", "--images", "pics", "--out", OUT],
        "blocker",
    ),
    ("validate",): (
        # the pipeline stage (no --data) always writes its report
        ["--set", "data.root=data", "--set", f"validate.report_dir={OUT}", "validate"],
        "blocker",
    ),
    ("shard",): (["shard", "--data", "data", "--out", OUT], "blocker"),
    ("pretrain",): (
        ["--set", "data.root=data", "--set", f"pretrain.out_dir={OUT}", "pretrain"],
        "blocker",
    ),
    ("pretrain-vision",): (
        ["--set", "data.root=data", "--set", f"pretrain_vision.out_dir={OUT}", "pretrain-vision"],
        "blocker",
    ),
    ("probe",): (
        ["--set", "data.root=data", "--set", f"runtime.metrics_dir={OUT}", "probe"],
        "blocker",
    ),
    ("finetune",): (
        ["--set", "data.root=data", "--set", f"finetune.out_dir={OUT}"]
        + ["finetune", "retrieval", "--init", "scratch"],
        "blocker",
    ),
    ("evaluate",): (
        ["--set", "data.root=data", "--set", "evaluate.models_dir=finetuned"]
        + ["--set", f"evaluate.results_dir={OUT}", "evaluate", "retrieval"],
        "blocker",
    ),
    ("eval", "captions"): (
        ["eval", "captions", "--results", "cap_res.json", "--annotations", "cap_ann.json"]
        + ["--out", OUT],
        "blocker",
    ),
    ("eval", "vqa"): (
        ["eval", "vqa", "--results", "vqa_res.json", "--questions", "q.json"]
        + ["--annotations", "a.json", "--out", OUT],
        "blocker",
    ),
    ("eval", "retrieval"): (
        ["eval", "retrieval", "--similarity", "sim.npy", "--out", OUT],
        "blocker",
    ),
    ("eval", "generation"): (
        ["eval", "generation", "--annotations", "coco.json", "--images", "pics", "--out", OUT],
        "blocker",
    ),
    ("zeroshot",): (
        ["zeroshot", "--model", "pretrained", "--data", "data", "--out", OUT],
        "blocker",
    ),
    ("embed",): (["embed", "--model", "pretrained", "--data", "data", "--out", OUT], "blocker"),
    ("register",): (["register", "retrieval", "--out", OUT], "blocker"),
    ("promote",): (["promote", "all", "--out", OUT], "blocker"),
}


def test_every_command_has_a_malformed_input_and_a_read_only_output_case() -> None:
    leaves = set(leaf_commands(build_parser()))
    assert leaves == set(MALFORMED)
    assert leaves == set(READ_ONLY) | NO_OUTPUT and not set(READ_ONLY) & NO_OUTPUT
    # a command with an --out option writes it
    assert {leaf for leaf in leaves if "--out" in _options(leaf)} <= set(READ_ONLY)


def _vlp(ws: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VLP_", "DVC_"))}
    cmd = [VLP, "--params", str(REPO / "params.yaml"), "--profile", "smoke", *args]
    return subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=600)


def _cases(table: dict[tuple[str, ...], Case]) -> list:
    return [pytest.param(words, id=" ".join(words)) for words in table]


def _assert_one_line_error(result: subprocess.CompletedProcess, words: tuple, names: str) -> None:
    lines = result.stderr.splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"vlp {words[0]}: error: ") and names in lines[0], lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("words", _cases(MALFORMED))
def test_malformed_input_is_one_line_naming_it(ws: Path, words: tuple[str, ...]) -> None:
    args, names = MALFORMED[words]
    _assert_one_line_error(_vlp(ws, args), words, names)


@pytest.mark.slow
@pytest.mark.parametrize("words", _cases(READ_ONLY))
def test_unwritable_output_is_one_line_naming_it(ws: Path, words: tuple[str, ...]) -> None:
    args, names = READ_ONLY[words]
    assert (ws / "blocker").is_file()
    _assert_one_line_error(_vlp(ws, args), words, names)


@pytest.mark.slow
def test_output_cut_short_by_its_reader_ends_quietly(tmp_path: Path) -> None:
    """`vlp eval retrieval ... | head -1`: the reader is gone before vlp writes."""
    np.save(tmp_path / "sim.npy", np.random.default_rng(0).random((2, 10)))
    read, write = os.pipe()
    os.close(read)  # every write to the pipe now fails (EPIPE), as after `head` has exited
    args = ["eval", "retrieval", "--similarity", "sim.npy", "--out", "scores.json"]
    try:
        result = subprocess.run(
            [VLP, "--params", str(REPO / "params.yaml"), *args],
            cwd=tmp_path, stdout=write, stderr=subprocess.PIPE, text=True, timeout=600,
        )  # fmt: skip
    finally:
        os.close(write)
    assert result.stderr == ""
    assert result.returncode == 141  # 128 + SIGPIPE, as a shell reports a tool SIGPIPE ended
    assert "rsum" in json.loads((tmp_path / "scores.json").read_text())
