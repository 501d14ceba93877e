"""`vlp repro`'s expansion of a profile into `dvc exp run -S` flags, read back by DVC itself."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from dvc.utils.cli_parse import to_path_overrides
from dvc.utils.hydra import apply_overrides

from vlp.cli import main
from vlp.config import load_config, write_variant_params
from vlp.errors import ConfigError
from vlp.lineage import PROFILE_ENV
from vlp.repro import exp_run_command, repro_profile, set_param_flags

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """params.yaml and profiles.yaml of this project in a scratch folder, the working directory."""
    monkeypatch.chdir(tmp_path)
    for name in ("params.yaml", "profiles.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    return tmp_path / "params.yaml"


def _dvc_applies(flags: list[str], dest: Path) -> Path:
    """The params file `flags` name, with them applied as `dvc exp run -S` does, at `dest`."""
    assert flags[::2] == ["-S"] * (len(flags) // 2)
    ((params, overrides),) = to_path_overrides(flags[1::2]).items()
    shutil.copy(params, dest)
    apply_overrides(dest, overrides)
    return dest


def test_dvc_applies_the_flags_as_vlp_applies_the_profile_then_the_sets(
    project: Path, tmp_path: Path
) -> None:
    sets = [
        "pretrain.max_steps=7",  # --set beats the profile's 4
        "data.root=my data/it's \\here",  # quotes, spaces and backslashes stay in the string
        "tracking.experiment=1e-3",  # a string that reads as a number stays a string
        "evaluate.data_root=null",
        "pretrain_vision.enabled=true",
        "pretrain.lr=0.002",
    ]
    flags = set_param_flags(project, "smoke", sets)
    by_dvc = load_config(_dvc_applies(flags, tmp_path / "dvc.yaml"))
    by_vlp = write_variant_params(project, tmp_path / "vlp.yaml", "smoke", sets)
    # the stages read the profile's name from VLP_PROFILE, not from params
    assert dataclasses.replace(by_dvc, profile="smoke").to_dict() == by_vlp.to_dict()
    assert by_dvc.pretrain.max_steps == 7 and by_dvc.data.n_train == 24
    assert by_dvc.data.root == "my data/it's \\here" and by_dvc.tracking.experiment == "1e-3"
    assert by_dvc.model.cnn_channels == [8, 16, 32]  # a list param of the profile
    # output folders stay where dvc.yaml names them: the experiment has its own copy
    assert by_dvc.pretrain.out_dir == load_config(project).pretrain.out_dir


def test_flags_name_a_params_file_other_than_params_yaml_and_the_targets(
    project: Path,
) -> None:
    flags = set_param_flags("params.yaml", "smoke")
    assert "data.n_train=24" in flags and "model.cnn_channels=[8,16,32]" in flags
    other = project.parent / "conf" / "params.yaml"
    other.parent.mkdir()
    for name in ("params.yaml", "profiles.yaml"):
        shutil.copy(project.parent / name, other.parent / name)
    assert set_param_flags(other, "smoke")[1] == "conf/params.yaml:data.n_pretrain=48"
    with pytest.raises(ConfigError, match="not in the working directory"):
        set_param_flags(REPO / "params.yaml", "smoke")
    cmd = exp_run_command("params.yaml", "smoke", None, "tiny", ["evaluate@vqa"])
    assert cmd[1:8] == ["-m", "dvc", "exp", "run", "--temp", "--name", "tiny"]
    assert cmd[8:] == [*flags, "evaluate@vqa"]


def test_bad_profiles_and_keys_are_named_before_anything_runs(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError, match="profile 'tiny' is not defined"):
        set_param_flags(project, "tiny")
    params = ["--params", str(project)]
    assert main([*params, "--set", "pretrain.nosuch=1", "repro", "--profile", "smoke"]) == 2
    assert "pretrain.nosuch" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="pretrain.nosuch"):
        repro_profile(project, "smoke", ["pretrain.nosuch=1"], dry_run=True)


def test_the_command_needs_a_profile_and_prints_what_it_runs(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["repro"]) == 2
    assert "name one with --profile" in capsys.readouterr().err
    assert main(["repro", "--profile", "smoke", "--name", "t1", "--dry-run", "pretrain"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{PROFILE_ENV}=smoke MLFLOW_TRACKING_URI=sqlite:///")
    assert "dvc exp run --temp --name t1 -S data.n_pretrain=48" in out
    assert out.rstrip().endswith("pretrain")
    assert not (project.parent / "mlflow.db").exists()  # a dry run opens no MLflow run
