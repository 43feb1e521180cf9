"""The output folder of ``score``: checked before any work, locked while a run uses it, its report replaced whole.

``locked_output_dir`` creates the folder, takes ``OUT/.lock`` (``fcntl.flock``, non-blocking: a second run
into the same folder stops at once) and checks that it can write there. ``staged_report`` gives a fresh
``OUT/.report.tmp-PID/`` to write the whole report into; when that succeeded, the new ``series/`` replaces the
old one (moved aside, then deleted) and ``scores.csv`` and ``summary.json`` are replaced, so old plots never sit
beside new scores. A failed write (full disk) removes the temporary folder and leaves the previous report as it
was. Every problem is an ``OutputError``: one line with the reason and the fix.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

LOCK_NAME = ".lock"
TEMP_PREFIX = ".report.tmp-"
REPORT_ENTRIES = ("series", "scores.csv", "summary.json")  # swapped in this order: summary.json last
COMPARE_ENTRIES = ("pairs.csv", "compare.json")  # what ``compare`` writes
MIN_FREE_BYTES = 1 << 20
BYTES_PER_SLICE = 400  # a scores.csv row and its share of summary.json
BYTES_PER_PLOT = 200_000  # one series/*.png, generously


class OutputError(RuntimeError):
    """A problem with the output folder, as one line: the reason and the fix."""


def printable(text: str) -> str:
    """``text`` as valid UTF-8: the bytes of a non-UTF-8 file name (surrogate escapes) become ``\\xNN``."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # lone surrogates that are not escaped bytes
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def printable_tree(value: Any) -> Any:
    """``value`` with every string (keys included) made ``printable``, for JSON and CSV."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable_tree(key): printable_tree(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [printable_tree(item) for item in value]
    return value


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object], durable: bool = False) -> Path:
    """``write`` into a temporary file beside ``path``, then rename it over ``path``: readers and crashes see the old
    file or the new one, never half of one; a failed write (full disk) removes the temporary file and re-raises.
    ``durable`` also flushes the file and the rename to disk (checkpoints: a power cut keeps one of them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as stream:
            write(stream)
            if durable:
                stream.flush()
                os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if durable and hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    return path


def write_bytes_atomic(path: str | Path, content: bytes) -> None:
    """``content`` written atomically (``write_atomic``)."""
    write_atomic(path, lambda stream: stream.write(content))


def write_json_atomic(path: str | Path, content: Any) -> None:
    """``content`` as indented JSON, written atomically; file names that are not UTF-8 are written with escapes."""
    write_bytes_atomic(path, json.dumps(printable_tree(content), indent=2).encode("utf-8"))


def _problem(path: Path, error: OSError) -> OutputError:
    """The one-line explanation of ``error`` met while creating or writing the output folder ``path``."""
    where = f"output folder {printable(str(path))}"
    reason = error.strerror or str(error)
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"{where} is not writable ({reason}): choose another --output_dir or make it writable")
    if error.errno == errno.ENAMETOOLONG:
        return OutputError(f"{where} cannot be created: its name is too long: choose a shorter --output_dir")
    if error.errno == errno.ENOTDIR:
        return OutputError(f"{where} cannot be created: part of its path is a file: choose another --output_dir")
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return OutputError(
            f"{where}: the report could not be written ({reason}); the previous report is unchanged: "
            "free some space or choose another --output_dir, and run again"
        )
    return OutputError(f"{where} cannot be used ({reason}): choose another --output_dir")


def _create(path: Path) -> None:
    """``path`` as a folder (with its parents); ``OutputError`` when it is a file, a broken link or not creatable."""
    if os.path.lexists(path) and not path.is_dir():
        what = "a link to a missing folder" if path.is_symlink() else "a file, not a folder"
        raise OutputError(f"output folder {printable(str(path))} is {what}: choose another --output_dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _problem(path, error) from None


def _lock(path: Path) -> int:
    """An open descriptor of ``path/.lock``, locked for this run (its pid written in it); ``OutputError`` if taken."""
    try:
        descriptor = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise _problem(path, error) from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(descriptor, 32).decode("ascii", "replace").strip() or "unknown"
        os.close(descriptor)
        raise OutputError(
            f"output folder {printable(str(path))} is in use by another run (pid {holder}): "
            "wait for it to finish or choose another --output_dir"
        ) from None
    os.ftruncate(descriptor, 0)
    os.write(descriptor, f"{os.getpid()}\n".encode())
    return descriptor


def staging_dir(output_dir: Path) -> Path:
    """The temporary folder this process writes its report into, inside ``output_dir``."""
    return output_dir / f"{TEMP_PREFIX}{os.getpid()}"


@contextmanager
def locked_output_dir(output_dir: str | Path) -> Iterator[Path]:
    """The output folder, created, locked for this run and checked writable, before any scoring.

    Temporary folders left by runs that were killed are removed (the lock says none is running).
    """
    path = Path(output_dir)
    _create(path)
    descriptor = _lock(path)
    try:
        for stale in path.glob(f"{TEMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        check_free_space(path, MIN_FREE_BYTES)
        try:  # the lock file may exist already: make sure a folder can be created too
            staging_dir(path).mkdir()
            staging_dir(path).rmdir()
        except OSError as error:
            raise _problem(path, error) from None
        yield path
    finally:
        os.close(descriptor)


def report_size(n_slices: int, n_series: int) -> int:
    """A rough upper bound of the report's size in bytes, with ``MIN_FREE_BYTES`` to spare."""
    return MIN_FREE_BYTES + BYTES_PER_SLICE * n_slices + BYTES_PER_PLOT * n_series


def check_free_space(path: Path, needed: int) -> None:
    """``OutputError`` unless the output folder's file system has ``needed`` bytes free."""
    free = shutil.disk_usage(path).free
    if free < needed:
        raise OutputError(
            f"too little free space for output folder {printable(str(path))}: {free / 1e6:.1f} MB free, about "
            f"{needed / 1e6:.1f} MB needed: free some space or choose another --output_dir"
        )


def _swap_in(staging: Path, output_dir: Path) -> None:
    """Move the report in ``staging`` into ``output_dir``; the old ``series/`` goes into ``staging`` (deleted after)."""
    old = staging / ".old"
    old.mkdir()
    for name in REPORT_ENTRIES:
        target = output_dir / name
        if name == "series" and os.path.lexists(target):
            os.rename(target, old / name)
        os.replace(staging / name, target)


@contextmanager
def staged_report(output_dir: Path) -> Iterator[Path]:
    """A fresh temporary folder for the whole report, swapped into ``output_dir`` when the block succeeds.

    The caller holds the lock (``locked_output_dir``) and writes every entry of ``REPORT_ENTRIES``. On any
    failure the temporary folder is removed; a failed write (full disk) becomes an ``OutputError``.
    """
    staging = staging_dir(output_dir)
    try:
        staging.mkdir()
        (staging / "series").mkdir()
        yield staging
        _swap_in(staging, output_dir)
    except OSError as error:
        raise _problem(output_dir, error) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
