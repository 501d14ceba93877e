"""Missing conformance data is a skip on a workstation and a failure in CI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.metrics.conftest import find_conformance


def test_missing_conformance_set_skips_outside_ci(tmp_path: Path) -> None:
    with pytest.raises(pytest.skip.Exception, match=re.escape(str(tmp_path))):
        find_conformance(tmp_path, ci=False)


def test_missing_conformance_set_fails_in_ci_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception, match=f"{re.escape(str(tmp_path))}.*CI=true"):
        find_conformance(tmp_path, ci=True)


def test_present_conformance_set_is_used_in_and_outside_ci(tmp_path: Path) -> None:
    (tmp_path / "official_scores.json").write_text("{}")
    assert find_conformance(tmp_path, ci=True) == find_conformance(tmp_path, ci=False) == tmp_path
