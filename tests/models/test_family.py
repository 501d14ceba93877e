"""Model families: one record each in one registry, which every family-specific step follows."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from vlp.errors import ConfigError
from vlp.models.family import (
    FAMILIES,
    build_from_params,
    fresh_model,
    load_model,
    model_family,
    task_not_applicable,
)

VLP = Path(__file__).resolve().parents[2] / "vlp"
# The registry and the family modules: the only code that may know a family by its name
FAMILY_CODE = {
    "family.py",
    "fusion.py",
    "clip.py",
    "blip.py",
    "vlp_model.py",
    "encoder_decoder.py",
    "t5.py",
}
FAMILY_WORDS = {"family", "kind", "format"}
# family names and checkpoint formats, as they were and are spelled
FAMILY_NAMES = {"fusion", "clip", "blip", "vlp", "encoder-decoder", "vision-encoder-decoder", "t5"}


def test_a_new_family_is_one_registry_line(monkeypatch, tiny_cfg, tokenizer, tmp_path):
    # a family named "twin" whose module is the clip family's: nothing else is registered
    twin = dataclasses.replace(FAMILIES["clip"], name="twin", description="a twin")
    monkeypatch.setitem(FAMILIES, "twin", twin)
    torch.manual_seed(0)
    model = build_from_params(tiny_cfg(family="twin"), tokenizer, temperature=0.07)
    model.save_pretrained(tmp_path / "m")
    assert model_family(tmp_path / "m") == "twin"
    loaded = load_model(tmp_path / "m")
    assert loaded.family is twin and loaded.format == "vlp" and not loaded.has_itm
    assert torch.equal(loaded.model.temp, model.temp)
    assert fresh_model(tmp_path / "m", temperature=0.5).temp.item() == pytest.approx(0.5)
    assert task_not_applicable("twin", "retrieval") is None
    assert "model.family twin (a twin) does not do vqa" in task_not_applicable("twin", "vqa")


def test_an_unknown_family_is_a_config_error(tiny_cfg, tokenizer):
    with pytest.raises(ConfigError, match="model.family: 'mae' is not one of fusion, clip"):
        build_from_params(tiny_cfg(family="mae"), tokenizer, temperature=0.07)


def test_each_family_does_what_its_record_says(tiny_cfg, tokenizer, tmp_path):
    for family in FAMILIES.values():
        torch.manual_seed(0)
        cfg = tiny_cfg(family=family.name, image_tower="vit")  # a tower every family builds
        model = build_from_params(cfg, tokenizer, temperature=0.07)
        assert hasattr(model, "itm_logits") == family.has_itm
        assert hasattr(model, "generate_captions") == ("captioning" in family.tasks)
        assert hasattr(model, "generate_answers") == family.generates_answers
        model.save_pretrained(tmp_path / family.name)
        assert load_model(tmp_path / family.name).family is family


def _family_branches(path: Path) -> list[str]:
    """Lines of `path` comparing a family/kind/format to a family's name, or testing a model's
    class."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            named = any(
                (isinstance(s, ast.Name) and s.id in FAMILY_WORDS)
                or (isinstance(s, ast.Attribute) and s.attr in FAMILY_WORDS)
                for s in sides
            )
            if named and any(
                isinstance(s, ast.Constant) and s.value in FAMILY_NAMES for s in sides
            ):
                found.append(f"{path.relative_to(VLP.parent)}:{node.lineno}")
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
            if any(
                "Encoder" in ast.unparse(a) or "VLPModel" in ast.unparse(a) for a in node.args[1:]
            ):
                found.append(f"{path.relative_to(VLP.parent)}:{node.lineno}")
    return found


def test_nothing_outside_the_families_branches_on_a_family():
    files = [
        p for p in VLP.rglob("*.py") if not (p.parent.name == "models" and p.name in FAMILY_CODE)
    ]
    branches = [line for p in files for line in _family_branches(p)]
    assert not branches, f"family names outside vlp/models' family modules: {branches}"


def test_a_model_temperature_left_unset_is_a_config_error(tiny_cfg, tokenizer) -> None:
    with pytest.raises(ConfigError, match="model.temperature: must be a number > 0, got None"):
        build_from_params(tiny_cfg(temperature=None), tokenizer, temperature=None)
