"""One fastrsb job at a time in a folder it writes. Two trains writing one run folder (a second
`--resume auto` started while the first still runs, two jobs given the same --out) overwrite each
other's last.pt and interleave their metrics.jsonl rows; two `data prepare`s, `shrink`s or
`prepare-val`s writing one folder race for the same class folders and files; and nothing says so.
Such a job holds an flock on FOLDER/.fastrsb.lock while it writes (a train: rank 0 alone). The
kernel lets go of it when the process ends, however it ends (a kill, a crash, a SLURM requeue), so
no stale lock ever needs removing by hand. Where the file system takes no locks (some NFS and
Lustre mounts), the job goes on unguarded and says so."""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from fastrsb.errors import UserError

LOCK_NAME = ".fastrsb.lock"
TRAIN = "fastrsb train"
# What a file system without locks answers: the job goes on unguarded rather than not at all.
NO_LOCKS_HERE = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class FolderLock:
    """take() before the first file is written, release() when the job ends (both idempotent), or
    `with FolderLock(folder, job):`. job: what the holder is, as a second job's refusal names it."""

    def __init__(self, folder: str | Path, job: str = TRAIN):
        self.path, self.job = Path(folder) / LOCK_NAME, job
        self.fd: int | None = None
        self.taken = False  # held, or found to be impossible here (said once)

    def __enter__(self) -> "FolderLock":
        self.take()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def take(self) -> None:
        if self.taken:
            return
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except PermissionError as err:
                raise UserError(f"cannot write in {self.path.parent}: {err.strerror}") from None
            try:
                _lock_soon(fd)
            except BlockingIOError:
                os.close(fd)
                raise in_use_error(self.path.parent, holder(self.path), self.job) from None
            except OSError as err:
                os.close(fd)
                if err.errno not in NO_LOCKS_HERE:
                    raise
                self.path.unlink(missing_ok=True)  # of no use here
                print(f"note: {self.path.parent}'s file system takes no file locks ({os.strerror(err.errno)}): "
                      f"nothing stops a second job from writing there while this {self.job} does")
                self.taken = True
                return
            # A job that ended between our open and our flock unlinked the file we hold: lock the
            # file now at that path instead, or two jobs could each hold a file of that name.
            if _same_file(fd, self.path):
                break
            os.close(fd)
        self.fd, self.taken = fd, True
        try:  # who holds it, for a second job's refusal (a courtesy only: a full disk skips it)
            os.ftruncate(fd, 0)
            os.write(fd, f"{self.job} (pid {os.getpid()} on {socket.gethostname()}, "
                         f"since {time.strftime('%Y-%m-%d %H:%M:%S')})".encode())
        except OSError:
            pass

    def release(self) -> None:
        """Unlinked while still held (see take), then let go."""
        self.taken = False
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


def _lock_soon(fd: int, tries: int = 6) -> None:
    """LOCK_EX, tried for half a second: in_use's look (a shared lock held for an instant, by
    every torchrun process at once) must not pass for a job holding the folder."""
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if attempt == tries - 1:
                raise
            time.sleep(0.1)


def _same_file(fd: int, path: Path) -> bool:
    try:
        named = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


def holder(path: Path) -> str:
    """Who holds the lock, as its holder wrote it (an instant after taking it: maybe not yet)."""
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        text = ""
    return text or "another fastrsb job, just started"


def in_use_error(folder: Path, who: str, job: str = TRAIN) -> UserError:
    why = ("two trains writing one run folder overwrite each other's checkpoints: wait for it to end or stop it, "
           "or choose another --out") if job == TRAIN else \
        ("two jobs writing one folder race for the same files: wait for it to end or stop it (a rerun then "
         "finishes what it left)")
    return UserError(f"{folder} is being written by {who}; {why}")


def refuse_if_in_use(folder: str | Path, job: str = TRAIN) -> None:
    """A look before the job starts (the CLI's, before it imports torch; doctor's): the job takes
    the lock itself when it begins writing."""
    who = in_use(folder)
    if who is not None:
        raise in_use_error(Path(folder), who, job)


def in_use(folder: str | Path) -> str | None:
    """Who writes in this folder now, or None (the lock taken for an instant and let go)."""
    path = Path(folder) / LOCK_NAME
    if not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:  # shared: many looking at once (every process of a run, at its start) do not exclude each other
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return holder(path)
    except OSError:
        return None
    finally:
        os.close(fd)  # also lets go of the lock if this took it
    return None
