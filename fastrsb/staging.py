"""Folders written whole or not at all: the files go into a hidden folder beside the target,
renamed into place once all are written, so a write that fails or is interrupted (Ctrl-C, a full
disk) leaves the target as it was and nothing that could pass for it."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def staged_folder(target: Path, existing: str) -> Iterator[Path]:
    """Yields the folder to write into; on a clean exit it becomes `target`. existing: what to do
    with a `target` that holds files by then: "replace" it (set aside, and removed only once the
    new folder is in place), or "keep" it (another process wrote the same content first: ours is
    dropped). An empty `target` folder is replaced either way."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield staging
        _modes_as_umask_allows(staging)
        _move_into_place(staging, target, existing)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once it was moved into place


def current_umask() -> int:
    """The process's umask, read where Linux shows it (/proc/self/status) rather than by setting
    it: os.umask(0) and back would leave it 0 for a moment for every other thread that creates a
    file (DALI's, a loader's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)  # elsewhere (no /proc): the only way there is
    os.umask(umask)
    return umask


def _modes_as_umask_allows(folder: Path) -> None:
    """mkdtemp's folder is private (0700), and some writers make private files (safetensors: 0600):
    give the folder and its files the modes a plain mkdir and open would have."""
    umask = current_umask()
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _move_into_place(staging: Path, target: Path, existing: str) -> None:
    try:
        staging.rename(target)  # no target, or an empty folder: replaced in one step
        return
    except OSError:
        if not target.exists():
            raise
    if existing == "keep":
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
    old.rmdir()
    target.rename(old)
    try:
        staging.rename(target)
    except BaseException:
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)
