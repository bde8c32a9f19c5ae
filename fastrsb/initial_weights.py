"""The recipe's `initial_checkpoint` (timm's --initial-checkpoint): a new run starts from trained
weights instead of random ones, from a fastrsb checkpoint (its model's weights) or a timm model
folder (`fastrsb export`'s, or a timm model's from the hub). Fine-tuning at a new resolution,
on another data set, or a warm start.

The classifier is kept where it classifies the run's classes: the same names in the same order,
or, for a folder that names none, the same number of them (a timm ImageNet model on ImageNet's
wnid folders). Otherwise it starts anew, as timm's does when num_classes changes. Everything else
must fit the recipe's model exactly. Only a new run reads the file: a resumed run continues from
its own checkpoint, and the file may be gone by then."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from fastrsb.checkpoint import load_checkpoint, load_weights
from fastrsb.errors import UserError
from fastrsb.model_folder import is_model_folder, read_config, read_weights


def load_initial_weights(model: nn.Module, source: str, architecture: str, classes: list[str]) -> str:
    """Copy SOURCE's weights into `model` (a freshly built `architecture` for `classes`); returns
    the run card's line saying what was taken."""
    path = Path(source)
    if is_model_folder(path):
        config = read_config(path)
        theirs, their_classes, weights = config.get("architecture"), config.get("label_names"), read_weights(path)
        origin = f"model folder {path}"
    elif path.is_file():
        state = load_checkpoint(path)
        theirs, their_classes, weights = state["recipe"]["model"], state["classes"], state["model"]
        origin = f"{path} (epoch {state.get('epoch')})"
    else:
        raise UserError(f"initial_checkpoint {path} does not exist: a fastrsb checkpoint, or a timm model folder "
                        "(config.json and its weights)")
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


def _classifier_keys(model: nn.Module) -> set[str]:
    """The state_dict keys of the model's final classifier (timm names its module in pretrained_cfg)."""
    name = getattr(model, "pretrained_cfg", {}).get("classifier")
    if not name:
        raise UserError(f"{type(model).__name__} does not name its classifier: initial_checkpoint cannot tell "
                        "which weights to start anew")
    return {key for key in model.state_dict() if key.startswith(f"{name}.")}

