"""The recipe's `initial_checkpoint` (timm's --initial-checkpoint): a new run starts from trained
weights instead of random ones, from a fastrsb checkpoint (its model's weights), a timm model
folder (`fastrsb export`'s, or a timm model's from the hub) or a file of weights alone (a state
dict, as timm's flag takes). Fine-tuning at a new resolution, on another data set, or a warm
start.

The classifier is kept where it classifies the run's classes: the same names (its rows put in the
run's order where theirs differs: fastrsb.class_order), or, for weights that name none, the same
number of them (a timm ImageNet model on ImageNet's wnid folders), taken in timm's order where they
are timm's (a checkpoint of its train.py, a model folder) and in the run's where they are a file of
weights alone. Otherwise it starts anew, as timm's does when num_classes changes. Everything else
must fit the recipe's model exactly. Only a new run reads the file: a resumed run continues from
its own checkpoint, and the file may be gone by then."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from fastrsb.checkpoint import is_timm_checkpoint, is_weights, load_weights, read_saved
from fastrsb.class_order import classifier_keys, read_class_map, reordered, timm_order
from fastrsb.data_folder import split_folder
from fastrsb.errors import UserError
from fastrsb.model_folder import is_model_folder, read_config, read_weights, read_weights_file
from fastrsb.timm_checkpoint import architecture_of, read_timm_checkpoint, timm_data_folders, unwrapped


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


def load_initial_weights(model: nn.Module, source: str, architecture: str, classes: list[str],
                         data: Path | None = None) -> str:
    """Copy SOURCE's weights into `model` (a freshly built `architecture` for `classes`, of the
    data folder DATA: where a timm checkpoint's --class-map is also looked for); returns the run
    card's line saying what was taken."""
    path = initial_source(source)
    if path.is_dir():
        config = read_config(path)
        theirs, their_classes, weights = config.get("architecture"), config.get("label_names"), read_weights(path)
        order = their_classes if their_classes is not None else timm_order(classes)  # a timm folder's
        origin = f"model folder {path}"
    else:
        theirs, their_classes, order, weights, origin = _from_file(path, architecture, classes, data)
    if theirs != architecture:
        raise UserError(f"initial_checkpoint {path} holds {theirs} weights and the recipe trains {architecture}: "
                        f"--set model={theirs}, or another initial_checkpoint")
    head = classifier_keys(model)
    own = model.state_dict()
    fits = (all(k in weights and weights[k].shape == own[k].shape for k in head)
            and (their_classes is None or sorted(their_classes) == sorted(classes)))
    if fits:
        moved = order is not None and order != classes
        load_weights(model, reordered(weights, head, order, classes) if moved else weights, str(path))
        return f"weights: from {origin}, its classifier included" + (
            " (its rows put in this run's class order)" if moved else _order_unknown(order, their_classes, classes))
    # A new classifier: the freshly initialised one the model was built with.
    load_weights(model, {**{k: v for k, v in weights.items() if k not in head}, **{k: own[k] for k in head}}, str(path))
    count = f"{len(their_classes)} classes" if their_classes is not None else "classes"
    return f"weights: from {origin}, with a new classifier (its {count} are not this run's {len(classes)})"


def _order_unknown(order: list[str] | None, their_classes: list[str] | None, classes: list[str]) -> str:
    """Where weights alone (naming no classes, nor a tool that would say their order) are taken in
    the run's order, and timm would index these classes otherwise: said, since weights timm trained
    on this folder then classify each image under another class's name."""
    theirs = timm_order(classes)
    if order is not None or their_classes is not None or theirs == classes:
        return ""
    return (f" (rows taken in this run's class order, sorted: {', '.join(classes[:4])}, ...; timm indexes these "
            f"classes otherwise: {', '.join(theirs[:4])}, ...: for weights timm trained, give its train.py "
            "checkpoint or a model folder, whose order is known)")


def _from_file(path: Path, architecture: str, classes: list[str],
               data: Path | None = None) -> tuple[str, list[str] | None, list[str] | None, dict, str]:
    """(architecture, the classes it names by index or None, the order of its classifier's rows or
    None, weights, what the run card calls them) of a fastrsb checkpoint (its model's weights, as
    timm's loader also takes them from that file), a checkpoint of timm's train.py (its EMA's
    weights where it kept an EMA, else its model's: timm's --initial-checkpoint loads with
    load_checkpoint's use_ema=True; its rows are the run's CLASSES where they are as many, in the
    order timm's ImageFolder gives them, or its --class-map's classes), or a file of weights alone
    (rows in the run's order), as timm's --initial-checkpoint takes one: a .safetensors file, or
    torch.save's of a state dict, bare or under the first of timm's keys that holds one
    ("state_dict_ema", "model_ema", "state_dict", "model"), a DDP model's "module." prefixes and
    torch's AveragedModel's count (torchvision's EMA) dropped. Weights alone name no architecture:
    they are taken as the recipe's model's, which they must fit key for key and shape for shape."""
    if path.suffix == ".safetensors":
        return architecture, None, None, read_weights_file(path), f"{path} (weights alone)"
    try:
        state = read_saved(path)
    except UserError as err:
        raise UserError(f"initial_checkpoint: {err}") from None
    if is_timm_checkpoint(state):
        timm = read_timm_checkpoint(state, path)
        class_map = timm.args and timm.args.get("class_map")
        # Where train.py looked for it (under its data folder), and under this run's data folder.
        places = [*timm_data_folders(timm), *([split_folder(data, "train"), data] if data else [])]
        order = timm_order(classes, read_class_map(class_map, places) if class_map else None)
        weights, said = ((timm.ema_weights, ", its EMA's weights, as timm's --initial-checkpoint takes them")
                         if timm.ema_weights is not None else (timm.weights, ""))
        return architecture_of(timm), order if class_map else None, order, weights, timm.describe() + said
    if isinstance(state, dict) and "model" in state and "recipe" in state:  # fastrsb's
        return (state["recipe"]["model"], state["classes"], state["classes"], state["model"],
                f"{path} (epoch {state.get('epoch')})")
    keys = ("state_dict_ema", "model_ema", "state_dict", "model")  # timm's load_state_dict's, in its order
    found = [(None, state), *((key, state.get(key)) for key in keys if isinstance(state, dict))]
    key, weights = next(((key, w) for key, w in found if is_weights(w)), (None, None))
    if weights is None:
        raise UserError(f"initial_checkpoint: {path} is neither a fastrsb checkpoint, nor timm's, nor a state dict "
                        "of weights alone")
    weights = {name: value for name, value in weights.items() if name != "n_averaged"}  # AveragedModel's count
    said = f", its EMA's under \"{key}\" as timm's --initial-checkpoint takes them" if key in keys[:2] else ""
    return architecture, None, None, unwrapped(weights), f"{path} (weights alone{said})"
