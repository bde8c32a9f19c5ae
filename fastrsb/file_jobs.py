"""What the commands share in writing: the folder they write into (a run's; the data tools':
prepare, prepare-val, shrink, demo), made or refused in one line; the data tools' per-file
(per-class) jobs, run in parallel processes; and what stops those all, a target disk that takes no
more (full, over quota, read-only), where every later job would fail the same way."""
from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from fastrsb.errors import UserError

# The errors of a write that no other file would escape: the disk, not the file.
_TARGET_WONT_TAKE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


# Where os.link cannot link (another disk, a file system without hard links): the file is copied.
_NO_LINK_HERE = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})


def link_or_copy(file: Path, where: Path) -> bool:
    """A hard link to FILE at WHERE (a symbolic link's target: the file itself) where the file
    system makes one, else a copy; True if linked. Other errors (a full disk) are raised."""
    try:
        os.link(file, where)
        return True
    except OSError as err:
        if err.errno not in _NO_LINK_HERE:
            raise
    shutil.copyfile(file, where)
    return False


def stops_writing(err: BaseException) -> bool:
    """A write error that every later write to the same disk would meet."""
    return isinstance(err, OSError) and err.errno in _TARGET_WONT_TAKE


def nearest_existing(path: Path) -> Path:
    """`path`, or the nearest folder above it that exists: where a folder still to be made will
    lie, for its disk's free space."""
    return next((p for p in (path, *path.parents) if p.exists()), Path("."))


def free_gb(folder: Path) -> float:
    return shutil.disk_usage(nearest_existing(folder)).free / 1e9


def write_stopped(folder: Path, reason: str, done: str) -> UserError:
    """The message for a data tool stopped by its target's disk: what is kept, and how to go on."""
    return UserError(f"cannot write into {folder} ({reason}; {free_gb(folder):,.1f} GB free on its disk): {done} "
                     "kept; make room (or make it writable), then run the same command again to finish")


def make_folder(path: Path, what: str) -> None:
    """Make `path` (and its parents) to write into, or say in one line why it cannot be."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file: a folder goes there")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot make {what} {path}: {err.strerror or err}") from None


def each_result(func: Callable, jobs: Iterable, workers: int, chunksize: int = 1) -> Iterator:
    """func(job) for each job, in order: in this process for one worker (no pool to start, and
    what a test patches applies), else in a pool of processes. Closing the iterator early (leaving
    its `closing` block by an error) cancels the jobs not started and waits for those running."""
    if workers <= 1:
        yield from map(func, jobs)
        return
    pool = ProcessPoolExecutor(workers)
    try:
        yield from pool.map(func, jobs, chunksize=chunksize)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def not_these_files(folder: Path, images: dict[str, int]) -> list[str]:
    """The entries of FOLDER that are not among IMAGES ({file name: bytes}) by name and size, each
    said why: another data set's files, which a rerun of `data prepare` must not take for the
    download's. Fewer files is fine: a class folder appears whole (renamed into place), so the
    missing ones were removed since, by hand."""
    foreign = []
    for entry in sorted(folder.iterdir()):
        if not entry.is_file():
            foreign.append(f"{entry.name}/ (a folder)")
        elif entry.name not in images:
            foreign.append(f"{entry.name} (not in the download)")
        elif entry.stat().st_size != images[entry.name]:
            foreign.append(f"{entry.name} ({entry.stat().st_size:,} bytes, the download's {images[entry.name]:,})")
    return foreign


def default_workers(workers: int | None) -> int:
    """WORKERS, or the cores this process may use, at most 16 (past that, a data tool waits on the disk)."""
    return workers or max(1, min(16, len(os.sched_getaffinity(0))))


def foreign_classes(folder: Path, foreign: list[str]) -> UserError:
    """The error for class folders of FOLDER already holding another data set's files (FOREIGN: each
    said why), which `data prepare` leaves as they are: they are somebody's files."""
    more = f"; and {len(foreign) - 1} more" if len(foreign) > 1 else ""
    return UserError(f"{len(foreign)} class folder(s) of {folder} already hold other files than the download's: "
                     f"{foreign[0]}{more}. Does OUT hold another data set (a shrunk copy, another download)? Prepare "
                     "into an empty folder, or remove those class folders to have them written again")
