"""RUN_DIR/train.log: what a run printed (rank 0's standard output and error), each start under a
line of its own, kept beside its metrics once the terminal or the job's output file is gone: the
run card and notes, the epoch lines, and how each start ended. `fastrsb runs` reads from it why a
stopped run stopped (stop_reason)."""
from __future__ import annotations

import errno
import os
import re
import sys
import threading
import traceback
from pathlib import Path

LOG_NAME = "train.log"
HEADER = "===== "  # a start's first line in the log
HELD_AT_MOST = 1 << 20  # what is held before the run folder exists (the start-up lines: a few KB)


def attach(path: Path, header: str | None) -> None:
    """The current command's log (`with RunLog():` in cli.main) into `path`, under a line saying
    `header` (None: appended without one, and only where the file is there: the --nproc launcher's
    own lines after its ranks'). Nothing where no log is kept (train() called as a function)."""
    if RunLog.active is not None:
        RunLog.active.attach(path, header)


def detach() -> None:
    """A process that writes no log (a rank but the first): hold nothing."""
    if RunLog.active is not None:
        RunLog.active.hold(False)


def log_only(text: str) -> None:
    """Into the log and not onto the terminal: what another process says there already (the
    --nproc launcher's rank that failed first), which this run's log would otherwise lack."""
    if RunLog.active is not None:
        RunLog.active.record(text)


def terminal_gone() -> None:
    """After SIGHUP (a terminal closed, an SSH session dropped): the standard output and error
    that were a terminal write to /dev/null from now on (a write to a hung-up terminal fails, and
    would stop the run before it saves), fastrsb's lines still going into the run's log. At the
    level of the file descriptors, so that torch's and DALI's own writes are quiet too, and only
    those that were a terminal when the command started (a job's output file is kept)."""
    log = RunLog.active
    fds = log.terminal_fds if log is not None else [fd for fd in (1, 2) if _is_terminal(fd)]
    if not fds:
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in fds:
        os.dup2(devnull, fd)
    os.close(devnull)


def _is_terminal(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def hold_anew() -> None:
    """Hold only what is printed from now on: the --nproc launcher's lines about its ranks go
    after theirs, not what it printed before it started them."""
    if RunLog.active is not None:
        RunLog.active.hold(True)


class RunLog:
    """Copies what this process writes to sys.stdout and sys.stderr from `with RunLog():` on. What
    is written before `attach(path, header)` is held (a run refused at start-up makes no run folder,
    and so no log), then appended to the file with what follows. The terminal sees what it saw
    before. A progress bar redrawn on a terminal ('\\r') goes to the file as its last state, a line;
    a line cut short by a kill is as far as it got. A file that cannot be written (a full disk) is
    said once and left; the run goes on."""

    active: "RunLog | None" = None  # the one `with` has entered, which attach() and detach() reach

    def __init__(self):
        self._held: list[str] | None = []
        self._held_size = 0
        self._file = None
        self._bar: str | None = None  # a progress bar's last redraw, not yet ended by its newline
        self._lock = threading.RLock()  # the stop and failure threads print too

    def __enter__(self) -> "RunLog":
        self._streams = sys.stdout, sys.stderr
        # Asked now: a hung-up terminal may no longer say it is one (terminal_gone).
        self.terminal_fds = [fd for fd in (1, 2) if _is_terminal(fd)]
        sys.stdout, sys.stderr = _Tee(sys.stdout, self), _Tee(sys.stderr, self)
        RunLog.active = self
        return self

    def __exit__(self, kind, error, trace) -> None:
        if error is not None and not isinstance(error, SystemExit):  # Python prints it once this returns
            self.record("".join(traceback.format_exception(kind, error, trace)))
        sys.stdout, sys.stderr = self._streams
        RunLog.active = None
        with self._lock:
            self._end_bar()
            if self._file is not None:
                self._file.close()
            self._file, self._held = None, None

    def attach(self, path: Path, header: str | None) -> None:
        """From now on into `path` (appended: a resumed run's starts follow each other), under
        `header`, after what was held."""
        with self._lock:
            if self._held is None or (header is None and not path.is_file()):
                return
            try:
                self._file = open(path, "a", encoding="utf-8", errors="replace")
            except OSError as err:
                self._failed(path, err)
                return
            held, self._held = self._held, None
            self._to_file((f"{HEADER}{header}\n" if header is not None else "") + "".join(held))

    def hold(self, anew: bool) -> None:
        """Drop what is held; go on holding (anew) or hold nothing more."""
        with self._lock:
            if self._file is None:
                self._held, self._held_size = ([] if anew else None), 0

    def record(self, text: str) -> None:
        """Text written to either stream (_Tee)."""
        with self._lock:
            if text.startswith("\r"):  # a terminal's progress bar redrawn: its last state is what counts
                self._bar = text.replace("\r", "").replace("\033[K", "")
                return
            if self._bar is not None:
                if text == "\n":  # the bar's own end (progress.Progress.close)
                    self._end_bar()
                    return
                self._end_bar()
            self._keep(text)

    def _end_bar(self) -> None:
        if self._bar is not None:
            self._keep(self._bar + "\n")
            self._bar = None

    def _keep(self, text: str) -> None:
        if self._file is not None:
            self._to_file(text)
        elif self._held is not None and self._held_size <= HELD_AT_MOST:
            self._held_size += len(text)
            if self._held_size <= HELD_AT_MOST:
                self._held.append(text)
            else:  # whole writes are held, and after the first that does not fit, a line saying so alone
                cut = "" if not self._held or self._held[-1].endswith("\n") else "\n"
                self._held.append(f"{cut}[fastrsb: what was said after this, before the run folder was made, is "
                                  f"not kept: over {HELD_AT_MOST >> 20} MiB]\n")

    def _to_file(self, text: str) -> None:
        try:
            self._file.write(text)
            self._file.flush()  # a kill loses no line that was printed
        except OSError as err:
            self._failed(Path(self._file.name), err)

    def _failed(self, path: Path, err: OSError) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
        self._file, self._held = None, None  # nothing more is kept
        self._streams[1].write(f"could not write {path} ({err.strerror or err}): the run goes on without its log\n")
        self._streams[1].flush()


class _Tee:
    """A text stream that writes to `stream` (the terminal, a job's output file) and to the log.
    Everything else (isatty, fileno, encoding) is the stream's."""

    def __init__(self, stream, log: RunLog):
        self._stream, self._log = stream, log

    def write(self, text: str) -> int:
        written = _quiet_if_hung_up(lambda: self._stream.write(text), len(text), self._stream)
        self._log.record(text)
        return written

    def flush(self) -> None:
        _quiet_if_hung_up(self._stream.flush, None, self._stream)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        return getattr(self._stream, name)


_SIGNAL_SAID = re.compile(r"^fastrsb: (SIG[A-Z0-9]+) received")  # fastrsb.stopping's line


def _quiet_if_hung_up(write, instead, stream):
    """write(), or where the terminal has hung up (EIO: its SIGHUP may arrive a moment after the
    first write fails), the terminal's output sent to /dev/null and `instead`; the same where
    STREAM is a pipe whose reader has gone (EPIPE: `fastrsb train ... | tee out.txt` and the tee
    ended), that stream's output alone: the run goes on, its lines in its log."""
    try:
        return write()
    except OSError as err:
        if err.errno == errno.EIO:
            terminal_gone()
        elif err.errno == errno.EPIPE:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)
        else:
            raise
        return instead


def stop_reason(folder: Path) -> str | None:
    """Why the last start of a run that is no longer running ended, from its log: its error, the
    stop it was asked for, or, where the log just ends, that it ended without a word (killed: out of
    memory, a lost machine). None where there is no log (a run of before 2026-12-03) or it ended
    as a finished run does."""
    try:
        text = (folder / LOG_NAME).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    lines = text[max(text.rfind(HEADER), 0):].splitlines()
    if any(line.startswith("done: ") for line in lines):
        return None
    for at in range(len(lines) - 1, -1, -1):
        line = lines[at]
        if line.startswith("fastrsb: error: "):
            return line.removeprefix("fastrsb: ")
        if line.startswith("Traceback (most recent call last)"):  # an error fastrsb did not foresee
            # Its line (type: message) is the first under the frames; lines after it are the message's
            # own (torch's CUDA errors add three of advice).
            raised = [line for line in lines[at + 1:] if line and not line.startswith(" ")]
            return f"error: {raised[0] if raised else 'a traceback'} (train.log has the traceback)"
        if line.startswith(("stopped at ", "stopped after ")):  # by a signal, or by --stop-after-steps
            signals = [m.group(1) for m in map(_SIGNAL_SAID.match, lines) if m]
            return f"{line} ({signals[0]})" if signals else line
        if line == "fastrsb: interrupted":
            return "interrupted (Ctrl-C)"
    return "ended without a word: killed (out of memory?), or its machine went down"
