"""`fastrsb export`: a run's trained weights as a timm model folder, for use outside fastrsb.

The folder is timm's own layout for a model (what timm's `save_for_hf` writes and the Hugging
Face hub serves, its config written by timm's `save_config_for_hf`): `model.safetensors`, the
weights alone (no optimizer moments, nothing pickled), and `config.json`: the architecture, the
classes by name (in the order timm's ImageFolder indexes them, which the classifier's rows take:
fastrsb.class_order), and as its pretrained config the transform the run validated with (the
recipe's test size and crop, bicubic, ImageNet's mean and
std). So, with no fastrsb installed:

    model = timm.create_model("local-dir:FOLDER", pretrained=True)
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))

builds the trained network and the transform to feed it, and the folder can be pushed to the hub
as it is. Code that builds its own model loads the weights file alone:
`timm.create_model(ARCH, num_classes=N, checkpoint_path="FOLDER/model.safetensors")`.

config.json also keeps, under "fastrsb", where the weights came from: the checkpoint, its epoch
and validated top-1, the weights taken (the model's or its EMA) and the whole recipe.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fastrsb import __version__, onnx_export
from fastrsb.checkpoint import load_checkpoint, load_weights
from fastrsb.class_order import classifier_keys, imagenet_descriptions, reordered, timm_order
from fastrsb.errors import UserError
from fastrsb.model import make_model
from fastrsb.staging import staged_folder

WEIGHTS = "model.safetensors"  # timm's (and the hub's) file names
CONFIG = "config.json"


def export_checkpoint(checkpoint: str | Path, out: str | Path, ema: bool = False, force: bool = False,
                      onnx: bool = False) -> dict:
    """Write CHECKPOINT's weights (ema: its EMA weights) and config to the folder OUT, and with
    `onnx` the network as model.onnx too (fastrsb.onnx_export). An OUT that holds anything is
    refused unless `force`; the folder is written beside OUT and renamed into place, so an export
    that fails leaves OUT as it was. Returns what was written."""
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf  # not re-exported by timm.models in every release

    state = load_checkpoint(checkpoint)
    recipe, classes = state["recipe"], state["classes"]
    if ema and "ema" not in state:
        raise UserError(f"{checkpoint} holds no EMA weights (the run had model_ema = false)")
    out = Path(out)
    _check_target(out, force)
    model = make_model(recipe["model"], len(classes))
    # The classifier in timm's order of the classes (its ImageFolder's: natural, where fastrsb's is
    # sorted), so that timm's own tools, which index a data folder so, read it right: class_order.py.
    timm_classes = timm_order(classes)
    load_weights(model, reordered(state["ema" if ema else "model"], classifier_keys(model), classes, timm_classes),
                 str(checkpoint))
    # safetensors stores dense row-major tensors: the channels-last convolution weights are
    # written as their contiguous copies (the same values; any model loads them).
    model = model.to(memory_format=torch.contiguous_format)
    architecture = model.pretrained_cfg["architecture"]
    model.pretrained_cfg = _pretrained_cfg(model, recipe, len(classes))
    # version and commit: the fastrsb that trained the weights (an older checkpoint has no commit)
    provenance = {"version": state.get("version", __version__), "commit": state.get("commit"),
                  "checkpoint": str(checkpoint), "epoch": state.get("epoch"),
                  "top1": _validated_top1(state, ema), "weights": "ema" if ema else "model", "recipe": recipe,
                  **({"averaged_from": state["averaged_from"]} if "averaged_from" in state else {})}
    model_config = {"label_names": timm_classes, "fastrsb": provenance}
    descriptions = imagenet_descriptions(classes)
    if descriptions:
        model_config["label_descriptions"] = descriptions

    try:
        with staged_folder(out, existing="replace") as staging:
            # What timm's save_for_hf writes, without its check for huggingface_hub (which some
            # timm releases fail to import beside a newer hub, though writing needs none of it).
            save_file(model.state_dict(), str(staging / WEIGHTS))
            save_config_for_hf(model, staging / CONFIG, model_config=model_config)
            if onnx:
                written = onnx_export.write_onnx(model, staging / onnx_export.ONNX, recipe["test_img_size"])
    except OSError as err:  # a folder we may not write, a full disk: said in one line
        raise UserError(f"could not write {out}: {err.strerror or err}") from None
    return {"checkpoint": str(checkpoint), "out": str(out), "architecture": architecture,
            "num_classes": len(classes), "epoch": state.get("epoch"), "top1": provenance["top1"],
            "averaged_epochs": [c["epoch"] for c in state.get("averaged_from", [])],
            "weights": provenance["weights"], "img_size": recipe["test_img_size"], "crop_pct": recipe["crop_pct"],
            # the weights not exported, where the run kept an EMA: the ones it judged its epochs by
            "ema_top1": _validated_top1(state, True) if "ema" in state and not ema else None,
            "weights_bytes": (out / WEIGHTS).stat().st_size, **(written if onnx else {})}


def _validated_top1(state: dict, ema: bool) -> float | None:
    """The top-1 these weights reached in the run's validation of the checkpoint's epoch (None
    where that epoch was saved before its validation ran)."""
    if not state.get("validated", True):
        return None
    return state.get("metrics", {}).get("ema_top1" if ema else "top1")


RUN_FILES = ("metrics.jsonl", "starts.jsonl", "recipe.json")  # a run folder's records (run_state.py)


def _check_target(out: Path, force: bool) -> None:
    """OUT is a new or empty folder, or with `force` one whose files it may replace: never a folder
    of folders (a data set, a folder of runs) nor a run's (its checkpoints, the one exported
    included, and its records), which --force would have removed whole."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file: export writes a folder (model.safetensors and config.json)")
    held = sorted(out.iterdir()) if out.is_dir() else []
    if held and not force:
        raise UserError(f"{out} already holds files: choose another folder, or --force to replace it")
    kept = [p for p in held if p.is_dir() or p.suffix == ".pt" or p.name in RUN_FILES]
    if kept:
        what = "a folder" if kept[0].is_dir() else "a run's checkpoint" if kept[0].suffix == ".pt" else "a run's record"
        raise UserError(f"{out} holds {what} ({kept[0].name}), which --force would remove with it: export replaces a "
                        "model folder's files only; choose another folder")


def _pretrained_cfg(model, recipe: dict, num_classes: int) -> dict:
    """timm's pretrained config for these weights: the transform the run validated with (timm's
    eval transform: shorter side to size / crop_pct, bicubic, centre crop), not the defaults of
    the architecture's published weights (their tag, URL, test size and license are not ours)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    own = model.pretrained_cfg
    size = recipe["test_img_size"]
    return {"architecture": own["architecture"], "tag": f"fastrsb_{recipe['name']}", "custom_load": False,
            "input_size": (3, size, size), "fixed_input_size": own.get("fixed_input_size", False),
            "interpolation": "bicubic", "crop_pct": recipe["crop_pct"], "crop_mode": "center",
            "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "num_classes": num_classes,
            "pool_size": None, "first_conv": own.get("first_conv"), "classifier": own.get("classifier")}
