"""What a checkpoint save costs the training thread: written by it (as fastrsb did until
2026-12-04: each save stopped the training for the whole write and its fsync), or copied to host
memory by it and written by the run's writer thread (fastrsb.checkpoint_writer, now). Also how
fast a thread that launches small torch ops, as a GPU trainer's main thread does, runs beside
such a write (the writer holds the GIL little).

    python benchmarks/checkpoint_save.py [--model resnet50] [--dir RUN_DISK] [--saves 3] [--json-out F]

The state is a run's: the model's weights and buffers and LAMB's two moments after one update
(~307 MB for ResNet-50), on the GPU where there is one. --dir: a folder on the disk the run folder
will be on (a network file system's writes and fsync take longer); the files are removed.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastrsb.checkpoint import save_checkpoint  # noqa: E402
from fastrsb.checkpoint_writer import CheckpointWriter, host_copy  # noqa: E402
from fastrsb.optim import Lamb, param_groups  # noqa: E402
from fastrsb.provenance import source_commit  # noqa: E402


def run_state(model_name: str, device: str) -> dict:
    import timm
    model = timm.create_model(model_name, num_classes=1000).to(device)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    optimizer = Lamb(param_groups(model, 0.02), lr=5e-3, weight_decay=0.02)
    optimizer.update(optimizer.prepare())  # the moments exist, as in a run's checkpoint
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1}


def _synchronized(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def ops_per_second(seconds: float, device: str) -> float:
    """Small in-place ops launched back to back for SECONDS: the host thread's pace."""
    x, n, start = torch.zeros(16, device=device), 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        x.add_(1.0)
        n += 1
    _synchronized(device)
    return n / (time.perf_counter() - start)


def timed_write(snapshot: dict, path: Path, seconds: list[float]) -> None:
    """On the writer's thread: the write alone (the op thread's measurement beside it may end first)."""
    start = time.perf_counter()
    save_checkpoint(snapshot, path)
    seconds.append(time.perf_counter() - start)


def measure(state: dict, folder: Path, saves: int, device: str) -> dict:
    path = folder / "last.pt"
    written, copied, alone, beside, write_seconds = [], [], [], [], []
    writer = CheckpointWriter()
    for _ in range(saves):
        start = time.perf_counter()
        save_checkpoint(state, path)  # the training thread writes
        written.append(time.perf_counter() - start)
        alone.append(ops_per_second(0.5, device))
        start = time.perf_counter()
        snapshot = host_copy(state)  # the training thread copies; the writer writes
        copied.append(time.perf_counter() - start)
        writer.submit(lambda: timed_write(snapshot, path, write_seconds))
        beside.append(ops_per_second(0.3, device))
        writer.wait()
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {"checkpoint_mb": round(path.stat().st_size / 1e6, 1),
            "blocked_seconds_written_by_training_thread": round(median(written), 3),
            "blocked_seconds_copied_then_written_beside": round(median(copied), 3),
            "write_seconds_beside": round(median(write_seconds), 3),
            "host_ops_per_second_alone": round(median(alone)),
            "host_ops_per_second_beside_a_write": round(median(beside)),
            "all": {"written": written, "copied": copied, "ops_alone": alone, "ops_beside": beside}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50", help="a timm model name")
    p.add_argument("--dir", type=Path, default=Path("."), help="a folder on the run folder's disk")
    p.add_argument("--saves", type=int, default=3, help="saves of each kind; medians are given")
    p.add_argument("--json-out", type=Path, help="also append the JSON line to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    state = run_state(args.model, device)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix=".checkpoint-save-") as folder:
        figures = measure(state, Path(folder), args.saves, device)
    result = {"mode": "checkpoint_save", "model": args.model, "device": device,
              "device_name": torch.cuda.get_device_name() if device == "cuda" else None,
              "cpu_threads": torch.get_num_threads(), "saves": args.saves, "commit": source_commit(), **figures}
    line = json.dumps(result)
    print(line, flush=True)
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(line + "\n")
    print(f"{args.model} checkpoint {figures['checkpoint_mb']:,.0f} MB on {device}: the training thread blocked "
          f"{figures['blocked_seconds_written_by_training_thread']:.2f} s writing it, "
          f"{figures['blocked_seconds_copied_then_written_beside']:.2f} s copying it for the writer "
          f"(which took {figures['write_seconds_beside']:.2f} s); a host thread launching ops ran at "
          f"{figures['host_ops_per_second_beside_a_write'] / figures['host_ops_per_second_alone']:.0%} "
          f"of its pace beside the write")
    return result


if __name__ == "__main__":
    main()
