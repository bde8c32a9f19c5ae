"""An epoch's peak memory (fastrsb.peak_memory) on the CPU: the kernel's high-water mark of the
process, reset at each epoch's start. (The GPU's figures: tests/test_gpu.py.)"""
import numpy as np

from fastrsb import peak_memory
from fastrsb.distributed import Dist

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
