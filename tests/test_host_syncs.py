"""No host-device sync per training step: the trainer reads a value back from the device only at
log steps, stops and epoch ends. On a GPU each such read stalls the host until the queued work has
run, so one per step would cost the overlap of loader and step that the trainer is built for.

Checked on the CPU, where CI runs, by watching the aten ops a CUDA host would have to wait for
(`_local_scalar_dense` is `.item()`, `bool()`, `float()` of a tensor; `nonzero`, `masked_select`,
`unique` and boolean indexing size their output by the data). A host read that dispatches no op on
the CPU (`.tolist()` or `.numpy()` of a CPU tensor) is not seen here: the GPU test
`test_torch_rand_augment_on_the_gpu_is_the_cpus_and_never_syncs` and the profile's blocking-call
summary (`benchmarks/throughput.py --profile`) cover the GPU side."""
import collections
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import run_cli

SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
           "equal", "is_nonzero", "repeat_interleave"}


class HostReads(TorchDispatchMode):
    """Counts the ops that would make a CUDA host wait, each by the fastrsb line that asked."""

    def __init__(self):
        super().__init__()
        self.sites = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))
        if name in SYNCING or bool_index:
            ours = [f for f in traceback.extract_stack()[:-1] if "/fastrsb/" in f.filename]
            site = f"{ours[-1].filename.rsplit('/', 1)[-1]}:{ours[-1].lineno}" if ours else "elsewhere"
            self.sites[f"{name} at {site}"] += 1
        return func(*args, **(kwargs or {}))


def host_reads(*argv) -> collections.Counter:
    with HostReads() as watch:
        run_cli(*argv)
    return watch.sites


@pytest.mark.parametrize("accumulate", [False, True])
def test_training_reads_back_from_the_device_only_at_log_steps(tiny_data, tmp_path, accumulate):
    """Two runs that stop within their first epoch, after 2 and after 9 optimizer steps, without a
    log step between: every host read of the longer run is one the shorter run made too (start-up,
    the stop's log line, the saved loss sum). A read per step, per micro-batch, in the mixing, the
    loss, LAMB, the EMA or the torch RandAugment form would add 7 or more. Eager (the compiled
    step's graph holds the same ops, and a sync in it would be a graph break, which
    test_step.py's compile test refuses)."""
    recipe = ["--device", "cpu", "--set", "compile=false", "--set", "epochs=4", "--set", "model_ema=true",
              "--set", "aa=rand-m9-mstd0.5-inc1", "--set", "aa_impl=torch", "--log-every", "1000"]
    if accumulate:  # 12 steps an epoch of two micro-batches of 2
        recipe += ["--set", "batch_size=4", "--grad-accum-steps", "2"]
    else:  # 24 steps an epoch of one batch of 2
        recipe += ["--set", "batch_size=2", "--grad-accum-steps", "1"]
    short = host_reads("train", "tiny", "--data", tiny_data, "--out", tmp_path / "short", *recipe,
                       "--stop-after-steps", "2")
    long = host_reads("train", "tiny", "--data", tiny_data, "--out", tmp_path / "long", *recipe,
                      "--stop-after-steps", "9")
    assert long == short, f"host reads that grow with the steps: {long - short}"
    assert sum(short.values()) > 0, "the watch saw none: the stop's log line reads the loss back"
