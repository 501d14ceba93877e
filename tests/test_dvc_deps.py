"""dvc.yaml declares, per stage, exactly the vlp code its command imports.

The imports are found statically: from the `vlp` CLI's handler of the stage's command
(`_cmd_<command>` in vlp/cli.py, plus cli.py's own module-level imports), following every
`vlp.*`/`flows.*` import transitively, lazy imports inside functions included, as well as
module names written as strings (`"vlp.models.vlp_model"`, `"vlp.tasks.predictor:load_predictor"`)
and sibling scripts named as files (`pyfunc_entry.py`). A task's implementation module
(`Task(implementation="vlp.tasks.<task>.task")`) counts only for commands that load it
(`.module()`). A declared folder covers the modules inside it. A module with no code
(empty, or a docstring only) needs no dep.
"""

from __future__ import annotations

import ast
import functools
import shlex
from pathlib import Path

import pytest

from vlp.tasks import TASK_NAMES as TASKS

REPO = Path(__file__).resolve().parents[1]
CODE_ROOTS = ("vlp", "flows")


@functools.cache
def _parse(source: str) -> ast.Module:
    """The syntax tree of a module's source; parsed once, as every stage walks the same modules."""
    return ast.parse(source)


@functools.cache
def _nodes(source: str) -> tuple[ast.AST, ...]:
    """Every node of `_parse(source)`."""
    return tuple(ast.walk(_parse(source)))


def _module_file(name: str, root: Path = REPO) -> Path | None:
    base = root.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _package_of(name: str, root: Path) -> str:
    path = _module_file(name, root)
    return name if path is not None and path.name == "__init__.py" else name.rpartition(".")[0]


# Task(<keyword>="vlp....") names a module that `<task>.<loader>()` imports
TASK_MODULES = {"implementation": "module", "zeroshot": "zeroshot_module"}


def _implementations(nodes: list[ast.AST], keyword: str | None = None) -> set[str]:
    """Task modules named in `nodes` (`Task(implementation="vlp....")`; `keyword`: only
    those named by it, else those of every `TASK_MODULES` keyword)."""
    return {
        kw.value.value
        for node in nodes
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Task"
        for kw in node.keywords
        if (kw.arg == keyword if keyword else kw.arg in TASK_MODULES)
        and isinstance(kw.value, ast.Constant)
    }


def _loads_implementations(nodes: list[ast.AST], loader: str = "module") -> bool:
    """Whether `nodes` call `<task>.<loader>()`, which imports a task's module."""
    return any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == loader
        for n in nodes
    )


def _referenced_modules(name: str, nodes: list[ast.AST], root: Path = REPO) -> set[str]:
    """vlp/flows modules that `nodes` (of module `name`) import or name."""
    package = _package_of(name, root)
    found: set[str] = set()
    implementations = _implementations(nodes)
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            found.add(base)
            # `from vlp.data import shapes` imports the submodule
            found |= {f"{base}.{alias.name}" for alias in node.names}
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value not in implementations
        ):
            text = node.value.partition(":")[0]
            if text.endswith(".py") and "/" not in text:
                found.add(f"{package}.{text[:-3]}")
            elif text.split(".")[0] in CODE_ROOTS:
                found.add(text)
    return {m for m in found if m.split(".")[0] in CODE_ROOTS and _module_file(m, root)}


def imported_modules(command: str, root: Path = REPO) -> set[str]:
    """Every vlp/flows module `vlp <command>` may import, parent packages included."""
    cli = _parse((root / "vlp" / "cli.py").read_text())
    name = f"_cmd_{command.replace('-', '_')}"  # `vlp pretrain-vision`: _cmd_pretrain_vision
    handler = next((n for n in cli.body if isinstance(n, ast.FunctionDef) and n.name == name), None)
    assert handler is not None, f"vlp/cli.py has no {name} for `vlp {command}`"
    # cli.py's own lazy imports belong to other commands: only its top level and the handler
    todo = [
        "vlp.cli",
        *_referenced_modules("vlp.cli", cli.body, root),
        *_referenced_modules("vlp.cli", list(ast.walk(handler)), root),
    ]
    seen: set[str] = set()
    named = {k: set() for k in TASK_MODULES}  # keyword -> the modules it names
    handler_nodes = list(ast.walk(handler))
    loads = {k: _loads_implementations(handler_nodes, v) for k, v in TASK_MODULES.items()}
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name in seen:
                continue
            seen.add(name)
            if name != "vlp.cli":
                nodes = list(_nodes(_module_file(name, root).read_text()))
                todo.extend(_referenced_modules(name, nodes, root))
                for k, loader in TASK_MODULES.items():
                    named[k] |= _implementations(nodes, k)
                    loads[k] = loads[k] or _loads_implementations(nodes, loader)
        if not todo:
            todo.extend(m for k in TASK_MODULES if loads[k] for m in named[k] - seen)
    return seen


def _has_code(path: Path) -> bool:
    body = _parse(path.read_text()).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return bool(body)


def _code_files(command: str, root: Path = REPO) -> set[str]:
    files = (_module_file(m, root) for m in imported_modules(command, root))
    return {str(f.relative_to(root)) for f in files if f is not None and _has_code(f)}


def _covers(dep: str, path: str) -> bool:
    return path == dep or path.startswith(dep.rstrip("/") + "/")


def _stages() -> dict[str, dict]:
    """dvc.yaml's stages as DVC resolves them: name -> {cmd, deps}."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(REPO), config={"core": {"no_scm": True}}) as repo:
        stages = repo.stage.collect(str(REPO / "dvc.yaml"))
        return {
            s.name: {
                "cmd": s.cmd,
                "deps": [str(d.def_path) for d in s.deps if not isinstance(d, ParamsDependency)],
            }
            for s in stages
        }


STAGES = _stages()


def _command(cmd: str) -> str:
    words = shlex.split(cmd)
    assert words[0] == "vlp", f"stage command {cmd!r} is not a `vlp` command"
    return next(w for w in words[1:] if not w.startswith("-"))


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_code_deps_are_exactly_what_its_command_imports(stage: str) -> None:
    cmd, deps = STAGES[stage]["cmd"], STAGES[stage]["deps"]
    imported = _code_files(_command(cmd))
    code_deps = [d for d in deps if d.split("/")[0] in CODE_ROOTS]
    missing = sorted(f for f in imported if not any(_covers(d, f) for d in code_deps))
    unused = sorted(d for d in code_deps if not any(_covers(d, f) for f in imported))
    assert not missing, f"{stage}: `{cmd}` imports {missing}; add them (or their package) to deps"
    assert not unused, f"{stage}: deps {unused} are code that `{cmd}` never imports"


def test_the_import_walk_follows_lazy_string_and_relative_imports(tmp_path: Path) -> None:
    """The walk itself: each way of reaching a module is seen, unreachable ones are not."""
    files = {
        "vlp/__init__.py": "",
        "vlp/cli.py": (
            "from vlp.config import X\n"
            "def _cmd_go(cfg, args):\n    from vlp.stage import run\n"
            "def _cmd_other(cfg, args):\n    from vlp import unused\n"
        ),
        "vlp/config.py": "X = 1\n",
        "vlp/stage.py": "def run():\n    from .pkg import lazy\n    return 'vlp.pkg.named'\n",
        "vlp/pkg/__init__.py": '"""Only a docstring."""\n',
        "vlp/pkg/lazy.py": "ENTRY = 'script.py'\n",
        "vlp/pkg/script.py": "import vlp.config\n",
        "vlp/pkg/named.py": "",
        "vlp/unused.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert imported_modules("go", tmp_path) == {
        "vlp",
        "vlp.cli",
        "vlp.config",
        "vlp.stage",
        "vlp.pkg",
        "vlp.pkg.lazy",
        "vlp.pkg.script",
        "vlp.pkg.named",
    }
    # empty and docstring-only modules carry no code to depend on
    assert _code_files("go", tmp_path) == {
        "vlp/cli.py",
        "vlp/config.py",
        "vlp/stage.py",
        "vlp/pkg/lazy.py",
        "vlp/pkg/script.py",
    }


def test_the_flow_runs_one_stage_per_task_and_init_in_dependency_order() -> None:
    from flows.pipeline import pipeline_stages

    stages = pipeline_stages(REPO)
    members = [f"finetune@{t}-{i}" for t in TASKS for i in ("pretrained", "scratch")]
    assert sorted(stages) == sorted(
        [
            "generate",
            "validate",
            "pretrain-vision",
            "pretrain",
            "probe",
            *members,
            *(f"evaluate@{t}" for t in TASKS),
        ]
        + ["register", "promote"]
    )
    pos = stages.index
    assert pos("generate") < pos("validate") < pos("pretrain-vision") < pos("pretrain")
    assert pos("pretrain") < pos("probe")
    for task in TASKS:
        for init in ("pretrained", "scratch"):
            assert pos("pretrain") < pos(f"finetune@{task}-{init}") < pos(f"evaluate@{task}")
        assert pos(f"evaluate@{task}") < pos("register") < pos("promote")
