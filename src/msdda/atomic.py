"""Writing files so that a crash never leaves a half-written one: temp file beside the target, fsync, rename.

Every file the package writes goes through these helpers (bytes, text, JSON), and a directory that must
appear whole (a training checkpoint) is written under a temp name and moved with `replace_dir_atomic`.
Temp files are named `.<target>.msdda<pid>-<host>.<random>.tmp`: a failed write removes its own, and the
first write of a process into a folder removes those a killed writer on this host (a process no longer
alive) left there.
A command that writes several files into one folder marks it with `incomplete_marker` until it is done.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from msdda.errors import MSDDAError

INCOMPLETE_MARKER = "INCOMPLETE"
_OUR_TEMP = re.compile(r"^\..+\.msdda(\d+)-([A-Za-z0-9-]*)\.[A-Za-z0-9_]+\.tmp$")
# The writer's host goes into the name: on a file system shared by several machines only the machine that
# wrote a temp file can tell whether its writer is still alive.
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", os.uname().nodename)[:40]
_swept_dirs: set[str] = set()  # folders whose stale temp files this process already removed


class OutputPathError(MSDDAError):
    """An output path cannot be written: it names an existing file, or its folder is read-only."""


def check_output_dir(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """Refuse, before any work, an output folder that cannot be written; create nothing.

    Raises OutputPathError when `path` is an existing file, when the nearest existing folder above it is a
    file, or when a probe file cannot be created there (read-only folder, no permission, disk full).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{option} {path} is an existing file, not a folder; choose a folder path")
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputPathError(f"{option} {path}: {probe} is a file, so no folder can be made inside it")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".msdda-write-check.", suffix=".tmp")
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise OutputPathError(
            f"{option} {path} is not writable ({exc.strerror or exc} in {probe}); choose a folder you can write to"
        ) from None
    return path


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically (the old file, if any, stays whole until the rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.msdda{os.getpid()}-{_HOST}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs and shipped weights should be readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    remove_stale_temp_files(path.parent)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temp_files(folder: str | os.PathLike[str], *, force: bool = False) -> list[Path]:
    """Remove the temp files of our writers that died mid-write in `folder` (once per process and folder
    unless `force`); return them. A temp file of a live process (a write in progress) is kept."""
    folder = Path(folder)
    key = str(folder.resolve())
    if key in _swept_dirs and not force:
        return []
    _swept_dirs.add(key)
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _OUR_TEMP.match(name)
        if m and m.group(2) == _HOST and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                (folder / name).unlink()
                removed.append(folder / name)
    return removed


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """UTF-8 text, written atomically."""
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | os.PathLike[str], data: Any, *, sort_keys: bool = False) -> None:
    """Indented JSON, written atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


def replace_dir_atomic(tmp_dir: str | os.PathLike[str], final_dir: str | os.PathLike[str]) -> None:
    """Move a fully written `tmp_dir` to `final_dir` (replacing an old one) with renames.

    Readers see either the old directory or the new one, never a mix: an existing `final_dir` is first
    renamed aside (``.<name>.old``), then `tmp_dir` takes its name, then the old copy is removed.
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)


@contextlib.contextmanager
def incomplete_marker(folder: str | os.PathLike[str], what: str) -> Iterator[Path]:
    """Mark `folder` as incomplete while a command writes several files into it.

    A file named INCOMPLETE (saying which command and when) is written first and removed when the block
    ends normally, so a killed or failed command leaves a folder that says its files are partial. A failure
    before any other file appeared leaves the folder as it was (folders created for it removed again).
    """
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    before = set(os.listdir(folder)) if folder.is_dir() else set()
    marker = folder / INCOMPLETE_MARKER
    write_text_atomic(
        marker,
        f"{what} started {time.strftime('%Y-%m-%d %H:%M:%S %z')} (pid {os.getpid()}) and has not finished: "
        "the files in this folder may be partial or left from an earlier run. Rerun the command.\n",
    )
    try:
        yield marker
    except BaseException:
        new = {n for n in os.listdir(folder) if not _OUR_TEMP.match(n)} - before - {INCOMPLETE_MARKER}
        if not new and INCOMPLETE_MARKER not in before:  # nothing written: undo the marker (and its folders)
            marker.unlink(missing_ok=True)
            for p in created:
                with contextlib.suppress(OSError):
                    p.rmdir()
        raise
    marker.unlink(missing_ok=True)
