"""Graceful stop: SIGTERM (a preempted cluster job), SIGINT (Ctrl-C), SIGUSR1 (SLURM's warning
before the time limit, `sbatch --signal=USR1@120`) or SIGHUP (the terminal closed, an SSH session
dropped) asks the trainer to save a checkpoint at the next step boundary and exit; a second signal
exits at once. After SIGHUP the terminal is gone: what the run says from then on goes to its
train.log alone (fastrsb.run_log.terminal_gone), since a write to a hung-up terminal fails.

One stop often reaches a process twice within milliseconds: Ctrl-C reaches every process of the
terminal's group and a launcher forwards it too (fastrsb's --nproc); SLURM's scancel or preemption
signals every process of the job step and torchrun forwards it to its workers as well. A signal
repeated within REPEAT_SECONDS of the first is that same stop, not a second one."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time


def handled(signals) -> list:
    """The signals to take as a stop: all but SIGHUP where it is ignored, as `nohup` starts a
    command so that it outlives its terminal (a handler would undo that)."""
    return [sig for sig in signals if not (sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN)]


class StopRequest:
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)
    REPEAT_SECONDS = 1.0  # a forwarded copy arrives within milliseconds; a person presses again later

    def __init__(self):
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def request(self, signum: int = signal.SIGTERM) -> None:
        self.signum = signum

    def _handle(self, signum, frame):
        if self.requested:
            if time.monotonic() - self._first_at < self.REPEAT_SECONDS:
                return  # the same stop, delivered twice (module docstring)
            signal.signal(signum, signal.SIG_DFL)  # the second signal: no more waiting
            os.kill(os.getpid(), signum)
            return
        self.signum, self._first_at = signum, time.monotonic()
        if signum == signal.SIGHUP:
            from fastrsb.run_log import terminal_gone
            terminal_gone()
        if os.environ.get("LOCAL_RANK", "0") == "0":  # one line per machine, not one per process
            print(f"\nfastrsb: {signal.Signals(signum).name} received: saving a checkpoint at the next step "
                  f"boundary, then exiting (send it again to exit at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # handlers only install there
            for sig in handled(self.SIGNALS):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
