import contextlib
import io
import os
import subprocess
import sys
import tempfile

import pytest

from fastrsb.cli import main

from fastrsb.demo_data import write_demo

# 4 classes x 12 train / 5 val images: 20 val images do not divide into batches of 8, so the
# partial last batch is exercised; each class holds the odd files (gray, CMYK, progressive, PNG).
TINY = dict(train_per_class=12, val_per_class=5, num_classes=4)


@pytest.fixture(scope="session", autouse=True)
def temporary_files_under_pytests_folder(tmp_path_factory):
    """What the tests, and the processes they start, write to the temporary folder (torchrun's
    torchelastic_* log folders, DALI's autograph files, run folders made with mkdtemp) goes under
    pytest's own folder, which pytest prunes, not into /tmp: a CI run left ~80 folders there."""
    folder = tmp_path_factory.mktemp("tmp")
    saved = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = str(folder), None  # None: tempfile reads TMPDIR again
    yield folder
    if saved[0] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved[0]
    tempfile.tempdir = saved[1]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return write_demo(tmp_path_factory.mktemp("data") / "tiny", seed=1, **TINY)


def run_cli(*args, check=True):
    """`fastrsb ARGS` in this process (fastrsb.cli.main, as the console script calls it): exit code,
    stdout and stderr as a CompletedProcess. An exception the CLI does not turn into a message
    propagates, so the test fails with its traceback."""
    argv = list(map(str, args))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse: --help, --version, a usage error
            code = exit_.code if isinstance(exit_.code, int) else 2
    proc = subprocess.CompletedProcess(["fastrsb", *argv], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"fastrsb {' '.join(argv)} failed ({code}):\n{proc.stderr}")
    return proc


def run_cli_process(*args, check=True):
    """Run `python -m fastrsb ARGS` in a process of its own, as a user would: for what needs one
    (signals, the console entry point)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "fastrsb", *map(str, args)], capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"fastrsb {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@contextlib.contextmanager
def folder_held(folder, job="fastrsb train"):
    """A process of its own holding FOLDER's lock (fastrsb.folder_lock), as a job writing there
    does; it is killed (SIGKILL: the kernel lets go of its lock, its file stays) on leaving."""
    code = ("import sys, time; from fastrsb.folder_lock import FolderLock; FolderLock(sys.argv[1], sys.argv[2]).take(); "
            "print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder), job], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        yield holder
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def said_errors(stderr: str) -> list[str]:
    """The 'fastrsb: error: ...' lines of a process's stderr, each from that text to its line's end.
    fastrsb writes each in one go, newline included, but another thread's C++ warning (torch's
    store) may have started its own line just before without ending it yet."""
    mark = "fastrsb: error:"
    return [line[line.index(mark):] for line in stderr.splitlines() if mark in line]


def assert_user_error(proc, *fragments):
    """A clear one-line error: exit 2, 'fastrsb: error: ...' naming what is wrong, no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = said_errors(proc.stderr)
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.hookimpl(trylast=True)  # after the terminal's own line for the test (`-v`: its outcome)
def pytest_runtest_logreport(report):
    """With FASTRSB_REPORT_AT_ONCE=1 (benchmarks/gpu_checks.sh's GPU tests), each test's time and,
    if it fails, its traceback are printed as it ends, not in the session's summary: a device call
    cut by its time limit keeps why a test failed and how long each took (at c5b2a17 two GPU
    failures lost their tracebacks that way)."""
    if not os.environ.get("FASTRSB_REPORT_AT_ONCE") or report.when == "teardown" and report.passed:
        return
    sys.stdout.flush()
    if report.when == "call" or report.failed:
        sys.stderr.write(f"\n[{report.duration:.1f} s {report.when} {report.outcome}] {report.nodeid}\n")
    if report.failed:
        sys.stderr.write(report.longreprtext + "\n")
    sys.stderr.flush()
