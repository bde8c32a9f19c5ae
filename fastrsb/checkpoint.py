"""Checkpoints: written atomically, read without running any code from the file."""
from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from fastrsb.errors import UserError
from fastrsb.file_jobs import link_or_copy
from fastrsb.staging import current_umask

_ZIP_MAGIC = b"PK\x03\x04"  # the first bytes of what torch.save writes


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write to a temporary file in the same folder, then rename: a crash or a preemption in
    the middle never leaves a half-written checkpoint in place of the last one (a process killed
    outright leaves the temporary file: remove_partial_saves)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp's file is private (0600): give it the mode torch.save's open would have (timm's
        # checkpoints, 0644 under the usual umask), so that others on a shared machine can read it.
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save says a failed write as a RuntimeError
        Path(tmp).unlink(missing_ok=True)
        raise _not_written(path, err) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def link_checkpoint(source: Path, target: Path) -> None:
    """TARGET as the same file as SOURCE: a hard link (no time, no room until SOURCE's next save,
    which writes a new file), else a copy; put in place by a rename, as a save is, from a
    temporary file named as remove_partial_saves finds it. OSError where neither can be made."""
    partial = target.parent / f".{target.name}.{os.getpid()}.tmp"
    try:
        link_or_copy(source, partial)
        os.replace(partial, target)
    except OSError:
        partial.unlink(missing_ok=True)
        raise


def link_best(last: Path, best: Path) -> None:
    """best.pt as last.pt, just saved; a failure (a full disk, where a copy was needed) stops the
    run as a failed save does."""
    try:
        link_checkpoint(last, best)
    except OSError as err:
        raise _not_written(best, err) from None


def _not_written(path: Path, err: BaseException) -> UserError:
    free = shutil.disk_usage(path.parent).free
    return UserError(f"could not write {path} ({_first_line(err)}; {free / 1e9:,.1f} GB free on its disk): "
                     f"the checkpoint there before is kept; make room, then --resume auto")


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


KEPT = "epoch-{:03d}.pt"  # an epoch's checkpoint kept by train --keep-every (run_state.RunFolder.keep)


def is_kept(epoch: int, epochs: int, keep_every: int) -> bool:
    """Whether `train --keep-every` keeps EPOCH's checkpoint (of EPOCHS): every keep_every-th, and
    the last."""
    return epoch % keep_every == 0 or epoch == epochs


def kept_checkpoints(folder: Path) -> dict[int, Path]:
    """{epoch: its kept checkpoint} of a run folder."""
    found = {}
    for path in Path(folder).glob("epoch-*.pt"):
        number = path.name.removeprefix("epoch-").removesuffix(".pt")
        if number.isdecimal() and path.is_file():
            found[int(number)] = path
    return dict(sorted(found.items()))


def remove_partial_saves(folder: Path, names: tuple[str, ...] = ("last.pt", "best.pt", "epoch-*.pt")
                         ) -> tuple[int, int]:
    """Delete the temporary files of saves that never finished (SIGKILL, a lost node, a full disk
    mid-write: each as large as a checkpoint, ~300 MB for ResNet-50 with LAMB's moments, and
    never read). Returns (files, bytes) removed. Only for a folder no other process is saving
    into."""
    partial = [p for name in names for p in Path(folder).glob(f".{name}.*.tmp") if p.is_file()]
    size = sum(p.stat().st_size for p in partial)
    for p in partial:
        p.unlink(missing_ok=True)
    return len(partial), size


def checkpoint_file(path: str | Path) -> Path:
    """`path`, a file, or one line saying it is a folder or nothing."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder: give a checkpoint file ({path / 'last.pt'} or best.pt in a run folder)")
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    return path


def read_saved(path: str | Path) -> object:
    """What torch.save wrote at PATH, read with weights_only=True: only tensors and plain data are
    unpickled, so a file from elsewhere cannot execute anything. One class is let through besides:
    argparse.Namespace, in which timm's train.py keeps its arguments in every checkpoint it writes
    (its fields are read under the same rule)."""
    path = checkpoint_file(path)
    try:
        with warnings.catch_warnings():  # a file of other bytes is refused below; no warning of torch's ahead of it
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            with _timm_arguments_allowed():
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling arbitrary bytes fails in many ways (KeyError, IndexError...)
        raise UserError(f"{path} is not a loadable checkpoint: {_why_unloadable(path, err)}") from None


def _timm_arguments_allowed():
    """torch >= 2.5 allows a class for one load; 2.4, the oldest fastrsb takes, has only the list
    every load of the process reads."""
    if hasattr(torch.serialization, "safe_globals"):
        return torch.serialization.safe_globals([argparse.Namespace])
    torch.serialization.add_safe_globals([argparse.Namespace])
    return contextlib.nullcontext()


def load_checkpoint(path: str | Path) -> dict:
    """A fastrsb checkpoint (read_saved), or one line saying what the file is instead."""
    path = checkpoint_file(path)
    return as_fastrsb_checkpoint(read_saved(path), path)


def as_fastrsb_checkpoint(state: object, path: Path) -> dict:
    """STATE, what read_saved read at PATH, if it is a fastrsb checkpoint; else one line saying what
    it is: a checkpoint of timm's train.py, weights alone or something else."""
    if is_timm_checkpoint(state):
        done = timm_epochs_done(state)
        raise UserError(f"{path} is a checkpoint of timm's train.py ({state['arch']}"
                        f"{'' if done is None else f', {done} epoch(s) trained'}), not fastrsb's: fastrsb eval "
                        f"evaluates it, and a new run starts from its weights with --set initial_checkpoint={path}")
    if not isinstance(state, dict) or "model" not in state or "recipe" not in state:
        found = (f"its entries: {', '.join(map(str, list(state)[:6]))}" if isinstance(state, dict)
                 else f"a {type(state).__name__}")
        hint = ("; weights alone name no model or classes (eval also reads a timm model folder: them beside a "
                "config.json); a run starts from them with --set initial_checkpoint" if is_weights(state) else "")
        entries = state if isinstance(state, dict) else {}
        missing = " and ".join(f"'{key}'" for key in ("model", "recipe") if key not in entries)
        raise UserError(f"{path} is not a fastrsb checkpoint (no {missing} entr{'ies' if ' and ' in missing else 'y'}; "
                        f"{found}){hint}")
    return state


def is_timm_checkpoint(state: object) -> bool:
    """What timm's train.py saves (its CheckpointSaver): the model's name under "arch" and its
    weights under "state_dict", beside the optimizer's state, the epoch, the arguments and the EMA's
    weights ("state_dict_ema") where it kept one."""
    return (isinstance(state, dict) and isinstance(state.get("arch"), str) and is_weights(state.get("state_dict")))


def timm_epochs_done(state: dict) -> int | None:
    """The epochs a timm checkpoint was trained for: its saver writes the index of the epoch just
    ended ("version" 2; before, one more)."""
    epoch = state.get("epoch")
    if not isinstance(epoch, int):
        return None
    return epoch + 1 if state.get("version", 1) >= 2 else epoch


def is_weights(state: object) -> bool:
    """A state dict: tensors by name, at least one."""
    return isinstance(state, dict) and bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())


def _why_unloadable(path: Path, err: Exception) -> str:
    """What torch.load's failure means for the user. Its own messages speak of weights_only and
    unpickler opcodes, or are a bare KeyError/IndexError for a text file."""
    if isinstance(err, pickle.UnpicklingError) and "Unsupported global" in str(err):
        return ("it holds objects other than tensors and plain data, and fastrsb never runs code from a "
                "checkpoint (weights_only=True)")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as read_err:
        return f"it cannot be read ({read_err.strerror or read_err})"
    if not head:
        return "the file is empty"
    if head == _ZIP_MAGIC:  # torch.save writes a zip archive: this one is cut short, damaged or another's
        detail = _first_line(err).split(". This is an internal miniz error")[0]
        return f"the file is truncated or damaged ({detail})"
    return "it was not written by torch.save (a checkpoint is a zip archive; this file is not)"


def load_weights(model: nn.Module, weights: dict, source: str) -> None:
    """load_state_dict that says what differs instead of a wall of key names."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    wrong = [f"{k} {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in weights and weights[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} shape mismatch(es), e.g. {wrong[0]}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise UserError(f"{source} does not fit the model: {'; '.join(parts)}")
    model.load_state_dict(weights)
