"""--deterministic: the same run twice gives the same batches, losses and weights, and when two
runs part, `fastrsb compare` names the step.

One seed (the recipe's) already drives torch, numpy (mixup/cutmix) and DALI; this mode adds
torch's deterministic algorithms (warn-only: an op without one is named once, not fatal), cuDNN
without autotuning, cuBLAS's fixed workspace, and a hash of every logged batch (its pixels' bytes
and labels: a device-to-host copy at log steps only, so off by default)."""
from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from pathlib import Path

import torch

from fastrsb.errors import UserError
from fastrsb.metrics_log import read_rows

_NAMED: set[str] = set()


@contextlib.contextmanager
def deterministic_mode(on: bool = True):
    """torch's deterministic algorithms (warn-only: an op without one is named once), cuDNN without
    autotuning, cuBLAS's fixed workspace, for the run inside; torch's settings are restored after."""
    if not on:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before any GPU matmul
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, warnings.showwarning)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if "deterministic" in text and "implementation" in text:
            op = text.split(" does not have")[0]
            if op not in _NAMED:
                _NAMED.add(op)
                print(f"deterministic mode: {op} has no deterministic implementation here: runs may differ "
                      "from the step it first ran", flush=True)
            return
        previous(message, category, filename, lineno, file, line)
    warnings.showwarning = show
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, warnings.showwarning = saved[2:]


def batch_hash(images: torch.Tensor, labels: torch.Tensor) -> str:
    """12 hex digits of SHA-1 over the batch's pixel bytes and labels (as the model saw them)."""
    digest = hashlib.sha1(images.detach().contiguous().cpu().numpy().tobytes())
    digest.update(labels.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:12]


def _log_rows(run: Path) -> dict[int, dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run} holds no metrics.jsonl: give two run folders")
    return {row["step"]: row for row in read_rows(path) if row["kind"] == "log"}


def compare(run_a: str | Path, run_b: str | Path) -> tuple[bool, str]:
    """(agree, one line): the first log step where the batches (hash) or the losses differ."""
    a, b = _log_rows(run_a), _log_rows(run_b)
    steps = sorted(set(a) & set(b))
    if not steps:
        raise UserError(f"{run_a} and {run_b} share no logged step (different --log-every?)")
    hashed = all("batch_hash" in a[s] and "batch_hash" in b[s] for s in steps)
    for step in steps:
        if hashed and a[step]["batch_hash"] != b[step]["batch_hash"]:
            return False, (f"diverged at step {step}: the batches differ (hash {a[step]['batch_hash']} vs "
                           f"{b[step]['batch_hash']}); the logged steps before it agree")
        if a[step]["loss"] != b[step]["loss"]:
            return False, (f"diverged at step {step}: the same batch{'' if hashed else ' (not hashed)'}, but the "
                           f"losses differ ({a[step]['loss']!r} vs {b[step]['loss']!r})")
    what = "batches and losses" if hashed else "losses (no batch hashes: run with --deterministic to compare batches)"
    return True, f"agree: the same {what} at all {len(steps)} common logged steps (up to step {steps[-1]})"
