"""The recipe's `initial_checkpoint` (timm's --initial-checkpoint): a new run starts from trained
weights instead of random ones, from a fastrsb checkpoint (its model's weights), a timm model
folder (`fastrsb export`'s, or a timm model's from the hub) or a file of weights alone (a state
dict, as timm's flag takes). Fine-tuning at a new resolution, on another data set, or a warm
start.

The classifier is kept where it classifies the run's classes: the same names in the same order,
or, for a folder that names none, the same number of them (a timm ImageNet model on ImageNet's
wnid folders). Otherwise it starts anew, as timm's does when num_classes changes. Everything else
must fit the recipe's model exactly. Only a new run reads the file: a resumed run continues from
its own checkpoint, and the file may be gone by then."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fastrsb.checkpoint import load_checkpoint, load_weights
from fastrsb.errors import UserError
from fastrsb.model_folder import is_model_folder, read_config, read_weights, read_weights_file


def initial_source(source: str) -> Path:
    """SOURCE, a file or a model folder, or one line saying what it is not (the CLI checks before
    it starts --nproc's processes, so that it is said once, not by each)."""
    path = Path(source)
    kinds = "a fastrsb checkpoint, a timm model folder (config.json and its weights), or a file of weights alone"
    if path.is_dir() and not is_model_folder(path):
        raise UserError(f"initial_checkpoint {path} is a folder without config.json: {kinds}")
    if not path.exists():
        raise UserError(f"initial_checkpoint {path} does not exist: {kinds}")
    return path


def load_initial_weights(model: nn.Module, source: str, architecture: str, classes: list[str]) -> str:
    """Copy SOURCE's weights into `model` (a freshly built `architecture` for `classes`); returns
    the run card's line saying what was taken."""
    path = initial_source(source)
    if path.is_dir():
        config = read_config(path)
        theirs, their_classes, weights = config.get("architecture"), config.get("label_names"), read_weights(path)
        origin = f"model folder {path}"
    else:
        theirs, their_classes, weights, origin = _from_file(path, architecture)
    if theirs != architecture:
        raise UserError(f"initial_checkpoint {path} holds {theirs} weights and the recipe trains {architecture}: "
                        f"--set model={theirs}, or another initial_checkpoint")
    head = _classifier_keys(model)
    own = model.state_dict()
    fits = (their_classes == classes if their_classes is not None
            else all(k in weights and weights[k].shape == own[k].shape for k in head))
    if fits:
        load_weights(model, weights, str(path))
        return f"weights: from {origin}, its classifier included"
    # A new classifier: the freshly initialised one the model was built with.
    load_weights(model, {**{k: v for k, v in weights.items() if k not in head}, **{k: own[k] for k in head}}, str(path))
    count = f"{len(their_classes)} classes" if their_classes is not None else "classes"
    return f"weights: from {origin}, with a new classifier (its {count} are not this run's {len(classes)})"


def _from_file(path: Path, architecture: str) -> tuple[str, list[str] | None, dict, str]:
    """(architecture, classes or None, weights, what the run card calls them) of a fastrsb
    checkpoint, or of a file of weights alone, as timm's --initial-checkpoint takes one: a
    .safetensors file, or torch.save's of a state dict (bare, or under "state_dict" or "model",
    with timm's "arch" where it says one; "module." prefixes of a DDP model dropped). Weights alone
    name no architecture but perhaps "arch": they are taken as the recipe's model's, which they
    must fit key for key and shape for shape."""
    if path.suffix != ".safetensors":
        try:
            state = load_checkpoint(path)
            return state["recipe"]["model"], state["classes"], state["model"], f"{path} (epoch {state.get('epoch')})"
        except UserError as err:
            found = _weights_alone(path)
            if found is None:
                raise UserError(f"initial_checkpoint: {err}, nor a state dict of weights alone") from None
            weights, arch = found
            return arch or architecture, None, weights, f"{path} (weights alone)"
    return architecture, None, read_weights_file(path), f"{path} (weights alone)"


def _weights_alone(path: Path) -> tuple[dict, str | None] | None:
    """(weights by name, timm's "arch" or None) of a torch.save'd state dict, or None where the
    file holds none (never running code from it: weights_only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - load_checkpoint has said why it cannot be read
        return None
    arch = state.get("arch") if isinstance(state, dict) and isinstance(state.get("arch"), str) else None
    for weights in (state, *(state.get(key) for key in ("state_dict", "model") if isinstance(state, dict))):
        if isinstance(weights, dict) and weights and all(isinstance(v, torch.Tensor) for v in weights.values()):
            return {k.removeprefix("module."): v for k, v in weights.items()}, arch
    return None


def _classifier_keys(model: nn.Module) -> set[str]:
    """The state_dict keys of the model's final classifier (timm names its module in pretrained_cfg)."""
    name = getattr(model, "pretrained_cfg", {}).get("classifier")
    if not name:
        raise UserError(f"{type(model).__name__} does not name its classifier: initial_checkpoint cannot tell "
                        "which weights to start anew")
    return {key for key in model.state_dict() if key.startswith(f"{name}.")}

