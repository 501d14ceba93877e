"""params.yaml -> Config: the one source of defaults, profiles, overrides and the errors a user sees."""

import dataclasses
import shutil
import typing
from pathlib import Path

import pytest
import yaml

from tests.mlflow_helpers import empty_store  # noqa: F401
from vlp.cli import main
from vlp.config import (
    OUTPUT_KEYS,
    Config,
    load_config,
    parse_override,
    profile_dir,
    shapes_dir,
    write_variant_params,
)
from vlp.errors import ConfigError

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
REPO_PROFILES = REPO_PARAMS.with_name("profiles.yaml")


def test_params_yaml_sets_every_field_of_the_config():
    """Every config field comes from params.yaml, and every params key lands in the config."""
    raw = yaml.safe_load(REPO_PARAMS.read_text())
    cfg = load_config(REPO_PARAMS)
    loaded = cfg.to_dict()
    loaded.pop("profile")  # a label, not a param
    assert loaded == raw
    # the dataclasses have no defaults of their own that could disagree with params.yaml;
    # only the profile label has one
    defaults = {}
    todo = [Config]
    while todo:
        cls = todo.pop()
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                todo.append(hints[f.name])
            elif (
                f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            ):
                defaults[f"{cls.__name__}.{f.name}"] = f.default
    assert defaults == {"Config.profile": "default"}


@pytest.mark.parametrize(
    "key",
    ["seed", "runtime.device", "data.image_size", "pretrain.caption_warmup_steps",
     "finetune.vqa.freeze_encoders", "finetune.vqa.lr", "evaluate.models_dir"],
)  # fmt: skip
def test_a_key_missing_from_params_is_an_error_naming_it(tmp_path, key):
    raw = yaml.safe_load(REPO_PARAMS.read_text())
    *parents, leaf = key.split(".")
    node = raw
    for p in parents:
        node = node[p]
    del node[leaf]
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=rf"{params}: missing key {key}$"):
        load_config(params)


def test_a_missing_params_file_is_an_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match=f"{tmp_path / 'params.yaml'}: params file not found"):
        load_config(tmp_path / "params.yaml")
    assert main(["--params", str(tmp_path / "params.yaml"), "generate"]) == 2
    assert "params file not found" in capsys.readouterr().err


def test_profiles_are_not_params(tmp_path):
    raw = yaml.safe_load(REPO_PARAMS.read_text())
    assert "profile" not in raw and "profiles" not in raw
    for key, message in (("profile", "--profile"), ("profiles", "profiles.yaml")):
        params = tmp_path / f"{key}.yaml"
        params.write_text(yaml.safe_dump({**raw, key: "smoke"}))
        with pytest.raises(ConfigError, match=f"unknown key {key} in .*{message}"):
            load_config(params)


def test_repo_params_load_for_every_profile():
    default = load_config(REPO_PARAMS, profile="default")
    assert default == load_config(REPO_PARAMS)
    for name in yaml.safe_load(REPO_PROFILES.read_text()):
        assert load_config(REPO_PARAMS, profile=name).profile == name
    smoke = load_config(REPO_PARAMS, profile="smoke")
    assert smoke.data.n_pretrain < default.data.n_pretrain
    # the overlay sets only what it names: other keys keep params.yaml's values
    assert smoke.data.captions_per_image == default.data.captions_per_image
    assert smoke.finetune.vqa.lr == default.finetune.vqa.lr
    assert smoke.runtime.log_every == 1 and smoke.runtime.device == default.runtime.device


def test_set_wins_over_profile():
    smoke = load_config(REPO_PARAMS, profile="smoke")
    assert smoke.pretrain.batch_size == 16
    cfg = load_config(REPO_PARAMS, "smoke", ["pretrain.batch_size=8", "runtime.log_every=5"])
    assert cfg.pretrain.batch_size == 8 and cfg.runtime.log_every == 5
    assert cfg.pretrain.max_steps == smoke.pretrain.max_steps  # the rest of the profile holds


def test_the_params_hash_is_of_values_not_of_the_profile_name(tmp_path):
    shutil.copy(REPO_PROFILES, tmp_path / "profiles.yaml")
    smoke = write_variant_params(REPO_PARAMS, tmp_path / "params.yaml", "smoke")
    assert load_config(tmp_path / "params.yaml").section_hash() == smoke.section_hash()
    assert smoke.section_hash() != load_config(REPO_PARAMS).section_hash()


def test_overrides_are_parsed_as_yaml(tmp_path):
    cfg = load_config(REPO_PARAMS, overrides=["pretrain.lr=0.25", "model.image_tower=vit"])
    assert cfg.pretrain.lr == 0.25 and cfg.model.image_tower == "vit"
    assert cfg.section_hash("pretrain") != load_config(REPO_PARAMS).section_hash("pretrain")
    assert parse_override("model.cnn_channels=[1, 2]") == (("model", "cnn_channels"), [1, 2])
    assert parse_override("evaluate.data_root=null") == (("evaluate", "data_root"), None)


def test_a_variant_params_file_keeps_comments_and_loads_as_the_variant(tmp_path):
    shutil.copy(REPO_PROFILES, tmp_path / "profiles.yaml")
    dest = tmp_path / "params.yaml"
    cfg = write_variant_params(REPO_PARAMS, dest, "smoke", ["pretrain.lr=0.002"])
    assert cfg.pretrain.lr == 0.002 and cfg.profile == "smoke"
    assert dataclasses.replace(load_config(dest), profile="smoke") == cfg
    before, after = REPO_PARAMS.read_text().splitlines(), dest.read_text().splitlines()
    assert [line.split("#")[1] for line in before if "#" in line] == [
        line.split("#")[1] for line in after if "#" in line
    ]
    with pytest.raises(ConfigError, match="unknown key pretrain.nope"):
        write_variant_params(REPO_PARAMS, tmp_path / "bad.yaml", None, ["pretrain.nope=1"])
    assert not (tmp_path / "bad.yaml").exists()


@pytest.mark.parametrize(
    ("overrides", "profile", "message"),
    [
        (["pretrain.lr=abc"], None, "pretrain.lr: expected a finite number"),
        (["pretrain.nope=1"], None, "unknown key pretrain.nope"),
        (["finetune.vqa.epochs=1.5"], None, "finetune.vqa.epochs: expected an integer"),
        (["pretrain.lr"], None, "must look like section.key=value"),
        # a task's section holds only what means something for that task
        (
            ["finetune.retrieval.freeze_encoders=true"],
            None,
            "unknown key finetune.retrieval.freeze_encoders",
        ),
        (["finetune.captioning.rerank_k=4"], None, "unknown key finetune.captioning.rerank_k"),
        (["finetune.vqa.beam_size=2"], None, "unknown key finetune.vqa.beam_size"),
        (["=1"], None, "must look like section.key=value"),
        (["pretrain.device=cpu"], None, "unknown key pretrain.device"),
        (["pretrain.lr.x=1"], None, "pretrain.lr is not a section"),
        ([], "huge", "profile 'huge' is not defined in .*profiles.yaml"),
    ],
)
def test_bad_params_name_the_key(overrides, profile, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO_PARAMS, profile=profile, overrides=overrides)


def test_cli_turns_config_errors_into_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text(REPO_PARAMS.read_text().replace("n_train: 1000", "n_train: many"))
    assert main(["--params", str(bad), "generate", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "vlp generate: error: data.n_train: expected an integer, got 'many'"
    assert not (tmp_path / "d").exists()


def test_a_task_section_without_one_of_its_keys_names_it(tmp_path):
    import yaml

    raw = yaml.safe_load(REPO_PARAMS.read_text())
    del raw["finetune"]["captioning"]["max_length"]
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="missing key finetune.captioning.max_length"):
        load_config(params)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pretrain.lr=.inf", "pretrain.lr: expected a finite number, got inf"),
        ("pretrain.lr=-.inf", "pretrain.lr: expected a finite number, got -inf"),
        ("runtime.max_grad_norm=.nan", "runtime.max_grad_norm: expected a finite number, got nan"),
        ("images.mean=[0.5, .nan, 0.5]", "images.mean: expected list.float., got"),
        ("pretrain.lr=1" + "0" * 400, "pretrain.lr: expected a finite number, got 1000"),
        ("seed=1e23", "seed: expected an integer, got '1e23'"),
        ("seed=1.0e+23", "seed: expected an integer, got 1e.23"),
        ("seed=100000000000000000000000", "seed: 100000000000000000000000 is out of range"),
        ("model.cnn_channels=[8, 100000000000000000000000]", "model.cnn_channels: expected"),
    ],
)
def test_non_finite_and_out_of_range_numbers_are_config_errors(override, message, capsys):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO_PARAMS, overrides=[override])
    assert main(["--params", str(REPO_PARAMS), "--set", override, "pretrain"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlp pretrain: error: ") and len(err.splitlines()) == 1


def test_a_profile_writes_its_outputs_in_its_own_folder(tmp_path):
    default = load_config(REPO_PARAMS)
    smoke = load_config(REPO_PARAMS, "smoke", ["pretrain.out_dir=/tmp/x"])
    apart = profile_dir("smoke")
    assert apart == Path("profiles/smoke")
    for section, key in OUTPUT_KEYS:
        before = getattr(getattr(default, section), key)
        after = getattr(getattr(smoke, section), key)
        expected = "/tmp/x" if (section, key) == ("pretrain", "out_dir") else str(apart / before)
        assert after == expected, (section, key)
    # one stage's outputs are the next one's inputs, inside the same folder
    assert smoke.finetune.init_dir == "profiles/smoke/models/pretrained"
    assert smoke.evaluate.models_dir == smoke.finetune.out_dir
    assert smoke.runtime.metrics_dir == "profiles/smoke/metrics"
    # the generated shapes world moves with them (`vlp --profile smoke generate` writes it)
    assert smoke.data.root == str(shapes_dir("smoke")) == "profiles/smoke/data/shapes"
    assert shapes_dir() == Path(default.data.root)
    # a dataset of the user's stays where it is; `default` is no profile
    shutil.copy(REPO_PROFILES, tmp_path / "profiles.yaml")
    params = tmp_path / "params.yaml"
    params.write_text(REPO_PARAMS.read_text().replace("root: data/shapes", "root: data/coco"))
    assert load_config(params, "smoke").data.root == "data/coco"
    assert load_config(REPO_PARAMS, "default") == default


def test_a_variant_params_file_keeps_the_pipeline_output_folders(tmp_path):
    """A variant's params are a pipeline of their own: dvc.yaml names its output folders."""
    shutil.copy(REPO_PROFILES, tmp_path / "profiles.yaml")
    cfg = write_variant_params(REPO_PARAMS, tmp_path / "params.yaml", "smoke")
    default = load_config(REPO_PARAMS)
    assert cfg.runtime == dataclasses.replace(default.runtime, log_every=1)
    assert cfg.pretrain.out_dir == default.pretrain.out_dir and cfg.profile == "smoke"


@pytest.mark.slow  # trains the smoke model for a few steps
def test_a_profile_stage_leaves_the_default_pipeline_outputs_alone(
    tmp_path,
    smoke_data,
    empty_store,  # noqa: F811
    monkeypatch,
):
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    for name in ("metrics/pretrain.json", "plots/pretrain_loss.csv"):
        Path(name).parent.mkdir(exist_ok=True)
        Path(name).write_text("the default pipeline's\n")
    out = tmp_path / "x"
    args = ["--params", str(REPO_PARAMS), "--profile", "smoke", "--set", f"data.root={smoke_data}"]
    args += ["--set", "runtime.device=cpu", "--set", f"pretrain.out_dir={out}", "pretrain"]
    assert main(args) == 0
    for name in ("metrics/pretrain.json", "plots/pretrain_loss.csv"):
        assert Path(name).read_text() == "the default pipeline's\n"
        assert (Path("profiles/smoke") / name).is_file()
    assert (out / "config.json").is_file() or any(out.iterdir())
