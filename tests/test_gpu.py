"""The GPU paths: run wherever an NVIDIA GPU is at hand (skipped without one)."""
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def

from conftest import run_cli_process

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]

# The compiled torch RandAugment form's tests run it at the shape the GPU loader compiles for A3 (a
# chunk of 64 images at 160 px, uint8 in, float16 out; any rand-mN-mstd0.5-inc1: the magnitude is
# drawn, not compiled): benchmarks/gpu_checks.sh compiles that first (check 3), and inductor's cache
# then serves the tests' compiles in seconds. At shapes of their own each took 100-180 s of a GPU
# session's 15 minutes from a cold cache at c5b2a17. (Ragged last chunks: the CPU tests'.)
A3_CHUNK, A3_SIZE = 64, 160


@pytest.fixture(scope="module")
def a3_chunk_data(tmp_path_factory):
    """A data set of one A3_CHUNK batch an epoch (4 classes of 16 train images)."""
    from fastrsb.demo_data import write_demo
    return write_demo(tmp_path_factory.mktemp("data") / "chunk", seed=1, train_per_class=A3_CHUNK // 4,
                      val_per_class=1, num_classes=4)


def test_gpu_train_loader_with_randaugment_and_repeats(tiny_data):
    from fastrsb.pipelines import train_loader
    # batch 8 with 3 repeats: ceil(8 / 3) images a batch, the surplus view cut on the GPU too
    loader = train_loader(tiny_data / "train", batch_size=8, img_size=32, device="cuda", seed=1,
                          aa="rand-m9-mstd0.5-inc1", repeats=3)
    batches = []
    for step, (images, labels) in enumerate(loader):
        assert images.is_cuda and labels.is_cuda and images.dtype == torch.float16
        assert images.shape == (8, 3, 32, 32) and images.is_contiguous(memory_format=torch.channels_last)
        batches.append((images.clone(), labels.clone()))
        if step == 1:
            state = loader.state_dict()
        if step == 3:
            break
    # Resumed from the position after batch 1: batches 2 and 3 again, pixel for pixel.
    resumed = train_loader(tiny_data / "train", batch_size=8, img_size=32, device="cuda", seed=1,
                           aa="rand-m9-mstd0.5-inc1", repeats=3, state=state)
    for (want_images, want_labels), (images, labels) in zip(batches[2:], resumed):
        assert torch.equal(labels, want_labels) and torch.equal(images, want_images)


@pytest.mark.parametrize("aa_impl", ["tree", "torch"])
def test_gpu_loader_resized_goes_on_as_one_restored_at_the_new_size(tiny_data, aa_impl):
    """Progressive resizing on the GPU: resize() between epochs gives what a loader started at the
    new size from the position gives, pixel for pixel (the torch form captured as a CUDA graph,
    made anew at the new size)."""
    from fastrsb.pipelines import train_loader
    options = dict(batch_size=8, device="cuda", seed=3, aa="rand-m9-mstd0.5-inc1", aa_impl=aa_impl,
                   cuda_graphs=aa_impl == "torch")
    resized = train_loader(tiny_data / "train", img_size=32, **options)
    for _ in resized:  # one epoch at 32 px
        pass
    restored = train_loader(tiny_data / "train", img_size=48, state=resized.state_dict(), **options)
    resized.resize(48)
    for (images, labels), (want_images, want_labels) in zip(resized, restored):
        assert images.shape == (8, 3, 48, 48) and images.is_cuda
        assert torch.equal(labels, want_labels) and torch.equal(images, want_images)


def test_gpu_loader_takes_the_current_gpu_by_its_index(tiny_data):
    """device="cuda:N" (or a torch.device) for the current GPU is "cuda"; another GPU is refused,
    naming set_device, since the loader's torch work runs on the current one."""
    from fastrsb.pipelines import DatasetError, train_loader, val_loader
    current = torch.cuda.current_device()
    for device in (f"cuda:{current}", torch.device("cuda", current)):
        images, labels = next(iter(val_loader(tiny_data / "val", 4, 32, 0.95, device=device)))
        assert images.device == labels.device == torch.device("cuda", current)
    with pytest.raises(DatasetError, match=rf"call torch.cuda.set_device\({current + 1}\) first"):
        train_loader(tiny_data / "train", 4, 32, device=f"cuda:{current + 1}")


@pytest.mark.parametrize("name", ["AutoContrast", "ContrastIncreasing", "ColorIncreasing", "SolarizeAdd", "Rotate",
                                  "SharpnessIncreasing"])
def test_gpu_ops_match_the_cpu_ops(name, tiny_data):
    """The GPU variants (arithmetic where the CPU uses fused operators; Color: DALI's saturation on
    the GPU, a fixed-point blend on the CPU) against the CPU ones."""
    from PIL import Image
    from fastrsb.pipelines.randaugment import OPS
    files = sorted((tiny_data / "train").glob("*/*.JPEG"))[:8]
    images = [np.asarray(Image.open(f).convert("RGB").resize((48, 48))) for f in files]

    def run(device):
        @pipeline_def(batch_size=len(images), num_threads=2, device_id=0 if device == "gpu" else None,
                      enable_conditionals=True)
        def one():
            x = fn.external_source(source=[images], layout="HWC")
            signed = fn.external_source(source=[[np.float32(7.0)] * len(images)])
            return OPS[name](x.gpu() if device == "gpu" else x, signed, 48)
        (out,) = one().run()
        out = out.as_cpu() if device == "gpu" else out
        return np.stack([np.asarray(o) for o in out]).astype(int)

    assert np.abs(run("gpu") - run("cpu")).mean() < 1.0


def test_short_compiled_gpu_run(a3_chunk_data, tmp_path):
    """The recipe's compile on the GPU: the model, LAMB and the torch RandAugment form, each
    compiled once for the run. Batches of A3_CHUNK images at A3_SIZE px: inductor's cache serves
    the torch form's compile."""
    from fastrsb.device import amp_dtype
    proc = run_cli_process("train", "tiny", "--data", a3_chunk_data, "--out", tmp_path, "--device", "cuda",
                           "--set", "aa=rand-m6-mstd0.5-inc1", "--set", "aa_impl=torch", "--set", "epochs=3",
                           "--set", f"batch_size={A3_CHUNK}", "--set", f"img_size={A3_SIZE}", "--log-every", "2")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert len(epochs) == 3 and all(r["val_images"] == 4 for r in epochs)
    amp = str(amp_dtype("cuda", True)).removeprefix("torch.")  # bfloat16, or float16 on GPUs without bf16
    assert f"1 x cuda {amp} compiled" in proc.stdout and "(torch form, compiled)" in proc.stdout
    assert "compiling: the first steps wait for torch.compile" in proc.stdout
    # Steady state: the fixed-shape train step and augment compile once (eval runs eager).
    assert proc.stderr.count("Recompiling") == 0, proc.stderr
    # Each epoch's peak: torch's reserve and DALI's pools above torch's live tensors (NVML there).
    for r in epochs:
        assert 0 < r["peak_torch_gib"] < r["peak_memory_gib"] < torch.cuda.get_device_properties(0).total_memory / 2**30
        assert f"peak memory {r['peak_memory_gib']:.2f} GiB a GPU" in proc.stdout


def test_gpu_batch_kept_across_later_ones_is_not_overwritten(tiny_data):
    from fastrsb.pipelines import train_loader
    batches = iter(train_loader(tiny_data / "train", batch_size=8, img_size=32, device="cuda", seed=2))
    kept, _ = next(batches)
    copy = kept.clone()
    for _ in range(5):
        next(batches)
    torch.cuda.synchronize()
    assert torch.equal(kept, copy)


def test_gpu_two_pipelines_take_turns_and_join_their_rests(tiny_data):
    """Two GPU pipelines: their whole batches are those of one-pipeline loaders on the parts, as
    DALI made them (no copy), in turns; their rests are joined on the GPU into each reshuffle's last
    batch, into a second epoch; batches kept meanwhile keep their values (DALI's buffers held
    until the GPU has used them)."""
    from fastrsb.pipelines import train_loader
    def loader(pipelines, batch_size=16, **shard):
        return train_loader(tiny_data / "train", batch_size=batch_size, img_size=32, device="cuda", seed=5,
                            pipelines=pipelines, **shard)
    two = loader(2)
    assert len(two) == 3  # 48 images: a whole batch of 16 from each part of 24, their rests of 8 joined
    def stream(loader):  # batch after batch, across epochs
        while True:
            yield from loader
    turns = stream(two)
    wholes = [stream(loader(1, shard_id=k, num_shards=2)) for k in range(2)]
    eighths = [stream(loader(1, batch_size=8, shard_id=k, num_shards=2)) for k in range(2)]
    kept = []
    for step in range(6):
        images, labels = next(turns)
        rests = [next(part)[1] for part in eighths]
        if step % 3 < 2:
            x, y = next(wholes[step % 3])
            assert torch.equal(labels, y) and torch.equal(images, x)
        else:
            assert images.is_cuda and labels.tolist() == torch.cat(rests).tolist()
        if step in (0, 2):
            kept.append((images, images.clone()))
    torch.cuda.synchronize()
    assert all(torch.equal(batch, copy) for batch, copy in kept)


@pytest.mark.parametrize("config", ["rand-m6-mstd0.5-inc1", "rand-m9-mstd0.5"])
def test_gpu_batch_wide_randaugment_matches_the_cpu(config, tiny_data):
    """The batch-wide RandAugment on the GPU: every op on the whole batch (sample j draws op j),
    against the same graph on the CPU (which tests/test_randaugment.py compares with timm)."""
    from PIL import Image
    from fastrsb.pipelines.randaugment import _apply_drawn_batched, _policy, parse_rand_augment
    spec = parse_rand_augment(config)
    count = len(_policy(spec)[0]) + 1
    files = sorted((tiny_data / "train").glob("*/*.JPEG"))
    images = [np.asarray(Image.open(files[j % len(files)]).convert("RGB").resize((48, 48))) for j in range(count)]

    def run(device):
        @pipeline_def(batch_size=count, num_threads=2, device_id=0 if device == "gpu" else None)
        def wide():
            x = fn.external_source(source=[images], layout="HWC")
            index = fn.external_source(source=[[np.int64(j) for j in range(count)]])
            signed = fn.external_source(source=[[np.float32(7.5 * (-1) ** j) for j in range(count)]])
            return _apply_drawn_batched(x.gpu() if device == "gpu" else x, spec, index, signed, 48)
        (out,) = wide().run()
        out = out.as_cpu() if device == "gpu" else out
        return [np.asarray(o).astype(int) for o in out]

    for j, (gpu, cpu) in enumerate(zip(run("gpu"), run("cpu"))):
        assert np.abs(gpu - cpu).mean() < 1.0, j
    assert np.array_equal(run("gpu")[-1], images[-1].astype(int))  # no op: untouched on the GPU too


def _geometric_photos(tiny_data, count):
    from PIL import Image
    files = sorted((tiny_data / "train").glob("*/*.JPEG"))
    return [np.asarray(Image.open(files[j % len(files)]).convert("RGB").resize((48, 48))) for j in range(count)]


@pytest.mark.parametrize("form", ["tree", "batch"])
def test_geometric_resampling_on_the_gpu_follows_each_draw(form, tiny_data):
    """The DALI forms' geometric ops on the GPU, bilinear or bicubic as each sample drew (the
    tree: a conditional; batch-wide: both warps, picked per sample): every geometric op on four
    samples, two of them bicubic, each exactly as the op alone makes it on the GPU with its
    interpolation, the bilinear ones as the CPU's graph makes them (within a level); two samples of
    no op, untouched. (The bicubic warp itself is the GPU's own kernel: the next test.)"""
    from nvidia.dali import types
    from fastrsb.pipelines.randaugment import GEOMETRIC, _apply_drawn, _apply_drawn_batched, _policy, geometric, \
        parse_rand_augment
    spec = parse_rand_augment("rand-m9-mstd0.5-inc1")
    ordered = _policy(spec)[0]
    indices = [ordered.index(name) for name in GEOMETRIC for _ in range(4)] + [len(ordered)] * 2
    cubic = [j % 2 == 0 for j in range(len(indices))]
    images = _geometric_photos(tiny_data, len(indices))
    apply = _apply_drawn if form == "tree" else _apply_drawn_batched

    def run(device):
        @pipeline_def(batch_size=len(indices), num_threads=2, device_id=0 if device == "gpu" else None,
                      enable_conditionals=True)
        def drawn():
            x = fn.external_source(source=[images], layout="HWC")
            x = x.gpu() if device == "gpu" else x
            index = fn.external_source(source=[[np.int64(i) for i in indices]])
            signed = fn.external_source(source=[[np.float32(7.5 * (-1) ** (j // 2)) for j in range(len(indices))]])
            resample = fn.external_source(source=[[np.bool_(c) for c in cubic]])
            first = ordered.index(GEOMETRIC[0])
            return (apply(x, spec, index, signed, 48, resample),
                    *(geometric(x, signed, 48, index - first, GEOMETRIC, interp)
                      for interp in (types.INTERP_LINEAR, types.INTERP_CUBIC)))
        outs = drawn().run()
        return [[np.asarray(o).astype(int) for o in (out.as_cpu() if device == "gpu" else out)] for out in outs]

    (gpu, linear, bicubic), (cpu, _, _) = run("gpu"), run("cpu")
    gaps = [np.abs(gpu[j] - cpu[j]).mean() for j in range(len(indices))]
    for j in range(len(indices) - 2):
        assert np.array_equal(gpu[j], (bicubic if cubic[j] else linear)[j]), (j, gaps)
        if not cubic[j]:
            assert gaps[j] < 1.0, (j, gaps)
    for j in (-2, -1):
        assert np.array_equal(gpu[j], images[j].astype(int))


@pytest.mark.parametrize("name", ["Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"])
def test_gpu_bicubic_warp_is_catmull_rom_and_near_timms(name, tiny_data, monkeypatch):
    """DALI's bicubic warp on the GPU is CV-CUDA's, whose cubic is Catmull-Rom (a = -0.5), where the
    CPU's is OpenCV's (a = -0.75) and timm's PIL transform's a = -1: the op on the GPU is
    tests/warp_reference.py's with a = -0.5 (to a level on a few pixels), within 2.6 levels of
    timm's on average and nearer to it than the bilinear warp is (simulated with the reference on
    these images: 0.9-2.4, the CPU's 0.7-1.7). At c5b2a17 the GPU test that held the GPU's bicubic
    pixels to the CPU's (within a level) failed: Rotate differs by 1.2-1.3 levels between the two."""
    from nvidia.dali import types
    from PIL import Image
    from test_randaugment import _timm_op
    from warp_reference import bicubic_warp, op_matrix
    from fastrsb.pipelines.randaugment import FILL, geometric
    files = sorted((tiny_data / "train").glob("*/*.JPEG"))[::5][:8]  # tests/test_randaugment.py's photos
    photos = [np.asarray(Image.open(f).convert("RGB").resize((48, 48), Image.BILINEAR)) for f in files]
    for level, sign in ((3.3, -1.0), (9.5, 1.0)):
        @pipeline_def(batch_size=len(photos), num_threads=2, device_id=0)
        def both():
            x = fn.external_source(source=[photos], layout="HWC").gpu()
            signed = fn.external_source(source=[[np.float32(level * sign)] * len(photos)])
            return tuple(geometric(x, signed, 48, None, (name,), interp)
                         for interp in (types.INTERP_CUBIC, types.INTERP_LINEAR))
        cubic, linear = ([np.asarray(o).astype(int) for o in out.as_cpu()] for out in both().run())
        matrix = op_matrix(name, float(np.float32(level * sign)), 48)
        kernel = [np.abs(o - bicubic_warp(p, matrix, -0.5, FILL)) for o, p in zip(cubic, photos)]
        assert max(k.max() for k in kernel) <= 1 and np.mean([k.mean() for k in kernel]) <= 0.01, (level, sign)
        theirs = [_timm_op(name, p, level, sign, monkeypatch, Image.BICUBIC).astype(int)
                  for p in photos]
        cubic_gap, linear_gap = (np.mean([np.abs(o - t).mean() for o, t in zip(out, theirs)]) for out in (cubic, linear))
        assert cubic_gap <= 2.6 and cubic_gap < linear_gap, (level, sign, cubic_gap, linear_gap)


@pytest.mark.parametrize("speed_key", ["cuda_graphs", "high_priority_stream"])
def test_short_run_with_a_speed_key(tiny_data, tmp_path, speed_key):
    proc = run_cli_process("train", "tiny", "--data", tiny_data, "--out", tmp_path, "--device", "cuda",
                           "--set", f"{speed_key}=true", "--set", "epochs=2", "--log-every", "2")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows if r["kind"] == "log")
    if speed_key == "cuda_graphs":  # captured, not fallen back to the eager step
        assert "+ CUDA graphs" in proc.stdout and "could not be captured" not in proc.stdout, proc.stdout


def test_cuda_graphs_auto_captures_where_the_step_fits_one_graph(tiny_data, tmp_path):
    """cuda_graphs = auto on one GPU: the step captured; where each step is two micro-batches
    (gradient accumulation) the run trains uncaptured and its start-up line says why."""
    common = ("train", "tiny", "--data", tiny_data, "--device", "cuda", "--set", "cuda_graphs=auto", "--set", "epochs=2",
              "--log-every", "2")
    whole = run_cli_process(*common, "--out", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    assert "+ CUDA graphs" in whole.stdout and "could not be captured" not in whole.stdout, whole.stdout
    split = run_cli_process(*common, "--out", tmp_path / "split", "--grad-accum-steps", "2")
    assert split.returncode == 0, split.stderr
    assert "(no CUDA graphs: each step is 2 micro-batches (gradient accumulation))" in split.stdout, split.stdout
    rows = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == [1, 2]


def test_progressive_resizing_trains_each_size_compiled_and_captured(tiny_data, tmp_path):
    """A run whose crops grow between epochs, on the GPU with the recipe's compile and cuda_graphs:
    each size compiled static and its step captured anew, every epoch at its size."""
    proc = run_cli_process("train", "tiny", "--data", tiny_data, "--out", tmp_path, "--device", "cuda",
                           "--set", "epochs=3", "--set", "ramp_img_size=16", "--set", "ramp_start_epoch=1",
                           "--set", "ramp_end_epoch=3", "--set", "ramp_step=8", "--set", "cuda_graphs=true",
                           "--log-every", "2")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["img_size"]) for r in rows if r["kind"] == "epoch"] == [(1, 16), (2, 24), (3, 32)]
    assert all(math.isfinite(r["loss"]) for r in rows if r["kind"] == "log")
    assert "epoch 3: crops of 32 px from here (progressive resizing; the first steps compile for it)" in proc.stdout
    assert "could not be captured" not in proc.stdout, proc.stdout


@pytest.mark.parametrize("compiled", [False, True])
def test_graphed_step_trains_as_the_eager_step(compiled, monkeypatch):
    """cuda_graphs: the captured step (forward, loss, backward, clip, LAMB) moves the weights as
    the eager step does, step for step, with a new LR every step (the LR is read from device
    memory at each replay, not baked into the graph at capture), mixup/cutmix drawn on the host;
    and batches of a new size (progressive resizing) warmed up and captured anew."""
    from fastrsb.parts import build_training
    from fastrsb.recipe import load_recipe
    # Deterministic cuDNN, so that the two steps' convolutions agree; restored after the test,
    # passed or failed (it was reset only on success before).
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    overrides = ["amp=false", f"compile={str(compiled).lower()}"]
    eager = build_training(load_recipe("tiny", overrides), 4, "cuda")
    graphed = build_training(load_recipe("tiny", overrides + ["cuda_graphs=true"]), 4, "cuda")
    graphed.model.load_state_dict(eager.model.state_dict())
    start = [p.detach().clone() for p in eager.model.parameters()]
    generator = torch.Generator(device="cuda").manual_seed(0)
    for k in range(12):
        size = 32 if k < 5 else 48  # 3 warm-up steps, a capture, a replay; then the same at 48 px
        images = torch.randn(8, 3, size, size, device="cuda", generator=generator).contiguous(
            memory_format=torch.channels_last)
        labels = torch.randint(0, 4, (8,), device="cuda", generator=generator)
        lr = 1e-3 * (k + 1)
        losses = [t.step.single(images, labels, lr) for t in (eager, graphed)]
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-3, atol=1e-4)
    assert graphed.step.graphed.graph is not None and not graphed.step.graphed.failed
    assert graphed.step.graphed.images.shape[-1] == 48
    for before, a, b in zip(start, eager.model.parameters(), graphed.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)
    assert any(not torch.equal(before, a) for before, a in zip(start, eager.model.parameters()))


def test_graph_warm_ups_cache_one_set_of_memory():
    """A captured step's warm-up steps run on one side stream (cuda_graphs.on_side_stream), so the
    memory the first one leaves in torch's cache serves the next ones: three warm-ups reserve about
    what one does. On a fresh stream each, the allocator (which keeps a freed block for its own
    stream) would cache a set for each: the A3 step reserved 13.9 GiB for 5.9 allocated at c5b2a17."""
    from fastrsb.parts import build_training
    from fastrsb.recipe import load_recipe
    from fastrsb.step import GraphedStep
    training = build_training(load_recipe("tiny", ["amp=false", "compile=false", "cuda_graphs=true"]), 4, "cuda")
    images = torch.randn(64, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 4, (64,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    reserved = [torch.cuda.memory_reserved()]
    for _ in range(GraphedStep.WARMUP):
        training.step.single(images, labels, 1e-3)
        torch.cuda.synchronize()
        reserved.append(torch.cuda.memory_reserved())
    assert training.step.graphed.graph is None and training.step.graphed.eager_steps == GraphedStep.WARMUP
    first, later = reserved[1] - reserved[0], reserved[-1] - reserved[1]
    assert first > 0 and later <= 0.25 * first, reserved


@pytest.mark.parametrize("compiled", [False, True])
def test_captured_torch_rand_augment_is_the_eager_one(compiled):
    """The torch form replayed as a CUDA graph (the GPU loader's), compiled or not: the
    uncaptured form's pixels for every op, batch after batch, with each batch's own draws (read
    from memory at each replay, not baked into the graph), and each batch in memory of its own.
    At the loader's A3 chunk (A3_CHUNK images at A3_SIZE px: inductor's cache serves the compile)."""
    from fastrsb.pipelines import parse_rand_augment
    from fastrsb.pipelines.cuda_graphs import CapturedCall
    from fastrsb.pipelines.randaugment import _policy
    from fastrsb.pipelines.torch_augment import TorchRandAugment
    spec = parse_rand_augment("rand-m9-mstd0.5-inc1")
    augment = TorchRandAugment(spec, A3_SIZE, torch.float16, compiled=compiled)
    captured = CapturedCall(augment, "test", warmup=1)
    choices, count = len(_policy(spec)[0]) + 1, A3_CHUNK  # every op and "none", in both layers
    assert augment.chunk_images == A3_CHUNK  # CHUNK_PIXELS at A3's size: the loader's chunk
    generator = torch.Generator(device="cuda").manual_seed(0)
    outputs = []
    for k in range(4):
        images = torch.randint(0, 256, (count, A3_SIZE, A3_SIZE, 3), dtype=torch.uint8, device="cuda",
                               generator=generator)
        index = (torch.arange(count, device="cuda") + k) % choices
        signed = (torch.rand(count, device="cuda", generator=generator) - 0.5) * 20
        flip = (torch.arange(count, device="cuda") + k) % 2
        cubic = (torch.arange(count, device="cuda") // 2 + k) % 2  # bilinear or bicubic geometric ops
        draws = torch.stack([flip, index, signed, cubic, index.flip(0), -signed, 1 - cubic], 1).float()
        outputs.append((captured(images, draws), augment(images, draws)))
    assert captured.graph is not None and not captured.failed
    for got, expected in outputs:
        assert torch.equal(got, expected)
    assert outputs[-1][0].data_ptr() != outputs[-2][0].data_ptr()


@pytest.mark.parametrize("compiled", [False, True])
def test_torch_rand_augment_on_the_gpu_is_the_cpus_and_never_syncs(compiled):
    """The torch form on the GPU, compiled or not: the pixels of the CPU's eager form (which are
    timm's), and not one host sync while it runs (torch's sync debug mode turns a sync into an
    error). At the loader's A3 chunk (A3_CHUNK images at A3_SIZE px: inductor's cache serves the
    compile); the CPU's on the whole batch."""
    from fastrsb.pipelines import parse_rand_augment
    from fastrsb.pipelines.randaugment import _policy
    from fastrsb.pipelines.torch_augment import TorchRandAugment
    spec = parse_rand_augment("rand-m9-mstd0.5-inc1")
    count = A3_CHUNK
    images = torch.randint(40, 200, (count, A3_SIZE, A3_SIZE, 3), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(0)
    index = torch.randint(0, len(_policy(spec)[0]) + 1, (count, 2), generator=generator).float()
    signed = torch.rand(count, 2, generator=generator) * 20 - 10
    cubic = torch.rand(count, 2, generator=generator).round()  # bilinear or bicubic geometric ops
    draws = torch.stack([torch.rand(count, generator=generator).round(), index[:, 0], signed[:, 0], cubic[:, 0],
                         index[:, 1], signed[:, 1], cubic[:, 1]], 1)
    want = TorchRandAugment(spec, A3_SIZE, torch.float16, chunk_pixels=None)(images, draws)
    augment = TorchRandAugment(spec, A3_SIZE, torch.float16, compiled=compiled)
    gpu_images, gpu_draws = images.cuda(), draws.cuda()
    augment(gpu_images, gpu_draws)  # constants made on the device once (and the compile)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = augment(gpu_images, gpu_draws)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # One level apart at most, and almost never (a sin or cos an ulp off on the GPU can tip a
    # rotated sample's truncation): normalized, one level is 1 / (0.229 x 255) < 0.018.
    difference = (got.cpu().float() - want.float()).abs()
    assert difference.max() < 0.018 and (difference > 0).float().mean() < 1e-3


def test_gpu_batches_are_let_go_once_their_work_has_run(tiny_data):
    """A GPU loader keeps each handed-over batch until an event recorded at the next hand-over
    has completed (DALI's zero-copy buffers must not return to DALI under queued kernels), and
    then lets it go: after a sync, at most the batch whose event was just recorded is held."""
    from fastrsb.pipelines import train_loader
    loader = train_loader(tiny_data / "train", 8, 32, device="cuda", aa="rand-m9-mstd0.5-inc1", aa_impl="torch")
    batches = iter(loader)
    images, _ = next(batches)
    square = torch.randn(4096, 4096, device="cuda")
    for _ in range(50):  # ~0.1 s of GPU work queued behind the batch
        square = (square @ square).tanh()
    next(batches)  # the first batch's event waits behind that work: the batch is held
    assert len(loader._in_use._held) >= 1
    torch.cuda.synchronize()
    next(batches)
    assert len(loader._in_use._held) <= 1 and loader._in_use._last is not None


def test_step_stream_hands_dali_batches_over_in_order(tiny_data):
    """Inside step_stream the current stream is a high-priority one, DALI's batches arrive on it
    intact (the same pixels as on the default stream), and the outer stream waits for its work."""
    from fastrsb.device import step_stream
    from fastrsb.pipelines import val_loader
    want = [x.clone() for x, _ in val_loader(tiny_data / "val", 8, 40, 0.95, device="cuda")]
    outer = torch.cuda.current_stream()
    with step_stream("cuda", True):
        inner = torch.cuda.current_stream()
        assert inner != outer and inner.priority < outer.priority  # lower is higher
        got = [(x.float() * 2).half() for x, _ in val_loader(tiny_data / "val", 8, 40, 0.95, device="cuda")]
    assert torch.cuda.current_stream() == outer
    assert all(torch.equal((w.float() * 2).half(), g) for w, g in zip(want, got)) and len(got) == len(want)


def test_startup_states_gpu_memory(tiny_data, tmp_path):
    proc = run_cli_process("train", "tiny", "--data", tiny_data, "--out", tmp_path, "--device", "cuda",
                           "--set", "epochs=2", "--set", "compile=false", "--stop-after-steps", "1")  # the line only
    line = next(l for l in proc.stdout.splitlines() if l.startswith("GPU memory before the first step"))
    # Each figure apart: the loaders' (DALI's, outside torch) and the context's, which NVML gives here.
    loaders, context = (float(re.search(rf"{what} ([0-9.]+) GiB", line).group(1))
                        for what in (r"loaders \(DALI\)", "CUDA context and libraries"))
    assert 0 <= loaders < 1.5 and 0 < context and "model state" in line  # a tiny loader may round to 0.00


def test_nvml_handle_is_torchs_device():
    """NVML's handle for torch's device index is the same GPU (by UUID), whatever the numberings,
    and NVML counts this process there: more than torch's reserve (the CUDA context)."""
    import pynvml
    from fastrsb.device import nvml_handle, process_gpu_bytes
    for index in range(torch.cuda.device_count()):
        uuid = pynvml.nvmlDeviceGetUUID(nvml_handle(index))
        assert str(torch.cuda.get_device_properties(index).uuid).removeprefix("GPU-") in str(uuid)
    torch.zeros(1, device="cuda")
    assert process_gpu_bytes() > torch.cuda.memory_reserved()


def test_gpu_probe_picks_a_micro_batch_and_leaves_the_model_as_it_was():
    import timm
    from fastrsb.accumulation import gpu_fits, plan
    model = timm.create_model("resnet10t", num_classes=10).cuda().to(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.cuda.get_rng_state()
    steps, micro = plan({"batch_size": 512, "mixup": 0.1, "cutmix": 1.0}, 1, "auto", None,
                        gpu_fits(model, 64, torch.bfloat16, 10))
    assert steps * micro == 512 and micro % 2 == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert torch.equal(rng, torch.cuda.get_rng_state())


def test_doctor_on_a_gpu(tiny_data):
    proc = run_cli_process("doctor", "--data", tiny_data, "--recipe", "tiny")  # a3's batch outnumbers tiny_data
    assert "GPU 0:" in proc.stdout and "compute capability" in proc.stdout and "decodes on the GPU" in proc.stdout
    assert "hardware JPEG decoder" in proc.stdout  # a count on A100/H100/H200, "none reported" elsewhere
    if "sent " in proc.stdout:  # where there are engines, the share the loaders give them
        from fastrsb.pipelines.loader import default_hw_decoder_load
        assert f"sent {default_hw_decoder_load(0):.0%} of the JPEGs" in proc.stdout


def _kept_behind_queued_work(loader, read=lambda images: None) -> list:
    """(images, labels, read(images)) for every batch of two epochs, each kept uncloned to the end
    and asked for while the consumer's stream still has a few ms of work queued, as a trainer's
    step leaves it: a batch read before DALI wrote it, or overwritten after, would show."""
    busy, kept = torch.randn(2048, 2048, device="cuda"), []
    for _ in range(2):
        for images, labels in loader:
            kept.append((images, labels, read(images)))
            for _ in range(20):
                busy = busy @ busy / 2048 ** 0.5
    torch.cuda.synchronize()
    return kept


def _same_batches_with(tiny_data, speed: dict, **form) -> None:
    """The loader's batches with the `speed` options are those without them (labels exactly; pixels
    a level apart at most, should a kernel's float rounding differ between the two loaders: a race
    would differ wholesale), while the consumer keeps its own stream busy before asking for each
    batch (as a trainer's queued step does), reads each there at once (that first read must see
    the final pixels) and keeps every batch uncloned to the end: nothing read before DALI (and the
    torch form) wrote it, nothing overwritten after."""
    from fastrsb.pipelines import train_loader

    def batches(**extra):
        loader = train_loader(tiny_data / "train", 8, 32, device="cuda", seed=4, aa="rand-m9-mstd0.5-inc1",
                              **form, **extra)
        return _kept_behind_queued_work(loader, read=lambda images: images.float().mean()), loader.settings
    plain, _ = batches()
    changed, settings = batches(**speed)
    assert all(settings[key] == value for key, value in speed.items())
    for (want_images, want_labels, _), (images, labels, early_mean) in zip(plain, changed, strict=True):
        assert torch.equal(labels, want_labels)
        difference = (images.float() - want_images.float()).abs()
        assert difference.max() < 0.018 and (difference > 0).float().mean() < 1e-3
        assert torch.equal(early_mean, images.float().mean())


def test_gpu_loader_on_a_stream_of_its_own_hands_over_the_same_batches(tiny_data):
    """augment_stream (the torch form on the loader's own CUDA stream, repeated views included):
    the batches of the loader without it (_same_batches_with)."""
    _same_batches_with(tiny_data, dict(augment_stream=True), aa_impl="torch", repeats=2)


@pytest.mark.parametrize("form", [dict(aa_impl="tree"), dict(aa_impl="torch", repeats=2, augment_stream=True)])
def test_gpu_loader_handing_over_on_the_consumers_stream_gives_the_same_batches(tiny_data, form):
    """stream_handover (each batch bound to the stream current where it is taken, which waits for
    DALI's work on the GPU, instead of DALI's host wait): the batches of the loader without it
    (_same_batches_with), in the tree form and in the torch form on the loader's own stream
    (repeated views: the joined reshuffle rests too)."""
    _same_batches_with(tiny_data, dict(stream_handover=True), **form)


def test_gpu_loader_waits_when_its_consumer_runs_far_ahead():
    """A consumer whose thread runs ahead of its GPU (its work on each batch still queued when it
    takes the next, as with stream_handover) has the loader hold at most _UntilRun.AHEAD batches:
    it then waits for the oldest one's work, so that DALI's memory does not grow with the lead.
    Here ~40 ms of work is queued after each hand-over, which takes microseconds."""
    from fastrsb.pipelines.loader import _UntilRun
    in_use, square, held = _UntilRun(), torch.randn(4096, 4096, device="cuda"), []
    for k in range(_UntilRun.AHEAD + 3):
        in_use.hand_over([{"labels": torch.full((8,), k, device="cuda")}])
        for _ in range(20):
            square = (square @ square).tanh()
        held.append(len(in_use._held))
    assert held == [min(k, _UntilRun.AHEAD) for k in range(_UntilRun.AHEAD + 3)]


def test_gpu_loader_with_dalis_earlier_executor_hands_over_the_same_batches(tiny_data):
    """exec_dynamic=False on the GPU (DALI's pipelined executor, its batches copied into torch's
    memory on the consumer's stream): the dynamic executor's batches, in torch's memory, while
    the consumer's stream is kept busy ahead of each batch and every batch is kept to the end."""
    from fastrsb.pipelines import train_loader

    def batches(**speed):
        loader = train_loader(tiny_data / "train", 8, 32, device="cuda", seed=4, aa="rand-m9-mstd0.5-inc1",
                              aa_impl="tree", **speed)
        return _kept_behind_queued_work(loader), loader.settings
    plain, _ = batches()
    earlier, settings = batches(exec_dynamic=False)
    assert settings["exec_dynamic"] is False
    for (want_images, want_labels, _), (images, labels, _) in zip(plain, earlier, strict=True):
        assert images.is_cuda and torch.equal(images, want_images) and torch.equal(labels, want_labels)


def test_gpu_loader_with_the_captured_torch_form_is_the_uncaptured_one(a3_chunk_data):
    """cuda_graphs on the loader (the torch form compiled, then replayed as a CUDA graph): the
    batches of the same loader without either, and its settings say the graph replays. Batches of
    A3_CHUNK images at A3_SIZE px: inductor's cache serves the compile."""
    from fastrsb.pipelines import train_loader

    def batches(**speed):
        loader = train_loader(a3_chunk_data / "train", A3_CHUNK, A3_SIZE, device="cuda", seed=4,
                              aa="rand-m9-mstd0.5-inc1", aa_impl="torch", **speed)
        got = []
        while len(got) < 6:  # 2 warm-up batches, the capture, then replays (epochs of 1 batch here)
            got += [(images.clone(), labels.clone()) for images, labels in loader]
        return got[:6], loader.settings
    plain, _ = batches()
    captured, settings = batches(cuda_graphs=True, compile_augment=True)
    assert settings["augment_captured"] and settings["compile_augment"]
    for (want_images, want_labels), (images, labels) in zip(plain, captured, strict=True):
        assert torch.equal(labels, want_labels)
        # compiled on the GPU: within one level of the eager form, rarely (normalized: 1 level < 0.018)
        difference = (images.float() - want_images.float()).abs()
        assert difference.max() < 0.018 and (difference > 0).float().mean() < 1e-3


def test_gpu_busy_share_from_nvml_follows_the_work():
    """benchmarks/throughput.py's GpuBusy (every row's gpu_busy): NVML's utilization sampled while
    the GPU multiplies large matrices without pause reads high, while it sleeps reads low."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from throughput import GpuBusy
    # NVML's figure covers its last sample period (up to a second): each side runs 3 s, the idle one
    # after a second's pause, so that the edges weigh little.
    a = torch.randn(8192, 8192, device="cuda")
    with GpuBusy("cuda") as busy:
        end = time.perf_counter() + 3
        while time.perf_counter() < end:
            a = (a @ a).clamp_(-1, 1)
            torch.cuda.synchronize()
    time.sleep(1)
    with GpuBusy("cuda") as idle:
        time.sleep(3)
    assert len(busy.samples) >= 20 and busy.share > 0.6, busy.samples
    assert idle.share < 0.3, idle.samples
    assert GpuBusy("cpu").share is None


def test_gpu_loader_timed_beside_a_gpu_load(tiny_data, tmp_path):
    """throughput.py --mode loader --gpu-load: the GPU loader timed while gpu_load.GpuLoad keeps
    the GPU busy from a thread and a stream of its own; the row says what the load ran at."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import throughput
    from gpu_load import GpuLoad
    out = tmp_path / "rows.jsonl"
    throughput.main(["--mode", "loader", "--loaders", "dali-gpu", "--data", str(tiny_data / "train"), "--aa", "none",
                     "--batch-size", "4", "--steps", "6", "--gpu-load", "--json-out", str(out)])
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["loader"] == "dali-gpu" and row["images_per_sec"] > 0
    assert row["gpu_load_tflops"] > 0
    with GpuLoad(size=2048) as load:
        deadline = time.monotonic() + 60
        while load.products < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert load.products >= 8 and load.tflops > 0


@pytest.mark.parametrize("hw_decoder_load", [0.0, 1.0])  # nvJPEG's CUDA path; the hardware engines where there are
def test_gpu_decoders_ignore_exif_orientation_as_timm(tmp_path, hw_decoder_load):
    """The "mixed" decoders as the CPU's (test_pipelines.py): JPEGs tagged "rotate 90 degrees"
    give the batches of the same files untagged, in training (the crop decoder and the whole-image
    one of repeated augmentation) and validation."""
    from fastrsb.pipelines import train_loader, val_loader
    from test_pipelines import _take, assert_same_batches, sideways_copies
    tagged, plain = sideways_copies(tmp_path / "tagged", 6), sideways_copies(tmp_path / "plain", None)
    for repeats in (1, 3):
        batches = [_take(train_loader(root, 4, 32, device="cuda", repeats=repeats, seed=5,
                                      hw_decoder_load=hw_decoder_load), 3, []) for root in (plain, tagged)]
        assert_same_batches(*batches)
    val = [[next(iter(val_loader(root, 4, 40, 0.95, device="cuda", hw_decoder_load=hw_decoder_load)))]
           for root in (plain, tagged)]
    assert_same_batches(*val)


@pytest.mark.parametrize("hw_decoder_load,repeats", [(0.0, 1), (1.0, 1), (1.0, 3)])
def test_gpu_random_crops_follow_timms_law(tmp_path, hw_decoder_load, repeats):
    """The GPU's crops as the CPU's (test_pipelines.py): the crop decoder on nvJPEG's CUDA path and
    on the hardware engines, and the crops cut from one decode for repeated views (DALI's
    random_resized_crop), against timm's law of area, aspect and position."""
    from test_pipelines import assert_crops_follow_timms_law, crop_windows
    assert_crops_follow_timms_law(crop_windows(tmp_path, device="cuda", hw_decoder_load=hw_decoder_load,
                                               repeats=repeats))


def test_gpu_decoders_read_other_formats_and_16_bit_pngs_as_the_cpu(tmp_path):
    """The "mixed" decoders (nvImageCodec, whichever of its GPU or CPU codecs takes each format) as
    the CPU's (test_pipelines.py): BMP, TIFF, WebP and JPEG 2000 under .JPEG names, palette, grey +
    alpha and RGBA PNGs, progressive and CMYK JPEGs give timm's eval transform within DALI's
    resampling (as the GPU graph's eval geometry, run on the CPU, in test_pipelines.py), and train
    beside images of 1 x 1 pixel and 3,000-pixel strips; a 16-bit grey PNG is scaled to 8 bits,
    not clipped."""
    from PIL import Image
    from timm.data import create_transform
    from fastrsb.pipelines import train_loader, val_loader
    from fastrsb.pipelines.graphs import IMAGENET_MEAN, IMAGENET_STD
    from test_pipelines import other_formats
    files = other_formats(tmp_path / "formats")
    timm_eval = create_transform(40, is_training=False, crop_pct=0.95, interpolation="bicubic")
    theirs = torch.stack([timm_eval(Image.open(f).convert("RGB")) for f in files])
    (ours, _), = list(val_loader(tmp_path / "formats", 16, 40, 0.95, device="cuda", dtype="float32"))
    assert ours.shape[0] == 11 and (ours.cpu() - theirs).abs().mean() < 0.005
    # Training: the crop decoder too, with a 1 x 1 image, a 3000 x 1 strip and a 2 x 3000 column.
    for name, (height, width) in {"tiny": (1, 1), "strip": (1, 3000), "column": (3000, 2)}.items():
        Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(tmp_path / "formats" / "c" / f"{name}.JPEG")
    train = train_loader(tmp_path / "formats", 7, 32, device="cuda", aa="rand-m9-mstd0.5-inc1", hw_decoder_load=1.0)
    images = torch.cat([batch for batch, _ in train])
    assert images.shape[0] == 14 and images.isfinite().all()
    values = np.random.default_rng(1).integers(0, 65536, (32, 32), dtype=np.uint16)
    (tmp_path / "deep" / "c").mkdir(parents=True)
    Image.fromarray(values).save(tmp_path / "deep" / "c" / "x.png")
    images, _ = next(iter(val_loader(tmp_path / "deep", 1, 32, 1.0, device="cuda", dtype="float32")))
    levels = images[0].cpu() * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    # Scaled, not clipped (clipped: up to 255 levels off); v >> 8 instead of round(v / 257): 1 level.
    assert (levels - torch.from_numpy(np.round(values / 257))).abs().max() < 1.01


def test_gpu_eval_memory_floor_reads_the_gpus_free_memory():
    """`fastrsb eval`'s memory floor on the GPU, against torch.cuda.mem_get_info: a batch far past
    any GPU's memory is refused naming the GPU and a batch size to try; a small one passes."""
    from fastrsb.errors import UserError
    from fastrsb.memory_floor import refuse_a_batch_that_cannot_fit
    from fastrsb.model import make_model
    model = make_model("resnet10t", 4).cuda()
    refuse_a_batch_that_cannot_fit(model, [224], 8, "cuda", activation_bytes=2, pixel_bytes=2)
    # 4000 px in 16 bits: the stem's normalization holds 2 x 64 x 2000 x 2000 x 2 bytes, ~1.2 GB an image.
    with pytest.raises(UserError, match=r"a batch of 1024 images at 4000 px needs at least 1,\d{3}\.\d GiB .* and the "
                                        r"GPU has [\d,.]+ GiB free: --batch-size \d+ or fewer"):
        refuse_a_batch_that_cannot_fit(model, [4000], 1024, "cuda", activation_bytes=2, pixel_bytes=2)


def test_gpu_predict_gives_the_cpus_classes(tiny_data, tmp_path):
    """fastrsb predict on the GPU (the "mixed" decoders, autocast) against the CPU's: the same files
    in the same order, each class's probability within what bf16 and the decoders' resampling move,
    with --flip too; eval --per-class on the GPU counts what predict's first classes there say."""
    run_cli_process("train", "tiny", "--data", tiny_data, "--out", tmp_path, "--device", "cpu")
    found = [[json.loads(line) for line in proc.stdout.splitlines()] for proc in (
        run_cli_process("predict", tmp_path / "last.pt", tiny_data / "val", "--json", "--top", "4", "--device", "cpu"),
        run_cli_process("predict", tmp_path / "last.pt", tiny_data / "val", "--json", "--top", "4", "--device", "cuda"))]
    assert [r["file"] for r in found[1]] == [r["file"] for r in found[0]] and len(found[0]) == 20
    for cpu, gpu in zip(*found):
        by_class = {t["index"]: t["probability"] for t in gpu["top"]}
        assert [by_class[t["index"]] for t in cpu["top"]] == pytest.approx([t["probability"] for t in cpu["top"]],
                                                                           abs=0.03)
    # --flip on the GPU (the mirror of a channels-last batch in autocast) gives the CPU's --flip probabilities.
    flipped = [[json.loads(line) for line in proc.stdout.splitlines()] for proc in (
        run_cli_process("predict", tmp_path / "last.pt", tiny_data / "val", "--json", "--top", "4", "--flip",
                        "--device", "cpu"),
        run_cli_process("predict", tmp_path / "last.pt", tiny_data / "val", "--json", "--top", "4", "--flip",
                        "--device", "cuda"))]
    for cpu, gpu in zip(*flipped):
        by_class = {t["index"]: t["probability"] for t in gpu["top"]}
        assert [by_class[t["index"]] for t in cpu["top"]] == pytest.approx([t["probability"] for t in cpu["top"]],
                                                                           abs=0.03)
    assert any(abs(a["top"][0]["probability"] - b["top"][0]["probability"]) > 1e-3
               for a, b in zip(found[0], flipped[0]))  # the mirror changed the figures: the check has work
    # eval --per-class on the GPU (its (label, top-1) pairs counted by index_add_ there): each class's
    # hits and most frequent mistake are those of predict's first classes on the GPU.
    evaluated = json.loads(run_cli_process("eval", tmp_path / "last.pt", "--data", tiny_data, "--json", "--device",
                                           "cuda", "--per-class", tmp_path / "classes.csv").stdout)["per_class"]
    for c in evaluated:
        firsts = [r["top"][0]["class"] for r in found[1] if Path(r["file"]).parent.name == c["class"]]
        wrong = [name for name in firsts if name != c["class"]]
        assert c["top1"] == pytest.approx(100 * (len(firsts) - len(wrong)) / len(firsts))
        if wrong:
            assert wrong.count(c["taken_for"]) == max(map(wrong.count, wrong))
            assert c["taken_for_share"] == pytest.approx(100 * wrong.count(c["taken_for"]) / len(firsts))
        else:
            assert c["taken_for"] is None


def test_gpu_average_measures_batch_norm_anew(tiny_data, tmp_path):
    """average --bn-data on the GPU (the GPU train loader, autocast): BatchNorm's statistics near
    the CPU's measurement of the same weights over the same folder (other decoders and resampling,
    bf16: near, not equal), and the checkpoint evaluates on the GPU."""
    import shutil as files
    from fastrsb.checkpoint import load_checkpoint
    run_cli_process("train", "tiny", "--data", tiny_data, "--out", tmp_path / "run", "--device", "cpu")
    files.copy(tmp_path / "run" / "last.pt", tmp_path / "copy.pt")
    pair = (tmp_path / "run" / "last.pt", tmp_path / "copy.pt")
    run_cli_process("average", *pair, "--out", tmp_path / "cpu.pt", "--bn-data", tiny_data, "--device", "cpu")
    run_cli_process("average", *pair, "--out", tmp_path / "cuda.pt", "--bn-data", tiny_data, "--device", "cuda")
    means = {device: load_checkpoint(tmp_path / f"{device}.pt")["model"] for device in ("cpu", "cuda")}
    for key, value in means["cpu"].items():
        if key.endswith("running_mean") or key.endswith("running_var"):
            assert torch.isfinite(means["cuda"][key]).all(), key
            assert means["cuda"][key] == pytest.approx(value, rel=0.15, abs=0.05), key
    proc = run_cli_process("eval", tmp_path / "cuda.pt", "--data", tiny_data, "--device", "cuda", "--json")
    assert 0 <= json.loads(proc.stdout)["top1"] <= 100
