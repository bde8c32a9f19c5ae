"""Checkpoints of timm's train.py (checkpoint-N.pth.tar, last.pth.tar, model_best.pth.tar), read
for `fastrsb eval` and a run's `initial_checkpoint`: a timm user's own weights, evaluated through
fastrsb's DALI validation or trained on, with nothing to convert first.

Such a file names its model ("arch") and holds its weights ("state_dict", and the EMA's under
"state_dict_ema" where one was kept). Where train.py wrote it, it also holds train.py's arguments
("args"): how the model was built (--gp, --model-kwargs) and the eval transform of train.py's own
validation (--img-size or --input-size, --crop-pct, --mean, --std, --interpolation), which eval
takes by default, so that it measures what timm recorded ("metric")."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastrsb.checkpoint import is_weights, load_weights, timm_epochs_done
from fastrsb.errors import UserError
from fastrsb.model_folder import check_eval_transform

# Prefixes a wrapped model adds to its weights' names: DDP's, and torch.compile's (timm unwraps
# both before it saves; an older or another trainer may not have).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class TimmCheckpoint:
    path: Path
    arch: str  # timm's model name, perhaps with a pretrained tag (resnet50.a1_in1k)
    weights: dict
    ema_weights: dict | None
    epochs_done: int | None
    args: dict | None  # train.py's arguments, by name
    metric: float | None  # what train.py's validation measured (args' eval_metric, top1 by default)

    def describe(self) -> str:
        done = f", {self.epochs_done} epoch(s) trained" if self.epochs_done is not None else ""
        return f"{self.path} (timm's train.py: {self.arch}{done})"


def read_timm_checkpoint(state: dict, path: Path) -> TimmCheckpoint:
    """STATE, what checkpoint.read_saved read at PATH (is_timm_checkpoint says it is timm's)."""
    args, ema, metric = state.get("args"), state.get("state_dict_ema"), state.get("metric")
    return TimmCheckpoint(path, state["arch"], unwrapped(state["state_dict"]),
                          unwrapped(ema) if is_weights(ema) else None, timm_epochs_done(state),
                          vars(args) if isinstance(args, argparse.Namespace) else None,
                          float(metric) if isinstance(metric, (int, float)) else None)


def timm_data_folders(checkpoint: TimmCheckpoint) -> list[Path]:
    """The data folder train.py was given (its data_dir, or data in older releases) and its splits:
    where timm's readers look for a --class-map given by a relative name."""
    from fastrsb.pipelines.image_list import SPLIT_NAMES
    roots = [Path(value) for key in ("data_dir", "data") if isinstance(value := (checkpoint.args or {}).get(key), str)
             and value]
    return [place for root in roots for place in (root, *(root / name for names in SPLIT_NAMES.values()
                                                          for name in names))]


def unwrapped(weights: dict) -> dict:
    """Weights by the names the bare model gives them."""
    for prefix in WRAPPER_PREFIXES:
        if all(name.startswith(prefix) for name in weights):
            weights = {name.removeprefix(prefix): value for name, value in weights.items()}
    return weights


def model_name(checkpoint: TimmCheckpoint) -> str:
    """The timm model name the checkpoint's "arch" (train.py's --model) stands for: itself, or for a
    model train.py fetched from the hub (hf-hub:timm/resnet50.a1_in1k, a fine-tune) the name timm's
    own repositories bear; one line saying so where it is none this timm knows."""
    import timm
    name = checkpoint.arch
    if name.startswith("hf-hub:timm/"):
        name = name.removeprefix("hf-hub:timm/").split("@")[0]  # a revision after "@"
    if not timm.is_model(name):
        raise UserError(f"{checkpoint.path} names its model '{checkpoint.arch}', which is no model this timm "
                        f"{timm.__version__} knows by name (fastrsb builds models from timm's names, offline)")
    return name


def architecture_of(checkpoint: TimmCheckpoint) -> str:
    """The model's name without a pretrained tag (resnet50.a1_in1k -> resnet50): the same network."""
    from timm.models import split_model_name_tag
    return split_model_name_tag(model_name(checkpoint))[0]


@dataclass
class TimmEval:
    model: nn.Module
    img_size: int
    crop_pct: float
    notes: list[str]
    class_map: str | None  # train.py's --class-map, which sets its classes' indices (else timm's natural order)
    classes_note: str  # how eval reads the classes the checkpoint does not name


def model_to_evaluate(checkpoint: TimmCheckpoint, ema: bool) -> TimmEval:
    """The checkpoint's network built as train.py built it (channels-last, its weights or its EMA's
    loaded) and the eval transform to test it with: train.py's own validation's where its arguments
    are there, else the one timm's validate.py resolves for the model (its test size)."""
    import timm
    from timm.data import resolve_data_config
    path, name = checkpoint.path, model_name(checkpoint)
    weights = checkpoint.ema_weights if ema else checkpoint.weights
    if weights is None:
        raise UserError(f"{path} holds no EMA weights (timm's train.py ran without --model-ema)")
    args = checkpoint.args or {}
    built = dict(args.get("model_kwargs") or {})
    if args.get("gp"):
        built["global_pool"] = args["gp"]
    model = timm.create_model(name, pretrained=False, **built)
    classes = _classes_of(model, weights)
    if classes != model.num_classes:  # train.py's --num-classes, which is not kept where its arguments are not
        model = timm.create_model(name, pretrained=False, **{**built, "num_classes": classes})
    load_weights(model, weights, str(path))
    if checkpoint.args is not None:
        data = resolve_data_config(args, model=model)  # as train.py's validation resolved it
        said = f"timm's train.py validated this checkpoint at {_transform(data)}"
        if checkpoint.metric is not None:
            # train.py records its EMA's figures where it validates an EMA (one not kept on the CPU)
            whose = ("its EMA weights (--ema)" if checkpoint.ema_weights is not None
                     and not args.get("model_ema_force_cpu") else "its weights")
            said += f" and recorded {args.get('eval_metric', 'top1')} {checkpoint.metric:.2f} for {whose}"
        said += " (the size and crop tested here unless --img-size or --crop-pct say others)"
    else:
        data = resolve_data_config({}, model=model, use_test_size=True)  # as timm's validate.py
        said = (f"the checkpoint holds no arguments of timm's train.py: tested unless --img-size or --crop-pct say "
                f"otherwise at the size and crop timm's validate.py takes for {name} ({_transform(data)})")
    class_map = args.get("class_map") or None
    classes_note = (f"the checkpoint names no classes: they are indexed as train.py's --class-map {class_map} "
                    "indexes them" if class_map else "the checkpoint names no classes: they are taken as the data "
                    "folder's class folders, in the order timm's ImageFolder indexes them (natural order: 'c2' before "
                    "'c10')")
    return TimmEval(model.to(memory_format=torch.channels_last), int(data["input_size"][1]),
                    float(data["crop_pct"]), [said, *check_eval_transform(data, path, "its transform")], class_map,
                    classes_note)


def _transform(data: dict) -> str:
    return f"{data['input_size'][1]} px, crop {data['crop_pct']}"


def _classes_of(model: nn.Module, weights: dict) -> int:
    """How many classes the weights classify: their classifier's rows (the model's where they hold
    no classifier under its name, and load_weights then names what is missing)."""
    name = model.pretrained_cfg.get("classifier")
    theirs = weights.get(f"{name}.weight") if isinstance(name, str) else None
    return theirs.shape[0] if theirs is not None and theirs.ndim >= 1 else model.num_classes
