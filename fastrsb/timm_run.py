"""An output folder of timm's train.py (output/train/<date>-<model>-<size>/), read so that
`fastrsb plot` draws it and `fastrsb runs` lists it beside fastrsb's runs (fastrsb.run_list): its
args.yaml (the arguments, written at each start) and its summary.csv (an epoch a row, appended at
each epoch's end). Its checkpoints are fastrsb.timm_checkpoint's."""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

from fastrsb.errors import UserError

# Arguments that timm's train.py has all of: another tool's args.yaml is not taken for timm's.
TRAIN_PY_KEYS = frozenset({"model", "epochs", "sched", "warmup_epochs", "cooldown_epochs", "mixup", "cutmix",
                           "smoothing", "aa"})


def train_arguments(folder: Path) -> dict | None:
    """The arguments of the timm train.py run in `folder` (its args.yaml, yaml.safe_dump of the
    argparse namespace), or None where it holds no such file or another tool's."""
    import yaml  # timm's own dependency
    path = folder / "args.yaml"
    if not path.is_file():
        return None
    try:
        arguments = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return arguments if isinstance(arguments, dict) and TRAIN_PY_KEYS <= arguments.keys() else None


def validates_ema(arguments: dict) -> bool:
    """Whether train.py's summary.csv and best checkpoint hold its EMA's figures: it validates an
    EMA it keeps (not one kept on the CPU) after the model and puts its figures in their place."""
    return bool(arguments.get("model_ema") and not arguments.get("model_ema_force_cpu"))


def scheduled_epochs(arguments: dict) -> int:
    """The epochs train.py runs: as many as timm's own scheduler factory makes of these arguments
    (train.py loops over its num_epochs), which counts --warmup-prefix and --cooldown-epochs on top
    of --epochs (the A3 command's 95 + 5 are 100). Its --epochs where the factory refuses them (an
    older or newer timm's arguments)."""
    import torch
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=float(arguments.get("lr") or 0.1))
    try:
        # One update an epoch: counted in updates, the schedule's length is then its epochs.
        _, epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(argparse.Namespace(**arguments)),
                                        updates_per_epoch=1)
        return int(epochs)
    except (TypeError, ValueError, AssertionError, AttributeError):
        return int(arguments["epochs"])


def summary_rows(path: Path) -> tuple[list[dict], list[dict]]:
    """(log rows, epoch rows), as fastrsb's metrics.jsonl holds them, of the summary.csv timm's
    train.py writes (an epoch a row: epoch, train_loss, eval_loss, eval_top1, eval_top5, lr; its
    EMA's eval_ figures where it kept one). Its epoch is the index of the epoch ended, fastrsb's the
    epochs done. A run resumed in the same folder (--experiment) wrote the header again under the
    rows before it; resumed from an earlier checkpoint, it writes epochs again: from the first
    written again on, the rows are the resumed run's (those the first run wrote past it are not
    the run's any more). The columns after train_loss may be missing (None): timm before
    0.6 (the RSB paper's runs) wrote no lr, and a run without validation no eval_ figures. It logs
    no steps: its loss and LR, an epoch's, are log rows at each epoch's end; it measures no
    images/s or data wait."""
    try:
        with open(path, newline="") as f:
            table = [row for row in csv.DictReader(f) if row.get("epoch") != "epoch"]
        epochs = []
        for row in table:
            epoch = int(row["epoch"]) + 1
            while epochs and epochs[-1]["epoch"] >= epoch:  # a resume: the run goes on from here
                epochs.pop()
            epochs.append({"kind": "epoch", "epoch": epoch, "train_loss": float(row["train_loss"]),
                           "val_loss": _number(row, "eval_loss"), "top1": _number(row, "eval_top1"),
                           "top5": _number(row, "eval_top5"), "lr": _number(row, "lr")})
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path} is not a summary.csv of timm's train.py (epoch, train_loss, eval_loss, eval_top1, "
                        f"eval_top5, lr): {type(err).__name__} {err}") from None
    if not epochs:
        raise UserError(f"{path} has no rows yet: timm's run has not ended its first epoch")
    logs = [{"kind": "log", "epoch": r["epoch"], "loss": r["train_loss"], "lr": r["lr"], "images_per_sec": None,
             "data_wait": None} for r in epochs]
    return logs, epochs


def _number(row: dict, column: str) -> float | None:
    """A column's value, None where the file has no such column (an empty cell is no number)."""
    return None if row.get(column) is None else float(row[column])
