"""`fastrsb train --nproc N`: the processes of one machine, one per GPU, started without torchrun.

The launcher sets each process the environment torchrun would (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR/PORT) and holds the rendezvous store itself, as torchrun's agent
does: the port is the store's own (no free-port guess that another program can take meanwhile),
and the store outlives any one rank, so the others' FailureNotice names a rank that died.

What torchrun does not do for a training run, this does:
- every stop signal it receives (SIGINT, SIGTERM, SIGUSR1, SIGHUP) goes to each process, and a
  process that gets the same stop twice (Ctrl-C reaches the terminal's whole group) takes it as
  one (fastrsb.stopping);
- it waits for a stopping run as long as the run needs to save its checkpoint (torchrun kills
  its workers 30 s after a signal);
- it exits with the run's own code (2 for a refused run, 128 + N after signal N) where torchrun
  says 1, and a process that fails leaves the others STRAGGLER_SECONDS to stop on their own
  (FailureNotice makes them, naming it) before they are killed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from fastrsb.errors import UserError
from fastrsb.stopping import StopRequest, handled

STRAGGLER_SECONDS = 60.0  # after a process failed; FailureNotice stops the others within seconds
# Exit codes of a run that stopped as asked (fastrsb.stopping): the others are stopping too, and
# rank 0 may still be saving its checkpoint, so no clock starts for them.
STOPPED = {0} | {128 + sig for sig in StopRequest.SIGNALS}


def _visible_gpus(device: str) -> int:
    """The GPUs a run on `device` would take processes to (none with --device cpu)."""
    import torch
    return torch.cuda.device_count() if device in ("auto", "cuda") else 0


def resolve_nproc(value: str, device: str) -> int:
    """--nproc N or all (every visible GPU), checked against the GPUs there are."""
    gpus = _visible_gpus(device)
    if value == "all":
        if gpus == 0:
            raise UserError("--nproc all starts one process per GPU, and no GPU is visible: "
                            "give a number (with --device cpu, CPU processes over gloo)")
        return gpus
    if gpus and int(value) > gpus:
        raise UserError(f"--nproc {value}, but {gpus} GPU(s) are visible (CUDA_VISIBLE_DEVICES selects them): "
                        "one process per GPU")
    return int(value)


def unused_gpus_note(device: str) -> str | None:
    """A single-process run on a machine with several GPUs uses one: say how to use them all."""
    gpus = _visible_gpus(device)
    if gpus > 1:
        return f"note: {gpus} GPUs are visible and this run uses one: --nproc all trains on every one"
    return None


def launch(nproc: int, argv: list[str]) -> int:
    """`python -m fastrsb ARGV` in `nproc` processes of one process group; the run's exit code."""
    from torch.distributed import TCPStore
    store = TCPStore("127.0.0.1", 0, world_size=nproc, is_master=True, wait_for_workers=False)  # lives until return
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "WORLD_SIZE": str(nproc),
           "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "TORCHELASTIC_USE_AGENT_STORE": "True",
           "TORCHELASTIC_RESTART_COUNT": "0", "FASTRSB_LAUNCHED_NPROC": str(nproc)}
    # torch's intra-op threads: the machine's cores shared out, not every process taking them all.
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // nproc)))
    return run_together([([sys.executable, "-m", "fastrsb", *argv], {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
                         for rank in range(nproc)])


def run_together(commands: list[tuple[list[str], dict]], straggler_seconds: float = STRAGGLER_SECONDS) -> int:
    """Start every (argv, env), forward the stop signals (StopRequest's) to each, and wait for all.
    A process that fails (any exit but a stop's) gives the rest `straggler_seconds`, then they are
    killed. The exit code: the first process to end with one that is not 0, as the shell counts
    (128 + N for signal N)."""
    procs: list[subprocess.Popen] = []

    def forward(signum, frame):
        if signum == signal.SIGHUP:  # the terminal is gone: what the launcher says goes to the run's log alone
            from fastrsb.run_log import terminal_gone
            terminal_gone()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in handled(StopRequest.SIGNALS)}
    ended: list[int] = []  # exit codes in the order the processes ended: the first failure is the cause
    try:
        procs.extend(subprocess.Popen(argv, env=env) for argv, env in commands)
        failed_at, running, killed = None, set(procs), False
        while running:
            for proc in [proc for proc in running if proc.poll() is not None]:
                running.discard(proc)
                ended.append(_shell_code(proc.returncode))
                if not killed and (why := _killed_by(proc.returncode)):
                    print(f"fastrsb: rank {procs.index(proc)} ended by {why}", file=sys.stderr, flush=True)
            if failed_at is None and any(code not in STOPPED for code in ended):
                failed_at = time.monotonic()
            if running and not killed and failed_at is not None and time.monotonic() - failed_at > straggler_seconds:
                print(f"fastrsb: a process failed and {len(running)} other(s) had not stopped "
                      f"{straggler_seconds:.0f} s later: killed", file=sys.stderr, flush=True)
                for proc in running:
                    proc.kill()
                killed = True  # said once; the loop collects their exits
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for proc in procs:  # an exception here (Popen failing) leaves no process behind
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return next((code for code in ended if code), 0)


def _killed_by(returncode: int) -> str | None:
    """What ended a process that could not say why itself: a signal other than a stop's."""
    number = -returncode
    if number <= 0 or number in StopRequest.SIGNALS:
        return None
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    if number == signal.SIGKILL:
        return f"{name}, without a word (the kernel's out-of-memory killer? `dmesg` says)"
    if number in (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS):
        return f"{name}, without a word (a crash)"
    return name


def _shell_code(returncode: int) -> int:
    """Popen says -N for a process ended by signal N; the shell, 128 + N."""
    return 128 - returncode if returncode < 0 else returncode
