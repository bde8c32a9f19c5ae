"""Recipes: plain TOML files with a fixed schema, named after timm's train.py flags.

A recipe is complete (every key of RECIPE_SCHEMA present) and closed (no other key), so a typo in
a file or in `--set` is an error instead of a silently ignored setting.
"""
from __future__ import annotations

import difflib
import importlib.resources
import math
import shlex
import tomllib
from pathlib import Path
from typing import Any

from fastrsb.errors import UserError

_OPTIONAL = "optional"  # marks keys whose value may be "none" (None)

# key -> (type, optional?, what it means). Names follow timm's train.py where a flag exists.
RECIPE_SCHEMA: dict[str, tuple[type, bool, str]] = {
    "model": (str, False, "timm model name"),
    "epochs": (int, False, "training epochs"),
    "batch_size": (int, False, "global batch size, split across all GPUs"),
    "img_size": (int, False, "training resolution (random-resized-crop output)"),
    "ramp_img_size": (int, True, "progressive resizing (FFCV's): the crop size the first epochs train at, rising to "
                                 "img_size; none: img_size from the first epoch to the last"),
    "ramp_start_epoch": (int, False, "with ramp_img_size: the last epoch at ramp_img_size (epochs count from 1; 0: the "
                                     "size rises from the first)"),
    "ramp_end_epoch": (int, False, "with ramp_img_size: the first epoch at img_size; between the two the size rises "
                                   "linearly, in steps of ramp_step"),
    "ramp_step": (int, False, "with ramp_img_size: the sizes between are ramp_img_size plus a multiple of this (px)"),
    "test_img_size": (int, False, "evaluation resolution"),
    "crop_pct": (float, False, "evaluation centre-crop ratio: resize shorter side to floor(test_img_size / crop_pct)"),
    "opt": (str, False, "optimizer (lamb)"),
    "opt_eps": (float, False, "optimizer epsilon"),
    "opt_betas": (list, False, "optimizer betas [b1, b2]"),
    "lr": (float, False, "peak learning rate"),
    "weight_decay": (float, False, "weight decay (not applied to biases and 1-D parameters)"),
    "sched": (str, False, "LR schedule (cosine, stepped per iteration)"),
    "warmup_epochs": (int, False, "epochs of linear warmup from warmup_lr to lr"),
    "warmup_lr": (float, False, "LR at the start of warmup"),
    "min_lr": (float, False, "LR at the end of the cosine"),
    "smoothing": (float, False, "label smoothing"),
    "drop_path": (float, False, "stochastic depth rate"),
    "train_interpolation": (str, False, "how each random crop is resampled: random (bilinear or bicubic per image, "
                                        "timm's default), bilinear or bicubic"),
    "aug_repeats": (int, False, "repeated augmentation count (0 = off)"),
    "aug_repeats_across_ranks": (bool, False, "repeated augmentation: an image's views on different processes, as "
                                              "timm's RepeatAugSampler places them (decoded once, then exchanged), not "
                                              "side by side in one process's batch"),
    "aa": (str, True, "RandAugment as timm's string, e.g. rand-m6-mstd0.5-inc1, or none"),
    "aa_impl": (str, False, "how RandAugment runs: auto, tree, batch (DALI) or torch (drawn by DALI, applied in torch); "
                            "the same law (pipelines/loader.py)"),
    "mixup": (float, False, "mixup alpha (0 = off)"),
    "cutmix": (float, False, "cutmix alpha (0 = off)"),
    "mixup_prob": (float, False, "probability of mixing a batch"),
    "mixup_switch_prob": (float, False, "probability of cutmix instead of mixup when both are on"),
    "mixup_mode": (str, False, "batch (one lam per batch, as the RSB recipes)"),
    "bce_loss": (bool, False, "binary cross-entropy instead of softmax cross-entropy"),
    "bce_target_thresh": (float, True, "binarize mixed targets above this value, or none"),
    "model_ema": (bool, False, "keep an EMA of the weights (evaluated and checkpointed alongside)"),
    "model_ema_decay": (float, False, "EMA decay per optimizer step (timm's default 0.9998)"),
    "amp": (bool, False, "mixed precision on the GPU (bf16, or fp16 with a GradScaler where bf16 is missing)"),
    "compile": (bool, False, "torch.compile the model, the torch RandAugment form and, where cuda_graphs captures the "
                             "step, LAMB's update, on the GPU (a resumed run may change it)"),
    "cuda_graphs": (bool, False, "on the GPU: replay the whole step (forward, loss, backward, clip, LAMB) as one CUDA graph, and the torch "
                    "RandAugment form as another (one process, bf16 or float32, one micro-batch a step); auto: "
                    "where the step can be, and the start-up line says why not elsewhere"),
    "high_priority_stream": (bool, False, "on the GPU: the training step on a high-priority CUDA stream, ahead of the "
                                          "loader's kernels"),
    "seed": (int, False, "random seed"),
    "initial_checkpoint": (str, True, "start from these weights instead of random ones: a fastrsb checkpoint, one of "
                                      "timm's train.py, a timm model folder or a file of weights alone (its classifier "
                                      "kept where its classes are the run's), or none"),
}

CHOICES = {"opt": {"lamb"}, "sched": {"cosine"}, "mixup_mode": {"batch"}, "aa_impl": {"auto", "tree", "batch", "torch"},
           "train_interpolation": {"random", "bilinear", "bicubic"}}
# Keys added after a checkpoint may have been written, with the value such a run had: resuming it
# compares them as if they had been saved.
ADDED_KEYS = {"cuda_graphs": False, "high_priority_stream": False, "aa_impl": "auto", "train_interpolation": "bilinear",
              "initial_checkpoint": None, "aug_repeats_across_ranks": False,
              "ramp_img_size": None, "ramp_start_epoch": 0, "ramp_end_epoch": 0, "ramp_step": 32}
# Boolean keys that may also be "auto": on where they apply, off elsewhere (fastrsb.parts decides).
AUTO_KEYS = {"cuda_graphs"}
# Keys that change how fast a run computes, not what it computes: a resumed run may change them.
# compile also rounds the float arithmetic otherwise (inductor's fusions), as timm's --torchcompile
# does, a flag of the run and not of the recipe; where compiling fails on a machine (a new node, a
# torch upgrade), --set compile=false is what continues the run.
SPEED_ONLY = {"cuda_graphs", "high_priority_stream", "compile"}
BUILTIN = ("a1", "a2", "a3", "demo", "tiny")


def builtin_path(name: str) -> Path:
    return Path(str(importlib.resources.files("fastrsb.configs").joinpath(f"{name}.toml")))


def load_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a built-in recipe by name (a1, a2, a3, demo, tiny) or a TOML file by path, apply
    `key=value` overrides, and return the validated recipe as a plain dict."""
    path = Path(name_or_path)
    if name_or_path in BUILTIN:
        path = builtin_path(name_or_path)
    elif not path.is_file():
        if path.suffix == ".toml" or path.parent != Path("."):  # meant as a path
            raise UserError(f"recipe file {path} does not exist (built-in recipes: {', '.join(BUILTIN)})")
        raise UserError(f"no recipe '{name_or_path}': give one of {', '.join(BUILTIN)} or a path to a .toml file"
                        f"{_suggest_recipe(name_or_path)}")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"recipe {path} does not parse: {err}") from None
    _check_keys(raw, str(path))
    recipe = {key: _coerce(key, raw[key], str(path)) for key in RECIPE_SCHEMA}
    for item in overrides:
        key, value = parse_override(item)
        recipe[key] = value
    _check_values(recipe)
    recipe["name"] = path.stem
    return recipe


def _suggest_recipe(name: str) -> str:
    close = difflib.get_close_matches(name, BUILTIN, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_keys(raw: dict, where: str) -> None:
    unknown = [k for k in raw if k not in RECIPE_SCHEMA]
    if unknown:
        raise UserError(f"recipe {where}: unknown key '{unknown[0]}'{_suggest(unknown[0])}")
    missing = [k for k in RECIPE_SCHEMA if k not in raw]
    if missing:
        # The file's own values carried over as --set, into a new file beside it: nothing it holds is lost.
        sets = "".join(f" --set {shlex.quote(f'{key}={_set_text(value)}')}" for key, value in raw.items())
        whole = Path(where).with_suffix(".whole.toml").name
        raise UserError(f"recipe {where}: missing key(s) {', '.join(missing)} (a recipe file holds every key: "
                        f"a whole one with this file's values in, to edit: `fastrsb recipe a3 --toml{sets} > {whole}`)")


def _set_text(value: Any) -> str:
    """A recipe file's value as `--set` takes it (parse_override)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, RECIPE_SCHEMA, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(key: str, value: Any, where: str) -> Any:
    kind, optional, _ = RECIPE_SCHEMA[key]
    if optional and value == "none":
        return None
    if key in AUTO_KEYS and value == "auto":
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is list:
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return [float(v) for v in value]
        raise UserError(f"{where}: '{key}' must be two numbers, e.g. [0.9, 0.999], not {value!r}")
    if type(value) is not kind:
        hint = ' or "none"' if optional else ' or "auto"' if key in AUTO_KEYS else ""
        raise UserError(f"{where}: '{key}' must be {kind.__name__}{hint}, not {value!r}")
    return value


def parse_override(item: str) -> tuple[str, Any]:
    """Parse one `--set key=value`, typed by the schema."""
    if "=" not in item:
        raise UserError(f"--set '{item}': expected key=value")
    key, text = (s.strip() for s in item.split("=", 1))
    if key not in RECIPE_SCHEMA:
        raise UserError(f"--set: unknown key '{key}'{_suggest(key)}")
    kind, optional, _ = RECIPE_SCHEMA[key]
    where = f"--set {key}"
    if optional and text.lower() in ("none", "null"):
        return key, None
    if key in AUTO_KEYS and text.lower() == "auto":
        return key, "auto"
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError
            return key, lowered in ("true", "1", "yes", "on")
        if kind is int:
            return key, int(text)
        if kind is float:
            return key, float(text)
        if kind is list:
            parts = [float(p) for p in text.strip("[]()").split(",")]
            return key, _coerce(key, parts, where)
    except ValueError:
        also = " (or auto)" if key in AUTO_KEYS else ""
        raise UserError(f"{where}: '{text}' is not a valid {kind.__name__}{also}") from None
    return key, text


def _check_values(r: dict[str, Any]) -> None:
    for key, allowed in CHOICES.items():
        if r[key] not in allowed:
            raise UserError(f"recipe: '{key}' must be one of {', '.join(sorted(allowed))}, not {r[key]!r}")
    for key in ("epochs", "batch_size", "img_size", "test_img_size"):
        if r[key] <= 0:
            raise UserError(f"recipe: '{key}' must be positive, not {r[key]}")
    for key in ("lr", "warmup_lr", "min_lr", "weight_decay", "mixup", "cutmix", "smoothing",
                "drop_path", "warmup_epochs", "aug_repeats", "opt_eps"):
        if r[key] < 0 or (isinstance(r[key], float) and not math.isfinite(r[key])):
            raise UserError(f"recipe: '{key}' must be a finite number >= 0, not {r[key]}")
    for key in ("crop_pct", "mixup_prob", "mixup_switch_prob"):
        if not 0 < r[key] <= 1 and not (key != "crop_pct" and r[key] == 0):
            raise UserError(f"recipe: '{key}' must lie in (0, 1], not {r[key]}")
    # Shares below 1: at 1 a drop path drops every block, label smoothing leaves uniform targets, a
    # BCE threshold binarizes no target, a beta makes a bias correction of 0, an EMA never moves.
    for key, value in (("model_ema_decay", r["model_ema_decay"]), ("drop_path", r["drop_path"]),
                       ("smoothing", r["smoothing"]), ("bce_target_thresh", r["bce_target_thresh"]),
                       ("opt_betas", r["opt_betas"][0]), ("opt_betas", r["opt_betas"][1])):
        if value is not None and not 0 <= value < 1:
            shown = r[key] if key == "opt_betas" else value
            raise UserError(f"recipe: '{key}' must lie in [0, 1), not {shown}")
    if r["opt_eps"] <= 0:  # a parameter whose gradient stays 0 would divide 0 by 0
        raise UserError(f"recipe: 'opt_eps' must be positive, not {r['opt_eps']}")
    if r["min_lr"] > r["lr"]:
        raise UserError(f"recipe: 'min_lr' ({r['min_lr']}) must not exceed 'lr' ({r['lr']}): the cosine would rise")
    if not 0 <= r["seed"] < 2**31:  # numpy takes seed + rank, below 2**32
        raise UserError(f"recipe: 'seed' must lie in [0, 2**31), not {r['seed']}")
    if r["warmup_epochs"] >= r["epochs"] and r["warmup_epochs"] > 0:
        raise UserError(f"recipe: warmup_epochs ({r['warmup_epochs']}) must be fewer than epochs ({r['epochs']}): "
                        f"--set warmup_epochs={r['epochs'] - 1}" + (" or fewer" if r["epochs"] > 1 else " (no warmup)"))
    _check_ramp(r)
    if r["aa"] is not None:
        from fastrsb.pipelines.augment_spec import parse_rand_augment
        try:
            parse_rand_augment(r["aa"])
        except ValueError as err:
            raise UserError(f"recipe: 'aa': {err}") from None


def _check_ramp(r: dict[str, Any]) -> None:
    """Progressive resizing's keys (fastrsb.progressive), where ramp_img_size is set."""
    small, start, end, step = r["ramp_img_size"], r["ramp_start_epoch"], r["ramp_end_epoch"], r["ramp_step"]
    if small is None:
        return
    if not 0 < small < r["img_size"]:
        raise UserError(f"recipe: 'ramp_img_size' ({small}) must lie between 0 and img_size ({r['img_size']}): the "
                        "size rises to img_size (none: no progressive resizing)")
    if step <= 0 or (r["img_size"] - small) % step:
        raise UserError(f"recipe: 'ramp_step' ({step}) must be a positive divisor of img_size - ramp_img_size "
                        f"({r['img_size']} - {small} = {r['img_size'] - small}), so that the ramp ends at img_size")
    if not 0 <= start < end <= r["epochs"]:
        raise UserError(f"recipe: the ramp's epochs must satisfy 0 <= ramp_start_epoch < ramp_end_epoch <= epochs, "
                        f"not {start}, {end} of {r['epochs']} (ramp_start_epoch: the last epoch at ramp_img_size; "
                        "ramp_end_epoch: the first at img_size)")


def describe() -> str:
    """One line per key, for `fastrsb recipe --keys`."""
    return "\n".join(f"{k:<18} {t.__name__}{' or none' if o else ''}{' or auto' if k in AUTO_KEYS else ''}: {d}"
                     for k, (t, o, d) in RECIPE_SCHEMA.items())


def to_toml(recipe: dict[str, Any], origin: str) -> str:
    """RECIPE as a whole recipe file, every key with its meaning above it, that load_recipe reads
    back to the same values (`fastrsb recipe a3 --toml --set epochs=50 > mine.toml`: a file of
    one's own, since a recipe file must hold every key). ORIGIN: the command that printed it."""
    import textwrap
    lines = [f"# {origin}", "# Every key must be present (`fastrsb recipe --keys`); values as `--set` takes them."]
    for key, (_, _, meaning) in RECIPE_SCHEMA.items():
        lines += ["", *textwrap.wrap(meaning, 97, initial_indent="# ", subsequent_indent="# "),
                  f"{key} = {_toml_value(recipe[key])}"]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    """A TOML literal: JSON's string escapes are TOML's basic string's; floats by repr, which
    reads back to the same float (TOML takes 1e-06 as Python writes it); None as the recipes'
    "none"."""
    import json
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)
