"""save_weights: tied tensors stored once, and the same bytes from every process."""

from __future__ import annotations

import os
import runpy
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_model

REPO = Path(__file__).resolve().parents[2]

# Eight linear layers sharing the first one's weight: eight aliases in the header metadata,
# whose order the safetensors writer draws from a per-process hash map.
TIED = """
import sys
import torch
from vlp.models.weights import save_weights

class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(9))
        for layer in self.layers[1:]:
            layer.weight = self.layers[0].weight

if __name__ == "__main__":
    save_weights(Tied(), sys.argv[1])
"""


def _save_in_new_process(script: Path, out: Path) -> bytes:
    subprocess.run(
        [sys.executable, str(script), str(out)],
        check=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    return out.read_bytes()


@pytest.mark.slow
def test_two_processes_write_identical_bytes_that_load_back(tmp_path: Path) -> None:
    script = tmp_path / "tied.py"
    script.write_text(TIED)
    first = _save_in_new_process(script, tmp_path / "a.safetensors")
    second = _save_in_new_process(script, tmp_path / "b.safetensors")
    assert first == second

    model = runpy.run_path(str(script))["Tied"]()
    reference = model.layers[0].weight.detach().clone()
    with torch.no_grad():
        model.layers[0].weight.zero_()
    load_model(model, str(tmp_path / "a.safetensors"))
    assert torch.equal(model.layers[0].weight, reference)
    assert model.layers[5].weight is model.layers[0].weight


# ---------------------------------------------------------------- damaged model directories
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _oversize_header_length(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 10 * len(data)) + data[8:])


def _pickle_under_the_name(path: Path) -> None:
    torch.save({"weight": torch.zeros(2)}, path)


DAMAGE = {
    "truncated": (_truncate, "truncated"),
    "header length past the end": (_oversize_header_length, "runs past the end of the file"),
    "a pickle under the name": (_pickle_under_the_name, "not a safetensors file"),
    "three bytes": (lambda p: p.write_bytes(b"abc"), "too short"),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, tiny_cfg, tokenizer) -> Path:
    """A tiny pretrained fusion model directory, as pretraining writes it; copy it before
    damaging it."""
    from tests.checkpoints.vlp import IMAGE_SIZE, TRANSFORM
    from vlp.models.checkpoints import IMAGE_TRANSFORM_FILE
    from vlp.models.vlp_model import build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("saved") / "model"
    transform = {IMAGE_TRANSFORM_FILE: {**TRANSFORM, "size": IMAGE_SIZE}}
    build_model(tiny_cfg(), tokenizer, 0.07).save_pretrained(path, transform)
    return path


def _copy(saved: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(saved, tmp_path / "model"))


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_weights_are_a_config_error_naming_the_file(damage, saved, tmp_path) -> None:
    from vlp.errors import ConfigError
    from vlp.models.family import load_model

    model_dir = _copy(saved, tmp_path)
    damage_file, message = DAMAGE[damage]
    damage_file(model_dir / "model.safetensors")
    with pytest.raises(ConfigError, match=message) as raised:
        load_model(model_dir)
    assert str(raised.value).startswith(f"{model_dir / 'model.safetensors'}: ")
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("damage", DAMAGE)
def test_load_weights_checks_any_safetensors_file(damage, tmp_path) -> None:
    """The answer decoder of a VQA model and every other weights file load through it."""
    from safetensors.torch import save_model

    from vlp.errors import ConfigError
    from vlp.models.weights import load_weights

    layer = torch.nn.Linear(4, 4)
    save_model(layer, str(tmp_path / "head.safetensors"))
    load_weights(layer, tmp_path / "head.safetensors")
    with pytest.raises(ConfigError, match="does not match the answer decoder"):
        load_weights(
            torch.nn.Linear(4, 5), tmp_path / "head.safetensors", "cpu", "the answer decoder"
        )
    damage_file, message = DAMAGE[damage]
    damage_file(tmp_path / "head.safetensors")
    with pytest.raises(ConfigError, match=message):
        load_weights(layer, tmp_path / "head.safetensors")


@pytest.mark.parametrize(
    "drop, named",
    [
        (["model.hidden_size", "model.vocab_size"], "lacks model.vocab_size, model.hidden_size"),
        (["model"], "lacks model "),
        (["text_config"], "lacks text_config "),
        (["image_config.model_type"], "lacks image_config.model_type "),
    ],
)
def test_config_without_needed_keys_names_them(drop, named, saved, tmp_path) -> None:
    import json

    from vlp.errors import ConfigError
    from vlp.models.family import fresh_model, load_model

    model_dir = _copy(saved, tmp_path)
    meta = json.loads((model_dir / "vlp_config.json").read_text())
    for key in drop:
        *parents, last = key.split(".")
        entry = meta
        for parent in parents:
            entry = entry[parent]
        del entry[last]
    (model_dir / "vlp_config.json").write_text(json.dumps(meta))
    # a from-scratch model is built from the model params alone
    fresh = [lambda p: fresh_model(p, 0.07)] if drop[0].startswith("model") else []
    for load in (load_model, *fresh):
        with pytest.raises(ConfigError, match=named) as raised:
            load(model_dir)
        assert str(raised.value).startswith(f"{model_dir / 'vlp_config.json'}: ")


def test_a_config_without_a_family_is_a_fusion_model(saved, tmp_path) -> None:
    import json

    from vlp.models.family import load_model
    from vlp.models.vlp_model import VLPModel

    model_dir = _copy(saved, tmp_path)
    meta = json.loads((model_dir / "vlp_config.json").read_text())
    del meta["model"]["family"]
    (model_dir / "vlp_config.json").write_text(json.dumps(meta))
    assert isinstance(load_model(model_dir).model, VLPModel)


EVIL = """
import os

class Evil:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
"""


def _evil_pickle(path: Path, marker: Path) -> None:
    """A pickle whose unpickling would create `marker`."""
    namespace: dict = {}
    exec(EVIL.format(marker=marker), namespace)  # noqa: S102 (a test's own payload)
    torch.save({"weight": namespace["Evil"]()}, path)


def test_pickle_weights_are_refused_unread_as_a_named_error(saved, tmp_path) -> None:
    from tests.checkpoints.clip import write_tiny_clip
    from vlp.errors import ConfigError
    from vlp.models.family import load_model

    marker = tmp_path / "unpickled"
    model_dir = _copy(saved, tmp_path)
    (model_dir / "model.safetensors").unlink()
    _evil_pickle(model_dir / "pytorch_model.bin", marker)
    with pytest.raises(ConfigError, match=r"pytorch_model.bin: pickle weights"):
        load_model(model_dir)

    clip = write_tiny_clip(tmp_path / "clip")
    (clip / "model.safetensors").unlink()
    _evil_pickle(clip / "pytorch_model.bin", marker)
    with pytest.raises(ConfigError, match=r"--model: .*clip: pytorch_model.bin: a pickle") as e:
        load_model(clip, key="--model")
    assert "\n" not in str(e.value)
    assert not marker.exists()


def test_cli_reports_a_damaged_model_in_one_line(saved, tmp_path, capsys) -> None:
    from vlp.cli import main

    model_dir = _copy(saved, tmp_path)
    _oversize_header_length(model_dir / "model.safetensors")
    params = str(REPO / "params.yaml")
    args = ["--params", params, "--profile", "smoke", "--set", "runtime.device=cpu"]
    code = main([*args, "zeroshot", "--model", str(model_dir), "--data", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines() == [
        f"vlp zeroshot: error: {model_dir / 'model.safetensors'}: its header length "
        f"({10 * (model_dir / 'model.safetensors').stat().st_size} bytes) runs past the end "
        f"of the file ({(model_dir / 'model.safetensors').stat().st_size} bytes): "
        "truncated, or not a safetensors file"
    ]
