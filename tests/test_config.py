"""params.yaml -> Config: profiles, overrides and the errors a user sees."""

from pathlib import Path

import pytest

from vlp.cli import main
from vlp.config import load_config
from vlp.errors import ConfigError

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def test_repo_params_load_for_every_profile():
    default = load_config(REPO_PARAMS, profile="default")
    smoke = load_config(REPO_PARAMS, profile="smoke")
    assert smoke.profile == "smoke"
    assert smoke.data.n_pretrain < default.data.n_pretrain
    # the overlay is deep-merged: keys it does not name keep their default values
    assert smoke.data.captions_per_image == default.data.captions_per_image
    assert smoke.finetune.vqa.lr == default.finetune.vqa.lr


def test_overrides_are_parsed_as_yaml(tmp_path):
    cfg = load_config(REPO_PARAMS, overrides=["pretrain.lr=0.25", "model.image_tower=vit"])
    assert cfg.pretrain.lr == 0.25 and cfg.model.image_tower == "vit"
    assert cfg.section_hash("pretrain") != load_config(REPO_PARAMS).section_hash("pretrain")


@pytest.mark.parametrize(
    ("overrides", "profile", "message"),
    [
        (["pretrain.lr=abc"], None, "pretrain.lr: expected a number"),
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
        ([], "huge", "profile 'huge' is not defined"),
    ],
)
def test_bad_params_name_the_key(overrides, profile, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO_PARAMS, profile=profile, overrides=overrides)


def test_cli_turns_config_errors_into_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text("data: {n_train: many}\n")
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
