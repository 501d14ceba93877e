"""The generate + validate DVC stages in a throwaway git+dvc repo: repro, no-op, push/pull."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from vlp.config import write_variant_params

pytestmark = pytest.mark.slow  # `dvc repro`, push and pull in subprocesses

REPO = Path(__file__).resolve().parents[2]
DVC = Path(sys.executable).parent / "dvc"


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _run(repo: Path, *args: str) -> str:
    env = dict(os.environ, PATH=f"{DVC.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    done = subprocess.run(
        [str(DVC), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture
def dvc_repo(tmp_path) -> Path:
    """A git+dvc repo with this project's data stages, smoke params and DVC remote config."""
    repo = tmp_path / "work" / "repo"
    repo.mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    _run(repo, "init", "-q")
    shutil.copy(REPO / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copy(REPO / ".gitignore", repo / ".gitignore")
    # the stages' code deps
    shutil.copytree(REPO / "vlp", repo / "vlp", ignore=shutil.ignore_patterns("__pycache__"))
    # this repo's defaults are the smoke sizes: quick to reproduce
    shutil.copy(REPO / "profiles.yaml", repo / "profiles.yaml")
    write_variant_params(REPO / "params.yaml", repo / "params.yaml", "smoke")
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    mine = {"stages": {k: stages[k] for k in ("generate", "validate")}}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(mine, sort_keys=False))
    return repo


def test_repro_twice_is_a_noop_and_push_pull_round_trips(dvc_repo):
    out = _run(dvc_repo, "repro", "validate")
    assert "Running stage 'generate'" in out and "Running stage 'validate'" in out
    data = dvc_repo / "data" / "shapes"
    summary = dvc_repo / "reports" / "validation" / "summary.json"
    assert (data / "pairs.parquet").exists() and summary.exists()
    stamp = summary.stat().st_mtime_ns

    again = _run(dvc_repo, "repro", "validate")
    assert "Running stage" not in again and "up to date" in again
    assert summary.stat().st_mtime_ns == stamp

    # The configured default remote is a directory beside the repo, not inside it.
    _run(dvc_repo, "push")
    remote = dvc_repo.parent / "vlp-dvc-remote"
    assert remote.is_dir() and any(remote.rglob("*"))

    before = _digest(data)
    shutil.rmtree(data)
    shutil.rmtree(dvc_repo / ".dvc" / "cache")
    _run(dvc_repo, "pull")
    assert _digest(data) == before
    assert "up to date" in _run(dvc_repo, "status")


def test_editing_a_profile_leaves_the_pipeline_up_to_date(dvc_repo):
    _run(dvc_repo, "repro", "generate")
    assert "up to date" in _run(dvc_repo, "status", "generate")
    profiles = dvc_repo / "profiles.yaml"
    edited = yaml.safe_load(profiles.read_text())
    edited["smoke"]["data"]["n_pretrain"] = 40
    edited["tiny"] = {"data": {"image_size": 16}}
    profiles.write_text(yaml.safe_dump(edited))
    assert "up to date" in _run(dvc_repo, "status", "generate")
    # whereas the same edit in params.yaml is a change of the generate stage
    params = dvc_repo / "params.yaml"
    params.write_text(params.read_text().replace("n_pretrain: 48", "n_pretrain: 40"))
    changed = _run(dvc_repo, "status", "generate")
    assert "params.yaml" in changed and "modified:           data" in changed


def test_photos_are_not_imported_into_the_generated_dataset_dvc_checks_out(dvc_repo, capsys):
    """`dvc repro`/`dvc checkout` restore data/shapes from the cache as it was generated,
    deleting whatever was added to it: vlp import refuses to add to it."""
    from vlp.cli import main

    _run(dvc_repo, "repro", "generate")
    data = dvc_repo / "data" / "shapes"
    photos = data / "images" / "photos"
    photos.mkdir()
    Image.new("RGB", (24, 20), (1, 2, 3)).save(photos / "a.png")
    table = dvc_repo / "photos.csv"
    table.write_text("image_path,caption\na.png,my only photo of it\n")
    before = _digest(data)
    code = main(
        ["--params", str(dvc_repo / "params.yaml"), "import", "table", "--table", str(table),
         "--images", str(photos), "--out", str(data)]
    )  # fmt: skip
    assert code == 2 and "import into another folder" in capsys.readouterr().err
    assert _digest(data) == before
    # imported elsewhere, the photo survives DVC restoring the generated dataset
    mine = dvc_repo / "mine"
    shutil.move(photos, mine / "images")
    assert main(
        ["--params", str(dvc_repo / "params.yaml"), "import", "table", "--table", str(table),
         "--images", str(mine / "images"), "--out", str(mine)]
    ) == 0  # fmt: skip
    _run(dvc_repo, "checkout", "--force", "generate")
    assert (mine / "images" / "a.png").is_file() and not photos.exists()
