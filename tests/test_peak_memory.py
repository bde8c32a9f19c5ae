"""An epoch's peak memory (fastrsb.peak_memory) on the CPU: the kernel's high-water mark of the
process, reset at each epoch's start, and an epoch split by a stop and a resume measured in both
of its processes; the GPU's branch on counters set as a GPU would give them. (The GPU's own
figures: tests/test_gpu.py.)"""
import json

import numpy as np
import torch

from fastrsb import peak_memory
from fastrsb.distributed import Dist
from fastrsb.recipe import load_recipe
from fastrsb.train import train

MiB = 2 ** 20


def test_the_peak_is_the_processs_and_an_epoch_starts_it_anew():
    before = peak_memory.resident_peak_bytes()
    block = np.ones(300 * MiB // 8)  # 300 MiB, every page touched
    held = peak_memory.resident_peak_bytes()
    assert held >= before and held >= 300 * MiB
    # The epoch's figure is that peak (a few pages more at most: reading it allocates a little).
    assert held <= peak_memory.epoch_peak("cpu", Dist())["peak_memory_gib"] * 2**30 <= held + 16 * MiB
    del block
    peak_memory.reset("cpu")  # a new epoch: the 300 MiB held before it are not its peak
    assert peak_memory.resident_peak_bytes() <= held - 200 * MiB


def test_without_procs_figures_nothing_is_claimed(tmp_path):
    missing = tmp_path / "no-proc"
    peak_memory.reset("cpu", missing)  # not Linux, or not permitted: no error
    assert peak_memory.resident_peak_bytes(missing) is None
    assert peak_memory.describe({"peak_memory_gib": None}, "cpu") == ""


def test_the_epoch_lines_words():
    assert peak_memory.describe({"peak_memory_gib": 11.234}, "cuda") == ", peak memory 11.23 GiB a GPU"
    assert peak_memory.describe({"peak_memory_gib": 0.5}, "cpu") == ", peak memory 0.50 GiB a process"
    # A GPU whose process NVML does not list (some containers): torch's own figure, named as such.
    assert (peak_memory.describe({"peak_memory_gib": None, "peak_torch_gib": 7.0}, "cuda")
            == ", peak memory of torch's tensors 7.00 GiB a GPU")


def test_the_gpu_figures_are_torchs_peak_reserve_plus_what_lies_outside_it(monkeypatch):
    """The GPU branch, on torch's and NVML's counters as a GPU would give them (a GPU is lent for
    minutes, rarely: a slip here should cost a CPU test, not a GPU run): the peak reserve plus what
    NVML counts outside torch's current reserve (DALI's pools, the CUDA context), torch's peak of
    live tensors beside; NVML silent, the process's figure unknown and torch's still given; an
    epoch's start resets torch's peaks."""
    import fastrsb.device
    counters = dict(memory_reserved=6 * 2**30, max_memory_reserved=8 * 2**30, max_memory_allocated=5 * 2**30)
    for name, value in counters.items():
        monkeypatch.setattr(torch.cuda, name, lambda value=value: value)
    monkeypatch.setattr(fastrsb.device, "process_gpu_bytes", lambda: int(9.5 * 2**30))  # 3.5 GiB outside torch
    assert peak_memory.epoch_peak("cuda", Dist()) == {"peak_memory_gib": 11.5, "peak_torch_gib": 5.0}
    monkeypatch.setattr(fastrsb.device, "process_gpu_bytes", lambda: None)  # NVML missing or not permitted
    figures = peak_memory.epoch_peak("cuda", Dist())
    assert figures == {"peak_memory_gib": None, "peak_torch_gib": 5.0}
    assert peak_memory.describe(figures, "cuda") == ", peak memory of torch's tensors 5.00 GiB a GPU"
    resets = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: resets.append(1))
    peak_memory.reset("cuda")
    assert resets == [1]


def test_an_epochs_parts_are_merged():
    part = {"peak_memory_gib": 2.0, "peak_torch_gib": 1.0}
    assert peak_memory.merged(None, part) == part  # the epoch began in this process
    assert peak_memory.merged({"peak_memory_gib": 3.0, "peak_torch_gib": 0.5}, part) == {
        "peak_memory_gib": 3.0, "peak_torch_gib": 1.0}
    # A part whose figure is not known (a checkpoint of before 2026-12-04) leaves the epoch's unknown.
    assert peak_memory.merged({"train_loss": 0.7}, part) == {"peak_memory_gib": None, "peak_torch_gib": None}
    assert peak_memory.merged({"peak_memory_gib": 3.0}, {"peak_memory_gib": None}) == {"peak_memory_gib": None}


def _epoch_peaks(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["peak_memory_gib"] for r in rows if r["kind"] == "epoch"]


def _edit_partial_peak(checkpoint, peak, seconds):
    state = torch.load(checkpoint, weights_only=True)
    assert state["partial"]["peak"]["peak_memory_gib"] > 0.1  # the part before the stop, measured and saved
    assert 0 < state["partial"]["seconds"] < 1000
    state["partial"]["seconds"] = seconds
    if peak is None:  # as a checkpoint of before 2026-12-04 holds it: no figure
        del state["partial"]["peak"]
    else:
        state["partial"]["peak"] = {"peak_memory_gib": peak}
    torch.save(state, checkpoint)


def test_an_epoch_stopped_and_resumed_has_the_peak_and_the_time_of_both_parts(tiny_data, tmp_path, capsys):
    """A preempted job's epoch: the peak of its part before the stop is saved in the checkpoint and
    counts in the epoch's figure after the resume (here a part before the stop made to have peaked
    at 1000 GiB, which the resumed process never reaches: the figure is that part's). A checkpoint
    that holds no such figure leaves the epoch's unknown rather than the resumed part's alone. The
    part's training seconds count too (made 1000 s here): the epoch's train_seconds are both parts'."""
    def run(out, **kwargs):
        return train(load_recipe("tiny"), tiny_data, out, device="cpu", num_threads=1, log_every=1, **kwargs)

    for peak, expected in ((1000.0, 1000.0), (None, None)):
        out = tmp_path / str(peak)
        assert run(out, stop_after_steps=1)["stopped"]  # mid-way through epoch 1
        _edit_partial_peak(out / "last.pt", peak, seconds=1000.0)
        capsys.readouterr()
        run(out, resume="auto")
        first, second = _epoch_peaks(out)
        assert first == expected and 0.1 < second < 1000  # the next epoch is this process's alone
        seconds = [r["train_seconds"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                   if r["kind"] == "epoch"]
        assert seconds[0] > 1000 and seconds[1] < 1000
        line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch 1: "))
        assert ("peak memory 1000.00 GiB a process" in line) == (peak is not None)
        assert ("peak memory" in line) == (peak is not None)
