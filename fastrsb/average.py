"""`fastrsb average CKPT CKPT ... --out AVG.pt`: the mean of several checkpoints' weights, as timm's
avg_checkpoints.py takes it (every entry of the state dict, BatchNorm's statistics included, summed
in float64 and divided by their number), for the epochs a run kept (`train --keep-every`) or for
runs of one recipe with other seeds. The result is a checkpoint of weights alone: `eval`, `export`,
`predict` and `initial_checkpoint` take it; it cannot be resumed (it has no optimizer state).
"""
from __future__ import annotations

from pathlib import Path

import torch

from fastrsb import __version__
from fastrsb.checkpoint import load_checkpoint, save_checkpoint
from fastrsb.errors import UserError
from fastrsb.provenance import source_commit


def average_checkpoints(paths: list[str | Path], out: str | Path) -> dict:
    """Write OUT: the mean of the checkpoints' model weights (and of their EMA's, where all kept
    one), with the last one's recipe, classes and epoch; what it wrote."""
    paths, out = [Path(p) for p in paths], Path(out)
    if len(paths) < 2:
        raise UserError("give two checkpoints or more to average")
    states = [load_checkpoint(p) for p in paths]  # each a checkpoint, or one line on what it is
    files = [_file_id(p) for p in paths]  # a kept epoch and last.pt may be one file (a hard link)
    if len(set(files)) < len(files):
        twice = next(p for k, p in enumerate(paths) if files[k] in files[:k])
        raise UserError(f"{twice} is a checkpoint given before (under this name or another: a hard link): each counts "
                        "once in a mean")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: give the file to write (e.g. {out / 'average.pt'})")
    if out.exists() and _file_id(out) in files:
        raise UserError(f"--out {out} is one of the checkpoints averaged: write the mean to a new file")
    _refuse_what_does_not_average(states, paths)
    last = states[-1]
    averaged = {"model": _mean([s["model"] for s in states])}
    if all("ema" in s for s in states):
        averaged["ema"] = _mean([s["ema"] for s in states])
    state = {**averaged, "recipe": last["recipe"], "classes": last["classes"], "epoch": last["epoch"],
             "step": last["step"], "metrics": {}, "version": __version__, "commit": source_commit(),
             "averaged_from": [{"path": str(p), "epoch": s["epoch"], "top1": s.get("metrics", {}).get("top1")}
                               for p, s in zip(paths, states)]}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(state, out)
    return {"out": str(out), "checkpoints": state["averaged_from"], "ema": "ema" in averaged}


def _file_id(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_dev, status.st_ino


def _refuse_what_does_not_average(states: list[dict], paths: list[Path]) -> None:
    """Weights average where they are one network's: the same model, classes and tensors."""
    first, where = states[0], paths[0]
    for state, path in zip(states[1:], paths[1:]):
        if state["recipe"]["model"] != first["recipe"]["model"]:
            raise UserError(f"{path} is a {state['recipe']['model']}, {where} a {first['recipe']['model']}: only one "
                            "model's weights average")
        if state["classes"] != first["classes"]:
            raise UserError(f"{path} and {where} classify other classes (or in another order): their outputs do not "
                            "average")
        shapes = {k: tuple(v.shape) for k, v in state["model"].items()}
        if shapes != {k: tuple(v.shape) for k, v in first["model"].items()}:
            raise UserError(f"{path} holds other tensors than {where}: not one network's weights")


def _mean(state_dicts: list[dict]) -> dict:
    """Each entry's mean in float64, back in its own dtype (an integer's, the step counts of
    BatchNorm, rounded)."""
    mean = {}
    for key, value in state_dicts[0].items():
        total = sum(sd[key].to(torch.float64) for sd in state_dicts) / len(state_dicts)
        mean[key] = (total.round() if not value.is_floating_point() else total).to(value.dtype)
    return mean
