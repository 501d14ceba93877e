"""Task logic lives in the task packages: nothing outside `vlp/tasks/` branches on a task name."""

from __future__ import annotations

import ast
from pathlib import Path

import vlp
from vlp.tasks import TASK_NAMES

VLP_DIR = Path(vlp.__file__).resolve().parent
# `vlp import vqa` and `vlp eval vqa` name file formats (VQA v2 JSON), not the task
FORMAT_ATTRS = {"format", "kind"}


def _task_name_comparisons(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Attribute) and s.attr in FORMAT_ATTRS for s in sides):
                continue
            values = []
            for side in sides:
                elts = side.elts if isinstance(side, ast.Tuple | ast.List | ast.Set) else [side]
                values += [e.value for e in elts if isinstance(e, ast.Constant)]
            if any(v in TASK_NAMES for v in values):
                found.append(f"{path.relative_to(VLP_DIR.parent)}:{node.lineno}")
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            value = node.value
            if isinstance(value, ast.Tuple | ast.List | ast.Set) and any(
                isinstance(e, ast.Constant) and e.value in TASK_NAMES for e in value.elts
            ):
                found.append(f"{path.relative_to(VLP_DIR.parent)}:{node.lineno} (task list)")
    return found


def test_no_task_name_branches_outside_the_task_packages():
    tasks_dir = VLP_DIR / "tasks"
    found = [
        hit
        for path in sorted(VLP_DIR.rglob("*.py"))
        if tasks_dir not in path.parents
        for hit in _task_name_comparisons(path)
    ]
    # a family's record names the tasks it supports (vlp.models.family.Family.tasks)
    found = [hit for hit in found if not hit.startswith("vlp/models/family.py")]
    assert found == [], f"task names compared or listed outside vlp/tasks/: {found}"
