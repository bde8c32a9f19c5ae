"""Every thread's native stack of a running command, sampled: in which library and function each
thread is, the waits on the GPU above all. Issue 13: A3 end to end runs at about the sum of the
loader's time and the step's, and the profile has ~1 device-wide sync a step (cudaDeviceSynchronize,
9.4 ms) and ~234 event syncs, on threads it cannot name; a stack says who calls them.

    python benchmarks/native_stacks.py --after 120 --gpu-busy 50 --samples 8 --out stacks.txt -- \\
        python3 benchmarks/throughput.py --mode train --recipe a3 --synthetic-jpegs 12000 --steps 5000

Starts the command, waits until the GPU is busy (NVML, --gpu-busy percent, three readings in a
row) or --after seconds have passed, takes --samples snapshots --interval seconds apart with
eu-stack (elfutils: it attaches to each thread with ptrace for a moment), then stops the command.
Writes every snapshot to --out, each thread named, and prints a summary: the stacks in CUDA (a
...Synchronize function, or the driver's unnamed frames innermost) with their callers, then every
thread's innermost named frames, counted over the snapshots. benchmarks/stage_native_tools.sh
brings eu-stack to a machine without it.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

FRAME = re.compile(r"^#\d+\s+0x[0-9a-f]+")
TID = re.compile(r"^TID (?P<tid>\d+):")
CUDA_WAIT = "Synchronize"  # cudaDeviceSynchronize, cuCtxSynchronize, cuEventSynchronize, ...
KEY_FRAMES = 6  # the innermost named frames a thread's stack is counted by


def parse(text: str) -> dict[int, list[tuple[str, str]]]:
    """eu-stack -m's output -> {thread id: [(function or '', module or ''), ...], innermost first}."""
    threads: dict[int, list[tuple[str, str]]] = {}
    frames: list | None = None
    for line in text.splitlines():
        if (tid := TID.match(line)) is not None:
            frames = threads.setdefault(int(tid["tid"]), [])
        elif frames is not None and FRAME.match(line):
            # "#3  0x00007f... name - /path/to/module" (-m); the name or the module may be missing
            head, dash, module = line.rpartition(" - ")
            if not dash or not module.startswith(("/", "[")):
                head, module = line, ""
            parts = head.split(None, 2)
            frames.append((parts[2].strip() if len(parts) > 2 else "", Path(module.strip()).name))
    return threads


def thread_names(pid: int) -> dict[int, str]:
    """/proc's name of each of the process's threads (what pthread_setname_np set: DALI's, torch's)."""
    names = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            names[int(task.name)] = (task / "comm").read_text().strip()
        except OSError:  # the thread ended meanwhile
            continue
    return names


def snapshot(eu_stack: str, pid: int) -> tuple[str, dict[int, list], dict[int, str]]:
    """One eu-stack run over the process: its text, parsed, and the threads' names."""
    names = thread_names(pid)
    run = subprocess.run([eu_stack, "-m", "-n", "64", "-p", str(pid)], capture_output=True, text=True, timeout=120)
    threads = parse(run.stdout)
    if not threads:  # rc 1 is "some frames incomplete": fine; no thread at all is not
        raise RuntimeError(f"eu-stack showed no thread of process {pid} (rc {run.returncode}): "
                           f"{run.stderr.strip()[-500:]}")
    return run.stdout, threads, names


def in_cuda(frames: list[tuple[str, str]]) -> bool:
    """Whether a stack waits in CUDA: a ...Synchronize function on it, or the driver (libcuda, whose
    inner functions have no names) among its innermost frames."""
    return any(CUDA_WAIT in name for name, _ in frames) or any(m.startswith("libcuda.so") for _, m in frames[:8])


def _named(frames: list[tuple[str, str]]) -> list[str]:
    return [f"{name} ({module})" if module else name for name, module in frames if name]


def summarize(snapshots: list[tuple[dict[int, list], dict[int, str]]]) -> str:
    """The CUDA waits with their callers, then each thread's innermost named frames, counted."""
    waits: collections.Counter = collections.Counter()
    states: collections.Counter = collections.Counter()
    for threads, names in snapshots:
        for tid, frames in threads.items():
            named = _named(frames)
            # "worker 3" and "worker 7" alike, "python3" itself
            who = re.sub(r"(?<=[^A-Za-z0-9])\d+$", "#", names.get(tid, "?"))
            if in_cuda(frames):
                waits[(who, tuple(named[:16]))] += 1
            states[(who, tuple(named[:KEY_FRAMES]))] += 1
    lines = [f"{len(snapshots)} snapshots; threads in CUDA (a ...{CUDA_WAIT} or the driver innermost), "
             "with their callers:"]
    for (who, named), count in waits.most_common(12):
        lines.append(f"  {count:3d}x  [{who}]")
        lines += [f"        {frame}" for frame in named]
    if not waits:
        lines.append("  none")
    lines.append(f"every thread by its innermost {KEY_FRAMES} named frames (count over the snapshots):")
    for (who, named), count in states.most_common(40):
        lines.append(f"  {count:3d}x  [{who}]  " + " < ".join(named))
    return "\n".join(lines)


def _gpu_busy_reader():
    """A function giving GPU 0's utilization in percent (NVML's numbering: the machine's first GPU),
    -1 where a reading fails; None without NVML."""
    try:
        import pynvml
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:  # noqa: BLE001 - no NVML or no GPU: wait the full --after
        return None

    def read() -> int:
        try:
            return pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
        except pynvml.NVMLError:  # one reading lost: not busy, the wait goes on
            return -1
    return read


def wait_for_work(process: subprocess.Popen, after: float, gpu_busy: int | None) -> str:
    """Until the GPU has been busy (>= gpu_busy %) three readings in a row, or `after` seconds."""
    read = _gpu_busy_reader() if gpu_busy is not None else None
    end, streak = time.monotonic() + after, 0
    while time.monotonic() < end and process.poll() is None:
        time.sleep(0.5)
        if read is not None:
            streak = streak + 1 if read() >= gpu_busy else 0
            if streak >= 3:
                return f"GPU busy >= {gpu_busy}%"
    return f"{after:.0f} s"


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(3)  # within gpu_checks.sh's `timeout -k 5`: the SIGKILL below comes first
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; args.command is the command to sample (after --)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--after", type=float, default=60.0, help="seconds to wait before the snapshots (at most, "
                                                             "with --gpu-busy)")
    p.add_argument("--gpu-busy", type=int, default=None, metavar="PERCENT",
                   help="start as soon as NVML reads GPU 0 this busy three times in a row")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--eu-stack", default=None, help="the eu-stack to run (default: the one on PATH)")
    p.add_argument("--out", type=Path, required=True, help="every snapshot, each thread named")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to sample")
    args = p.parse_args(argv)
    args.command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not args.command:
        p.error("no command given (-- COMMAND ...)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = args.command
    eu_stack = args.eu_stack or shutil.which("eu-stack")
    if not eu_stack:
        sys.exit("native_stacks.py: eu-stack not found: install elfutils, or run benchmarks/stage_native_tools.sh "
                 "and pass --eu-stack")
    # A timeout's SIGTERM (gpu_checks.sh) still stops the command and prints what was taken.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # A process group of its own, stopped whole (children too), in this session: a machine that ends
    # a session's processes when its command returns ends this one too, should this script be killed.
    process = subprocess.Popen(command, process_group=0)
    snapshots = []
    try:
        waited = wait_for_work(process, args.after, args.gpu_busy)
        if process.poll() is not None:
            print(f"native_stacks: the command ended (rc {process.returncode}) before the snapshots", file=sys.stderr)
            return 1
        print(f"native_stacks: {args.samples} snapshots of process {process.pid} after {waited}", file=sys.stderr)
        with open(args.out, "w") as out:
            for index in range(args.samples):
                if process.poll() is not None:
                    print(f"native_stacks: the command ended (rc {process.returncode}) after {index} snapshots",
                          file=sys.stderr)
                    break
                text, threads, names = snapshot(eu_stack, process.pid)
                named = "\n".join(f"TID {m['tid']} ({names.get(int(m['tid']), '?')}):" if (m := TID.match(line))
                                  else line for line in text.splitlines())
                out.write(f"===== snapshot {index + 1} of {args.samples}\n{named}\n")
                snapshots.append((threads, names))
                time.sleep(args.interval)
    finally:
        stop(process)
        if snapshots:
            print(summarize(snapshots), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
