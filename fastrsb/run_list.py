"""`fastrsb runs [DIR ...]`: every run folder under the DIRs in one table: its recipe and model, how
far it got and whether a train runs in it now (its lock: fastrsb.folder_lock), its last and best
top-1, the time it still needs (at its last epoch's pace), when it started, on what (processes,
device, fastrsb commit), when it last wrote a row, and why a stopped run stopped. Read from
recipe.json, metrics.jsonl, starts.jsonl and train.log only (a checkpoint of ResNet-50 weighs ~300
MB: none is opened), so a folder of a hundred runs lists at once. The output folders of timm's
train.py among them (args.yaml, summary.csv: fastrsb.timm_run) are listed too, so that a recipe run
by both tools is seen in one table."""
from __future__ import annotations

import datetime
import json
from pathlib import Path

from fastrsb import progressive, wandb_log
from fastrsb.errors import UserError
from fastrsb.folder_lock import in_use
from fastrsb.metrics_log import read_rows
from fastrsb.progress import clock
from fastrsb.provenance import read_starts
from fastrsb.run_log import stop_reason
from fastrsb.timm_run import scheduled_epochs, summary_rows, train_arguments, validates_ema


def run_folders(root: Path) -> list[Path]:
    """The run folders at or under `root`, sorted by path: fastrsb's (a folder with a recipe.json)
    and timm train.py's (its args.yaml, where no recipe.json is beside it)."""
    if not root.is_dir():
        raise UserError(f"{root} is not a folder")
    below = {p.parent for name in ("recipe.json", "args.yaml") for p in root.rglob(f"*/{name}")
             if not p.parent.name.startswith(".")}
    return [folder for folder in [root, *sorted(below)]
            if (folder / "recipe.json").is_file() or train_arguments(folder) is not None]


def describe(folder: Path) -> dict:
    """One run's row: what its files say (None where a file is missing or has no such row yet).
    started: its first start; processes, device, commit: its last start's (what it runs on now).
    A file that does not parse leaves the row empty but for its name and why. A timm run's row is
    describe_timm's."""
    if not (folder / "recipe.json").exists() and (arguments := train_arguments(folder)):
        return describe_timm(folder, arguments)
    metrics = folder / "metrics.jsonl"
    try:
        recipe = json.loads((folder / "recipe.json").read_text())
        rows = read_rows(metrics) if metrics.is_file() else []
        starts = read_starts(folder)
    except (OSError, ValueError, UserError) as err:  # json's errors are ValueErrors
        return {"run": str(folder), "unreadable": str(err).splitlines()[0]}
    if not isinstance(recipe, dict) or not {"name", "model", "epochs"} <= recipe.keys():
        return {"run": str(folder), "unreadable": "its recipe.json is not a fastrsb recipe"}  # another tool's file
    validated = [r for r in rows if r.get("kind") == "epoch" and "top1" in r]
    first, last = (starts[0], starts[-1]) if starts else ({}, {})
    written = max((p.stat().st_mtime for p in (metrics, folder / "last.pt") if p.is_file()), default=None)
    done, trainer = validated[-1]["epoch"] if validated else 0, in_use(folder)
    return {"run": str(folder), "kind": "fastrsb", "recipe": recipe.get("name"), "model": recipe.get("model"),
            "epochs": recipe.get("epochs"), "epochs_done": done,
            "state": "running" if trainer else "done" if done >= recipe["epochs"] else "stopped",
            "trainer": trainer,  # who runs it now: "fastrsb train (pid N on HOST, since ...)"
            # the EMA's where the run keeps one: what its best.pt was chosen by (and timm's summary.csv holds)
            "top1": _score(validated[-1]) if validated else None,
            "best_top1": max(map(_score, validated)) if validated else None,
            "ema": bool(recipe.get("model_ema")),
            "started": first.get("started"), "starts": len(starts), "processes": last.get("processes"),
            "device": last.get("device"), "commit": last.get("commit"),
            # the most a process of it held over an epoch (a GPU's memory, or on the CPU the process's)
            "peak_memory_gib": max((r["peak_memory_gib"] for r in validated if r.get("peak_memory_gib")), default=None),
            "last_written": _stamp(written) if written else None,
            "time_left_seconds": _time_left(rows, validated, recipe),
            "wandb": wandb_log.run_of(folder),  # its W&B run, where it logs to one (train --wandb)
            # why its last start ended, where it stopped short (its train.log says)
            "why": stop_reason(folder) if not trainer and done < recipe["epochs"] else None}


def _time_left(rows: list[dict], validated: list[dict], recipe: dict) -> float | None:
    """The training and validation time a run not done still needs, from where its last row stands
    (a progress row's epoch is fractional) at its last validated epoch's pace (its steady pace,
    after the first steps' compiling: fastrsb.train); None before an epoch has been validated."""
    last, epochs = (validated[-1] if validated else {}), recipe["epochs"]
    left = epochs - rows[-1].get("epoch", epochs) if rows else 0
    if left <= 0 or "train_seconds" not in last or "val_seconds" not in last:
        return None
    # Each size's latest pace: with progressive resizing the epochs ahead may train at other sizes.
    paces = {row.get("img_size", recipe["img_size"]): row.get("train_seconds_steady") or row["train_seconds"]
             for row in validated if "train_seconds" in row}
    return progressive.train_seconds_ahead(recipe, epochs - left, paces) + left * last["val_seconds"]


def _score(row: dict) -> float:
    """An epoch row's top-1: the EMA's where the run keeps one."""
    return row.get("ema_top1", row["top1"])


def describe_timm(folder: Path, arguments: dict) -> dict:
    """The row of a timm train.py output folder, with a fastrsb run's keys (None where timm keeps
    no such thing: its commit, its number of processes). timm leaves no mark of a run in progress,
    so a run short of its epochs is "unfinished" (its last written says whether it still writes)."""
    summary = folder / "summary.csv"
    try:
        epochs = summary_rows(summary)[1] if summary.is_file() else []
    except UserError as err:
        if "no rows yet" not in str(err):
            return {"run": str(folder), "kind": "timm", "unreadable": str(err).splitlines()[0]}
        epochs = []
    total, done = scheduled_epochs(arguments), epochs[-1]["epoch"] if epochs else 0
    validated = [r for r in epochs if r["top1"] is not None]  # all but a run without validation
    written = max((p.stat().st_mtime for p in (summary, folder / "last.pth.tar") if p.is_file()), default=None)
    return {"run": str(folder), "kind": "timm", "recipe": "timm", "model": arguments["model"], "epochs": total,
            "epochs_done": done, "state": "done" if done >= total else "unfinished", "trainer": None,
            "top1": validated[-1]["top1"] if validated else None,
            "best_top1": max(r["top1"] for r in validated) if validated else None,
            "ema": validates_ema(arguments),  # its summary.csv's figures are its EMA's
            "started": _timm_started(folder), "starts": 1, "processes": None, "device": arguments.get("device"),
            "commit": None, "peak_memory_gib": None, "last_written": _stamp(written) if written else None,
            "time_left_seconds": None,  # timm's summary.csv keeps no times
            "wandb": None}  # (timm's --log-wandb keeps no record in its output folder)


def _timm_started(folder: Path) -> str:
    """When a timm run began: the local time train.py puts at the head of the folder's name
    (20261203-101530-resnet50-160), else when it wrote args.yaml (at its last start)."""
    try:
        return _stamp(datetime.datetime.strptime(folder.name[:15], "%Y%m%d-%H%M%S").timestamp())
    except ValueError:
        return _stamp((folder / "args.yaml").stat().st_mtime)


def _stamp(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="seconds")


def table(runs: list[dict], now: datetime.datetime | None = None) -> str:
    """The runs as aligned text columns, a run a line."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    header = ("run", "recipe", "epochs", "state", "top-1", "best", "started", "on", "peak mem", "commit",
              "last written")
    lines = [header]
    for r in runs:
        if "unreadable" in r:
            lines.append((r["run"], f"unreadable: {r['unreadable']}", *["-"] * (len(header) - 2)))
            continue
        top1 = f"{r['top1']:.2f}{' (EMA)' if r.get('ema') else ''}" if r["top1"] is not None else "-"
        best = f"{r['best_top1']:.2f}" if r["best_top1"] is not None else "-"
        on = f"{r['processes']} x {r['device']}" if r["processes"] else "-"
        memory = f"{r['peak_memory_gib']:.1f} GiB" if r.get("peak_memory_gib") else "-"
        resumed = f" (+{r['starts'] - 1} resume(s))" if r["starts"] > 1 else ""
        to_go = f" (~{clock(r['time_left_seconds'])} to go)" if r.get("time_left_seconds") is not None else ""
        lines.append((r["run"], f"{r['recipe']} ({r['model']})", f"{r['epochs_done']}/{r['epochs']}",
                      r["state"] + to_go, top1, best, (r["started"] or "-")[:16].replace("T", " ") + resumed, on,
                      memory, r["commit"] or "-", _ago(r["last_written"], now)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    # Why a stopped run stopped, on a line of its own under it (an error names a file: no room in a column).
    whys = [None] + [r.get("why") for r in runs]
    return "\n".join(line + (f"\n  why: {why}" if why else "") for line, why in zip(text, whys))


def _ago(stamp: str | None, now: datetime.datetime) -> str:
    if stamp is None:
        return "-"
    seconds = max(0, int((now - datetime.datetime.fromisoformat(stamp)).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"
