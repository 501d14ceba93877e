"""Atomic writes and owned output directories.

A reader never sees a half-written file; a failure keeps the old one. Temp files and
folders are created with the modes of ordinary ones (0666 / 0777 less the umask), so what
vlp writes is as readable as anything else the user creates.

A directory that vlp may later replace or delete wholesale holds an `OUTPUT_MARKER` file
naming what wrote it. vlp replaces or deletes only missing or empty directories and those
holding the marker; anything else raises `OutputError` and stays as it is. An output whose
own index lists every file vlp wrote into it (a dataset's manifests, a shard directory's
index: see `index_outputs`) is also refused once it holds a file its index does not list.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vlp.errors import OutputError, VlpError

OUTPUT_MARKER = ".vlp-output"


def _fresh_beside(path: Path, create: Callable[[Path], None]) -> Path:
    """Create a new hidden temp entry beside `path` with `create`; return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            create(tmp)
            return tmp
        except FileExistsError:
            continue


def umask() -> int:
    """The process umask (read without changing it where the OS allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _new_file(path: Path) -> None:
    # O_EXCL and mode 0666: created like any file (umask applies), never reusing one.
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    tmp_path = _fresh_beside(path, _new_file)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
    """Write `rows` as CSV with a header of `columns`: other keys ignored, missing ones empty."""
    buf = io.StringIO()
    writer = csv.DictWriter(
        buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in columns})
    atomic_write_text(path, buf.getvalue())


def _marker_text(kind: str) -> str:
    return f"vlp output: {kind}\nvlp may delete and rewrite this directory.\n"


# Kind of output -> the files (paths relative to it) its own index says vlp wrote. The index,
# not a listing in the marker, keeps the marker's bytes what they always were: DVC hashes it.
_INDEXED_OUTPUTS: dict[str, Callable[[Path], Iterable[str]]] = {}


def index_outputs(kind: str, files: Callable[[Path], Iterable[str]]) -> None:
    """Declare that an output of `kind` lists what vlp wrote into it: `files(path)`.

    Such an output that holds any other file (a user's photos copied in, say) is not
    replaced or deleted; the OutputError names the file.
    """
    _INDEXED_OUTPUTS[kind] = files


def _marker_kind(path: Path) -> str:
    try:
        first = (path / OUTPUT_MARKER).read_text(errors="replace").split("\n", 1)[0]
    except OSError:
        return ""
    return first.removeprefix("vlp output:").strip()


def _unlisted_file(path: Path) -> str | None:
    """A file (or link) in the vlp output `path` that its index does not list, if any."""
    files = _INDEXED_OUTPUTS.get(_marker_kind(path))
    if files is None:
        return None
    try:
        listed = {os.path.normpath(f) for f in files(path)} | {OUTPUT_MARKER}
    except (VlpError, OSError, ValueError) as e:
        raise OutputError(
            f"{path}: cannot tell which files vlp wrote into it ({e}); vlp will not replace "
            "it: move it away or choose another output path"
        ) from None
    for root, dirs, names in os.walk(path):
        base = Path(root).relative_to(path)
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
        for name in sorted([*names, *links]):
            rel = (base / name).as_posix()
            if rel not in listed:
                return rel
    return None


def check_replaceable(path: Path) -> None:
    """Raise OutputError unless `path` is missing, an empty directory or one vlp wrote."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        raise OutputError(
            f"{path}: exists and is not a directory vlp wrote; move it away or choose "
            f"another output path"
        )
    if (path / OUTPUT_MARKER).is_file():
        unlisted = _unlisted_file(path)
        if unlisted is None:
            return
        raise OutputError(
            f"{path}: holds {unlisted}, which vlp did not write; vlp will not replace or "
            f"delete it: move your files out of {path} or choose another output path"
        )
    if not any(path.iterdir()):
        return
    raise OutputError(
        f"{path}: not empty and not written by vlp (no {OUTPUT_MARKER} file); vlp will not "
        f"replace it: move its contents away or choose another output path"
    )


def claim_dir(path: Path, kind: str) -> Path:
    """Create `path` as a vlp output directory of `kind` (or keep one); return `path`.

    An existing empty directory is adopted; a non-empty one without the marker raises
    OutputError, since vlp may later write into or delete it.
    """
    path = Path(path)
    check_replaceable(path)
    check_writable({str(path): path})
    path.mkdir(parents=True, exist_ok=True)
    marker = path / OUTPUT_MARKER
    if not marker.is_file():
        atomic_write_text(marker, _marker_text(kind))
    return path


def remove_dir(path: Path) -> None:
    """Delete a directory vlp wrote (nothing if it is missing); OutputError for any other."""
    path = Path(path)
    check_replaceable(path)
    if path.exists():
        shutil.rmtree(path)


@contextmanager
def scratch_dir(path: Path) -> Iterator[Path]:
    """Yield a fresh hidden directory beside `path`, deleted with its contents afterwards."""
    tmp = _fresh_beside(Path(path), os.mkdir)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_dir(path: Path, kind: str) -> Iterator[Path]:
    """Yield a fresh temp directory beside `path`; swap it in for `path` on success.

    `path` must be missing, empty or a directory vlp wrote, in a folder vlp can write in
    (OutputError otherwise, raised before the block runs); the new directory gets the
    marker naming `kind`.
    """
    path = Path(path)
    check_replaceable(path)
    # now, not after the block's work: the temp folder goes beside `path`, and the old
    # contents must be deletable
    check_writable({str(path): path.parent})
    if path.is_dir():
        check_writable({str(path): path})
    with scratch_dir(path) as tmp:
        yield tmp
        (tmp / OUTPUT_MARKER).write_text(_marker_text(kind))
        check_replaceable(path)  # again: the block may have run for minutes
        old = path.with_name(f".{path.name}.old")
        if old.exists() or old.is_symlink():  # left by a swap that was interrupted
            if old.is_symlink() or not (old / OUTPUT_MARKER).is_file():
                check_replaceable(old)
            _remove_swapped_out(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        with contextlib.suppress(OSError):
            _remove_swapped_out(old)


def _remove_swapped_out(old: Path) -> None:
    """Delete the folder a swap moved the previous output to, its marker last.

    Its files were checked as vlp's just before the swap; a deletion cut short leaves the
    marker, so the next swap removes the rest without asking again.
    """
    for entry in old.iterdir():
        if entry.name == OUTPUT_MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    shutil.rmtree(old)


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
    for label, path in locations.items():
        path = Path(path)
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise OutputError(f"{label}: cannot write in {path} ({existing} is not a folder)")
        try:
            _fresh_beside(existing / ".vlp-write-check", _new_file).unlink()
        except OSError as e:
            raise OutputError(f"{label}: cannot write in {existing} ({e.strerror or e})") from None
