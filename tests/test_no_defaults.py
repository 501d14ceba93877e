"""params.yaml is the one source of every knob: the code spells no default of a params key."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]

# Parameters that share a params key's name but not its meaning, or whose None means
# "not given here: the params value" (a command-line override), each with its reason.
ALLOWED = {
    # a torch device to load onto, not runtime.device's auto | cpu | cuda choice
    ("*", "device"),
    # the split of a foreign data set's own files, not evaluate.split / zeroshot.split
    ("vlp/data/adapters.py", "split"),
    ("vlp/data/manifest.py", "split"),
    # `vlp shard`'s choice of splits (None: every split), not pretrain.splits / finetune.splits
    ("vlp/data/shards.py", "splits"),
    # the tokenizer's length cap (None: the model's max_text_length), not a caption length
    ("vlp/models/weights.py", "max_length"),
    # loading a trained model needs none; a checkpoint without one is refused without it
    ("vlp/models/family.py", "temperature"),
    # `vlp zeroshot` / `vlp embed` options: None takes the params value
    ("vlp/zeroshot.py", "split"),
    ("vlp/zeroshot.py", "precision"),
    ("vlp/zeroshot.py", "batch_size"),
    ("vlp/zeroshot.py", "rerank_k"),
    ("vlp/zeroshot.py", "rerank_score"),
    ("vlp/tasks/vqa/zeroshot.py", "split"),
    ("vlp/tasks/vqa/zeroshot.py", "precision"),
    ("vlp/tasks/vqa/zeroshot.py", "batch_size"),
    ("vlp/tasks/captioning/zeroshot.py", "split"),
    ("vlp/tasks/captioning/zeroshot.py", "precision"),
    ("vlp/tasks/captioning/zeroshot.py", "batch_size"),
    ("vlp/embeddings.py", "split"),
    ("vlp/embeddings.py", "precision"),
    ("vlp/embeddings.py", "batch_size"),
    # the answer decoder's own width split (finetune.vqa.answer_heads at its call site)
    ("vlp/tasks/vqa/model.py", "num_heads"),
    # a VQA model loads with these when its task.json predates recording them; training
    # passes finetune.vqa's values
    ("vlp/tasks/vqa/model.py", "head_lr_multiplier"),
    ("vlp/tasks/vqa/model.py", "freeze_encoders"),
    ("vlp/tasks/vqa/model.py", "answer_layers"),
    ("vlp/tasks/vqa/model.py", "answer_heads"),
    # a predictor's forward batch when its caller names none (evaluate passes
    # evaluate.batch_size, serving serving.max_rows)
    ("vlp/tasks/predictor.py", "batch_size"),
    ("vlp/tasks/vqa/task.py", "batch_size"),
    ("vlp/tasks/generation/task.py", "batch_size"),
    # generation metrics' forward batch when the caller names none (None: a set in one pass);
    # `vlp eval generation` passes zeroshot.batch_size
    ("vlp/metrics/generation.py", "batch_size"),
    ("vlp/metrics/feature_scores.py", "batch_size"),
}


# Code names of params keys: generation's `num_beams` is finetune.captioning.beam_size.
ALIASES = {"num_beams": "beam_size"}


def _leaves(section: dict[str, Any], out: dict[str, list[Any]]) -> dict[str, list[Any]]:
    for key, value in section.items():
        if isinstance(value, dict):
            _leaves(value, out)
        else:
            out.setdefault(key, []).append(value)
    return out


def _defaults(tree: ast.AST) -> list[tuple[str, ast.expr]]:
    """(name, default) of every function parameter and class-level annotated field."""
    found: list[tuple[str, ast.expr]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            a = node.args
            pos = a.posonlyargs + a.args
            found += [
                (x.arg, d)
                for x, d in zip(pos[len(pos) - len(a.defaults) :], a.defaults, strict=True)
            ]
            found += [
                (x.arg, d)
                for x, d in zip(a.kwonlyargs, a.kw_defaults, strict=True)
                if d is not None
            ]
        elif isinstance(node, ast.ClassDef):
            found += [
                (s.target.id, s.value)
                for s in node.body
                if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) and s.value
            ]
    return found


def _literal(node: ast.expr) -> tuple[bool, Any]:
    try:
        return True, ast.literal_eval(node)
    except ValueError:
        return False, None


def literal_param_defaults(package: Path, params: dict[str, Any]) -> list[str]:
    """`file:line name=default` for each literal default of a params leaf key's name.

    None passes where some params key of that name is null too (None means "not set").
    """
    leaves = _leaves(params, {})
    bad = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).as_posix()
        for code_name, default in _defaults(ast.parse(path.read_text())):
            name = ALIASES.get(code_name, code_name)
            is_literal, value = _literal(default)
            if name not in leaves or not is_literal:
                continue
            if (rel, name) in ALLOWED or ("*", name) in ALLOWED:
                continue
            if value is None and None in leaves[name]:
                continue
            bad.append(f"{rel}:{default.lineno} {code_name}={ast.unparse(default)}")
    return bad


def test_no_literal_default_of_a_params_key():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert literal_param_defaults(ROOT / "vlp", params) == []


def test_the_scan_sees_parameter_and_field_defaults(tmp_path: Path):
    pkg = tmp_path / "vlp"
    pkg.mkdir()
    (pkg / "m.py").write_text(
        "from dataclasses import dataclass\n"
        "def f(x, temperature=0.07, *, num_beams=3, shards=None, lr=None): ...\n"
        "@dataclass\nclass S:\n    grad_accum_steps: int = 1\n    epochs: int\n"
    )
    params = {"model": {"temperature": 0.07}, "data": {"shards": None}, "t": {"lr": 1e-3},
              "c": {"beam_size": 3, "grad_accum_steps": 1, "epochs": 2}}  # fmt: skip
    assert literal_param_defaults(pkg, params) == [
        "vlp/m.py:2 temperature=0.07",
        "vlp/m.py:2 num_beams=3",
        "vlp/m.py:2 lr=None",
        "vlp/m.py:5 grad_accum_steps=1",
    ]
