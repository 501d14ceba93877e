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
    index_outputs,
    remove_dir,
)

# An output kind whose own `index.txt` lists the files vlp wrote into it.
INDEXED = "indexed-test-output"
index_outputs(INDEXED, lambda path: (path / "index.txt").read_text().split())


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


def _indexed(out: Path) -> None:
    with atomic_dir(out, INDEXED) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("vlp's\n")
        (tmp / "index.txt").write_text("index.txt sub/a.txt\n")


@pytest.mark.parametrize("added", ["photo.jpg", "sub/photo.jpg", "sub/deeper/photo.jpg", "link"])
def test_an_indexed_output_that_gained_a_file_is_neither_replaced_nor_deleted(
    tmp_path: Path, added: str
) -> None:
    out = tmp_path / "out"
    _indexed(out)
    _indexed(out)  # its own files only: replaced
    if added == "link":
        (out / "link").symlink_to(tmp_path, target_is_directory=True)
    else:
        (out / added).parent.mkdir(parents=True, exist_ok=True)
        (out / added).write_text("the user's only copy\n")
    before = _contents(out)
    ran = False
    with pytest.raises(OutputError, match=rf"{out}: holds {added}, which vlp did not write"):
        with atomic_dir(out, INDEXED):
            ran = True
    with pytest.raises(OutputError, match=rf"holds {added}"):
        remove_dir(out)
    assert not ran and _contents(out) == before


def test_an_indexed_output_whose_index_is_unreadable_is_kept_unless_swapped_out(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    _indexed(out)
    (out / "index.txt").unlink()
    with pytest.raises(OutputError, match=rf"{out}: cannot tell which files vlp wrote"):
        remove_dir(out)
    assert (out / "sub" / "a.txt").exists()
    # the same state left by a swap cut short while deleting the previous output: removed
    os.replace(out, tmp_path / ".out.old")
    _indexed(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_unwritable_place_is_named_before_the_block_runs(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder is expected\n")
    ran = False
    with pytest.raises(OutputError, match=rf"{blocker}/out: cannot write in {blocker}"):
        with atomic_dir(blocker / "out", "test"):
            ran = True
    assert not ran
    with pytest.raises(OutputError, match=rf"{blocker}/out: cannot write in {blocker}"):
        claim_dir(blocker / "out", "test")
