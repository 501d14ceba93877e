"""Atomic writes and owned output directories: modes follow the umask, foreign data survives."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from vlp.errors import OutputError
from vlp.io import (
    OUTPUT_MARKER,
    atomic_dir,
    atomic_write_json,
    claim_dir,
    remove_dir,
)


@pytest.fixture
def umask() -> Iterator[None]:
    """Restore the process umask after a test that sets its own."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _foreign(root: Path) -> dict[str, str]:
    """A user's folder: a file and a subfolder, no vlp marker."""
    (root / "notes").mkdir(parents=True)
    (root / "important.txt").write_text("keep me\n")
    (root / "notes" / "a.md").write_text("mine\n")
    return _contents(root)


def _contents(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)]
)
def test_written_files_and_dirs_follow_the_umask(
    umask: None, tmp_path: Path, mask: int, file_mode: int, dir_mode: int
) -> None:
    os.umask(mask)
    atomic_write_json(tmp_path / "metrics" / "m.json", {"a": 1})
    with atomic_dir(tmp_path / "out", "test") as tmp:
        (tmp / "f.txt").write_text("x")
    assert _mode(tmp_path / "metrics" / "m.json") == file_mode
    assert _mode(tmp_path / "out") == dir_mode
    assert _mode(tmp_path / "out" / OUTPUT_MARKER) == file_mode


def test_atomic_dir_refuses_a_foreign_non_empty_dir_before_the_block(tmp_path: Path) -> None:
    out = tmp_path / "out"
    before = _foreign(out)
    ran = False
    with pytest.raises(OutputError, match=f"{out}.*{OUTPUT_MARKER}"):
        with atomic_dir(out, "test"):
            ran = True
    assert not ran
    assert _contents(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dirs left


def test_atomic_dir_replaces_its_own_output_and_an_empty_dir(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with atomic_dir(out, "test") as tmp:
        (tmp / "first.txt").write_text("1")
    assert (out / OUTPUT_MARKER).read_text().startswith("vlp output: test")
    with atomic_dir(out, "test") as tmp:
        (tmp / "second.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "second.txt"]


def test_a_file_where_a_dir_goes_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "out"
    path.write_text("not a folder")
    with pytest.raises(OutputError, match=str(path)):
        with atomic_dir(path, "test"):
            pass
    assert path.read_text() == "not a folder"


def test_remove_and_claim_refuse_foreign_dirs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    before = _foreign(out)
    with pytest.raises(OutputError, match=str(out)):
        remove_dir(out)
    with pytest.raises(OutputError, match=str(out)):
        claim_dir(out, "test")
    assert _contents(out) == before

    ours = claim_dir(tmp_path / "ours", "test")
    (ours / "ckpt").mkdir()
    remove_dir(ours)
    assert not ours.exists()
    remove_dir(ours)  # missing: nothing to do
