"""The recipe's global batch on any number of processes: --grad-accum-steps auto, --micro-batch,
the GPU probe's search, the CPU's memory estimate, the run card, and a group's gradient."""
import pytest
import torch
from torch import nn

from conftest import assert_user_error, run_cli
import fastrsb.accumulation
from fastrsb.accumulation import HEADROOM, candidates, choose_micro, cpu_fits, plan, saved_for_backward
from fastrsb.distributed import Dist
from fastrsb.errors import UserError
from fastrsb.loss import make_loss
from fastrsb.optim import make_optimizer
from fastrsb.parts import PlainTargets
from fastrsb.recipe import load_recipe
from fastrsb.step import TrainStep, wrap_model

A3 = {"batch_size": 2048, "mixup": 0.1, "cutmix": 1.0}


def test_auto_keeps_the_global_batch():
    assert plan(A3, 8, "auto", None, fits=None) == (1, 256)  # no probe (CPU): the whole share at once
    assert plan(A3, 1, "auto", 256, fits=None) == (8, 256)   # the paper's 2048 on one GPU
    assert plan(A3, 4, "auto", None, fits=lambda m: m <= 200) == (4, 128)  # largest divisor of 512 that fits
    assert plan(A3, 2, 4, None, fits=None) == (4, 256)


def test_the_probe_search_takes_the_largest_that_fits_in_few_tries():
    tried = []

    def fits(micro):
        tried.append(micro)
        return micro <= 96
    assert choose_micro(2048, even=True, fits=fits) == 64  # the even divisors of 2048: ..., 128, 64, ...
    assert len(tried) <= 6
    assert candidates(12, even=True) == [12, 6, 4, 2] and candidates(12, even=False)[-1] == 1
    with pytest.raises(UserError, match="not even a micro-batch of 2 images fits"):
        choose_micro(8, even=True, fits=lambda m: False)
    tried.clear()
    assert choose_micro(2048, even=True, fits=lambda m: tried.append(m) or True) == 2048 and tried == [2048]


@pytest.mark.parametrize("even", [True, False])
def test_the_probe_search_finds_the_largest_that_fits_at_every_limit(even):
    """Whatever the largest micro-batch that fits, the search lands on it (a divisor of 360: 24 of
    them, 12 even)."""
    options = candidates(360, even)
    for limit in options:
        assert choose_micro(360, even, fits=lambda m: m <= limit) == limit


def test_mixing_pairs_images_so_its_micro_batches_are_even():
    """Mixup or cutmix alone pair a micro-batch's images (timm's mixup flips the batch): its
    micro-batches are even. A per-process batch with no even divisor is left whole, for the run
    to refuse saying why."""
    cutmix_only = {"batch_size": 12, "mixup": 0.0, "cutmix": 1.0}
    plain = {**cutmix_only, "cutmix": 0.0}
    assert plan(cutmix_only, 1, "auto", None, fits=lambda m: m <= 3) == (6, 2)
    assert plan({**cutmix_only, "cutmix": 0.0, "mixup": 0.2}, 1, "auto", None, fits=lambda m: m <= 3) == (6, 2)
    assert plan(plain, 1, "auto", None, fits=lambda m: m <= 3) == (4, 3)
    assert plan({**cutmix_only, "batch_size": 9}, 3, "auto", None, fits=lambda m: False) == (1, 3)


@pytest.mark.parametrize("accum,micro,fragment", [
    ("auto", 0, "--micro-batch 0"), ("auto", 3, "--micro-batch 3 does not divide the 2048 images per process"),
    (4, 128, "disagree"), (3, None, "does not split into 1 process(es) x 3"),
    (0, None, "does not split into 1 process(es) x 0 accumulation step(s)"),
])
def test_bad_splits_are_refused(accum, micro, fragment):
    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        plan(A3, 1, accum, micro, fits=None)
    with pytest.raises(UserError, match="batch_size 2048 does not split over 3 processes"):
        plan(A3, 3, accum, micro, fits=None)


def test_micro_batch_on_the_command_line_and_resume_keeps_it(tiny_data, tmp_path):
    common = ["train", "tiny", "--data", tiny_data, "--out", tmp_path, "--device", "cpu"]
    proc = run_cli(*common, "--micro-batch", "4", "--stop-after-steps", "2")
    assert "batch 8 = 1 x 2 x 4" in proc.stdout and "run card: global batch 8 = 1 process(es) x 2 micro-batch(es)" \
        in proc.stdout
    assert "--micro-batch 4" in proc.stdout  # in the command that continues the run
    resumed = run_cli(*common, "--resume", "auto")  # no --micro-batch: the checkpoint's split
    assert "batch 8 = 1 x 2 x 4" in resumed.stdout and "done: top1" in resumed.stdout
    refused = run_cli(*common[:-4], "--out", tmp_path / "x", "--device", "cpu", "--micro-batch", "0", check=False)
    assert refused.returncode == 2 and "argument --micro-batch: must be 1 or more, not 0" in refused.stderr


def test_run_card_names_the_lr_rule(tiny_data, tmp_path):
    proc = run_cli("train", "tiny", "--data", tiny_data, "--out", tmp_path, "--device", "cpu", "--set", "batch_size=16",
                   "--stop-after-steps", "1")
    assert ("not rescaled for batch 16 (recipe tiny: batch 8, LR 0.008; timm's rule for LAMB, the square root of "
            "the batch ratio, would give 0.0113, a linear one 0.016: --set lr= to choose)") in proc.stdout
    same = run_cli("train", "tiny", "--data", tiny_data, "--out", tmp_path / "b", "--device", "cpu",
                   "--stop-after-steps", "1")
    assert "(recipe tiny's, for its batch 8)" in same.stdout
    assert ("augmentation: crops resampled bilinear or bicubic at random, no RandAugment, mixup 0.1 / cutmix 1 "
            "with probability 1") in same.stdout
    torch_form = run_cli("train", "tiny", "--data", tiny_data, "--out", tmp_path / "c", "--device", "cpu",
                         "--set", "aa=rand-m6-mstd0.5-inc1", "--set", "aa_impl=torch", "--set", "aug_repeats=2",
                         "--set", "mixup=0", "--set", "cutmix=0", "--set", "train_interpolation=bicubic",
                         "--stop-after-steps", "1")
    assert ("augmentation: crops and RandAugment's geometric ops resampled bicubic, RandAugment rand-m6-mstd0.5-inc1 "
            "(torch form), 2 views of each image, side by side in one process's batch, no mixup or cutmix"
            ) in torch_form.stdout


@pytest.mark.parametrize("split", [[], ["--micro-batch", "8"]])
def test_a_train_set_smaller_than_one_step_is_refused(tiny_data, tmp_path, split):
    """48 images against a batch of 64: whether split into micro-batches or not, the same message,
    before a step (accumulated, it would have trained on steps of 48 images at the LR of 64)."""
    proc = run_cli("train", "tiny", "--data", tiny_data, "--out", tmp_path, "--device", "cpu",
                   "--set", "batch_size=64", *split, check=False)
    assert_user_error(proc, "the 48 train images (48 a process over 1) do not fill one optimizer step of "
                            "batch_size 64 (64 images a process)", "--set batch_size")
    assert not (tmp_path / "last.pt").exists()


def test_the_cpu_estimate_is_linear_in_the_images_and_leaves_the_model_as_it_was(monkeypatch):
    from fastrsb.model import make_model
    model = make_model("resnet10t", 4).to(memory_format=torch.channels_last)
    before, rng = {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()
    at = {n: saved_for_backward(model, n, 32) for n in (2, 4, 8)}
    assert at[8] - at[4] == 2 * (at[4] - at[2]) > 0  # a part per image and a fixed part
    # Per image at least the input and the first convolution's output, 32 channels at 16 x 16 in float32.
    assert at[4] - at[2] > 2 * 4 * (3 * 32 * 32 + 32 * 16 * 16)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # BatchNorm statistics too
    assert torch.equal(torch.get_rng_state(), rng)
    # A convolution keeps its input and its weight for the backward: the weight, held anyway, is not counted.
    assert saved_for_backward(nn.Conv2d(3, 8, 3, bias=False), 2, 32) == 2 * 3 * 32 * 32 * 4

    class TwoViews(nn.Module):  # two views of one tensor kept for the backward: one tensor's memory
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x * self.scale + x.view(x.shape) * self.scale
    assert saved_for_backward(TwoViews(), 2, 32) == 2 * 3 * 32 * 32 * 4
    weights = sum(p.numel() * 4 for p in model.parameters())
    need = 3 * weights + at[2] + 4 * (at[4] - at[2]) / 2  # 6 images, with gradients and LAMB's moments
    fits = cpu_fits(model, 32, available=int(need / HEADROOM) + 1)
    assert fits(6) and not fits(7)
    assert not cpu_fits(model, 32, processes=2, available=int(need / HEADROOM) + 1)(6)  # two processes share it
    assert fits.where == (f"in the {(int(need / HEADROOM) + 1) / 2**30:.1f} GiB of memory left",
                          "a machine with more memory")
    assert cpu_fits(model, 32, processes=2, available=2**31).where == ("in the 2.0 GiB of memory left to 2 processes",
                                                                       "fewer processes")
    monkeypatch.setattr(fastrsb.accumulation, "memory_available", lambda: None)
    assert cpu_fits(model, 32)(10**6)  # where no memory figure can be read, nothing is split


def test_a_batch_beyond_the_cpus_memory_is_split_not_killed(tiny_data, tmp_path, monkeypatch):
    """On the CPU a step that runs out of memory is killed by the kernel without a word: with 6
    images' worth of memory left, the tiny recipe's batch of 8 runs as 2 micro-batches of 4."""
    from fastrsb.model import make_model
    model = make_model("resnet10t", 4).to(memory_format=torch.channels_last)
    at_2, at_4 = saved_for_backward(model, 2, 32), saved_for_backward(model, 4, 32)
    need = 3 * sum(p.numel() * 4 for p in model.parameters()) + at_2 + 4 * (at_4 - at_2) / 2
    monkeypatch.setattr(fastrsb.accumulation, "memory_available", lambda: int(need / HEADROOM))
    common = ["train", "tiny", "--data", tiny_data, "--device", "cpu", "--stop-after-steps", "1"]
    split = run_cli(*common, "--out", tmp_path / "a").stdout
    assert "batch 8 = 1 x 2 x 4" in split
    assert (f"micro-batches of 4: the largest that fits in the {need / HEADROOM / 2**30:.1f} GiB of memory left with "
            "20% headroom (--micro-batch to choose)") in split
    assert "batch 8 = 1 x 1 x 8" in run_cli(*common, "--out", tmp_path / "b", "--micro-batch", "8").stdout  # as asked
    monkeypatch.setattr(fastrsb.accumulation, "memory_available", lambda: 2**20)
    assert_user_error(run_cli(*common, "--out", tmp_path / "c", check=False),
                      "not even a micro-batch of 2 images fits in the 0.0 GiB of memory left with 20% headroom")


def test_the_memory_left_is_the_least_of_the_machines_and_its_cgroups(tmp_path):
    """A SLURM job's limit sits on a cgroup above the process's own (v2: job_1 above step_0), or on
    v1's memory controller; /proc/meminfo's MemAvailable where no cgroup says less."""
    from fastrsb.accumulation import memory_available
    gib = 2**30
    proc, cgroups = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal: {200 * gib // 1024} kB\nMemAvailable: {100 * gib // 1024} kB\n")
    (proc / "self" / "cgroup").write_text("0::/job_1/step_0\n")
    (cgroups / "job_1" / "step_0").mkdir(parents=True)
    (cgroups / "job_1" / "step_0" / "memory.max").write_text("max\n")
    (cgroups / "job_1" / "step_0" / "memory.current").write_text(f"{gib}\n")
    (cgroups / "job_1" / "memory.max").write_text(f"{8 * gib}\n")
    (cgroups / "job_1" / "memory.current").write_text(f"{3 * gib}\n")
    assert memory_available(proc, cgroups) == 5 * gib
    (cgroups / "job_1" / "memory.max").write_text("max\n")
    assert memory_available(proc, cgroups) == 100 * gib  # no limit: the machine's
    (proc / "self" / "cgroup").write_text("12:cpu,cpuacct:/job_2\n5:memory:/job_2\n0::/\n")  # v1 beside v2
    (cgroups / "memory" / "job_2").mkdir(parents=True)
    (cgroups / "memory" / "job_2" / "memory.limit_in_bytes").write_text(f"{4 * gib}\n")
    (cgroups / "memory" / "job_2" / "memory.usage_in_bytes").write_text(f"{gib}\n")
    (cgroups / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert memory_available(proc, cgroups) == 3 * gib
    (proc / "self" / "cgroup").write_text("5:memory,hugetlb:/job_2\n")  # v1's memory mounted with another controller
    assert memory_available(proc, cgroups) == 3 * gib
    (cgroups / "memory" / "job_2" / "memory.usage_in_bytes").write_text(f"{5 * gib}\n")  # over its limit: none left
    assert memory_available(proc, cgroups) == 0
    # A container with a cgroup namespace of its own sees its cgroup as "/": its limit sits at the mount's top.
    (proc / "self" / "cgroup").write_text("0::/\n")
    (cgroups / "memory.max").write_text(f"{4 * gib}\n")
    (cgroups / "memory.current").write_text(f"{gib}\n")
    assert memory_available(proc, cgroups) == 3 * gib
    assert memory_available(tmp_path / "none", tmp_path / "none") is None


def test_a_group_of_micro_batches_has_the_whole_batchs_gradient():
    """Each micro-batch's loss divided by the group's size, as timm's train.py divides by its
    accumulation steps: the gradients of 2 micro-batches of 4 are those of the batch of 8 in one.
    (The gradients are compared: LAMB normalizes its update, so the weights alone would barely show
    a missing division. A model without BatchNorm, whose statistics are a micro-batch's.)"""
    recipe = load_recipe("tiny")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4))
    step = TrainStep(wrap_model(model, Dist(), "cpu", compile_model=False),
                     make_optimizer(model, recipe), torch.amp.GradScaler("cpu", enabled=False), make_loss(recipe),
                     PlainTargets(4, recipe["smoothing"]), "cpu", None)
    images, labels = torch.randn(8, 3, 16, 16), torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    step.accumulate(images, labels, group=1, last=True)
    whole = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    for k in range(2):
        step.accumulate(images[4 * k:4 * k + 4], labels[4 * k:4 * k + 4], group=2, last=k == 1)
    for (name, param), expected in zip(model.named_parameters(), whole):
        assert torch.allclose(param.grad, expected, rtol=1e-5, atol=1e-7), name
