"""Inside `dvc repro`, a checkpoint a stage reads must be one of its DVC deps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vlp.cli import main
from vlp.errors import ConfigError
from vlp.lineage import check_checkpoint_deps

REPO = Path(__file__).resolve().parents[2]
DVC = Path(sys.executable).parent / "dvc"
CHECK = (
    "from vlp.lineage import check_checkpoint_deps; "
    "check_checkpoint_deps({'model.image_pretrained': 'ckpt/vit', 'model.init_from': None})"
)


def _dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env["PATH"] = f"{DVC.parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        [str(DVC), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300
    )


def _project(root: Path, deps: list[str]) -> Path:
    """A dvc project (no git) with one stage `pretrain` that runs the check on ckpt/vit."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "ckpt" / "vit").mkdir(parents=True, exist_ok=True)
    (root / "ckpt" / "vit" / "config.json").write_text("{}")
    if not (root / ".dvc").exists():
        assert _dvc(root, "init", "--no-scm", "-q").returncode == 0
    cmd = f'{sys.executable} -c "{CHECK}"'
    stage = {"cmd": cmd, "deps": deps, "outs": []}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"pretrain": stage}}))
    return root


@pytest.mark.slow  # `dvc repro` in a subprocess
def test_dvc_repro_refuses_a_checkpoint_that_is_not_a_dep(tmp_path: Path) -> None:
    repo = _project(tmp_path / "repo", deps=[])
    done = _dvc(repo, "repro", "pretrain")
    assert done.returncode != 0
    err = done.stdout + done.stderr
    assert "model.image_pretrained: ckpt/vit is read by DVC stage pretrain" in err
    _project(repo, deps=["ckpt"])  # a folder above it covers it
    done = _dvc(repo, "repro", "pretrain")
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_check_runs_only_inside_dvc_and_names_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / ".dvc").mkdir()  # a DVC project as far as the stage lookup goes
    stage = {"cmd": "vlp pretrain", "deps": ["ckpt/bert", str(tmp_path / "abs")]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"pretrain": stage}}))
    monkeypatch.delenv("DVC_STAGE", raising=False)
    check_checkpoint_deps({"model.image_pretrained": "ckpt/vit"})  # outside DVC: no check
    monkeypatch.setenv("DVC_STAGE", "pretrain")
    monkeypatch.setenv("DVC_ROOT", str(repo))
    check_checkpoint_deps(
        {
            "model.text_pretrained": "ckpt/bert",
            "model.tokenizer_pretrained": "ckpt/bert/tokenizer",
            "model.image_pretrained": str(tmp_path / "abs"),  # outside the project
            "model.init_from": None,
        }
    )
    with pytest.raises(ConfigError, match=r"^model.image_pretrained: ckpt/vit is read by"):
        check_checkpoint_deps({"model.image_pretrained": "ckpt/vit"})
    with pytest.raises(ConfigError, match="ckpt/bertie"):  # a prefix is not a parent
        check_checkpoint_deps({"model.text_pretrained": "ckpt/bertie"})


def test_vlp_pretrain_under_dvc_refuses_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    stage = {"cmd": "vlp pretrain", "deps": ["data"]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"pretrain": stage}}))
    (repo / "bert").mkdir()
    monkeypatch.chdir(repo)
    monkeypatch.setenv("DVC_STAGE", "pretrain")
    monkeypatch.setenv("DVC_ROOT", str(repo))
    params = ["--params", str(REPO / "params.yaml"), "--profile", "smoke"]
    rc = main([*params, "--set", "model.text_pretrained=bert", "pretrain"])
    assert rc == 2
    assert "model.text_pretrained: bert is read by DVC stage pretrain" in capsys.readouterr().err
    assert sorted(p.name for p in repo.iterdir()) == [".dvc", "bert", "dvc.yaml"]
