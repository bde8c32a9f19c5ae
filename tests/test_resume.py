"""Exact resume, graceful stop, EMA, gradient accumulation: the trainer's promises on the CPU."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import assert_user_error, run_cli, said_errors
from fastrsb.checkpoint import load_checkpoint
from fastrsb.demo_data import write_demo
from fastrsb.errors import UserError
from fastrsb.optim import lr_at
from fastrsb.recipe import load_recipe
from fastrsb.train import train

# Every stateful part on: stochastic depth (torch RNG), EMA, repeated augmentation, RandAugment
# (DALI conditionals in the checkpointed pipeline), mixup/cutmix.
PARTS = ["drop_path=0.1", "model_ema=true", "model_ema_decay=0.9", "aug_repeats=2", "aa=rand-m9-mstd0.5-inc1"]


def _train(data, out, **kwargs):
    return train(load_recipe("tiny", PARTS), data, out, device="cpu", num_threads=1, log_every=2, **kwargs)


# What an epoch row measures of the machine rather than of the training: left out where runs are compared.
MEASURED = ("images_per_sec", "train_seconds", "train_seconds_steady", "val_seconds", "data_wait", "peak_memory_gib",
            "peak_torch_gib")


def _epoch_rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in MEASURED}
            for r in rows if r["kind"] == "epoch"]


def _assert_same_run(a, b):
    left, right = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert left["step"] == right["step"] == 12
    for part in ("model", "ema"):
        for key, value in left[part].items():
            assert torch.equal(value, right[part][key]), f"{part}.{key} differs"
    for (_, x), (_, y) in zip(left["optimizer"]["state"].items(), right["optimizer"]["state"].items()):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert _epoch_rows(a) == _epoch_rows(b)  # losses, accuracies, LR: identical
    # The best epoch is judged across the resume (the tiny run's EMA scores best in epoch 1).
    best = [load_checkpoint(run / "best.pt") for run in (a, b)]
    assert left["best_top1"] == right["best_top1"] and best[0]["epoch"] == best[1]["epoch"]
    assert (a / "summary.csv").read_text() == (b / "summary.csv").read_text()  # rebuilt after the resume
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    boards = [EventAccumulator(str(run / "tensorboard")) for run in (a, b)]
    for board in boards:
        board.Reload()
    # The resumed run's events after its checkpoint were purged and written again: the same curves, once.
    for tag in ("epoch/train_loss", "epoch/top1"):
        assert [(e.step, e.value) for e in boards[0].Scalars(tag)] == [(e.step, e.value) for e in boards[1].Scalars(tag)]


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    metrics = _train(tiny_data, out)
    assert not metrics.get("stopped") and metrics["epoch"] == 2 and "ema_top1" in metrics
    return out


def test_a_run_keeping_an_ema_is_judged_by_the_ema_as_timm_judges_it(uninterrupted, tmp_path):
    """With model_ema, timm's train.py validates the EMA in the model's place: its summary.csv holds
    the EMA's eval_ figures and its best checkpoint is the epoch of the EMA's best top-1. So do
    fastrsb's summary.csv and best.pt (they held the model's), and `fastrsb runs` says whose top-1
    it shows; metrics.jsonl keeps both. An export of the model's weights names the EMA's."""
    import csv
    rows = _epoch_rows(uninterrupted)
    with open(uninterrupted / "summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert len(summary) == len(rows) == 2
    for row, line in zip(rows, summary):
        assert [float(line[k]) for k in ("eval_loss", "eval_top1", "eval_top5")] == \
            [row["ema_val_loss"], row["ema_top1"], row["ema_top5"]]
    scores = [row["ema_top1"] for row in rows]
    best = load_checkpoint(uninterrupted / "best.pt")
    assert best["best_top1"] == max(scores) and best["epoch"] == 1 + scores.index(max(scores))
    listed = run_cli("runs", uninterrupted).stdout.splitlines()[1].split()
    assert f"{scores[-1]:.2f}" in listed and "(EMA)" in listed and f"{max(scores):.2f}" in listed
    exported = run_cli("export", uninterrupted / "best.pt", tmp_path / "model").stdout  # the model's weights
    assert (f"note: the checkpoint also holds its EMA's weights (top-1 {max(scores):.2f}), by which the run judged "
            "its epochs (best.pt, summary.csv): --ema exports them") in exported
    assert "note:" not in run_cli("export", uninterrupted / "best.pt", tmp_path / "ema", "--ema").stdout


@pytest.mark.parametrize("stop_at", [6, 8])  # the end of epoch 1; two steps into epoch 2
def test_stopped_and_resumed_equals_uninterrupted(tiny_data, tmp_path, uninterrupted, stop_at):
    stopped = _train(tiny_data, tmp_path, stop_after_steps=stop_at)
    assert stopped["stopped"]
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["step"] == stop_at and (state["partial"] is None) == (stop_at == 6)
    resumed = _train(tiny_data, tmp_path, resume="auto")
    assert not resumed.get("stopped") and resumed["epoch"] == 2
    _assert_same_run(uninterrupted, tmp_path)
    if stop_at == 8:  # 2 of epoch 2's 6 steps before the stop: its seconds count them, its images/s the other 4
        second = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
        assert second["kind"] == "epoch" and state["partial"]["seconds"] > 0
        assert second["train_seconds"] == pytest.approx(state["partial"]["seconds"] + 4 * 8 / second["images_per_sec"],
                                                        rel=1e-9)


def test_loader_positions_of_an_earlier_fastrsb_continue_at_the_same_step(tiny_data, tmp_path, capsys):
    """A checkpoint whose loader positions an earlier fastrsb wrote (no "format": its readers stood
    partway into a reshuffle) cannot continue its loaders exactly: the run continues at the same
    step with loaders started anew, says so, and finishes."""
    from fastrsb.checkpoint import save_checkpoint
    _train(tiny_data, tmp_path, stop_after_steps=8)
    state = load_checkpoint(tmp_path / "last.pt")
    for rank in state["ranks"]:
        position = rank["loader"]
        position["fingerprint"].pop("format")
        position["turn"] = position.pop("taken") % 2
    save_checkpoint(state, tmp_path / "last.pt")
    capsys.readouterr()
    resumed = _train(tiny_data, tmp_path, resume="auto")
    assert "resumed from a checkpoint whose loader positions an earlier fastrsb wrote" in capsys.readouterr().out
    assert not resumed.get("stopped") and resumed["epoch"] == 2
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["step"] == 12 and state["loader_seed"] == 9  # the recipe's seed 0 + the step resumed at 8 + 1
    assert [r["epoch"] for r in _epoch_rows(tmp_path)] == [1, 2]


def test_sigterm_saves_and_resume_finishes_the_same_run(tiny_data, tmp_path, uninterrupted):
    args = [sys.executable, "-m", "fastrsb", "train", "tiny", "--data", tiny_data, "--out", tmp_path,
            "--device", "cpu", "--threads", "1", "--log-every", "1"] + [a for p in PARTS for a in ("--set", p)]
    proc = subprocess.Popen(list(map(str, args)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # wait for the first training step, then preempt
        if line.startswith("epoch 1/2 1/6"):
            proc.send_signal(signal.SIGTERM)
            break
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "SIGTERM received" in stderr and "Traceback" not in stderr
    assert "--resume auto" in stdout
    state = load_checkpoint(tmp_path / "last.pt")
    assert 1 <= state["step"] < 12
    # The hint names the whole command: recipe, data, options and every --set value.
    hint = next(line for line in stdout.splitlines() if line.startswith("continue with: "))
    words = hint.removeprefix("continue with: ").split()
    assert words[:3] == ["fastrsb", "train", "tiny"] and words[-2:] == ["--resume", "auto"]
    assert all(f"--set {p}" in hint for p in PARTS) and "--threads 1" in hint
    listed = run_cli("runs", tmp_path).stdout.splitlines()  # why it stopped, from its train.log
    assert listed[2] == f"  why: stopped at step {state['step']} (epoch 1, {state['step']}/6) (SIGTERM)"
    resumed = run_cli(*words[1:])
    assert f"resumed from {tmp_path / 'last.pt'} at step {state['step']} (epoch 1, {state['step']}/6)" in resumed.stdout
    _assert_same_run(uninterrupted, tmp_path)


def test_second_signal_exits_at_once_and_a_repeat_of_the_first_is_the_same_stop():
    # The repeat: one Ctrl-C reaching a worker directly and forwarded by its launcher (or SLURM's
    # signal and torchrun's copy of it) a few milliseconds apart.
    script = ("import os, signal, time\n"
              "from fastrsb.stopping import StopRequest\n"
              "with StopRequest() as stop:\n"
              "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.05)\n"
              "    os.kill(os.getpid(), signal.SIGINT); time.sleep(0.05)\n"
              "    assert stop.requested and stop.signum == signal.SIGTERM\n"
              "    print('first signal noted, its repeat too', flush=True)\n"
              "    time.sleep(StopRequest.REPEAT_SECONDS)\n"
              "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)\n"
              "    print('still running')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "first signal noted, its repeat too" in proc.stdout and "still running" not in proc.stdout
    assert proc.returncode == -signal.SIGTERM
    assert proc.stderr.count("received: saving a checkpoint") == 1


def test_slurms_time_limit_warning_stops_the_run_too():
    """SIGUSR1, as `--signal=USR1@120` sends it, is a stop request (its default action would kill)."""
    script = ("import os, signal, time\n"
              "from fastrsb.stopping import StopRequest\n"
              "with StopRequest() as stop:\n"
              "    os.kill(os.getpid(), signal.SIGUSR1); time.sleep(0.1)\n"
              "    print(stop.signum == signal.SIGUSR1)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "True" and "SIGUSR1 received" in proc.stderr


def test_a_terminal_that_hangs_up_stops_the_run_resumably_its_words_in_the_log(tiny_data, tmp_path):
    """A run in a terminal that goes away (an SSH session dropped): its output is a pseudo-terminal
    whose other end closes, then SIGHUP arrives, as the kernel sends it. The run saves a checkpoint
    and stops (exit 129), saying so in train.log alone: a write to the hung-up terminal fails, and
    the run would have died of it, or of SIGHUP itself, losing the epoch."""
    import pty
    import select
    leader, follower = pty.openpty()
    args = [sys.executable, "-m", "fastrsb", "train", "tiny", "--data", tiny_data, "--out", tmp_path, "--device", "cpu",
            "--threads", "1", "--log-every", "1"] + [a for p in PARTS for a in ("--set", p)]
    proc = subprocess.Popen(list(map(str, args)), stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
    os.close(follower)
    shown, deadline = b"", time.monotonic() + 120
    while b"] 1/6 " not in shown and time.monotonic() < deadline:  # the first step's progress bar
        if select.select([leader], [], [], 1.0)[0]:
            shown += os.read(leader, 65536)
    assert b"] 1/6 " in shown, shown.decode(errors="replace")
    os.close(leader)  # the terminal is gone: writes to it now fail
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=120) == 128 + signal.SIGHUP
    assert 1 <= load_checkpoint(tmp_path / "last.pt")["step"] < 12
    log = (tmp_path / "train.log").read_text()
    assert "fastrsb: SIGHUP received: saving a checkpoint" in log and "Traceback" not in log
    assert "continue with: fastrsb train tiny" in log.splitlines()[-1]
    listed = run_cli("runs", tmp_path).stdout.splitlines()
    assert listed[2].startswith("  why: stopped at step ") and listed[2].endswith(" (SIGHUP)")


def test_a_run_whose_output_pipe_closes_goes_on_its_words_in_the_log(tiny_data, tmp_path):
    """`fastrsb train ... | tee out.txt`, and the tee ends (killed, its terminal gone): writes to the
    pipe fail (EPIPE). The run goes on to its end, that output to /dev/null, its words in train.log
    (it ended at its first write that failed); its standard error, elsewhere, still takes its lines."""
    args = [sys.executable, "-m", "fastrsb", "train", "tiny", "--data", tiny_data, "--out", tmp_path / "run",
            "--device", "cpu", "--threads", "1"]
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen(list(map(str, args)), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr)
        proc.stdout.close()  # the reader has gone before the first line
        assert proc.wait(timeout=300) == 0
    log = (tmp_path / "run" / "train.log").read_text()
    assert "Traceback" not in log and log.splitlines()[-1].startswith("done: top1 ")
    progress = [line for line in log.splitlines() if line.startswith("epoch 2/2 ")]  # on standard error
    assert progress and progress[-1] in (tmp_path / "stderr.txt").read_text().splitlines()
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 2


def test_a_run_started_by_nohup_outlives_its_terminal():
    """nohup starts a command with SIGHUP ignored, so that it goes on when its terminal goes: a
    run keeps it ignored (SIGHUP is a stop only where nothing said to ignore it)."""
    script = ("import os, signal, time\n"
              "from fastrsb.stopping import StopRequest\n"
              "signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup starts it\n"
              "with StopRequest() as stop:\n"
              "    os.kill(os.getpid(), signal.SIGHUP); time.sleep(0.1)\n"
              "    print(stop.requested)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "False" and "received" not in proc.stderr


def test_after_a_hang_up_the_run_writes_to_its_log_alone(tmp_path):
    """SIGHUP says the terminal has gone: from its handler on, nothing more is written to the
    terminal (its own line included), everything to the run's log; and at once, not at the first
    write that fails (the terminal may still take writes a moment longer, or not be one that fails)."""
    import pty
    leader, follower = pty.openpty()
    log = tmp_path / "train.log"
    script = ("import os, signal, time\n"
              "from pathlib import Path\n"
              "from fastrsb import run_log\n"
              "from fastrsb.stopping import StopRequest\n"
              "with run_log.RunLog(), StopRequest():\n"
              f"    run_log.attach(Path({str(log)!r}), 'fastrsb train x')\n"
              "    print('before the hang-up', flush=True)\n"
              "    os.kill(os.getpid(), signal.SIGHUP); time.sleep(0.1)\n"
              "    print('after the hang-up', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", script], stdin=subprocess.DEVNULL, stdout=follower, stderr=follower,
                          timeout=60)
    os.close(follower)
    shown = b""
    with contextlib.suppress(OSError):  # EIO: the pseudo-terminal's other end is closed, all is read
        while chunk := os.read(leader, 65536):
            shown += chunk
    os.close(leader)
    assert proc.returncode == 0, shown.decode(errors="replace")
    assert shown.decode().splitlines() == ["before the hang-up"]
    assert log.read_text().splitlines()[1:] == [
        "before the hang-up", "", "fastrsb: SIGHUP received: saving a checkpoint at the next step boundary, then "
        "exiting (send it again to exit at once)", "after the hang-up"]


def test_a_stop_request_puts_back_the_handlers_it_found_and_off_the_main_thread_installs_none():
    """train() called as a function (a notebook, a script of the user's) leaves Ctrl-C as it was
    once it returns; called on a thread other than the main one, where Python installs no
    handler, it takes no signal rather than failing."""
    import threading
    from fastrsb.stopping import StopRequest
    handlers = lambda: {sig: signal.getsignal(sig) for sig in StopRequest.SIGNALS}  # noqa: E731
    before = handlers()
    with StopRequest() as stop:
        assert all(handler == stop._handle for handler in handlers().values())
    assert handlers() == before
    failed = []

    def elsewhere():
        try:
            with StopRequest():
                failed.append(handlers() != before)
        except Exception as err:
            failed.append(err)
    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert failed == [False] and handlers() == before


def test_resume_refuses_another_recipe(tiny_data, uninterrupted, tmp_path):
    import shutil
    shutil.copy(uninterrupted / "last.pt", tmp_path / "last.pt")
    proc = run_cli("train", "tiny", "--data", tiny_data, "--out", tmp_path, "--device", "cpu", "--resume", "auto",
                   "--set", "lr=0.001", check=False)
    assert proc.returncode == 2 and "another recipe" in proc.stderr and "lr" in proc.stderr
    assert "initial_checkpoint" not in proc.stderr
    longer = run_cli("train", "tiny", "--data", tiny_data, "--out", tmp_path, "--device", "cpu", "--resume", "auto",
                     "--set", "epochs=4", check=False)  # more epochs: another schedule, and a way on from the weights
    assert_user_error(longer, "another recipe (epochs 2 -> 4",
                      f"--set initial_checkpoint={tmp_path / 'last.pt'} and a new --out")


def test_resume_refuses_data_of_other_classes(tiny_data, uninterrupted, tmp_path):
    """A checkpoint's output i is class i of the classes it was trained on: a resume over data of
    other classes, even as many (a class folder renamed, another data set), would train each output
    as another class. Refused, naming the difference."""
    sets = [word for part in PARTS for word in ("--set", part)]
    renamed, fewer = tmp_path / "renamed", tmp_path / "fewer"
    for copy in (renamed, fewer):
        shutil.copytree(tiny_data, copy)
    for split in ("train", "val"):
        (renamed / split / "n01_vstripes").rename(renamed / split / "n01_wavy")
        shutil.rmtree(fewer / split / "n03_dots")
    (tmp_path / "run").mkdir()
    shutil.copy(uninterrupted / "last.pt", tmp_path / "run" / "last.pt")
    for data, difference in ((renamed, "(the checkpoint's 4, the data's 4; only in the checkpoint: n01_vstripes; "
                                       "only in the data: n01_wavy)"),
                             (fewer, "(the checkpoint's 4, the data's 3; only in the checkpoint: n03_dots)")):
        proc = run_cli("train", "tiny", "--data", data, "--out", tmp_path / "run", "--device", "cpu", *sets,
                       "--resume", "auto", check=False)
        assert_user_error(proc, f"{tmp_path / 'run' / 'last.pt'} was trained on other classes than the data's "
                                f"{difference}: its outputs are those classes")


def test_a_finished_runs_checkpoint_resumed_into_a_new_folder_has_nothing_to_do(tiny_data, uninterrupted, tmp_path):
    """`--resume CKPT` of a finished run, with a new --out: it says so and ends (it raised
    FileNotFoundError: the new folder has no metrics.jsonl to sum the time from)."""
    sets = [word for part in PARTS for word in ("--set", part)]
    proc = run_cli("train", "tiny", "--data", tiny_data, "--out", tmp_path / "new", "--device", "cpu", *sets,
                   "--resume", uninterrupted / "last.pt")
    assert f"resumed from {uninterrupted / 'last.pt'} at step 12 (epoch 2 done)" in proc.stdout  # not "epoch 3"
    assert "this run already finished all 2 epochs" in proc.stdout
    assert "done: top1 " in proc.stdout and f"run folder {tmp_path / 'new'}" in proc.stdout


def test_a_loss_gone_to_inf_names_the_last_checkpoint_and_where_it_stands(tiny_data, tmp_path):
    """A run stopped after its first step and resumed, whose LR (1e38 after the warmup's first step)
    sends the loss to inf two steps later: the stop names the checkpoint it resumed from and where
    that stands, from what the run saved rather than what its file system shows (the same on every
    machine). A run that blows up before any checkpoint says there is none."""
    args = ("train", "tiny", "--data", tiny_data, "--device", "cpu", "--threads", "1", "--log-every", "1",
            "--set", "lr=1e38")
    run_cli(*args, "--out", tmp_path / "run", "--stop-after-steps", "1")
    proc = run_cli(*args, "--out", tmp_path / "run", "--resume", "auto", check=False)
    assert_user_error(proc, "loss is not finite at step 3 (epoch 1)",
                      f"the last checkpoint before it is {tmp_path / 'run' / 'last.pt'}, at step 1 (epoch 1, 1/6)")
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 1  # kept: nothing was saved after it
    assert_user_error(run_cli(*args, "--out", tmp_path / "new", check=False), "loss is not finite at step 3",
                      "no checkpoint was written before it")


def test_resume_auto_after_a_crash_before_any_checkpoint_starts_clean(tiny_data, uninterrupted, tmp_path, capsys):
    """A run killed before its first checkpoint leaves logged rows and no last.pt: --resume auto
    starts from scratch and drops those rows (they were appended to before, so every step it had
    logged appeared twice in metrics.jsonl and TensorBoard). The run is then the uninterrupted one."""
    _train(tiny_data, tmp_path, stop_after_steps=4)
    (tmp_path / "last.pt").unlink()  # as if killed (SIGKILL, a node lost) before any checkpoint
    _train(tiny_data, tmp_path, resume="auto")
    assert "starting from scratch (the rows a run logged there" in capsys.readouterr().out
    logs = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "log"]
    assert logs == [2, 4, 6, 8, 10, 12]
    _assert_same_run(uninterrupted, tmp_path)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8, 10, 12]


def test_what_a_kill_leaves_does_not_stop_the_resume(tiny_data, uninterrupted, tmp_path, capsys):
    """A run killed while it appended a metrics row leaves half a line: plot, compare and the
    resume leave it out (the resume writes that row again; it was a JSONDecodeError traceback),
    and the run ends as the uninterrupted one. A bad line elsewhere is named. Killed in a save, it
    leaves the save's temporary file (as large as a checkpoint): the resume removes it."""
    _train(tiny_data, tmp_path, stop_after_steps=4)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "log", "step": 6, "lo')
    (tmp_path / ".last.pt.k1ll3d.tmp").write_bytes(b"\0" * 1_000_000)  # the save it was killed in
    (tmp_path / "notes.tmp").write_text("the user's")
    assert "curves.png" in run_cli("plot", tmp_path, "--backend", "pillow").stdout
    _train(tiny_data, tmp_path, resume="auto")
    assert "removed 1 partial checkpoint file(s) (1.0 MB)" in capsys.readouterr().out
    assert not list(tmp_path.glob(".*.tmp")) and (tmp_path / "notes.tmp").is_file()
    _assert_same_run(uninterrupted, tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("\n".join(["{oops"] + lines[1:]) + "\n")
    assert_user_error(run_cli("plot", tmp_path, check=False), "metrics.jsonl:1 is not a JSON line")
    assert_user_error(run_cli("compare", tmp_path, uninterrupted, check=False), "metrics.jsonl:1 is not a JSON line")
    # Valid JSON but no row (a list, a number): named too (plot, runs and compare died on .get or ["kind"]).
    (tmp_path / "metrics.jsonl").write_text("\n".join(["[1]"] + lines[1:]) + "\n")
    assert_user_error(run_cli("plot", tmp_path, check=False), "metrics.jsonl:1 is not a row (a JSON object): [1]")
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with open(tmp_path / "starts.jsonl", "a") as f:
        f.write("5\n")
    assert "starts.jsonl:3 is not a row (a JSON object): 5" in run_cli("runs", tmp_path).stdout  # a start, a resume


def test_a_save_that_fails_keeps_the_checkpoint_before_and_says_why(tiny_data, tmp_path):
    """A checkpoint write that fails (a full disk; here the process may not write past 1 MB, so
    the write really fails) stops the run in one line, naming the file and the free space; the
    last.pt before it is kept whole and no temporary file is left. It was torch's
    "[enforce fail at inline_container.cc] unexpected pos" traceback."""
    import resource
    _train(tiny_data, tmp_path, stop_after_steps=4)
    before = (tmp_path / "last.pt").read_bytes()
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, limit[1]))
    try:
        with pytest.raises(UserError, match=r"could not write .*last\.pt .*GB free on its disk\): the checkpoint "
                                            r"there before is kept"):
            _train(tiny_data, tmp_path, resume="auto")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    assert (tmp_path / "last.pt").read_bytes() == before and not list(tmp_path.glob(".*.tmp"))


def test_metrics_rows_outlive_a_full_disk(tmp_path, capsys):
    """A metrics row that cannot be written (the disk full; here the process may write only 10
    more bytes, so the append really fails partway) does not stop the run: no half row is left,
    the failure is said once, and the kept rows are written, in order, with the next row that can
    be. It was an OSError traceback at the next log step."""
    import resource
    from fastrsb.distributed import Dist
    from fastrsb.metrics_log import read_rows
    from fastrsb.run_state import RunFolder
    folder = RunFolder(tmp_path, {"name": "tiny"}, Dist())
    folder.log({"kind": "log", "step": 1, "loss": 1.0})
    size = (tmp_path / "metrics.jsonl").stat().st_size
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 10, limit[1]))
    try:
        folder.log({"kind": "log", "step": 2, "loss": 0.5})
        folder.log({"kind": "log", "step": 3, "loss": 0.25})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    assert (tmp_path / "metrics.jsonl").stat().st_size == size  # the partial write was cut back off
    assert capsys.readouterr().out.count("could not write to") == 1
    folder.log({"kind": "log", "step": 4, "loss": 0.125})
    assert [row["step"] for row in read_rows(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    assert "3 kept metrics row(s) written" in capsys.readouterr().out
    # summary.csv that cannot be rewritten (here a folder stands in its place): the epoch row is
    # in metrics.jsonl once, not kept to be appended again; the summary follows at the next epoch.
    epoch = {"kind": "epoch", "epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "top1": 50.0, "top5": 90.0, "lr": 0.1}
    (tmp_path / "summary.csv").unlink()
    (tmp_path / "summary.csv").mkdir()
    folder.log({**epoch, "step": 5})
    (tmp_path / "summary.csv").rmdir()
    folder.log({**epoch, "epoch": 2, "step": 6})
    assert [row["step"] for row in read_rows(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert len((tmp_path / "summary.csv").read_text().splitlines()) == 3


def test_a_kill_while_a_resume_drops_rows_keeps_the_rows(tmp_path, monkeypatch):
    """A resume rewrites metrics.jsonl without the rows after its checkpoint: written beside and
    renamed over it, so a kill before the rename (here the rename fails) leaves every row, where
    writing in place first emptied the file."""
    import fastrsb.metrics_log as metrics_log
    path = tmp_path / "metrics.jsonl"
    metrics_log.append_rows(path, [{"kind": "log", "step": step} for step in (2, 4, 6)])
    before = path.read_text()

    def killed(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(metrics_log.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        metrics_log.rewrite_rows(path, [{"kind": "log", "step": 2}])
    assert path.read_text() == before
    monkeypatch.undo()
    metrics_log.rewrite_rows(path, [{"kind": "log", "step": 2}])
    assert [row["step"] for row in metrics_log.read_rows(path)] == [2]


def test_a_kill_while_summary_csv_is_rewritten_keeps_the_last_one(tmp_path, monkeypatch):
    """summary.csv is rewritten whole at each epoch row (and recipe.json at each start), beside
    and renamed over: a kill before the rename leaves the last complete summary."""
    import fastrsb.metrics_log as metrics_log
    from fastrsb.distributed import Dist
    from fastrsb.run_state import RunFolder
    folder = RunFolder(tmp_path, {"model": "resnet10t"}, Dist())
    epoch = {"kind": "epoch", "train_loss": 0.5, "val_loss": 0.4, "top1": 50.0, "top5": 90.0, "lr": 0.1}
    folder.log({**epoch, "epoch": 1, "step": 3})
    before = (tmp_path / "summary.csv").read_text()
    assert len(before.splitlines()) == 2

    def killed(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(metrics_log.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        folder.log({**epoch, "epoch": 2, "step": 6})
    assert (tmp_path / "summary.csv").read_text() == before
    with pytest.raises(KeyboardInterrupt):
        RunFolder(tmp_path, {"model": "resnet50"}, Dist())
    assert json.loads((tmp_path / "recipe.json").read_text()) == {"model": "resnet10t"}
    assert not list(tmp_path.glob(".*.tmp"))  # nothing left beside


def test_finished_run_resumes_to_nothing(tiny_data, uninterrupted):
    before = (uninterrupted / "metrics.jsonl").read_text()
    metrics = _train(tiny_data, uninterrupted, resume="auto")
    assert metrics["epoch"] == 2 and (uninterrupted / "metrics.jsonl").read_text() == before


def test_existing_run_needs_resume(tiny_data, uninterrupted):
    proc = run_cli("train", "tiny", "--data", tiny_data, "--out", uninterrupted, "--device", "cpu", check=False)
    assert proc.returncode == 2 and "--resume auto" in proc.stderr


def test_ema_equals_timms_model_ema_v3():
    from timm.utils import ModelEmaV3
    from fastrsb.ema import ModelEma
    from fastrsb.model import make_model
    torch.manual_seed(0)
    model = make_model("resnet10t", 5)
    ours, theirs = ModelEma(model, 0.9), ModelEmaV3(model, decay=0.9)
    for step in range(1, 5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        model.train()(torch.randn(4, 3, 32, 32))  # moves the BN statistics and num_batches_tracked
        ours.update(model, step)
        theirs.update(model, step=step)
        for (key, mine), other in zip(ours.state_dict().items(), theirs.module.state_dict().values()):
            assert torch.equal(mine, other), key
    assert not torch.equal(ours.state_dict()["fc.weight"], model.state_dict()["fc.weight"])


def test_a_tie_keeps_the_first_best_and_a_stop_at_the_runs_last_step_ends_it_done(tiny_data, tmp_path, monkeypatch):
    """best.pt is the first epoch of the best score, as timm's CheckpointSaver keeps it (a later one
    must do better); --stop-after-steps at the run's last step ends it done, not stopped; an epoch's
    line gives the time left with the validations left. Every validation here gives the same
    figures and takes a second (the figures of a validation are test_train's)."""
    import fastrsb.train
    from fastrsb.progress import clock

    def the_same_figures(*args, **kwargs):
        time.sleep(1.0)
        return {"top1": 50.0, "top5": 100.0, "val_loss": 1.0, "val_images": 20}
    monkeypatch.setattr(fastrsb.train, "evaluate", the_same_figures)
    proc = run_cli("train", "tiny", "--data", tiny_data, "--out", tmp_path, "--device", "cpu", "--keep-every", "1",
                   "--stop-after-steps", "12", "--log-every", "2")
    assert os.path.samefile(tmp_path / "best.pt", tmp_path / "epoch-001.pt")
    assert proc.stdout.splitlines()[-1].startswith("done: ") and "stopped" not in proc.stdout
    first = next(json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["kind"] == "epoch")
    assert f"1 epoch(s) left, ~{clock(first['train_seconds_steady'] + first['val_seconds'])})" in proc.stdout


def test_the_ema_is_updated_with_timms_count_of_updates(tiny_data, tmp_path, monkeypatch):
    """timm's train.py calls model_ema.update(model, step=num_updates) with the update just counted:
    1 the first time (the EMA takes the weights), each later one decaying towards them."""
    from fastrsb.ema import ModelEma
    steps, update = [], ModelEma.update

    def watched(self, model, step):  # the real one, its step noted
        steps.append(step)
        update(self, model, step)
    monkeypatch.setattr(ModelEma, "update", watched)
    run_cli("train", "tiny", "--data", tiny_data, "--out", tmp_path, "--device", "cpu", "--set", "model_ema=true",
            "--stop-after-steps", "3")
    assert steps == [1, 2, 3]


def test_gradient_accumulation(tiny_data, tmp_path, monkeypatch):
    import fastrsb.train
    from fastrsb.step import TrainStep
    groups, forward_backward = [], TrainStep.forward_backward
    counted, close = [], fastrsb.train.Interval.close

    def watched(self, images, targets, group=1, **kwargs):  # the real one, its group noted
        groups.append(group)
        return forward_backward(self, images, targets, group, **kwargs)

    def closed(self):  # the real one, the images its log interval counted noted
        counted.append(self.images)
        return close(self)
    monkeypatch.setattr(TrainStep, "forward_backward", watched)
    monkeypatch.setattr(fastrsb.train.Interval, "close", closed)
    proc = run_cli("train", "tiny", "--data", tiny_data, "--out", tmp_path, "--device", "cpu", "--set", "epochs=1",
                   "--set", "warmup_epochs=0", "--grad-accum-steps", "2")
    assert "batch 8 = 1 x 2 x 4" in proc.stdout
    # each micro-batch's loss divided by its group's size (test_accumulation: the whole batch's gradient)
    assert groups == [2] * 12
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["kind"] == "epoch" and rows[-1]["step"] == 6  # 12 micro-batches of 4, one step per two
    assert [r["step"] for r in rows if r["kind"] == "log"] == [6]  # --log-every 50: an epoch's last step is logged
    assert counted == [48]  # its images/s over the epoch's 48 images (6 steps of 2 micro-batches of 4)
    # As timm, an epoch whose micro-batches the group does not divide ends with a shorter group.
    groups.clear()
    proc = run_cli("train", "tiny", "--data", tiny_data, "--out", tmp_path / "short", "--device", "cpu", "--set",
                   "epochs=1", "--set", "warmup_epochs=0", "--set", "batch_size=40", "--grad-accum-steps", "5")
    assert "batch 40 = 1 x 5 x 8" in proc.stdout and groups == [5] * 5 + [1]
    rows = [json.loads(line) for line in (tmp_path / "short" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["kind"] == "epoch" and rows[-1]["step"] == 2  # 6 micro-batches of 8: a group of 5, one of 1
    proc = run_cli("train", "tiny", "--data", tiny_data, "--out", tmp_path / "x", "--device", "cpu",
                   "--grad-accum-steps", "3", check=False)
    assert proc.returncode == 2 and "does not split" in proc.stderr


def _torchrun(*args, check=True, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fastrsb", "train", "tiny", "--device", "cpu", "--threads", "1", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if check and proc.returncode:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def distributed_run(tiny_data, tmp_path_factory):
    out, temp = tmp_path_factory.mktemp("ddp"), tmp_path_factory.mktemp("ddp_temp")
    proc = _torchrun("--data", tiny_data, "--out", out, "--log-every", "2", env={**os.environ, "TMPDIR": str(temp)})
    # Each rank ends with os._exit (fastrsb/__main__.py), its atexit handlers run first: DALI's
    # autograph removes the file it wrote for each pipeline with conditionals.
    assert not list(temp.glob("__autograph_generated_file*")), "the ranks left DALI's autograph files behind"
    return out, proc


def test_two_processes_train_in_step_and_count_every_image_once(distributed_run):
    # The trainer compares a fingerprint of every rank's weights after each epoch and fails if
    # they differ: the run finishing is the "in step" check.
    out, proc = distributed_run
    assert "batch 8 = 2 x 1 x 4" in proc.stdout and proc.stdout.count("done: top1") == 1  # rank 0 speaks
    # Checked before the first step: 48 files in 2 shards of 24, each 6 batches of 4.
    assert "2 shards x 24 files, disjoint, complete; 0 left out of each epoch" in proc.stdout
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [m for m in epochs if m["kind"] == "epoch"]
    assert [m["epoch"] for m in epochs] == [1, 2] and all(m["val_images"] == 20 for m in epochs)
    # An epoch's train_loss is the mean over both ranks' micro-batches: near rank 0's logged ones (not twice them).
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for m in epochs:
        logged = [r["loss"] for r in rows if r["kind"] == "log" and m["step"] - 6 < r["step"] <= m["step"]]
        assert len(logged) == 3 and 0.75 < m["train_loss"] / (sum(logged) / 3) < 1.33
    state = load_checkpoint(out / "last.pt")
    assert [r["loader"]["fingerprint"]["shard_id"] for r in state["ranks"]] == [0, 1]
    assert state["step"] == 12  # 48 images / (2 ranks x 4) per step, 2 epochs


def test_two_processes_validate_the_ema_they_save(tiny_data, tmp_path):
    """Each rank keeps an EMA of its model, whose BatchNorm statistics follow its own batches: at an
    epoch's end they are averaged as the model's are, so every rank validates the same EMA, the one
    saved; evaluated alone it gives the run's EMA figures."""
    _torchrun("--data", tiny_data, "--out", tmp_path / "run", "--set", "model_ema=true", "--set", "model_ema_decay=0.9")
    last = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    alone = json.loads(run_cli("eval", tmp_path / "run" / "last.pt", "--data", tiny_data, "--ema", "--json").stdout)
    assert alone["top1"] == last["ema_top1"] and alone["val_loss"] == pytest.approx(last["ema_val_loss"], rel=1e-5)


@pytest.fixture(scope="module")
def stopped_on_two(tiny_data, tmp_path_factory):
    """A run of 2 processes stopped 2 steps into epoch 2 (6 steps an epoch): each test that resumes
    it resumes its own copy (one torchrun start the fewer for the suite)."""
    out = tmp_path_factory.mktemp("stopped-on-two") / "run"
    proc = _torchrun("--data", tiny_data, "--out", out, "--stop-after-steps", "8")
    assert "stopped at step 8" in proc.stdout
    return out


def test_two_processes_resume_exactly(distributed_run, stopped_on_two, tiny_data, tmp_path):
    whole, _ = distributed_run
    run = tmp_path / "run"
    shutil.copytree(stopped_on_two, run)
    _torchrun("--data", tiny_data, "--out", run, "--resume", "auto")
    left, right = load_checkpoint(whole / "last.pt"), load_checkpoint(run / "last.pt")
    assert all(torch.equal(v, right["model"][k]) for k, v in left["model"].items())
    assert _epoch_rows(whole) == _epoch_rows(run)  # the half-stopped epoch's train loss included
    single = run_cli("train", "tiny", "--data", tiny_data, "--out", run, "--device", "cpu", "--resume", "auto")
    assert "this run already finished all 2 epochs" in single.stdout  # on 1 process too: nothing left to do
    # A checkpoint rank 0 refuses stops both processes (rank 1 is not left waiting for the state).
    other = _torchrun("--data", tiny_data, "--out", run, "--set", "lr=0.1", "--resume", "auto", check=False)
    assert other.returncode != 0 and "another recipe" in other.stderr and "rank 0 cannot resume" in other.stderr


def test_resume_on_another_number_of_processes(stopped_on_two, tiny_data, tmp_path):
    """A run stopped on 2 processes 2 steps into epoch 2 continues on 1, and one stopped on 1
    continues on 2: the same step and epoch, the rest of the epoch's steps taken (a fresh order of
    images), the note said, the LR schedule ending at the last step. A run so resumed then resumes
    exactly on its new number (its loaders' seed is in its checkpoints): stopped and resumed, it
    ends as it does uninterrupted."""
    two = tmp_path / "two"
    shutil.copytree(stopped_on_two, two)
    assert len(load_checkpoint(two / "last.pt")["ranks"]) == 2
    on_one = ("train", "tiny", "--data", tiny_data, "--device", "cpu", "--threads", "1", "--resume", "auto")
    proc = run_cli(*on_one, "--out", two, "--stop-after-steps", "10")
    assert "resumed on 1 process(es) from a checkpoint of 2" in proc.stdout and "stopped at step 10" in proc.stdout
    mid = load_checkpoint(two / "last.pt")
    assert (len(mid["ranks"]), mid["step"], mid["epoch"], mid["partial"]["micro_done"]) == (1, 10, 1, 4)
    assert mid["loader_seed"] == 9  # the recipe's seed 0 + the resumed checkpoint's step 8 + 1
    again, whole = tmp_path / "again", tmp_path / "whole"
    shutil.copytree(two, again)
    shutil.copytree(two, whole)
    assert "stopped at step 11" in run_cli(*on_one, "--out", again, "--stop-after-steps", "11").stdout
    for out in (again, whole):
        assert "process(es) from a checkpoint" not in run_cli(*on_one, "--out", out).stdout
    left, right = load_checkpoint(whole / "last.pt"), load_checkpoint(again / "last.pt")
    assert left["step"] == right["step"] == 12
    assert all(torch.equal(v, right["model"][k]) for k, v in left["model"].items())
    assert _epoch_rows(whole) == _epoch_rows(again) and [r["epoch"] for r in _epoch_rows(whole)] == [1, 2]

    # 56 images in 3 views each: 7 steps an epoch on 1 process and on 2 (an epoch is the data set's
    # images however many processes share it: floor(56 / 8) = floor(28 / 4)). Stopped 1 step into
    # epoch 2 on 1, the run takes epoch 2's 6 other steps on 2, and its LR ends where the schedule
    # of 7 steps an epoch ends.
    data = write_demo(tmp_path / "data56", seed=1, train_per_class=14, val_per_class=2, num_classes=4)
    one = tmp_path / "one"
    repeats = ("--set", "aug_repeats=3")
    run_cli("train", "tiny", "--data", data, "--out", one, "--device", "cpu", "--stop-after-steps", "8", *repeats)
    proc = _torchrun("--data", data, "--out", one, "--resume", "auto", *repeats)
    assert "resumed on 2 process(es) from a checkpoint of 1" in proc.stdout
    state = load_checkpoint(one / "last.pt")
    assert len(state["ranks"]) == 2 and state["step"] == 8 + 6 and state["loader_seed"] == 9
    rows, r = _epoch_rows(one), load_recipe("tiny")
    assert [row["epoch"] for row in rows] == [1, 2] and all(0 < row["train_loss"] < 10 for row in rows)
    assert rows[-1]["lr"] == lr_at(2 * 7 - 1, 7, 2, r["lr"], r["warmup_epochs"], r["warmup_lr"], r["min_lr"])


def test_a_run_resumes_over_a_listing_with_a_file_taken_out(tiny_data, tmp_path):
    """A run stopped by a broken file is told to remove or replace it. Removed, the listing holds an
    image fewer, and the checkpoint's loader position fitted no loader ("the saved loader position
    does not fit this loader (images 48 -> 47)", exit 2). Now its loaders start anew, as on another
    number of processes: the same step and epoch, the epoch's remaining steps taken (5 an epoch
    now: 2 pipelines' parts of 23 images, batches of 8), the note said, the run then resuming
    exactly over its new listing."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    run = ("train", "tiny", "--data", data, "--out", tmp_path / "run", "--device", "cpu", "--threads", "1")
    run_cli(*run, "--stop-after-steps", "4")  # 6 steps an epoch over 48 images
    sorted((data / "train" / "n01_vstripes").iterdir())[0].unlink()
    proc = run_cli(*run, "--resume", "auto", "--stop-after-steps", "7")
    assert "resumed over 47 train images where the checkpoint's loaders listed 48 (files added or removed since)" \
        in proc.stdout and "stopped at step 7" in proc.stdout
    proc = run_cli(*run, "--resume", "auto")
    assert "train images where" not in proc.stdout
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["step"] == 4 + 1 + 5 and [row["epoch"] for row in _epoch_rows(tmp_path / "run")] == [1, 2]


@pytest.mark.parametrize("rank,world,accumulate,micro_done", [(0, 1, 2, 6), (0, 1, 4, 8), (1, 2, 2, 6)])
def test_a_resharded_epoch_carries_its_loss_so_far_as_its_mean(rank, world, accumulate, micro_done):
    """The arithmetic behind the reshard above: a checkpoint of 2 processes, 3 steps of 2
    micro-batches into its epoch with loss sums 3 and 5 (mean 8 / 12), continued by `world`
    processes of `accumulate` micro-batches a step and 12 micro-batches an epoch. The steps taken
    carry over (at least one left: 3 steps of 4 is the whole epoch, so 2), the new loader is told
    how far in it is, and rank 0 holds the mean times the micro-batches that now count as done on
    every process, so the epoch's train loss (all ranks' sums / (micro-batches x processes)) is
    the mean so far weighted by what is done."""
    from types import SimpleNamespace

    from fastrsb.distributed import Dist
    from fastrsb.parts import Schedule
    from fastrsb.run_state import Position, _resharded_position
    told = []
    run = SimpleNamespace(d=Dist(rank=rank, world=world), schedule=Schedule(12, accumulate, {}),
                          train_data=SimpleNamespace(continue_epoch_at=told.append))
    state = {"ranks": [{"epoch_loss_sum": 3.0}, {"epoch_loss_sum": 5.0}], "grad_accum_steps": 2}
    pos = _resharded_position(run, state, Position(epoch=1, step=9, micro_done=6, loss_sum=3.0))
    assert (pos.epoch, pos.step, pos.micro_done, told) == (1, 9, micro_done, [micro_done])
    assert pos.loss_sum == (pytest.approx(8 / 12 * micro_done * world) if rank == 0 else 0.0)


def test_nproc_runs_as_torchrun_and_ctrl_c_stops_it_resumably(distributed_run, tiny_data, tmp_path, capfd):
    """`fastrsb train --nproc 2` starts the processes itself. Ctrl-C, as a terminal sends it, reaches
    the launcher and both processes, and the launcher forwards it too: each process gets it twice,
    takes it as one stop, and the run saves, says how to continue, and continues to the same end
    as torchrun's uninterrupted run."""
    whole, _ = distributed_run
    args = [sys.executable, "-m", "fastrsb", "train", "tiny", "--data", tiny_data, "--out", tmp_path, "--device",
            "cpu", "--threads", "1", "--log-every", "1", "--nproc", "2"]
    proc = subprocess.Popen(list(map(str, args)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a terminal's job
    for line in proc.stderr:
        if line.startswith("epoch 1/2 1/6"):
            os.killpg(proc.pid, signal.SIGINT)
            break
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert stderr.count("SIGINT received") == 1 and "Traceback" not in stderr  # one line, from local rank 0
    hint = next(line for line in stdout.splitlines() if line.startswith("continue with: "))
    words = hint.removeprefix("continue with: ").split()
    assert words[:3] == ["fastrsb", "train", "tiny"] and words[-4:] == ["--nproc", "2", "--resume", "auto"]
    assert 1 <= load_checkpoint(tmp_path / "last.pt")["step"] < 12
    assert run_cli("runs", tmp_path).stdout.splitlines()[2].endswith(") (SIGINT)")  # rank 0's train.log says why
    assert run_cli(*words[1:]).returncode == 0
    left, right = load_checkpoint(whole / "last.pt"), load_checkpoint(tmp_path / "last.pt")
    assert right["step"] == 12 and all(torch.equal(v, right["model"][k]) for k, v in left["model"].items())
    assert _epoch_rows(whole) == _epoch_rows(tmp_path)
    # A run its processes refuse ends with their exit code (torchrun would say 1), and the refusal
    # is said once: rank 1's "rank 0 cannot resume (its message says why)" is left out, since
    # rank 0's message is on the same terminal.
    capfd.readouterr()
    other = run_cli("train", "tiny", "--data", tiny_data, "--out", tmp_path, "--device", "cpu", "--threads", "1",
                    "--set", "lr=0.1", "--nproc", "2", "--resume", "auto", check=False)
    assert other.returncode == 2
    said = capfd.readouterr().err  # (the processes write to the terminal's stderr, not run_cli's)
    assert said.count("fastrsb: error:") == 1 and "another recipe (lr " in said, said
    log = (tmp_path / "train.log").read_text()  # a start each (rank 0's lines), none for the refused one
    assert log.count("===== ") == 2 and log.count("fastrsb: SIGINT received") == 1 and "another recipe" not in log


def _two_machines(tmp_path, *args, check=True):
    """torchrun as on two machines of one process each (node ranks 0 and 1, a static rendezvous on
    this host), each in a working folder of its own: a relative --out is then a folder each
    machine holds alone, as a run folder on a machine's local disk is. The rendezvous port is one
    the system had free a moment before; another process can take it meanwhile, so a run whose
    store found its port taken is run again on another (up to three tries)."""
    for _ in range(3):
        outputs, codes = _two_machines_once(tmp_path, *args)
        if not any("address already in use" in output.lower() for output in outputs):
            break
    if check:
        assert not any(codes), "\n".join(outputs)
        return outputs
    return outputs, codes


def _two_machines_once(tmp_path, *args):
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    procs = []
    for node in (0, 1):
        (tmp_path / f"machine{node}").mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}",
               "-m", "fastrsb", "train", "tiny", "--device", "cpu", "--threads", "1", "--out", "run", *map(str, args)]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path / f"machine{node}", stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=180)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError("the two machines' run did not finish (out of step?)")
    return outputs, [p.returncode for p in procs]


def test_two_machines_resume_from_rank_0s_own_run_folder(tiny_data, tmp_path):
    """Only rank 0 writes the run folder, so a multi-node run whose --out is on rank 0's machine
    alone resumes from there: rank 0 reads the checkpoint and sends it to every rank (tested as two
    machines whose run folders are different folders). The result is the uninterrupted run's.
    (Compared with a two-machine run, not the one-machine run above: gloo reduces across machines
    in another order, and the losses differ in the last bits.)"""
    _two_machines(tmp_path / "whole", "--data", tiny_data)
    first = _two_machines(tmp_path / "stopped", "--data", tiny_data, "--stop-after-steps", "8")
    assert "stopped at step 8" in first[0] and "continue with: torchrun --nnodes=2 --nproc_per_node=1 -m" in first[0]
    rank0, rank1 = tmp_path / "stopped/machine0/run", tmp_path / "stopped/machine1/run"
    assert (rank0 / "last.pt").is_file() and not (rank1 / "last.pt").exists()
    _two_machines(tmp_path / "stopped", "--data", tiny_data, "--resume", "auto")
    whole = tmp_path / "whole/machine0/run"
    left, right = load_checkpoint(whole / "last.pt"), load_checkpoint(rank0 / "last.pt")
    assert right["step"] == 12 and all(torch.equal(v, right["model"][k]) for k, v in left["model"].items())
    assert _epoch_rows(whole) == _epoch_rows(rank0)


def test_two_machines_stop_together_on_a_start_up_error(tiny_data, tmp_path):
    """A start-up check that fails on one machine only (its copy of the data missing; a run folder
    on rank 0's machine that holds a run; a file its loader cannot decode) stops both at once,
    each saying why: torchrun does not
    stop the other machines, which waited for the failed process for 30 minutes before."""
    (tmp_path / "machine0").mkdir()
    shutil.copytree(tiny_data, tmp_path / "machine0/data")  # machine 1 has no copy of the data
    outputs, codes = _two_machines(tmp_path, "--data", "data", check=False)
    assert all(codes), outputs
    assert "the start-up checks (data folder, run folder) failed on rank(s) 1" in outputs[0], outputs[0]
    assert "data folder data does not exist" in outputs[1], outputs[1]

    shutil.copytree(tiny_data, tmp_path / "machine1/data")
    (tmp_path / "machine0/run").mkdir(exist_ok=True)  # rank 0 made it before rank 1 failed
    (tmp_path / "machine0/run/metrics.jsonl").write_text("{}\n")
    outputs, codes = _two_machines(tmp_path, "--data", "data", check=False)
    assert all(codes) and "run already holds a run" in outputs[0] and "failed on rank(s) 0" in outputs[1], outputs

    # Truncated JPEGs (they pass the header scan) in machine 1's copy only: its loader fails as it
    # decodes its first batches, and rank 0 says so instead of a traceback from the process group.
    (tmp_path / "machine0/run/metrics.jsonl").unlink()
    for victim in sorted((tmp_path / "machine1/data/train").glob("*/*.JPEG"))[::3]:
        victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 3])
    outputs, codes = _two_machines(tmp_path, "--data", "data", check=False)
    assert all(codes) and "cannot decode" in outputs[1], outputs[1]
    assert "opening the data loaders failed on rank(s) 1" in outputs[0] and "[rank0]: Traceback" not in outputs[0], outputs[0]


def test_two_machines_stop_together_on_a_mid_run_error(tiny_data, tmp_path):
    """A file that fails to decode on one machine mid-run (a validation image of its last batch,
    which no start-up decode reaches) stops that machine with its name, and the other names it
    too (FailureNotice) instead of a traceback from the process group (gloo) or a wait for the
    process group's timeout (NCCL)."""
    for node in (0, 1):
        shutil.copytree(tiny_data, tmp_path / f"machine{node}/data")
    # 20 validation images in sorted order, 10 a rank in batches of 4, 4 and 2: rank 1's last image.
    victim = sorted((tmp_path / "machine1/data/val").glob("*/*.JPEG"))[-1]
    victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 3])
    outputs, codes = _two_machines(tmp_path, "--data", "data", check=False)
    assert all(codes), outputs
    assert "epoch 1/2" in outputs[0] and f"cannot decode data/val/{victim.parent.name}/{victim.name}" in outputs[1]
    said = said_errors(outputs[0])
    assert said and said[0].startswith("fastrsb: error: rank 1 (") and "stopped: cannot decode" in said[0], outputs[0]
    assert said[0].endswith("; rank 0 stops with it") and "[rank0]: Traceback" not in outputs[0], outputs[0]


def test_eval_of_the_ema_weights(tiny_data, uninterrupted, tmp_path):
    last = _epoch_rows(uninterrupted)[-1]
    result = json.loads(run_cli("eval", uninterrupted / "last.pt", "--data", tiny_data, "--ema", "--json",
                                "--batch-size", "8").stdout)
    assert result["ema"] and result["top1"] == pytest.approx(last["ema_top1"])
    state = load_checkpoint(uninterrupted / "last.pt")
    del state["ema"]
    torch.save(state, tmp_path / "plain.pt")
    proc = run_cli("eval", tmp_path / "plain.pt", "--data", tiny_data, "--ema", check=False)
    assert proc.returncode == 2 and "no EMA weights" in proc.stderr


def test_checkpoint_from_before_a_recipe_key_was_added_resumes(tiny_data, tmp_path):
    """A checkpoint written before `cuda_graphs`, `high_priority_stream`, `initial_checkpoint` and
    `aug_repeats_across_ranks` existed holds a recipe without them: it resumes as the value such a
    run had (false, none, views in one batch: in one process, where they could go nowhere else,
    whatever the recipe says now), instead of "trained with another recipe"."""
    first = _train(tiny_data, tmp_path, stop_after_steps=2)
    assert first["stopped"]
    state = load_checkpoint(tmp_path / "last.pt")
    for key in ("cuda_graphs", "high_priority_stream", "initial_checkpoint", "aug_repeats_across_ranks"):
        del state["recipe"][key]
    for key in ("spread_views", "format"):  # its loader positions were an earlier fastrsb's too
        del state["ranks"][0]["loader"]["fingerprint"][key]
    torch.save(state, tmp_path / "last.pt")
    assert not _train(tiny_data, tmp_path, resume="auto").get("stopped")


def test_a_speed_only_key_may_change_on_resume(tiny_data, tmp_path):
    """cuda_graphs, high_priority_stream and compile change how fast a run computes, not what: a
    run saved with the first two on (a GPU) continues with them off (here, the CPU), one saved with
    compile off (where it failed) continues with it on, and the reverse; any other key is refused."""
    _train(tiny_data, tmp_path, stop_after_steps=2)
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["recipe"]["compile"]
    state["recipe"].update(cuda_graphs=True, high_priority_stream=True, compile=False)
    torch.save(state, tmp_path / "last.pt")
    state["recipe"]["smoothing"] = 0.3
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(UserError, match="another recipe \\(smoothing 0.3 -> "):
        _train(tiny_data, tmp_path, resume=str(tmp_path / "other.pt"))
    assert _train(tiny_data, tmp_path, resume="auto", stop_after_steps=4)["stopped"]
    assert not load_checkpoint(tmp_path / "last.pt")["recipe"]["cuda_graphs"]  # saved as it ran
    assert not train(load_recipe("tiny", [*PARTS, "compile=false"]), tiny_data, tmp_path, device="cpu", num_threads=1,
                     resume="auto").get("stopped")


def test_randaugment_form_auto_resumes_with_the_form_it_was_saved_with(tiny_data, tmp_path, monkeypatch):
    """aa_impl "auto" resolves when a run starts: resumed after the default changed (a newer
    version, another device), the run continues with the form its loader position was saved with;
    a fresh run takes the new default, and an explicit form is used as given."""
    import fastrsb.pipelines.loader as loader_module

    def saved_form(out):
        return load_checkpoint(out / "last.pt")["ranks"][0]["loader"]["fingerprint"]["aa_impl"]
    _train(tiny_data, tmp_path / "a", stop_after_steps=2)
    assert saved_form(tmp_path / "a") == "tree"
    monkeypatch.setattr(loader_module, "default_aa_impl", lambda device: "batch")
    _train(tiny_data, tmp_path / "a", resume="auto", stop_after_steps=4)
    assert saved_form(tmp_path / "a") == "tree"
    _train(tiny_data, tmp_path / "b", stop_after_steps=2)
    assert saved_form(tmp_path / "b") == "batch"
    train(load_recipe("tiny", [*PARTS, "aa_impl=torch"]), tiny_data, tmp_path / "c", device="cpu", num_threads=1,
          stop_after_steps=2)
    assert saved_form(tmp_path / "c") == "torch"


def test_a_run_saved_before_the_random_interpolation_resumes_bilinear(tiny_data, tmp_path):
    """A checkpoint of before train_interpolation (its recipe lacks the key; its crops were
    bilinear): resuming with the recipe's "random" is refused with the key named, and with
    --set train_interpolation=bilinear it continues where it stopped."""
    recipe = load_recipe("tiny", [*PARTS, "train_interpolation=bilinear"])
    train(recipe, tiny_data, tmp_path, device="cpu", num_threads=1, stop_after_steps=2)
    state = load_checkpoint(tmp_path / "last.pt")
    del state["recipe"]["train_interpolation"]
    for rank in state["ranks"]:
        for key in ("interpolation", "aa_interpolation", "format"):
            del rank["loader"]["fingerprint"][key]
    torch.save(state, tmp_path / "last.pt")
    with pytest.raises(UserError, match="another recipe \\(train_interpolation 'bilinear' -> 'random'\\)"):
        _train(tiny_data, tmp_path, resume="auto")
    assert not train(recipe, tiny_data, tmp_path, device="cpu", num_threads=1, resume="auto").get("stopped")


def test_keep_every_keeps_epochs_and_a_resume_from_an_earlier_one_redoes_the_rest(tiny_data, tmp_path, capsys):
    """--keep-every 2 of 3 epochs keeps epoch-002.pt and, the last, epoch-003.pt (hard links to
    last.pt as it was then): checkpoints eval and resume take, readable by others as torch.save's
    files are. A run resumed from epoch-002.pt drops the later ones (as it drops their metrics rows),
    keeps them again when it gets there, and ends with the weights it had (exact resume); the
    continue command it prints when stopped keeps --keep-every."""
    import stat
    from fastrsb.staging import current_umask
    out = tmp_path / "run"
    argv = ("train", "tiny", "--data", tiny_data, "--out", out, "--device", "cpu", "--threads", "1", "--set",
            "epochs=3", "--keep-every", "2")
    run_cli(*argv)
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "epoch-002.pt", "epoch-003.pt", "last.pt"]
    assert os.path.samefile(out / "epoch-003.pt", out / "last.pt")
    assert stat.S_IMODE(os.stat(out / "last.pt").st_mode) == 0o666 & ~current_umask()  # mkstemp's were 0600
    kept, rows = load_checkpoint(out / "epoch-002.pt"), _epoch_rows(out)
    assert (kept["epoch"], kept["step"], kept["validated"]) == (2, 12, True)
    assert json.loads(run_cli("eval", out / "epoch-002.pt", "--data", tiny_data, "--json").stdout)["top1"] == \
        rows[1]["top1"]
    first = load_checkpoint(out / "epoch-003.pt")
    capsys.readouterr()

    stopped = run_cli(*argv, "--resume", out / "epoch-002.pt", "--stop-after-steps", "14", check=False)
    assert "removed 1 kept checkpoint(s) of epochs after the one resumed from (epoch-003.pt)" in stopped.stdout
    assert "--keep-every 2 --set epochs=3 --resume auto" in stopped.stdout.splitlines()[-1]  # the continue command
    assert sorted(p.name for p in out.glob("epoch-*.pt")) == ["epoch-002.pt"] and len(_epoch_rows(out)) == 2
    run_cli(*argv, "--resume", "auto")
    again = load_checkpoint(out / "epoch-003.pt")
    assert all(torch.equal(value, again["model"][key]) for key, value in first["model"].items())
    assert _epoch_rows(out) == rows


def test_checkpoints_are_written_beside_the_training_from_a_copy_of_the_state(tiny_data, tmp_path, monkeypatch):
    """Rank 0 writes each checkpoint on a thread of its own (fastrsb.checkpoint_writer), from a
    copy of the state taken when the save was asked for, while the training goes on. Here every
    write first waits a second, so the next epoch's steps change the weights and LAMB's moments in
    place before it reads them: the kept epoch-001.pt still holds epoch 1's state, that of a run
    stopped after epoch 1 (a write of the live tensors held later ones). best.pt is the best
    epoch's own file (a hard link, no second write), and the run ends with its last write done."""
    import threading
    import fastrsb.run_state
    written_by, write = [], fastrsb.run_state.save_checkpoint

    def slow(state, path):
        written_by.append(threading.current_thread().name)
        time.sleep(1.0)
        write(state, path)
    monkeypatch.setattr(fastrsb.run_state, "save_checkpoint", slow)
    _train(tiny_data, tmp_path / "run", keep_every=1)
    monkeypatch.undo()
    assert set(written_by) == {"fastrsb-checkpoint-writer"} and len(written_by) == 4  # 2 epochs x (trained, validated)
    run = tmp_path / "run"
    kept = load_checkpoint(run / "epoch-001.pt")
    _train(tiny_data, tmp_path / "one", stop_after_steps=kept["step"])
    one = load_checkpoint(tmp_path / "one" / "last.pt")
    assert (kept["epoch"], kept["validated"]) == (one["epoch"], one["validated"]) == (1, True)
    for part in ("model", "ema"):
        assert all(torch.equal(value, one[part][key]) for key, value in kept[part].items()), part
    for x, y in zip(kept["optimizer"]["state"].values(), one["optimizer"]["state"].values()):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert os.path.samefile(run / "epoch-002.pt", run / "last.pt")
    rows = _epoch_rows(run)
    best = max(range(2), key=lambda i: (rows[i]["ema_top1"], -i)) + 1  # the first of the best (the EMA's: PARTS)
    assert os.path.samefile(run / "best.pt", run / f"epoch-00{best}.pt")
    assert not list(run.glob(".*.tmp"))


def test_the_checkpoint_writer_says_a_failed_write_in_the_training_thread():
    """A write that fails comes out of the next wait() (or submit(), which waits first), in the
    caller's thread, once; the writes run one at a time, in order."""
    from fastrsb.checkpoint_writer import CheckpointWriter
    writer, done = CheckpointWriter(), []

    def failing():
        raise UserError("could not write last.pt (No space left on device)")
    writer.submit(lambda: (time.sleep(0.2), done.append(1)))
    writer.submit(lambda: done.append(2))  # after the first
    writer.wait()
    assert done == [1, 2]
    writer.submit(failing)
    with pytest.raises(UserError, match="No space left"):
        writer.submit(lambda: done.append(3))
    assert done == [1, 2]  # not written after the failure
    writer.wait()  # said once


def test_a_process_that_ends_finishes_the_checkpoint_being_written(tmp_path):
    """The writer's thread is not a daemon: a process that ends while a checkpoint is written (an
    error elsewhere, the run's end) ends after the write, which leaves the checkpoint whole."""
    written = tmp_path / "last.pt"
    script = ("import time\n"
              "from pathlib import Path\n"
              "from fastrsb.checkpoint_writer import CheckpointWriter\n"
              "CheckpointWriter().submit(lambda: (time.sleep(0.5), Path(%r).write_text('whole')))\n"
              "raise SystemExit(3)\n" % str(written))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and written.read_text() == "whole", proc.stderr


def test_host_copy_keeps_what_a_checkpoint_reads_as_it_was():
    """The copy a write reads: tensors, numpy arrays, dicts, lists and tuples copied (the originals
    change in place as training goes on); a state dict keeps its type and its _metadata (the
    modules' versions, which load_state_dict reads)."""
    import collections
    import numpy as np
    from fastrsb.checkpoint_writer import host_copy
    model = torch.nn.BatchNorm2d(3)
    state = {"model": model.state_dict(), "optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}, "betas": (0.9, 0.99)},
             "ranks": [{"rng": np.arange(3), "seed": 7, "name": "a"}], "pair": (torch.zeros(2), "b")}
    copied = host_copy(state)
    model.running_mean.add_(1)
    state["optimizer"]["state"][0]["exp_avg"].mul_(5)
    state["optimizer"]["state"][0]["step"] = 3
    state["ranks"][0]["rng"][0] = 99
    state["pair"][0].add_(1)
    assert torch.equal(copied["model"]["running_mean"], torch.zeros(3))
    assert type(copied["model"]) is collections.OrderedDict and copied["model"]._metadata == state["model"]._metadata
    assert torch.equal(copied["optimizer"]["state"][0]["exp_avg"], torch.ones(3))
    assert "step" not in copied["optimizer"]["state"][0] and copied["optimizer"]["betas"] == (0.9, 0.99)
    assert copied["ranks"][0]["rng"].tolist() == [0, 1, 2] and copied["ranks"][0]["seed"] == 7
    assert type(copied["pair"]) is tuple and copied["pair"][0].tolist() == [0, 0] and copied["pair"][1] == "b"


def test_a_failed_last_write_fails_the_run_rather_than_end_it_done(tiny_data, tmp_path, monkeypatch):
    """The run's last checkpoint is written beside the training like the others: a failure of
    that write (here the 4th and last save of 2 epochs fails as a full disk would) still stops the
    run with the save's one-line error before it returns, not after a "done", and leaves the
    checkpoint before it, from which a resume finishes the run."""
    import fastrsb.run_state
    calls, write = [], fastrsb.run_state.save_checkpoint

    def fourth_fails(state, path):
        calls.append(state["epoch"])
        if len(calls) == 4:
            raise UserError(f"could not write {path} (No space left on device; 0.0 GB free on its disk): "
                            "the checkpoint there before is kept; make room, then --resume auto")
        write(state, path)
    monkeypatch.setattr(fastrsb.run_state, "save_checkpoint", fourth_fails)
    with pytest.raises(UserError, match="could not write .*last.pt \\(No space left"):
        _train(tiny_data, tmp_path)
    assert calls == [1, 1, 2, 2]
    kept = load_checkpoint(tmp_path / "last.pt")
    assert (kept["epoch"], kept["validated"]) == (2, False)  # the save before the failed one
    # Room made, the resume validates epoch 2 again: its row, written before the failed save, once.
    monkeypatch.undo()
    assert _train(tiny_data, tmp_path, resume="auto")["epoch"] == 2
    assert [row["epoch"] for row in _epoch_rows(tmp_path)] == [1, 2]
