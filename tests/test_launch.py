"""fastrsb.launch: the processes of `fastrsb train --nproc N`, watched and stopped together.
(A whole run under --nproc, stopped with Ctrl-C and resumed: tests/test_resume.py.)"""
import os
import signal
import sys
import threading
import time

import pytest
import torch

from conftest import assert_user_error, run_cli
from fastrsb.errors import UserError
from fastrsb.launch import resolve_nproc, run_together, unused_gpus_note


def _python(code: str) -> tuple[list[str], dict]:
    return [sys.executable, "-c", code], dict(os.environ)


def test_a_signal_to_the_launcher_reaches_every_process(tmp_path):
    """`kill LAUNCHER` (a container's stop, a job system that signals the main process only): each
    process gets it, and the launcher ends with their code."""
    child = ("import pathlib, signal, sys, time\n"
             "got = []\n"
             "signal.signal(signal.SIGTERM, lambda *a: got.append(1))\n"
             "pathlib.Path(sys.argv[1]).write_text('listening')\n"
             "deadline = time.monotonic() + 30\n"
             "while not got and time.monotonic() < deadline: time.sleep(0.01)\n"
             "sys.exit(0 if got else 99)\n")
    marks = [tmp_path / f"got{rank}" for rank in range(2)]
    commands = [([sys.executable, "-c", child, str(mark)], dict(os.environ)) for mark in marks]

    def signal_once_both_listen():
        while not all(mark.exists() for mark in marks):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=signal_once_both_listen, daemon=True).start()
    assert run_together(commands) == 0  # each process was signalled (else 99)


def test_a_failed_process_leaves_the_others_a_while_then_they_are_killed(capsys):
    failing, hanging = _python("import sys; sys.exit(3)"), _python("import time; time.sleep(600)")
    assert run_together([failing, hanging], straggler_seconds=1) == 3  # the cause, not the kill's 137
    err = capsys.readouterr().err
    assert "1 other(s) had not stopped 1 s later: killed" in err and "ended by" not in err  # 3: its own words


def test_a_process_killed_without_a_word_is_named(capsys):
    """The OOM killer's SIGKILL leaves a process no time to say anything: the launcher says it."""
    killed = _python("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    waiting = _python("import time; time.sleep(600)")
    assert run_together([waiting, killed], straggler_seconds=1) == 128 + signal.SIGKILL
    err = capsys.readouterr().err
    assert "fastrsb: rank 1 ended by SIGKILL, without a word (the kernel's out-of-memory killer?" in err
    assert err.count("ended by") == 1  # rank 0, killed by the launcher itself, is not reported


def test_a_stopped_process_starts_no_clock_for_the_others(capsys):
    """A run stopped by a signal: rank 1 is done at once, rank 0 still saves its checkpoint."""
    stopped, saving = _python("import sys; sys.exit(130)"), _python("import time; time.sleep(2)")
    assert run_together([saving, stopped], straggler_seconds=0.5) == 130
    assert "killed" not in capsys.readouterr().err


def test_nproc_refusals(monkeypatch, tiny_data, tmp_path):
    common = ["train", "tiny", "--data", tiny_data, "--out", tmp_path / "run", "--device", "cpu"]
    proc = run_cli(*common, "--nproc", "all", check=False)
    assert proc.returncode == 2 and "no GPU is visible" in proc.stderr
    proc = run_cli(*common, "--nproc", "0", check=False)
    assert proc.returncode == 2 and "must be 1 or more" in proc.stderr
    # A batch that does not split is said once, here, before any process starts (each said it).
    assert_user_error(run_cli(*common, "--nproc", "3", check=False), "batch_size 8 does not split over 3 processes")
    assert_user_error(run_cli(*common, "--nproc", "2", "--micro-batch", "3", check=False),
                      "--micro-batch 3 does not divide the 4 images per process")
    assert_user_error(run_cli(*common, "--nproc", "2", "--set", "batch_size=6", "--set", "mixup=0.1", check=False),
                      "batch_size 6 = 2 process(es) x 1 accumulation step(s) x 3", "must be even")
    monkeypatch.setenv("WORLD_SIZE", "2")  # already one of torchrun's processes
    monkeypatch.setenv("RANK", "0")
    proc = run_cli(*common, "--nproc", "2", check=False)
    assert proc.returncode == 2 and "without torchrun" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_nproc_counts_the_visible_gpus(monkeypatch):
    """On a machine with 4 GPUs (their count stood in for)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_nproc("all", "auto") == 4 and resolve_nproc("2", "cuda") == 2
    with pytest.raises(UserError, match="--nproc 5, but 4 GPU"):
        resolve_nproc("5", "auto")
    assert resolve_nproc("5", "cpu") == 5  # CPU processes: as many as asked
    assert unused_gpus_note("auto") == "note: 4 GPUs are visible and this run uses one: --nproc all trains on every one"
    assert unused_gpus_note("cpu") is None
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert unused_gpus_note("cuda").startswith("note: 2 GPUs are visible")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert unused_gpus_note("cuda") is None


def test_a_crashed_process_is_named_as_one(capsys):
    crashed = _python("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert run_together([crashed], straggler_seconds=1) == 128 + signal.SIGSEGV
    assert "fastrsb: rank 0 ended by SIGSEGV, without a word (a crash)" in capsys.readouterr().err


def test_the_launched_processes_get_torchruns_environment_and_a_share_of_the_cores(monkeypatch):
    """Each process: its rank, the world, the launcher's store, and torch's threads as the cores
    shared out (4 of 8 cores each for 2), unless OMP_NUM_THREADS is set already."""
    import fastrsb.launch as launch
    started = []
    monkeypatch.setattr(launch, "run_together", lambda commands: started.extend(commands) or 0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert launch.launch(2, ["train", "tiny"]) == 0
    assert [argv[-3:] for argv, _ in started] == [["fastrsb", "train", "tiny"]] * 2
    for rank, (_, env) in enumerate(started):
        assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == (str(rank), str(rank),
                                                                                               "2", "2")
        assert env["OMP_NUM_THREADS"] == "4" and env["MASTER_ADDR"] == "127.0.0.1" and int(env["MASTER_PORT"]) > 0
    started.clear()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    launch.launch(2, ["train", "tiny"])
    assert {env["OMP_NUM_THREADS"] for _, env in started} == {"3"}
