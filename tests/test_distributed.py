"""FailureNotice: a rank that fails mid-run stops the others, however they are blocked."""
import subprocess
import sys
import textwrap
from datetime import timedelta

import pytest
import torch.distributed as dist

from fastrsb.distributed import Dist, FailureNotice
from fastrsb.errors import UserError

BLOCKED_RANK = textwrap.dedent("""
    import sys, time
    from datetime import timedelta
    import torch.distributed as dist
    from fastrsb.distributed import Dist, FailureNotice
    store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), is_master=False, timeout=timedelta(seconds=30))
    with FailureNotice(Dist(rank=0, world=2), store):
        print("training", flush=True)
        time.sleep(120)  # as a main thread blocked in an NCCL collective, waiting for a rank that has gone
    print("woke up after two minutes", flush=True)
""")


def test_a_blocked_rank_stops_when_another_rank_fails():
    """The store is a real TCPStore, as torchrun's; the rank is a process of its own whose main
    thread sleeps. Its notice thread finds rank 1's message and ends the process, exit 2."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    rank0 = subprocess.Popen([sys.executable, "-c", BLOCKED_RANK, str(store.port)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert rank0.stdout.readline().strip() == "training"
        store.set(FailureNotice.KEY, "rank 1 (node7) stopped: cannot decode val/x.JPEG")
        out, err = rank0.communicate(timeout=60)
    finally:
        rank0.kill()
    assert rank0.returncode == 2, err
    assert "fastrsb: error: rank 1 (node7) stopped: cannot decode val/x.JPEG; rank 0 stops with it" in err
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
