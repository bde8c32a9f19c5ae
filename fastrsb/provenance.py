"""What made a run: RUN_DIR/starts.jsonl, one JSON line each time the run starts (the first start
and every resume), written by rank 0 before the first step. Months later, or beside another run,
it answers what a metrics file cannot: the command, fastrsb's commit, the versions of torch, DALI,
timm and the CUDA libraries, the machines and GPUs, and the data (counts and a fingerprint of the
listing, equal exactly when the loaders read the same files as the same classes).

`fastrsb compare` reads it to name what differs between two runs (a torch upgrade is the first
suspect when two deterministic runs diverge); the benchmarks record the same commit."""
from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import shlex
import socket
import subprocess
from pathlib import Path

import torch

from fastrsb import __version__

STARTS = "starts.jsonl"
# The keys of a start line that describe the software, in the order compare names them.
SOFTWARE_KEYS = ("fastrsb", "commit", "python", "torch", "torchvision", "nvidia-dali", "timm", "numpy", "cuda",
                 "cudnn", "driver")


@functools.lru_cache(maxsize=1)
def source_commit() -> str | None:
    """The short commit of the fastrsb checkout this code runs from, with "+changes" when tracked
    files other than results and docs differ from it; None where fastrsb was installed from a
    wheel, or sits untracked in another project's repository (its commit would not be ours).
    Asked once a process: the code a run has loaded, whatever the checkout becomes meanwhile."""
    package = Path(__file__).parent

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=package, capture_output=True, text=True, timeout=10)
    try:
        if git("ls-files", "--error-unmatch", "__init__.py").returncode != 0:
            return None
        commit = git("rev-parse", "--short", "HEAD").stdout.strip() or None
        code = ("diff", "--quiet", "HEAD", "--", ":/", ":(top,exclude,glob)**/*.jsonl", ":(top,exclude,glob)**/*.md")
        if commit and git(*code).returncode == 1:
            commit += "+changes"
        return commit
    except (OSError, subprocess.TimeoutExpired):  # no git here, or a disk that hangs
        return None


def software(device: str) -> dict:
    """fastrsb's version and commit, and the versions everything it runs on."""
    import numpy
    import nvidia.dali
    import timm
    import torchvision
    cuda = device == "cuda"
    return {"fastrsb": __version__, "commit": source_commit(), "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "nvidia-dali": nvidia.dali.__version__,
            "timm": timm.__version__, "numpy": numpy.__version__, "cuda": torch.version.cuda if cuda else None,
            "cudnn": torch.backends.cudnn.version() if cuda else None, "driver": _driver() if cuda else None}


def _driver() -> str | None:
    try:
        import pynvml
        pynvml.nvmlInit()
        return pynvml.nvmlSystemGetDriverVersion()
    except Exception:  # noqa: BLE001 - NVML missing or failing: the record goes without it
        return None


def start_record(command: str | None, device: str, world: int, resumed_at_step: int | None, data: Path,
                 train_images, val_images, listings: dict[str, str]) -> dict:
    """One line of starts.jsonl: this start (rank 0's view: its machine and GPUs). `listings`: the
    splits' listing_fingerprint by name, as the shard check took them (about a second for
    ImageNet's 1.33 M train files: computed once a start)."""
    machines = world // int(os.environ.get("LOCAL_WORLD_SIZE", world))
    launcher = ("fastrsb --nproc" if os.environ.get("FASTRSB_LAUNCHED_NPROC")
                else "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else None)
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if device == "cuda" else []
    return {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command, "resumed_at_step": resumed_at_step, **software(device),
            "host": socket.gethostname(), "cpus": len(os.sched_getaffinity(0)), "gpus": gpus, "device": device,
            "processes": world, "machines": machines, "launcher": launcher,
            "data": {"path": str(Path(data).resolve()), "train_images": len(train_images),
                     "val_images": len(val_images), "classes": len(train_images.classes),
                     "listing": listings}}


def command_line(argv: list[str] | None) -> str | None:
    """The fastrsb command as this process was given it (None: train() called from Python)."""
    return None if argv is None else shlex.join(["fastrsb", *argv])


def read_starts(run_dir: str | Path) -> list[dict]:
    """The start lines of a run folder (a last line cut short by a kill left out)."""
    from fastrsb.metrics_log import read_rows
    path = Path(run_dir) / STARTS
    return read_rows(path) if path.is_file() else []


def differences(run_a: str | Path, run_b: str | Path) -> list[str]:
    """What the software and data of two runs' first starts differ in ("torch 2.11.0 / 2.14.1");
    empty where they agree or a run folder has no starts.jsonl (a run from before it)."""
    a, b = read_starts(run_a), read_starts(run_b)
    return start_differences(a[0], b[0]) if a and b else []


def recipe_differences(run_a: str | Path, run_b: str | Path) -> list[str]:
    """The recipe keys two runs were trained with that differ ("model resnet18 / resnet50"), from
    their recipe.json; empty where either has none or cannot be read."""
    try:
        a, b = (json.loads((Path(run) / "recipe.json").read_text()) for run in (run_a, run_b))
    except (OSError, ValueError):
        return []
    return [f"{key} {a.get(key)} / {b.get(key)}" for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


def start_differences(a: dict, b: dict, processes: bool = True) -> list[str]:
    """What two start lines differ in, beyond their time, command and host (and, with
    processes=False, their number of processes, which a resume on another number says itself)."""
    found = [f"{key} {a.get(key)} / {b.get(key)}" for key in SOFTWARE_KEYS if a.get(key) != b.get(key)]
    if a["data"]["listing"] != b["data"]["listing"]:
        found.append("the data's listing (other files or classes)")
    if processes and a["processes"] != b["processes"]:
        found.append(f"processes {a['processes']} / {b['processes']}")
    return found


def record_start(out: Path, record: dict) -> None:
    """Append `record` to OUT/starts.jsonl (rank 0); on a resume, say what this start runs with
    that the last one did not (a resumed run continues bit for bit on the same software only)."""
    from fastrsb.metrics_log import append_rows, rewrite_rows
    path, earlier = out / STARTS, read_starts(out)
    if path.is_file() and not path.read_bytes().endswith(b"\n"):  # a line cut short by a kill: dropped
        rewrite_rows(path, earlier)
    append_rows(path, [record])
    if record["resumed_at_step"] is None or not earlier:
        return
    if changed := start_differences(earlier[-1], record, processes=False):
        print(f"note: resumed with another setup than its last start's ({'; '.join(changed)}): the run "
              "continues, but not necessarily bit for bit as it would have", flush=True)
    elif earlier[-1]["data"]["path"] != record["data"]["path"]:
        print(f"note: the data is read from {record['data']['path']} (the last start's: "
              f"{earlier[-1]['data']['path']}): the same files as the same classes", flush=True)
