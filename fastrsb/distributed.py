"""torch.distributed for the trainer: one process per GPU (or CPU process), started by torchrun.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK and the rendezvous; without them the run is a
single process and every helper here is a no-op."""
from __future__ import annotations

import datetime
import gc
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fastrsb.errors import StoppedWithAnother, UserError, say_error


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


def init_distributed(device: str, timeout: datetime.timedelta = datetime.timedelta(minutes=30)) -> Dist:
    """Join the process group torchrun describes: NCCL on GPUs, gloo on the CPU. timeout: how long
    a collective waits for a rank that does not come (a training run: 30 minutes, for a slow
    checkpoint save or a first compile on one rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) visible: "
                            "--nproc_per_node must not exceed the GPUs per node")
        torch.cuda.set_device(local_rank)  # before DALI or NCCL touch a GPU (else all pile onto GPU 0)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timeout,
                                **({"device_id": torch.device("cuda", local_rank)} if device == "cuda" else {}))
    return Dist(rank, world, local_rank)


def shutdown(d: Dist) -> None:
    """Leave the process group, once the run's objects are gone (fastrsb.train's _train frame, and
    here whatever of them sits in reference cycles). The order matters: DDP's reducer holds the
    group from C++, and were it the last holder, its release (under the GIL) would run gloo's
    destructor, which waits for gloo's worker threads while one of them waits for the GIL to free
    the tensors of its last all-reduce: a finished run that never exits (py-spy on torch 2.11,
    Python 3.12, the GPU machine's versions, in this suite under load). Released here instead, by
    torch.distributed's own references, whose destructor lets go of the GIL first."""
    if d.on and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, d: Dist) -> torch.Tensor:
    """In place; no host sync of its own (NCCL queues it on the stream)."""
    if d.on:
        dist.all_reduce(tensor)
    return tensor


def gather_to_main(obj, d: Dist) -> list | None:
    """Every rank's `obj` on rank 0 (None elsewhere). Checkpoint time only: it pickles."""
    if not d.on:
        return [obj]
    objects = [None] * d.world if d.main else None
    dist.gather_object(obj, objects, dst=0)
    return objects


def broadcast_from_main(obj, d: Dist):
    """Rank 0's `obj` on every rank (what the others pass is ignored). Start-up only: it pickles."""
    if not d.on:
        return obj
    box = [obj if d.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def stop_together(error: Exception | None, d: Dist, what: str) -> None:
    """After a check each rank made on its own (its copy of the data folder, say): if it failed on
    any rank, every rank stops, the failed ones with their own error, the others naming them, so
    no rank is left waiting in a collective for one that has gone (across machines, torchrun
    does not stop the others: they would wait for the process group's 30-minute timeout)."""
    if not d.on:
        if error is not None:
            raise error
        return
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    failed = torch.zeros(d.world, dtype=torch.int32, device=device)
    failed[d.rank] = int(error is not None)
    dist.all_reduce(failed)
    ranks = [rank for rank, flag in enumerate(failed.tolist()) if flag]
    if error is not None:
        raise error
    if ranks:
        raise StoppedWithAnother(f"{what} failed on rank(s) {', '.join(map(str, ranks))} (their messages say why)")


class FailureNotice:
    """Mid-run, a rank that stops tells the others, and they stop at once naming it.
    A rank that fails (a file its loader cannot decode, a full disk, a CUDA error) leaves the
    others in their next collective: gloo notices the closed connection, NCCL waits for the
    process group's timeout (30 minutes), and torchrun stops no other machine's processes.

    `with FailureNotice(d):` around the training: an exception leaving it puts "rank R (host):
    message" into the process group's store (the rendezvous's, which every rank reaches), and a
    daemon thread on every rank looks for it there every POLL_SECONDS; one that finds it prints
    it and ends its process (exit 2), however its main thread is blocked. A rank whose own error
    came from a collective that another rank's failure broke (gloo's closed connection) raises
    that rank's message instead. Start-up checks stop together their own way (stop_together).

    A rank that ends without a word (killed for memory, a segfault, a second Ctrl-C, its machine
    gone) is found by its heartbeat: each rank's thread counts up a key of its own at every look,
    and watches the next rank's (a ring: each rank reads one key, whatever the world size); a
    count that has not moved for SILENT_SECONDS, of a rank that has not left the training, is
    told to every rank as that rank's failure. The thread beats while its process lives,
    whatever the main thread is doing (compiling, saving, blocked in a collective), so only a
    process that is gone falls silent. The store itself lives on the first machine (torchrun's
    agent there holds it): if that machine goes, the store goes with it, and a second thread,
    which never touches the store, ends the process once the store has not answered a beat for
    SILENT_SECONDS (its operations then fail, or hang until their own timeout).
    Without torch.distributed, or where the store cannot be had, it does nothing."""

    KEY = "fastrsb/failed"
    POLL_SECONDS = 3.0
    SILENT_SECONDS = 120.0  # ~40 beats missed: far from a busy process, far below NCCL's 30 minutes

    @classmethod
    def _looks_needed(cls) -> int:
        """Silence counts only over this many looks of the watcher's own, as well as SILENT_SECONDS
        of the clock: a job suspended and resumed as a whole (SLURM's suspend, SIGSTOP and SIGCONT)
        comes back to a clock that jumped while nobody beat, and must not take that for a death."""
        return max(2, round(cls.SILENT_SECONDS / cls.POLL_SECONDS))

    def __init__(self, d: Dist, store: dist.Store | None = None):
        self.d = d
        self._store = store if store is not None else _process_group_store(d)
        self._quiet = threading.Event()  # set once this rank leaves the training, whichever way
        self._watched = (d.rank + 1) % d.world if d.world > 1 else None  # the rank whose heartbeat it watches
        self._count, self._since, self._looks = None, 0.0, 0  # its last count seen, when, and looks since
        self._answered, self._unanswered = time.monotonic(), 0  # the store's last answer to a beat, looks since

    def __enter__(self) -> "FailureNotice":
        if self._store is not None:
            self._safely(lambda: self._store.set(f"fastrsb/host/{self.d.rank}", socket.gethostname()))
            self.beat()
            threading.Thread(target=self._watch, name="fastrsb-failure-notice", daemon=True).start()
            threading.Thread(target=self._watch_store, name="fastrsb-store-watch", daemon=True).start()
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        self._quiet.set()
        if self._store is None:
            return False
        # Leaving on purpose (the end, a stop, an error said below): its heartbeat stops, not its process.
        self._safely(lambda: self._store.set(f"fastrsb/left/{self.d.rank}", "1"))
        if not isinstance(error, Exception):  # a clean end, Ctrl-C, exit
            return False
        explained = isinstance(error, UserError)  # its own stop (some, as a non-finite loss, all ranks agree on)
        other = None if explained else self.failure()
        if other is not None:  # this rank's error is the broken collective another rank's failure left
            raise StoppedWithAnother(f"{other}; rank {self.d.rank} stops with it") from None
        text = str(error) if explained else f"{type(error).__name__}: {error}"
        self._tell(f"rank {self.d.rank} ({socket.gethostname()}) stopped: {(text.strip().splitlines() or [''])[0]}")
        return False

    def failure(self) -> str | None:
        """The message a failed rank left, if any."""
        return self._safely(lambda: self._store.get(self.KEY).decode() if self._store.check([self.KEY]) else None)

    def beat(self) -> None:
        """This rank is alive: its heartbeat count goes up by one."""
        if self._safely(lambda: self._store.add(f"fastrsb/beat/{self.d.rank}", 1)) is not None:
            self._answered, self._unanswered = time.monotonic(), 0

    def store_gone(self, now: float) -> str | None:
        """Why this rank must stop if the store has not taken a beat for SILENT_SECONDS at `now`,
        over as many looks (this call is one) as _looks_needed."""
        self._unanswered += 1
        if now - self._answered < self.SILENT_SECONDS or self._unanswered < self._looks_needed():
            return None
        waited = f"the rendezvous store has not answered for {now - self._answered:.0f} s"
        if os.environ.get("FASTRSB_LAUNCHED_NPROC"):  # fastrsb.launch holds it, on this machine
            return f"{waited}: the `fastrsb train --nproc` process that holds it is gone (killed?)"
        where = f" ({os.environ['MASTER_ADDR']})" if os.environ.get("MASTER_ADDR") else ""
        return f"{waited}: the first machine{where}, which holds it, or the network to it is gone"

    def silent(self, now: float) -> str | None:
        """The watched rank's failure if its heartbeat has not moved for SILENT_SECONDS at `now`
        (time.monotonic()) over _looks_needed looks (this call is one), else None. Counted from the
        first look: a rank that never beat is silent too. A rank that left on purpose is not
        watched any more."""
        if self._watched is None:
            return None
        count = self._safely(lambda: self._store.add(f"fastrsb/beat/{self._watched}", 0))  # add 0: a read
        if count is None:  # the store did not answer: no news of the rank, which is not news of its death
            return None
        if count != self._count:
            self._count, self._since, self._looks = count, now, 0
            return None
        self._looks += 1
        if now - self._since < self.SILENT_SECONDS or self._looks < self._looks_needed():
            return None
        rank, key = self._watched, f"fastrsb/host/{self._watched}"
        if self._safely(lambda: self._store.check([f"fastrsb/left/{rank}"])):
            self._watched = None
            return None
        host = self._safely(lambda: self._store.get(key).decode() if self._store.check([key]) else None)
        return (f"rank {rank} ({host or 'host unknown'}) has not been heard from for {now - self._since:.0f} s: "
                "its process ended without a word (killed for memory? a crash?) or its machine is gone")

    def _watch(self) -> None:
        while not self._quiet.wait(self.POLL_SECONDS):
            self.beat()
            message, told = self.failure(), True
            if message is None and (message := self.silent(time.monotonic())) is not None:
                self._tell(message)
                told = False
            if message is not None and not self._quiet.is_set():
                # Under --nproc the rank that told it (the failed one, or the one that found it silent)
                # says it on the same terminal: the others stop without repeating it.
                self._stop(message, quiet=told and bool(os.environ.get("FASTRSB_LAUNCHED_NPROC")))

    def _watch_store(self) -> None:
        """Apart from _watch, which a store that hangs would hold: no store operation here."""
        while not self._quiet.wait(self.POLL_SECONDS):
            message = self.store_gone(time.monotonic())
            if message is not None and not self._quiet.is_set():
                self._stop(message)

    def _stop(self, message: str, quiet: bool = False) -> None:
        sys.stdout.flush()
        if not quiet:
            say_error(f"{message}; rank {self.d.rank} stops with it")
        os._exit(2)  # the main thread may be blocked in a collective for the timeout

    def _tell(self, message: str) -> None:
        """Every rank's failure message, unless one is there already (the first cause stays)."""
        self._safely(lambda: self._store.check([self.KEY]) or self._store.set(self.KEY, message))

    @staticmethod
    def _safely(operation):
        """operation() on the store, or None where the store failed (gone with its host, say): the
        notice is a help, never a cause of failure itself."""
        try:
            return operation()
        except Exception:  # noqa: BLE001
            return None


def _process_group_store(d: Dist) -> dist.Store | None:
    """The default process group's store (its key space is this launch's, and under torchrun this
    restart's), or None without one. torch has no public accessor for it."""
    if not d.on or not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def agree(flags: list[bool], d: Dist) -> list[bool]:
    """Each flag True on every rank if it is True on any rank (a stop request that reached one
    process, a non-finite loss on one shard), so that all ranks take the same branch."""
    return [bool(v) for v in _reduced([int(f) for f in flags], dist.ReduceOp.MAX, torch.int64, d)]


def smallest(value: int, d: Dist) -> int:
    """The smallest of every rank's value (a choice each rank made alone, which all must share)."""
    return int(_reduced([value], dist.ReduceOp.MIN, torch.int64, d)[0])


def largest(values: list[float], d: Dist) -> list[float]:
    """Each value the largest of every rank's (a figure each rank measured alone: its memory)."""
    return _reduced(values, dist.ReduceOp.MAX, torch.float64, d)


def _reduced(values: list, op, dtype: torch.dtype, d: Dist) -> list:
    """`values` all-reduced with `op` over the ranks (on the device NCCL needs: one host sync, at
    the points where ranks must agree anyway); as they are in a single process."""
    if not d.on:
        return list(values)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=dtype, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


@torch.no_grad()
def average_bn_stats(model: nn.Module, d: Dist) -> None:
    """Average BatchNorm running statistics across ranks (timm's --dist-bn reduce), so every rank
    evaluates and checkpoints the same model."""
    if not d.on:
        return
    stats = [b for name, b in model.named_buffers() if name.endswith(("running_mean", "running_var"))]
    if stats:
        flat = torch.cat([s.flatten() for s in stats])
        dist.all_reduce(flat)
        flat /= d.world
        for s, new in zip(stats, torch._utils._unflatten_dense_tensors(flat, stats)):
            s.copy_(new)


@torch.no_grad()
def check_in_step(model: nn.Module, d: Dist) -> None:
    """Every rank must hold the same weights after an epoch (DDP keeps them equal; a divergence
    means a bug or a broken rank): compare a fingerprint of all parameters and buffers."""
    if not d.on:
        return
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    fingerprint = torch.stack([torch.stack([t.double().sum(), t.double().square().sum()]) for t in tensors]).sum(0)
    low, high = fingerprint.clone(), fingerprint.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(f"rank {d.rank}: the processes' weights differ after an epoch (fingerprints "
                           f"{low.tolist()} vs {high.tolist()}): the ranks are out of step")
