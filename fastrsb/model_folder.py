"""A timm model folder read back for evaluation: what `fastrsb export` writes, or a timm model's
folder from the Hugging Face hub (`timm/resnet50.a3_in1k`, fetched on a machine with a network):
config.json (the architecture, the classes, the eval transform as timm's pretrained config) and
the weights as model.safetensors or pytorch_model.bin.

fastrsb's validation pipeline is timm's eval transform with ImageNet's mean and std and a bicubic
resize; a folder whose transform differs in a way that changes the figures (other mean or std,
another crop mode) is refused, one that asks for another resampling filter is evaluated with a
note saying so."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fastrsb.checkpoint import load_weights
from fastrsb.errors import UserError

CONFIG = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's (and the hub's) names, in its order


@dataclass
class FolderModel:
    model: nn.Module
    classes: list[str] | None  # by name, where config.json names them (fastrsb export does)
    img_size: int  # timm's test size and crop for these weights (resolve_data_config, use_test_size)
    crop_pct: float
    epoch: int | None  # the run's epoch, for a folder fastrsb exported
    notes: list[str] = field(default_factory=list)
    classes_note: str | None = None  # how eval reads classes config.json does not name
    descriptions: dict | None = None  # config.json's label_descriptions (class name -> words), where it has them


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file()


def load_model_folder(folder: Path) -> FolderModel:
    """The folder's network (channels-last, its weights loaded) and its eval transform, checked
    against what fastrsb's validation pipeline computes."""
    import timm
    from timm.data import resolve_data_config
    config = read_config(folder)
    architecture, num_classes = config.get("architecture"), config.get("num_classes")
    if not isinstance(architecture, str) or not isinstance(num_classes, int):
        raise UserError(f"{folder / CONFIG} names no architecture and num_classes: not a timm model folder")
    if not timm.is_model(architecture):
        raise UserError(f"{folder / CONFIG}: architecture '{architecture}' is not a model this timm "
                        f"{timm.__version__} knows")
    # timm's defaults where the folder states nothing (its resolver wants a non-empty config)
    data = resolve_data_config(pretrained_cfg=config.get("pretrained_cfg") or {"architecture": architecture},
                               use_test_size=True)
    notes = check_eval_transform(data, folder, "the folder's config")
    classes = config.get("label_names")
    if classes is not None and (not isinstance(classes, list) or len(classes) != num_classes):
        raise UserError(f"{folder / CONFIG}: label_names does not list {num_classes} classes")
    classes_note = None if classes is not None else (
        "config.json names no classes: they are taken as the data folder's class folders, in the order timm's "
        "ImageFolder indexes them (natural order: 'c2' before 'c10'; ImageNet's wnids sorted)")
    # model_args: what timm records of the model's construction (newer timm writes num_classes there too)
    model = timm.create_model(architecture, pretrained=False, **{**(config.get("model_args") or {}),
                                                                 "num_classes": num_classes})
    load_weights(model, read_weights(folder), str(folder))
    return FolderModel(model.to(memory_format=torch.channels_last), classes, int(data["input_size"][1]),
                       float(data["crop_pct"]), (config.get("fastrsb") or {}).get("epoch"), notes, classes_note,
                       _descriptions(config, classes))


def _descriptions(config: dict, classes: list[str] | None) -> dict | None:
    """config.json's words for its classes (timm's label_descriptions), those of them that are text."""
    found = config.get("label_descriptions")
    if not isinstance(found, dict) or classes is None:
        return None
    named = set(classes)
    return {name: words for name, words in found.items() if name in named and isinstance(words, str)} or None


def check_eval_transform(data: dict, source: Path, whose: str) -> list[str]:
    """DATA, an eval transform as timm's resolve_data_config gives it for SOURCE's weights, if
    fastrsb's validation pipeline computes it (ImageNet's mean and std, a centre crop of a square,
    3 channels); else one line saying what differs. Returns the notes to print: another resampling
    filter than the pipeline's bicubic is evaluated, and said."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    channels, height, width = data["input_size"]
    problems = [f"{what} {tuple(ours)}, fastrsb's validation normalizes with ImageNet's {tuple(imagenet)}"
                for what, ours, imagenet in (("mean", data["mean"], IMAGENET_DEFAULT_MEAN),
                                             ("std", data["std"], IMAGENET_DEFAULT_STD))
                if len(ours) != 3 or not all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(ours, imagenet))]
    if data["crop_mode"] != "center":
        problems.append(f"crop mode '{data['crop_mode']}', fastrsb's validation crops the centre")
    if height != width:
        problems.append(f"input size {height}x{width}, fastrsb's validation crops squares")
    if channels != 3:
        problems.append(f"{channels} input channel(s), fastrsb's validation gives RGB images")
    if problems:
        raise UserError(f"{source}: its eval transform is not fastrsb's: {'; '.join(problems)}")
    if data["interpolation"] != "bicubic":
        return [f"{whose} resizes {data['interpolation']}; fastrsb's validation resizes bicubic"]
    return []


def read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {folder / CONFIG}: {err}") from None
    if not isinstance(config, dict):
        raise UserError(f"{folder / CONFIG} is not a JSON object: not a timm model folder")
    return config


def read_weights(folder: Path) -> dict:
    path = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if path is None:
        raise UserError(f"{folder} holds no weights: neither {' nor '.join(WEIGHT_FILES)}")
    return read_weights_file(path)


def read_weights_file(path: Path) -> dict:
    """A model's weights by name from a .safetensors file or torch.save's of a state dict."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            weights = load_file(str(path))
        else:
            weights = torch.load(path, map_location="cpu", weights_only=True)  # never runs code from the file
    except Exception as err:  # a truncated or foreign file: safetensors and pickle raise many kinds
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"cannot read the weights in {path}: {reason}") from None
    if not isinstance(weights, dict):
        raise UserError(f"{path} holds a {type(weights).__name__}, not a model's weights by name")
    return weights
