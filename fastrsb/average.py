"""`fastrsb average CKPT CKPT ... --out AVG.pt`: the mean of several checkpoints' weights, as timm's
avg_checkpoints.py takes it (every entry of the state dict, BatchNorm's statistics included, summed
in float64 and divided by their number), for the epochs a run kept (`train --keep-every`) or for
runs of one recipe with other seeds. The result is a checkpoint of weights alone: `eval`, `export`,
`predict` and `initial_checkpoint` take it; it cannot be resumed (it has no optimizer state).
`--bn-data DIR` measures the mean's BatchNorm statistics anew over DIR's train images, as
stochastic weight averaging does, instead of averaging them (fastrsb.bn_update).
"""
from __future__ import annotations

from pathlib import Path

import torch

from fastrsb import __version__
from fastrsb.checkpoint import checkpoint_file, load_checkpoint, save_checkpoint
from fastrsb.errors import UserError
from fastrsb.provenance import source_commit


def average_checkpoints(paths: list[str | Path], out: str | Path, bn_data: str | Path | None = None,
                        bn_images: int | None = None, device: str = "cpu", batch_size: int = 64,
                        num_threads: int | None = None) -> dict:
    """Write OUT: the mean of the checkpoints' model weights (and of their EMA's, where all kept
    one), with the last one's recipe, classes and epoch; what it wrote. One checkpoint is read at a
    time (ten of ResNet-50's with LAMB's moments are 3 GB), into float64 sums. With bn_data, the
    mean's BatchNorm statistics are measured anew over bn_data's train images (at most bn_images;
    fastrsb.bn_update) instead of averaged."""
    paths, out = [Path(p) for p in paths], Path(out)
    if len(paths) < 2:
        raise UserError("give two checkpoints or more to average")
    for path in paths:
        checkpoint_file(path)  # a path mistyped is said before minutes of reading the others
    files = [_file_id(p) for p in paths]  # a kept epoch and last.pt may be one file (a hard link)
    if len(set(files)) < len(files):
        twice = next(p for k, p in enumerate(paths) if files[k] in files[:k])
        raise UserError(f"{twice} is a checkpoint given before (under this name or another: a hard link): each counts "
                        "once in a mean")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: give the file to write (e.g. {out / 'average.pt'})")
    if out.exists() and _file_id(out) in files:
        raise UserError(f"--out {out} is one of the checkpoints averaged: write the mean to a new file")
    if bn_data is not None:
        from fastrsb.bn_update import recompute_for_checkpoint, train_images
        train = train_images(bn_data)
    first, sums, sources, any_ema = None, {}, [], False
    for path in paths:
        state = load_checkpoint(path)  # a checkpoint, or one line on what the file is
        if first is None:  # kept as its tensors' shapes and dtypes alone (on torch's meta device)
            first = {"recipe": {"model": state["recipe"]["model"]}, "classes": state["classes"],
                     **{part: {k: v.to("meta") for k, v in state[part].items()} for part in ("model", "ema")
                        if part in state}}
            first_path = path
            sums = {part: _as_float64(state[part]) for part in ("model", "ema") if part in state}
        else:
            _refuse_what_does_not_average(state, path, first, first_path)
            sums = {part: {k: v + state[part][k].to(torch.float64) for k, v in total.items()}
                    for part, total in sums.items() if part in state}  # the EMA's: where all kept one
        sources.append({"path": str(path), "epoch": state["epoch"], "top1": state.get("metrics", {}).get("top1")})
        any_ema |= "ema" in state
        last = state
    averaged = {part: {k: _back(v / len(paths), first[part][k]) for k, v in total.items()}
                for part, total in sums.items()}
    state = {**averaged, "recipe": last["recipe"], "classes": last["classes"], "epoch": last["epoch"],
             "step": last["step"], "metrics": {}, "version": __version__, "commit": source_commit(),
             "averaged_from": sources}
    measured = None
    if bn_data is not None:
        measured = recompute_for_checkpoint(state, bn_data, train, bn_images, device, batch_size, num_threads)
        state.update(measured.pop("state"))
        state["bn_recomputed"] = measured  # the data, images and crop size its statistics were measured on
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(state, out)
    return {"out": str(out), "checkpoints": sources, "ema": "ema" in averaged,
            "ema_left_out": any_ema and "ema" not in averaged, "bn_recomputed": measured}


def _file_id(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_dev, status.st_ino


def _refuse_what_does_not_average(state: dict, path: Path, first: dict, where: Path) -> None:
    """Weights average where they are one network's: the same model, classes and tensors."""
    if state["recipe"]["model"] != first["recipe"]["model"]:
        raise UserError(f"{path} is a {state['recipe']['model']}, {where} a {first['recipe']['model']}: only one "
                        "model's weights average")
    if state["classes"] != first["classes"]:
        raise UserError(f"{path} and {where} classify other classes (or in another order): their outputs do not "
                        "average")
    if {k: tuple(v.shape) for k, v in state["model"].items()} != {k: tuple(v.shape) for k, v in first["model"].items()}:
        raise UserError(f"{path} holds other tensors than {where}: not one network's weights")


def _as_float64(state_dict: dict) -> dict:
    return {k: v.to(torch.float64) for k, v in state_dict.items()}


def _back(mean: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A mean in the dtype of its entry (LIKE; an integer's, BatchNorm's step count, rounded)."""
    return (mean if like.is_floating_point() else mean.round()).to(like.dtype)
