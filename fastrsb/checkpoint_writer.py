"""Checkpoints written beside the training, not in its way.

A checkpoint of ResNet-50 with LAMB's two moments is ~300 MB, and a run writes one to two of them
an epoch (last.pt before validation, and again after it). Written by the training thread, each
stops it, and with it the GPU, for as long as the disk takes: 0.7-1 s here for 307 MB with its
fsync, seconds on a network file system; on 8 GPUs, where an A3 epoch takes ~20 s, that is a tenth
of the run. So the training thread only copies the state to host memory (the weights and moments
it will go on changing in place; ~0.1 s) and a thread of the run's own writes the copy, while the
training thread validates or trains on. The writing thread holds the GIL little (the write and
fsync release it): a thread launching small torch ops beside it kept 86-94% of its pace here (a
median; on 2 cores it shares with the write's copies: benchmarks/checkpoint_save.py). The copy
costs one checkpoint's worth of host memory while it is written.

One write at a time, in order: a new one waits for the one before, whose error (a full disk)
comes out there, in the training thread, as the synchronous save's did, one save later."""
from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np
import torch


def host_copy(obj: Any) -> Any:
    """OBJ with its tensors copied to the host (on the current stream, after the work queued on
    it) and its dicts, lists, tuples and numpy arrays copied: what a later write reads stays as it
    was at this call. A state dict keeps its type and `_metadata` (the modules' versions, which
    load_state_dict reads). Other values (numbers, strings, bytes) are immutable and shared."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if isinstance(obj, dict):
        copied = obj.copy()  # keeps the type (an OrderedDict), not its attributes
        for key, value in copied.items():
            copied[key] = host_copy(value)
        if hasattr(obj, "_metadata"):
            copied._metadata = host_copy(obj._metadata)
        return copied
    if isinstance(obj, list):
        return [host_copy(value) for value in obj]
    if type(obj) is tuple:
        return tuple(host_copy(value) for value in obj)
    return obj


class CheckpointWriter:
    """Runs each write given to `submit` on a thread of its own, one after the other. `wait()`
    returns once the last one is done, raising its error in the caller's thread. The thread is
    not a daemon: a process that ends (an error elsewhere, the end of a run) finishes the write
    first, so the last checkpoint is whole, not a temporary file left behind."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, write: Callable[[], None]) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(write,), name="fastrsb-checkpoint-writer")
        self._thread.start()

    def _run(self, write: Callable[[], None]) -> None:
        try:
            write()
        except BaseException as err:  # said in the training thread, at its next wait()
            self._error = err

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error
