"""Fixtures for the metric tests: the shared COCO caption conformance set."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFORMANCE = REPO.parent / "shared" / "conformance" / "coco_caption"


def in_ci() -> bool:
    """Whether the suite runs in CI (`CI=true`, as CI services and `.ci/run` set it)."""
    return os.environ.get("CI", "").lower() in ("true", "1")


def find_conformance(folder: Path, ci: bool) -> Path:
    """`folder` if it holds the conformance set; else skip, or fail in CI, naming the path."""
    if not (folder / "official_scores.json").exists():
        message = (
            f"COCO caption conformance set not found at {folder} (shared/ not beside the repo)"
        )
        if ci:
            pytest.fail(f"{message}; CI=true requires it", pytrace=False)
        pytest.skip(message)
    return folder


@pytest.fixture(scope="session")
def coco_conformance() -> Path:
    """Folder of the toolkit's demo results, references and official scores."""
    return find_conformance(CONFORMANCE, in_ci())


@pytest.fixture(scope="session")
def coco_captions(coco_conformance: Path) -> tuple[dict[int, str], dict[int, list[str]], dict]:
    """(results by image id, references by image id, official scores) of the conformance set."""
    results = json.loads((coco_conformance / "captions_val2014_fakecap_results.json").read_text())
    annotations = json.loads((coco_conformance / "captions_val2014_subset.json").read_text())
    references: dict[int, list[str]] = {}
    for ann in annotations["annotations"]:
        references.setdefault(ann["image_id"], []).append(ann["caption"])
    official = json.loads((coco_conformance / "official_scores.json").read_text())
    return {r["image_id"]: r["caption"] for r in results}, references, official
