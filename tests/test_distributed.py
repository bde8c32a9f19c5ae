"""FailureNotice: a rank that fails mid-run, or dies without a word, stops the others, however
they are blocked; and BatchNorm's statistics averaged across ranks."""
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from conftest import said_errors
from fastrsb.distributed import Dist, FailureNotice
from fastrsb.errors import UserError

BLOCKED_RANK = textwrap.dedent("""
    import sys, time
    from datetime import timedelta
    import torch.distributed as dist
    from fastrsb.distributed import Dist, FailureNotice
    FailureNotice.POLL_SECONDS, FailureNotice.SILENT_SECONDS = float(sys.argv[3]), float(sys.argv[4])
    store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), is_master=False, timeout=timedelta(seconds=30))
    with FailureNotice(Dist(rank=int(sys.argv[2]), world=2), store):
        print("training", flush=True)
        time.sleep(120)  # as a main thread blocked in an NCCL collective, waiting for a rank that has gone
    print("woke up after two minutes", flush=True)
""")


BN_RANK = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from fastrsb.distributed import Dist, average_bn_stats
    rank, world, init, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.BatchNorm1d(2))
    with torch.no_grad():  # each rank's statistics and weights its own
        for k, tensor in enumerate(model.state_dict().values()):
            tensor.copy_(torch.arange(tensor.numel()).view_as(tensor) * (rank + 1) + 10 * k)
    average_bn_stats(model, Dist(rank=rank, world=world))
    torch.save(model.state_dict(), out)
    dist.destroy_process_group()
""")


def _gloo_ranks(script: str, world: int, folder, suffix: str) -> None:
    """`script` in `world` processes, rank r writing FOLDER/r<suffix> (a gloo group met through
    FOLDER/init); each must end well."""
    procs = [subprocess.Popen([sys.executable, "-c", script, str(rank), str(world), str(folder / "init"),
                               str(folder / f"{rank}{suffix}")], stderr=subprocess.PIPE, text=True)
             for rank in range(world)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()


def test_batchnorm_statistics_are_the_ranks_mean_as_timms_dist_bn_reduce(tmp_path):
    """After each epoch every rank holds the mean of the ranks' running means and variances (timm's
    --dist-bn reduce), and nothing else changes: the weights (DDP keeps them equal) and the step
    counts stay each rank's own."""
    world = 3
    _gloo_ranks(BN_RANK, world, tmp_path, ".pt")
    states = [torch.load(tmp_path / f"{rank}.pt") for rank in range(world)]
    averaged = 0
    for k, (name, tensor) in enumerate(states[0].items()):
        base = torch.arange(tensor.numel()).view_as(tensor)  # rank r's before: base * (r + 1) + 10 k
        for r, state in enumerate(states):
            mean = name.endswith(("running_mean", "running_var"))
            expected = base * (2 if mean else r + 1) + 10 * k  # the mean of 1, 2 and 3: 2
            assert torch.equal(state[name], expected.to(tensor.dtype)), (name, r)
            averaged += mean
    assert averaged == 2 * 2 * world  # two BatchNorms' means and variances


AGREEING_RANK = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as dist
    from fastrsb.distributed import Dist, agree, check_in_step, largest, smallest, stop_together
    rank, world, init, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    d = Dist(rank=rank, world=world)
    said = {"agree": agree([rank == 0, True, False], d), "smallest": smallest(10 - rank, d),
            "largest": largest([float(rank), -float(rank)], d)}
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(0.0)
    check_in_step(model, d)  # the same weights everywhere: nothing said
    with torch.no_grad():
        model.bias[0] += 1e-6 * (rank == 2)
    try:
        check_in_step(model, d)
    except RuntimeError as err:
        said["out_of_step"] = str(err)
    try:
        stop_together(ValueError("no data folder") if rank == 1 else None, d, "reading the data")
    except Exception as err:
        said["stopped"] = f"{type(err).__name__}: {err}"
    json.dump(said, open(out, "w"))
    dist.destroy_process_group()
""")


def test_ranks_agree_on_flags_figures_weights_and_a_stop(tmp_path):
    """What the ranks must share: a flag raised on any rank is raised on all (a stop request, a
    loss not finite), the smallest and the largest of their figures; weights that differ on one
    rank stop every rank, saying so; a check that failed on one rank stops all, the others naming it."""
    import json
    world = 3
    _gloo_ranks(AGREEING_RANK, world, tmp_path, ".json")
    for rank in range(world):
        said = json.loads((tmp_path / f"{rank}.json").read_text())
        assert said["agree"] == [True, True, False] and said["smallest"] == 8 and said["largest"] == [2.0, 0.0]
        assert said["out_of_step"].startswith(f"rank {rank}: the processes' weights differ after an epoch")
        assert said["stopped"] == ("ValueError: no data folder" if rank == 1 else
                                   "StoppedWithAnother: reading the data failed on rank(s) 1 (their messages say why)")


@pytest.mark.parametrize("launcher", ["torchrun", "fastrsb --nproc"])
def test_a_blocked_rank_stops_when_another_rank_fails(launcher):
    """The store is a real TCPStore, as torchrun's; the rank is a process of its own whose main
    thread sleeps. Its notice thread finds rank 1's message and ends the process, exit 2, saying
    it; under --nproc, where rank 1 says it on the same terminal, without a word."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    rank0 = _rank_process(store, 0, silent_seconds=120, nproc=launcher == "fastrsb --nproc")
    try:
        assert rank0.stdout.readline().strip() == "training"
        store.set(FailureNotice.KEY, "rank 1 (node7) stopped: cannot decode val/x.JPEG")
        out, err = rank0.communicate(timeout=60)
    finally:
        rank0.kill()
    assert rank0.returncode == 2, err
    said = "fastrsb: error: rank 1 (node7) stopped: cannot decode val/x.JPEG; rank 0 stops with it"
    assert (said in err) == (launcher == "torchrun") and "error" not in err.replace(said, ""), err
    assert "woke up" not in out


def test_a_failing_rank_leaves_its_message_and_a_clean_end_leaves_none():
    store = dist.HashStore()
    with FailureNotice(Dist(rank=0, world=2), store):
        pass
    assert not store.check([FailureNotice.KEY])
    with pytest.raises(ValueError):  # its own error goes on up as it is
        with FailureNotice(Dist(rank=1, world=2), store):
            raise ValueError("CUDA error: an illegal memory access\nmore lines")
    message = store.get(FailureNotice.KEY).decode()
    assert message.startswith("rank 1 (")
    assert message.endswith("stopped: ValueError: CUDA error: an illegal memory access")  # its first line
    # The other rank's collective then fails (gloo: the connection closed): it says rank 1's message.
    with pytest.raises(UserError) as caught:
        with FailureNotice(Dist(rank=0, world=2), store):
            raise RuntimeError("[gloo] Connection closed by peer")
    assert str(caught.value) == f"{message}; rank 0 stops with it"
    # A stop of its own (a UserError: a file it cannot decode, a loss all ranks found not finite)
    # is its own to say, whatever another rank said first.
    with pytest.raises(UserError, match="^loss is not finite at step 8"):
        with FailureNotice(Dist(rank=0, world=2), store):
            raise UserError("loss is not finite at step 8")
    # A second Ctrl-C (KeyboardInterrupt) or an exit is no failure to tell: the others stop their own way.
    quiet = dist.HashStore()
    for ending in (KeyboardInterrupt, SystemExit):
        with pytest.raises(ending):
            with FailureNotice(Dist(rank=1, world=2), quiet):
                raise ending()
    assert not quiet.check([FailureNotice.KEY]) and quiet.check(["fastrsb/left/1"])


def _rank_process(store, rank: int, silent_seconds: float, poll_seconds: float = 0.2,
                  nproc: bool = False) -> subprocess.Popen:
    """A rank in a process of its own, its main thread asleep inside FailureNotice: it prints
    "training" once inside. nproc: as `fastrsb train --nproc` starts it."""
    env = {**os.environ, "FASTRSB_LAUNCHED_NPROC": "2"} if nproc else None
    return subprocess.Popen([sys.executable, "-c", BLOCKED_RANK, str(store.port), str(rank), str(poll_seconds),
                             str(silent_seconds)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.parametrize("nproc", [False, True])
def test_a_blocked_rank_stops_when_another_rank_dies_without_a_word(nproc):
    """Rank 1 is killed as the kernel's OOM killer kills (SIGKILL: no handler, no message). Rank 0,
    blocked as in a collective, finds its heartbeat silent and stops, naming it and its machine,
    instead of waiting for NCCL's timeout. Under `fastrsb train --nproc` too, where the ranks that
    learn of a failure from the store leave it to the rank that found it to say: here rank 0."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    rank0, rank1 = (_rank_process(store, rank, silent_seconds=2, nproc=nproc) for rank in (0, 1))
    try:
        assert rank1.stdout.readline().strip() == "training" and rank0.stdout.readline().strip() == "training"
        time.sleep(3)  # both beating: longer than the silence that counts as death
        assert rank0.poll() is None and rank1.poll() is None
        rank1.send_signal(signal.SIGKILL)
        out, err = rank0.communicate(timeout=60)
    finally:
        rank0.kill(), rank1.kill()
    assert rank0.returncode == 2, err
    said = said_errors(err)
    assert len(said) == 1 and said[0].startswith(f"fastrsb: error: rank 1 ({socket.gethostname()}) has not been "
                                                 "heard from for "), err
    assert said[0].endswith("its machine is gone; rank 0 stops with it") and "woke up" not in out
    assert store.get(FailureNotice.KEY).decode() in said[0]  # told to every rank through the store


def _look(notice: FailureNotice, start: float, seconds: float) -> str | None:
    """The watcher's looks every POLL_SECONDS from `start` for `seconds`: the last look's verdict."""
    looks = int(seconds / FailureNotice.POLL_SECONDS)
    verdicts = [notice.silent(now=start + k * FailureNotice.POLL_SECONDS) for k in range(1, looks + 1)]
    assert not any(verdicts[:-1]), verdicts  # nothing before the last
    return verdicts[-1]


def test_heartbeat_silence_is_counted_from_the_last_beat_seen():
    """The ring's arithmetic on an explicit clock: rank 0 watches rank 1 (and rank 1 rank 0)."""
    store = dist.HashStore()
    watcher, watched = FailureNotice(Dist(rank=0, world=2), store), FailureNotice(Dist(rank=1, world=2), store)
    limit, poll = FailureNotice.SILENT_SECONDS, FailureNotice.POLL_SECONDS
    assert watcher.silent(now=0.0) is None  # first look: the clock starts, beaten or not
    assert _look(watcher, 0.0, limit - poll) is None
    message = watcher.silent(now=limit)  # a rank that never beat is silent too
    assert message.startswith("rank 1 (host unknown) has not been heard from for 120 s: ")
    watched.beat()
    assert watcher.silent(now=limit + poll) is None  # a beat: the clock starts again
    assert _look(watcher, limit + poll, limit - poll) is None
    assert watcher.silent(now=2 * limit + poll).startswith("rank 1 (host unknown) has not been heard from for 120 s")
    store.set("fastrsb/left/1", "1")  # it left the training on purpose: no more watching
    assert watcher.silent(now=10 * limit) is None and watcher.silent(now=20 * limit) is None
    assert FailureNotice(Dist(rank=0, world=1), store).silent(now=10 * limit) is None  # nothing to watch alone


def test_a_failure_found_once_the_rank_has_left_the_training_stops_nothing(monkeypatch):
    """The watcher's look finds a failure just as its own rank leaves the training (its run done,
    or stopping its own way): it does not end the process; a look while training does."""
    monkeypatch.setattr(FailureNotice, "POLL_SECONDS", 0.01)
    message = "rank 1 (node7) stopped: cannot decode x.JPEG"
    for leaving in (True, False):
        notice, stops = FailureNotice(Dist(rank=0, world=2), dist.HashStore()), []

        def failure(notice=notice, leaving=leaving):
            if leaving:
                notice._quiet.set()  # between the look and its verdict
            return message

        def stop(text, quiet=False, notice=notice, stops=stops):  # in place of os._exit(2)
            stops.append(text)
            notice._quiet.set()
        monkeypatch.setattr(notice, "failure", failure)
        monkeypatch.setattr(notice, "_stop", stop)
        notice._watch()
        assert stops == ([] if leaving else [message])


def test_more_processes_on_a_machine_than_gpus_is_said_before_any_gpu_is_touched(monkeypatch):
    from fastrsb.distributed import init_distributed
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("a GPU was touched"))
    with pytest.raises(UserError, match=r"^LOCAL_RANK 1 but only 1 GPU\(s\) visible: --nproc_per_node must not "
                                        "exceed the GPUs per node$"):
        init_distributed("cuda")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed("cuda") == Dist()  # one process: no process group, whatever the device


def test_a_store_that_does_not_answer_is_no_news_of_the_watched_rank():
    """Where the store fails to answer (its machine gone: the store's own watch says so), the
    watched rank is not taken for dead for it, however long."""
    class Unanswered:
        def add(self, key, amount):
            raise RuntimeError("Connection reset by peer")
    watcher = FailureNotice(Dist(rank=0, world=2), Unanswered())
    assert all(watcher.silent(now=k * FailureNotice.POLL_SECONDS) is None for k in range(200))


def test_a_job_suspended_and_resumed_is_not_taken_for_dead():
    """SLURM's suspend stops every process of the job; on resume the clock has jumped while no one
    beat. One look after the jump is not silence: the watched rank beats again within a poll."""
    store = dist.HashStore()
    watcher, watched = FailureNotice(Dist(rank=0, world=2), store), FailureNotice(Dist(rank=1, world=2), store)
    watched.beat()
    assert watcher.silent(now=0.0) is None
    assert watcher.silent(now=3600.0) is None  # an hour suspended: one look since
    watched.beat()  # resumed: it beats
    assert watcher.silent(now=3603.0) is None
    assert watcher.store_gone(now=watcher._answered + 3600) is None  # the store's watch alike: one look


def test_leaving_marks_the_rank_as_left_and_keeps_the_first_failure():
    store = dist.HashStore()
    with FailureNotice(Dist(rank=1, world=3), store):
        assert store.get("fastrsb/host/1").decode() == socket.gethostname()
        assert store.add("fastrsb/beat/1", 0) == 1  # its first beat, on entering
        assert not store.check(["fastrsb/left/1"])
    assert store.check(["fastrsb/left/1"])
    store.set(FailureNotice.KEY, "rank 2 (node9) has not been heard from for 125 s: ...")
    with pytest.raises(UserError):
        with FailureNotice(Dist(rank=0, world=3), store):
            raise UserError("cannot decode val/y.JPEG")
    assert store.get(FailureNotice.KEY).decode().startswith("rank 2 (node9)")  # the first cause stays


STORE_SERVER = textwrap.dedent("""
    import sys, time
    from datetime import timedelta
    import torch.distributed as dist
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    print(store.port, flush=True)
    time.sleep(300)
""")


def test_a_blocked_rank_stops_when_the_store_goes_with_its_machine():
    """The store (torchrun's agent on the first machine holds it) is killed: the rank, blocked as
    in a collective, finds that its beats go unanswered and stops, saying so, instead of waiting
    for NCCL's timeout."""
    server = subprocess.Popen([sys.executable, "-c", STORE_SERVER], stdout=subprocess.PIPE, text=True)
    ranks = []
    try:
        port = int(server.stdout.readline())
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30))
        ranks = [_rank_process(store, rank, silent_seconds=2) for rank in (0, 1)]
        assert all(rank.stdout.readline().strip() == "training" for rank in ranks)
        time.sleep(3)  # both beating, answered: longer than the silence that counts
        assert all(rank.poll() is None for rank in ranks)
        server.kill()
        errors = [rank.communicate(timeout=60)[1] for rank in ranks]
    finally:
        server.kill()
        for rank in ranks:
            rank.kill()
    for number, (rank, err) in enumerate(zip(ranks, errors)):
        assert rank.returncode == 2, err
        said = said_errors(err)
        assert len(said) == 1 and said[0].startswith("fastrsb: error: the rendezvous store has not answered for "), err
        assert said[0].endswith(f"which holds it, or the network to it is gone; rank {number} stops with it")


def test_the_store_is_gone_once_it_has_not_taken_a_beat_for_the_silence(monkeypatch):
    store = dist.HashStore()
    notice = FailureNotice(Dist(rank=2, world=4), store)
    limit = FailureNotice.SILENT_SECONDS
    start = notice._answered
    looks = round(limit / FailureNotice.POLL_SECONDS)
    assert not any(notice.store_gone(now=start + limit - 1) for _ in range(2 * looks))  # too soon, however often
    notice.beat()  # answered: the clock and the looks start again
    assert not any(notice.store_gone(now=notice._answered + limit + 1) for _ in range(looks - 1))
    monkeypatch.setenv("MASTER_ADDR", "node0")
    assert notice.store_gone(now=notice._answered + limit + 1).startswith(
        f"the rendezvous store has not answered for {limit + 1:.0f} s: the first machine (node0), which holds it")
    monkeypatch.setenv("FASTRSB_LAUNCHED_NPROC", "4")  # started by `fastrsb train --nproc 4`: its store
    assert notice.store_gone(now=notice._answered + limit + 2).endswith(
        ": the `fastrsb train --nproc` process that holds it is gone (killed?)")


# `python -m fastrsb` with torch.distributed's destroy_process_group watched: how many DDP wrappers
# are still alive as the process group goes.
WATCHED_END = textwrap.dedent("""
    import atexit, gc, os, sys
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    destroy = dist.destroy_process_group

    def watched(*args, **kwargs):
        alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
        print(f"DDP wrappers alive as the process group goes: {alive}", flush=True)
        return destroy(*args, **kwargs)
    dist.destroy_process_group = watched
    from fastrsb.cli import main
    code = main(sys.argv[1:])
    atexit._run_exitfuncs()  # as fastrsb/__main__.py ends a process of several
    sys.stdout.flush()
    os._exit(code)
""")


@pytest.mark.parametrize("ending,fails", [(["--stop-after-steps", "2"], False), (["--set", "lr=1e9"], True)])
def test_a_run_lets_go_of_ddp_before_its_process_group(tiny_data, tmp_path, ending, fails):
    """Stopped, or failed (a loss gone to inf: a UserError through train()): DDP's reducer holds
    the process group from C++, and were it the group's last holder, a finished run could hang
    in gloo's destructor (torch 2.11: fastrsb.distributed.shutdown). So no DDP wrapper is left
    when the group goes, on either rank. (A failed run's first rank to exit has torchrun end the
    other, which may not reach that point: every rank that does counts none.)"""
    script = tmp_path / "watched.py"
    script.write_text(WATCHED_END)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           "train", "tiny", "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--device", "cpu",
           "--threads", "1", "--log-every", "1", *ending]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    counts = re.findall(r"DDP wrappers alive as the process group goes: (\d+)", proc.stdout)
    assert counts and set(counts) == {"0"} and (fails or len(counts) == 2), proc.stdout + proc.stderr
    assert (proc.returncode != 0) == fails, proc.stderr
    if fails:
        assert "no checkpoint was written before it (a lower --set lr" in " ".join(said_errors(proc.stderr))
