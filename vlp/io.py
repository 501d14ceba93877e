"""Atomic file writes: a reader never sees a half-written file, a failure keeps the old one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a fresh temp directory beside `path`; swap it in for `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_json(path: Path, error: type[Exception]) -> Any:
    """Parsed JSON of `path`; `error` naming the file if it is missing, unreadable or not JSON.

    JSON nested deeper than Python's recursion limit counts as not JSON.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise error(f"{path}: not valid JSON (nested too deeply to read)") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None


def check_writable(locations: dict[str, Path]) -> None:
    """OutputError naming the first folder (label -> path) in which a file cannot be created.

    A folder that does not exist yet is judged by its nearest existing parent (creating
    it would need that). The test creates and removes a file rather than reading
    permission bits, which root ignores.
    """
    from vlp.errors import OutputError

    for label, path in locations.items():
        path = Path(path)
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise OutputError(f"{label}: cannot write in {path} ({existing} is not a folder)")
        try:
            fd, probe = tempfile.mkstemp(prefix=".vlp-write-check.", dir=existing)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise OutputError(f"{label}: cannot write in {existing} ({e.strerror or e})") from None
