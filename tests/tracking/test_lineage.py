"""Runs record what they read, by content hashes of the files, beside what dvc.lock says."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mlflow
import pytest

from tests.checkpoints.clip import write_tiny_clip
from tests.mlflow_helpers import png_bytes
from vlp.config import Config
from vlp.data.manifest import dataset_hash
from vlp.lineage import input_tags
from vlp.tasks import model_sha256
from vlp.tracking import stage_run

LOCKED = "0123abcd.dir"
DVC_LOCK = f"""
schema: '2.0'
stages:
  generate:
    cmd: vlp generate
    outs:
    - path: data/shapes
      hash: md5
      md5: {LOCKED}
"""


@pytest.fixture
def cfg(store_cfg: Config) -> Config:
    """store_cfg in a project whose dvc.lock records a hash for its default data root."""
    Path("dvc.lock").write_text(DVC_LOCK)
    return dataclasses.replace(
        store_cfg, data=dataclasses.replace(store_cfg.data, root="data/shapes")
    )


def _image_folder(root: Path, classes: dict[str, int]) -> Path:
    """An image-folder tree `root/<class>/<n>.png`."""
    for label, n in classes.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / label / f"{i}.png").write_bytes(png_bytes(8 + i))
    return root


def _tags(run_id: str) -> dict[str, str]:
    return mlflow.MlflowClient().get_run(run_id).data.tags


def test_zeroshot_of_an_image_folder_records_that_folder(cfg: Config, tmp_path: Path) -> None:
    from vlp.zeroshot import zeroshot

    model = write_tiny_clip(tmp_path / "clip")
    folder = _image_folder(tmp_path / "pets", {"cat": 2, "dog": 1})
    zeroshot(cfg, model, folder, classify=True, precision="fp32")
    (run,) = mlflow.MlflowClient().search_runs(
        [mlflow.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
        filter_string="tags.`vlp.stage` = 'zeroshot'",
    )
    tags = run.data.tags
    assert tags["vlp.input.data"] == dataset_hash(folder)
    assert tags["vlp.input.data.path"] == str(folder)
    assert tags["vlp.input.model"] == model_sha256(model)
    assert tags["vlp.input.model.path"] == str(model)
    # nothing claims the default data root, which this run never opened
    assert LOCKED not in tags.values() and "vlp.data_hash" not in tags
    assert _tags(tags["mlflow.parentRunId"])["vlp.dvc_lock.data/shapes"] == LOCKED


def test_the_hash_of_an_image_folder_follows_its_files(tmp_path: Path) -> None:
    folder = _image_folder(tmp_path / "a", {"cat": 2})
    first = dataset_hash(folder)
    assert dataset_hash(_image_folder(tmp_path / "b", {"cat": 2})) == first  # not the place
    _image_folder(folder, {"dog": 1})
    assert dataset_hash(folder) != first
    (folder / "dog" / "0.png").write_bytes(png_bytes(30))
    assert dataset_hash(folder) not in (first, dataset_hash(tmp_path / "b"))


def test_stage_run_names_each_input_with_its_hash(cfg: Config) -> None:
    inputs = {"init": ("models/x", "abc"), "data": (Path("data/y"), "def")}
    with stage_run(cfg, "finetune", task="vqa", init="pretrained", inputs=inputs) as run:
        pass
    tags = _tags(run.run_id)
    assert {k: v for k, v in tags.items() if k.startswith("vlp.input.")} == input_tags(inputs)
    assert (tags["vlp.input.init"], tags["vlp.input.init.path"]) == ("abc", "models/x")
    assert (tags["vlp.input.data"], tags["vlp.input.data.path"]) == ("def", "data/y")
    assert "vlp.data_hash" not in tags
