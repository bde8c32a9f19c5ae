"""Smoke test of benchmarks/throughput.py: a few real batches per loader on tiny generated JPEGs."""
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_synthetic_jpegs_look_like_imagenet(tmp_path):
    sys.path.insert(0, str(BENCH))
    from synthetic import synthetic_jpegs
    root = synthetic_jpegs(tmp_path, 20, classes=4, workers=2)
    files = sorted(root.rglob("*.JPEG"))
    assert len(files) == 20 and len({f.parent.name for f in files}) == 4
    sizes = [Image.open(f).size for f in files]
    assert all(150 <= min(s) and max(s) <= 700 for s in sizes)
    assert 20_000 < sum(f.stat().st_size for f in files) / len(files) < 250_000  # photo-like weight
    before = [f.stat().st_mtime_ns for f in files]
    synthetic_jpegs(tmp_path, 20, classes=4)  # cached: nothing rewritten
    assert [f.stat().st_mtime_ns for f in files] == before


LOADER = ["--mode", "loader", "--synthetic-jpegs", "24", "--img-size", "32", "--batch-size", "4", "--steps", "4",
          "--workers", "1"]


def test_loader_mode_reports_every_loader(tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    for name in ("dali-cpu", "torchvision", "timm"):  # one loader and one round: measured in this process
        _bench_here(capsys, *LOADER, "--cache", tmp_path, "--loaders", name, "--json-out", out)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["loader"] for r in lines] == ["dali-cpu", "torchvision", "timm"]
    assert lines[0]["pipelines"] == 2  # the CPU loader's default, whatever the threads
    assert {r["pixels"] for r in lines} == {"float32"}  # on the CPU every loader hands over float32, as the trainer uses
    # Warm-up covered twice the batches the queues held, and at least 5: DALI's 4 (each of its 2
    # pipelines queues 2 whole batches), 1 worker x 2 (prefetch_factor).
    assert [(r["queued_batches"], r["warmup"]) for r in lines] == [(4, 8), (2, 5), (2, 5)]
    for r in lines:
        assert r["mode"] == "loader" and r["img_size"] == 32 and r["batch_size"] == 4 and r["device"] == "cpu"
        assert r["aa"] == "rand-m6-mstd0.5-inc1"  # A3's RandAugment in every loader by default
        assert r["images_per_sec"] > 0 and r["peak_rss_gib"] > 0.05 and r["peak_pss_with_workers_gib"] > 0.05
        assert r["torch"] and r["dali"] and r["timm"] and r["device_name"]
        assert 0 < r["host_busy"] <= 1.05 and "gpu_busy" not in r  # the main thread's CPU share; no GPU here


def test_a_measurement_of_prefetched_batches_is_refused(tmp_path, capsys):
    """16 DALI CPU pipelines once printed 415,764 img/s: their 25 timed batches had been queued
    during a 5-batch warm-up. Timing that starts before the queues are consumed is refused."""
    with pytest.raises(SystemExit, match="holds 4 batches ready in its queues.*--warmup 8 or more"):
        _bench_here(capsys, *LOADER, "--cache", tmp_path, "--loaders", "dali-cpu", "--warmup", "7")
    with pytest.raises(SystemExit, match="--steps 4 or more"):
        _bench_here(capsys, *LOADER[:-4], "--steps", "3", "--workers", "1", "--cache", tmp_path, "--loaders", "dali-cpu")


def test_loader_rounds_report_each_loaders_median(tmp_path):
    """--rounds 3: the loader measured three times, each time in a process of its own (its own peak
    memory); the reported images/s is the median round, and each round's figure is kept."""
    lines, stdout = _bench(*LOADER, "--cache", tmp_path, "--loaders", "torchvision", "--aa", "none", "--rounds=3")
    (r,) = lines
    rounds = r["images_per_sec_rounds"]
    assert r["loader"] == "torchvision" and len(rounds) == 3 and all(v > 0 for v in rounds)
    assert round(r["images_per_sec"], 1) == sorted(rounds)[1]
    assert r["device_name"] and r["torch"] and "commit" in r  # the parent's context, on the child's line
    assert "ratio" in stdout and "1.00" in stdout and "median of 3 rounds" in stdout


def _bench_here(capsys, *args):
    """throughput.py's main in this process (the training modes need no process of their own)."""
    sys.path.insert(0, str(BENCH))
    import throughput
    throughput.main(list(map(str, args)))
    stdout = capsys.readouterr().out
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")], stdout


def _bench(*args, torchrun=False):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun \
        else [sys.executable]
    proc = subprocess.run([*launcher, str(BENCH / "throughput.py"), *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")], proc.stdout


TRAINING = ["--recipe", "tiny", "--img-size", "32", "--batch-size", "4", "--num-classes", "10"]


def test_step_mode_times_the_trainers_step(tmp_path, capsys):
    (r,), table = _bench_here(capsys, "--mode", "step", *TRAINING, "--steps", "2", "--warmup", "1",
                               "--set", "model=resnet18")
    assert r["mode"] == "step" and r["model"] == "resnet18" and r["loader"] == "synthetic batch"
    assert r["images_per_sec"] > 0 and r["peak_rss_gib"] > 0.1 and r["amp"] == "float32" and r["world_size"] == 1
    assert r["device_name"] and r["commit"] is not None and "img/s per process" in table
    # The step alone on the CPU: the main thread drives it, its share of the wall time near all of it
    # (torch's own threads do the arithmetic; the main thread waits for them inside each op).
    assert 0 < r["host_busy"] <= 1.05 and f"busy: host {r['host_busy']:.0%}" in table


def test_train_mode_runs_loader_mixing_and_step(tmp_path, capsys):
    (r,), _ = _bench_here(capsys, "--mode", "train", *TRAINING, "--steps", "6", "--synthetic-jpegs", "16", "--cache", tmp_path,
                          "--workers", "1", "--set", "aa=rand-m9-mstd0.5-inc1", "--set", "aug_repeats=3")
    assert r["mode"] == "train" and r["loader"] == "dali-cpu" and r["model"] == "resnet10t"
    assert r["images_per_sec"] > 0 and r["batch_size"] == 4 and r["img_size"] == 32
    # The trainer's loader, as the loader itself reports it: the recipe's RandAugment and repeats.
    assert (r["aa"], r["repeats"], r["pipelines"], r["aa_impl"]) == ("rand-m9-mstd0.5-inc1", 3, 2, "tree")
    assert "variant" not in r and "vs_step" not in r


def test_train_mode_variants_share_one_model(tmp_path, capsys):
    """--variants: the step alone and loader settings measured in turn on the model built once;
    each row says what it ran, and the loader rows their share of the step alone."""
    rows, table = _bench_here(capsys, "--mode", "train", *TRAINING, "--steps", "6", "--synthetic-jpegs", "16",
                              "--cache", tmp_path, "--workers", "1", "--set", "aa=rand-m9-mstd0.5-inc1",
                              "--variants", "step", "default", "aa_impl=batch,workers=2,prefetch=3,concurrency=full",
                              "aa_impl=torch,compile_augment=true", "step,mixing=false", "mixing=false", "aa=none,pipelines=1",
                              "--profile", tmp_path / "prof", "--profile-steps", "2")
    assert [(r["variant"], r["mode"]) for r in rows] == [("step", "step"), ("default", "train"),
                                                          ("aa_impl=batch,workers=2,prefetch=3,concurrency=full", "train"),
                                                          ("aa_impl=torch,compile_augment=true", "train"),
                                                          ("step,mixing=false", "step"), ("mixing=false", "train"),
                                                          ("aa=none,pipelines=1", "train")]
    step, default, batch, compiled, unmixed, unmixed_train, plain = rows
    assert (default["aa"], plain["aa"]) == ("rand-m9-mstd0.5-inc1", None)  # aa=none: the loader without RandAugment
    assert (default["pipelines"], plain["pipelines"]) == (2, 1)  # the CPU's 2 by default; pipelines=1
    assert step["mixing"] and default["mixing"] and not unmixed["mixing"] and not unmixed_train["mixing"]
    # each train row against the step alone that mixed as it did
    assert unmixed_train["vs_step"] == pytest.approx(unmixed_train["images_per_sec"] / unmixed["images_per_sec"], abs=1e-3)
    assert all(r["step_captured"] is None for r in rows)  # no cuda_graphs (and no GPU) here
    assert (compiled["aa_impl"], compiled["compile_augment"], default["compile_augment"]) == ("torch", True, False)
    assert (default["aa_impl"], default["num_threads"], default["prefetch_queue_depth"]) == ("tree", 1, 2)
    assert (batch["aa_impl"], batch["num_threads"], batch["prefetch_queue_depth"], batch["concurrency"]) == (
        "batch", 2, 3, "full")
    assert default["concurrency"] is None and default["stream_policy"] is None  # DALI's own defaults
    assert batch["warmup"] == 2 * 2 * 3  # 2 pipelines queue 3 each, twice: the guard follows the variant
    for r in (default, batch):
        assert r["vs_step"] == pytest.approx(r["images_per_sec"] / step["images_per_sec"], abs=1e-3)
    assert "x the step" in table and "aa_impl=batch,workers=2,prefetch=3,concurrency=full" in table
    # A profile per variant, in a folder named after it.
    assert sorted(p.parent.name for p in (tmp_path / "prof").glob("*/profile.json")) == [
        "aa-none_pipelines-1", "aa_impl-batch_workers-2_prefetch-3_concurrency-full", "aa_impl-torch_compile_augment-true", "default",
        "mixing-false", "step", "step_mixing-false"]
    for bad, says in [("aa_impl=fast", "aa_impl is auto, tree, batch or torch"), ("threads=4", "is not KEY=VALUE"),
                      ("workers=many", "workers takes a int"), ("high_priority_stream=yes", "takes a bool"),
                      ("compile_augment=1", "compile_augment takes a bool"),
                      ("step,aa_impl=tree", "the step alone has no loader (aa_impl)"),
                      *([("aa_impl=batch,high_priority_stream=true", "high_priority_stream needs a GPU"),
                         ("aa_impl=torch,augment_stream=true", "augment_stream needs a GPU"),
                         ("aa_impl=tree,stream_handover=true", "stream_handover needs a GPU")]
                        if not torch.cuda.is_available() else [])]:
        with pytest.raises(SystemExit):
            _bench_here(capsys, "--mode", "train", *TRAINING, "--synthetic-jpegs", "16", "--variants", bad)
        assert says in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            _bench_here(capsys, "--mode", "loader", "--synthetic-jpegs", "16", "--cuda-graphs")
        assert "--cuda-graphs replays GPU work as CUDA graphs: it needs a GPU" in capsys.readouterr().err


def test_train_mode_under_torchrun_reports_per_process_and_total(tmp_path):
    (r,), table = _bench("--mode", "train", *TRAINING, "--steps", "4", "--synthetic-jpegs", "16", "--cache", tmp_path,
                         "--workers", "1", torchrun=True)
    # Both ranks measured (each its own shard), and the total is their sum, not one rank doubled.
    ranks = r["images_per_sec_per_rank"]
    assert r["world_size"] == 2 and len(ranks) == 2 and all(v > 0 for v in ranks)
    assert r["images_per_sec_total"] == pytest.approx(sum(ranks)) and ranks[0] != ranks[1]
    assert "total over 2" in table


def test_ranks_combine_to_the_mean_per_gpu_and_the_most_memory():
    """A torchrun row: images/s per GPU is the ranks' mean (the total beside it), and each memory
    figure the highest any rank held (a rank without the figure passed over: rank 0's None had
    stood for the row)."""
    sys.path.insert(0, str(BENCH))
    import throughput
    combined = throughput.combine_ranks([
        {"images_per_sec": 100.0, "peak_rss_gib": 1.0, "nvml_process_gib": None, "steps": 4},
        {"images_per_sec": 50.0, "peak_rss_gib": 2.5, "nvml_process_gib": 3.0, "steps": 4}])
    assert combined == {"images_per_sec": 75.0, "images_per_sec_total": 150.0, "images_per_sec_per_rank": [100.0, 50.0],
                        "world_size": 2, "peak_rss_gib": 2.5, "nvml_process_gib": 3.0, "steps": 4}


def test_a_loader_that_fails_in_its_process_is_said_with_its_error(tmp_path):
    """--rounds measures each loader in a process of its own: one that fails there stops the
    benchmark with the loader's name and the process's own error."""
    proc = subprocess.run([sys.executable, str(BENCH / "throughput.py"), "--mode", "loader", "--synthetic-jpegs", "8",
                           "--cache", str(tmp_path), "--loaders", "dali-cpu", "--batch-size", "16", "--rounds", "2"],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "{" not in proc.stdout  # no row
    said = "dali-cpu failed:\n.*8 images over 1 shard.* do not fill one batch of 16"
    assert re.search(said, proc.stderr), proc.stderr


def test_the_memory_of_a_loaders_processes_counts_their_children():
    """The loader rows' peak_pss_with_workers_gib: this process's PSS and its children's (a
    DataLoader's workers), here a child holding 256 MiB it wrote."""
    sys.path.insert(0, str(BENCH))
    import throughput
    before = throughput._tree_pss_gib()
    child = subprocess.Popen([sys.executable, "-c", "import time; held = b'x' * 2**28; print('held', flush=True); "
                              "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "held\n"
        assert throughput._tree_pss_gib() - before > 0.2
    finally:
        child.kill()
        child.wait()
        child.stdout.close()


def test_train_mode_profile_explains_itself(tmp_path, capsys):
    """--profile on the CPU: the summary files, the main thread's time per step, the data share, and
    the top operators (no kernels without a GPU)."""
    (r,), _ = _bench_here(capsys, "--mode", "train", *TRAINING, "--steps", "6", "--synthetic-jpegs", "16",
                          "--cache", tmp_path, "--workers", "1", "--profile", tmp_path / "prof", "--profile-steps", "3")
    summary = json.loads((tmp_path / "prof" / "profile.json").read_text())
    assert summary["steps"] == 3 and summary["device"] == "cpu" and summary["gpu_busy_share"] is None
    assert summary["gpu_bound_images_per_sec"] is None and r["profile"]["gpu_bound_images_per_sec"] is None
    assert 0 < summary["host_cpu_ms_per_step"] and 0 < summary["wall_ms_per_step"]
    assert 0 <= summary["data_wait_share"] < 1 and 0 <= r["data_wait"] < 1
    assert any(op["name"].startswith("aten::conv") for op in summary["top_cpu_ops"])
    assert r["profile"]["wall_ms_per_step"] == summary["wall_ms_per_step"]
    assert "ms a step" in (tmp_path / "prof" / "profile.txt").read_text()
    # the timeline beside it: a Chrome trace of the profiled steps, the trainer's ops on it
    with gzip.open(tmp_path / "prof" / "trace.json.gz", "rt") as trace:
        events = json.load(trace)["traceEvents"]
    assert any(str(e.get("name", "")).startswith("aten::conv") for e in events)


def test_profile_summary_of_gpu_kernels():
    """The GPU figures from a trace: busy share from the union of kernel intervals (overlapping
    streams counted once), DALI's and nvJPEG's kernels apart from the model's, and so the kernels
    launched by the torch RandAugment form (by ops inside the loader's profiler range), host syncs."""
    from types import SimpleNamespace
    sys.path.insert(0, str(BENCH))
    from profile_summary import render, summarize
    from fastrsb.pipelines.loader import AUGMENT_RANGE

    def event(name, start, end, gpu=True, annotation=False, id=0, linked=0, parent=None, thread=1, stream=7):
        return SimpleNamespace(name=name, device_type="DeviceType.CUDA" if gpu else "DeviceType.CPU",
                               time_range=SimpleNamespace(start=start, end=end), is_user_annotation=annotation,
                               id=id, linked_correlation_id=linked, cpu_parent=parent, thread=thread,
                               device_resource_id=stream)
    augment_range = event(AUGMENT_RANGE, 50_000, 52_000, gpu=False, id=7)
    augment_op = event("aten::where", 50_500, 50_600, gpu=False, id=8, parent=augment_range)
    model_op = event("aten::add", 60_000, 60_100, gpu=False, id=9)
    host_ops = [SimpleNamespace(key="aten::convolution", self_cpu_time_total=3_000, count=2),
                SimpleNamespace(key="cudaLaunchKernel", self_cpu_time_total=5_000, count=400)]
    trace = SimpleNamespace(key_averages=lambda: host_ops, events=lambda: [
        event("Optimizer.step#Lamb.step", 0, 50_000, annotation=True),  # a range, not a kernel: not counted
        event("Memcpy HtoD (Pinned -> Device)", 32_000, 34_000, stream=13),
        event("sm90_xmma_gemm_bf16", 0, 10_000), event("void at::native::elementwise_kernel", 5_000, 15_000),
        event("void dali::kernels::resize::ResizeKernel", 20_000, 30_000, stream=13),
        event("nvjpeg::decode_huffman", 40_000, 45_000, stream=21),
        event("cudaStreamSynchronize", 45_000, 47_000, gpu=False), event("aten::_local_scalar_dense", 46_000, 47_000, gpu=False),
        event("cudaDeviceSynchronize", 47_000, 51_000, gpu=False, thread=2),  # a loader's thread: no torch op there
        event("cudaLaunchKernel", 60_000, 60_010, gpu=False),  # the trainer's launch, on its thread: the split holds
        augment_range, augment_op, model_op,  # the same eager kernel, launched once in the range, once outside it
        event("void at::native::where_kernel", 53_000, 57_000, linked=8),
        event("void at::native::where_kernel", 60_000, 61_000, linked=9)])
    s = summarize(trace, steps=2, wall_seconds=0.1, host_seconds=0.05, data_wait_seconds=0.01, device="cuda",
                  images_per_step=256)
    assert s["gpu_busy_share"] == pytest.approx(0.37)  # 15 + 10 + 2 + 5 + 4 + 1 ms of 100 ms
    # 18.5 ms of GPU work a step for 256 images: the pace were the GPU never idle
    assert s["gpu_bound_images_per_sec"] == pytest.approx(256 / 0.0185)
    assert "the GPU's own work allows at most 13,838 img/s (18.50 ms a step busy), were it never idle" in render(s)
    # the kernels alone, the copy (on a copy engine, beside them) left out: 17.5 ms a step
    assert s["kernel_bound_images_per_sec"] == pytest.approx(256 / 0.0175)
    assert "; its kernels alone 14,629 (the copies beside them on the copy engines)" in render(s)
    assert s["gpu_ms_per_step"] == pytest.approx({"loader": 9.5, "model": 10.5, "copies": 1.0})
    assert s["blocking_ms_per_step"] == pytest.approx({"aten::_local_scalar_dense": 0.5, "cudaDeviceSynchronize": 2.0,
                                                       "cudaStreamSynchronize": 1.0})
    assert s["blocking_elsewhere_ms_per_step"] == pytest.approx({"cudaDeviceSynchronize": 2.0})
    # Each stream's share, busiest first (the torch form's kernel, launched in the loader's range, is
    # the loader's on the trainer's stream).
    assert s["streams"] == [pytest.approx({"stream": 7, "model": 10.5, "loader": 2.0}),
                            pytest.approx({"stream": 13, "loader": 5.0, "copies": 1.0}),
                            pytest.approx({"stream": 21, "loader": 2.5})]
    assert "the GPU's work came from 3 streams" in render(s) and "21: loader 2.50 ms" in render(s)
    # A trace whose launches sit on no thread of torch's ops numbers threads apart: no split claimed.
    renumbered = SimpleNamespace(key_averages=trace.key_averages, events=lambda: [
        SimpleNamespace(**{**vars(e), "thread": 7}) if e.name == "cudaLaunchKernel" else e for e in trace.events()])
    unsplit = summarize(renumbered, steps=2, wall_seconds=0.1, host_seconds=0.05, data_wait_seconds=0.01, device="cuda")
    assert unsplit["blocking_elsewhere_ms_per_step"] is None and unsplit["blocking_ms_per_step"] == s["blocking_ms_per_step"]
    assert "(on which threads: unknown, the trace numbers torch's threads and CUDA's calls apart)" in render(unsplit)
    assert "(on which threads: unknown" not in render(s)
    assert [(k["part"], k["name"]) for k in s["top_kernels"]] == [
        ("model", "sm90_xmma_gemm_bf16"), ("model", "void at::native::elementwise_kernel"),
        ("loader", "void dali::kernels::resize::ResizeKernel"), ("loader", "nvjpeg::decode_huffman"),
        ("loader", "void at::native::where_kernel"), ("copies", "Memcpy HtoD (Pinned -> Device)"),
        ("model", "void at::native::where_kernel")]
    assert s["data_wait_share"] == pytest.approx(0.1) and s["host_cpu_ms_per_step"] == pytest.approx(25.0)
    assert s["top_cpu_ops"] == [{"name": "cudaLaunchKernel", "ms_per_step": 2.5, "calls_per_step": 200.0},
                                {"name": "aten::convolution", "ms_per_step": 1.5, "calls_per_step": 1.0}]


def test_profile_summary_counts_each_moment_and_kernel_once_and_says_the_top():
    """The busy time counts a kernel inside another's span (another stream's) once; a memset is a
    copy; a kernel launched at the very start of the loader's range is the loader's; a runtime
    call, whose ids are CUPTI's numbering, is no op a kernel links to; a kernel whose trace names
    no stream is counted under -1; the streams busiest first; the top kernels `top` of them, their
    names cut at 120 characters; a trace without launches (the CPU's) splits its waits by thread;
    no wall time is no share."""
    from types import SimpleNamespace
    sys.path.insert(0, str(BENCH))
    from profile_summary import summarize
    from fastrsb.pipelines.loader import AUGMENT_RANGE

    def event(name, start, end, gpu=True, id=0, linked=0, parent=None, thread=1, stream=7):
        return SimpleNamespace(name=name, device_type="DeviceType.CUDA" if gpu else "DeviceType.CPU",
                               time_range=SimpleNamespace(start=start, end=end), is_user_annotation=False, id=id,
                               linked_correlation_id=linked, cpu_parent=parent, thread=thread,
                               device_resource_id=stream)
    long_name = "void cutlass::Kernel<" + "cutlass_80_tensorop_s16816gemm_" * 8 + ">"
    augment_range = event(AUGMENT_RANGE, 50_000, 52_000, gpu=False, id=7)
    model_op = event("aten::add", 60_000, 60_100, gpu=False, id=9)
    # a runtime call inside the loader's range whose (CUPTI) id is the model op's (torch's) number
    runtime_call = event("cudaMemsetAsync", 51_000, 51_001, gpu=False, id=9, linked=900, parent=augment_range)
    trace = SimpleNamespace(key_averages=lambda: [], events=lambda: [
        event(long_name, 0, 10_000, stream=30), event("void at::native::reduce_kernel", 2_000, 3_000, stream=5),
        event("Memset (Device)", 20_000, 20_500, stream=5),
        event("cudaLaunchKernel", 50_000, 50_001, gpu=False, id=600),  # at the range's first moment
        event("void at::native::index_kernel", 54_000, 55_000, id=600, stream=None),
        model_op, augment_range, runtime_call, event("void at::native::add_kernel", 60_000, 62_000, linked=9)])
    s = summarize(trace, steps=1, wall_seconds=0.1, host_seconds=0.01, data_wait_seconds=0.0, device="cuda", top=3)
    assert s["gpu_busy_share"] == pytest.approx(0.135)  # 10 + 0.5 + 1 + 2 ms: the reduce inside the gemm's span
    assert s["gpu_ms_per_step"] == pytest.approx({"model": 13.0, "loader": 1.0, "copies": 0.5})
    assert [row["stream"] for row in s["streams"]] == [30, 7, 5, -1]  # 10, 2, 1.5 and 1 ms
    assert s["streams"][3] == pytest.approx({"stream": -1, "loader": 1.0})
    assert [(k["name"], k["part"]) for k in s["top_kernels"]] == [
        (long_name[:120], "model"), ("void at::native::add_kernel", "model"),
        ("void at::native::reduce_kernel", "model")]
    # On the CPU: no kernels, no launches; a read back to the host on the trainer's thread is its own.
    cpu = SimpleNamespace(key_averages=lambda: [], events=lambda: [
        event("aten::conv2d", 0, 5_000, gpu=False, id=1), event("aten::_local_scalar_dense", 5_000, 6_000, gpu=False)])
    on_cpu = summarize(cpu, steps=1, wall_seconds=0.0, host_seconds=0.0, data_wait_seconds=0.5, device="cpu")
    assert on_cpu["blocking_ms_per_step"] == pytest.approx({"aten::_local_scalar_dense": 1.0})
    assert on_cpu["blocking_elsewhere_ms_per_step"] == {} and on_cpu["gpu_busy_share"] is None
    assert on_cpu["data_wait_share"] == 0.0


def test_profile_places_a_graph_replays_kernels_by_where_it_was_launched():
    """Kernels of a CUDA graph replay link to no torch op: they are the loader's where the runtime
    call that launched them (cudaGraphLaunch, the kernels' CUPTI correlation id) started inside
    the loader's range (the captured torch RandAugment form), the model's elsewhere (the captured
    step); at c5b2a17 the form's were all counted as the model's."""
    from types import SimpleNamespace
    sys.path.insert(0, str(BENCH))
    from profile_summary import summarize
    from fastrsb.pipelines.loader import AUGMENT_RANGE

    def event(name, start, end, gpu=True, id=0, thread=1):
        return SimpleNamespace(name=name, device_type="DeviceType.CUDA" if gpu else "DeviceType.CPU",
                               time_range=SimpleNamespace(start=start, end=end), is_user_annotation=False,
                               id=id, linked_correlation_id=0, cpu_parent=None, thread=thread, device_resource_id=7)
    trace = SimpleNamespace(key_averages=lambda: [], events=lambda: [
        event(AUGMENT_RANGE, 100, 200, gpu=False, id=3),
        event("cudaGraphLaunch", 150, 151, gpu=False, id=500, thread=99),  # the form's graph, in the range
        event("cudaGraphLaunch", 300, 301, gpu=False, id=501, thread=99),  # the step's, after it
        event("triton_poi_fused_warp", 400, 1_400, id=500), event("triton_poi_fused_lookup", 1_400, 1_900, id=500),
        event("triton_poi_fused_relu", 2_000, 6_000, id=501)])
    s = summarize(trace, steps=1, wall_seconds=0.01, host_seconds=0.005, data_wait_seconds=0.0, device="cuda")
    assert s["gpu_ms_per_step"] == pytest.approx({"loader": 1.5, "model": 4.0, "copies": 0.0})
    assert {(k["name"], k["part"]) for k in s["top_kernels"]} == {
        ("triton_poi_fused_warp", "loader"), ("triton_poi_fused_lookup", "loader"), ("triton_poi_fused_relu", "model")}


def test_a_trace_too_large_to_come_back_is_not_written(tmp_path, monkeypatch):
    """A lent GPU machine hands back files of at most 16 MiB: a trace over the limit is dropped
    (the summary still says what it found) rather than written and lost."""
    sys.path.insert(0, str(BENCH))
    import profile_summary
    from types import SimpleNamespace
    trace = SimpleNamespace(export_chrome_trace=lambda path: Path(path).write_text(json.dumps(
        {"traceEvents": [{"name": f"aten::op{i}", "ph": "X"} for i in range(2000)]})))
    assert profile_summary.write_trace(trace, tmp_path / "small").name == "trace.json.gz"
    monkeypatch.setattr(profile_summary, "TRACE_LIMIT_BYTES", 100)
    assert profile_summary.write_trace(trace, tmp_path / "large") is None
    assert not (tmp_path / "large" / "trace.json.gz").exists()


def test_lamb_update_benchmark(tmp_path):
    """benchmarks/lamb_update.py on the CPU: the eager and the compiled update timed on a small
    model's parameters (the GPU adds both as CUDA graphs), one JSON line each, also to --json-out."""
    sys.path.insert(0, str(BENCH))
    import lamb_update
    out = tmp_path / "lamb.jsonl"
    results = lamb_update.main(["--model", "resnet10t", "--steps", "2", "--json-out", str(out)])
    assert [r["variant"] for r in results] == ["eager", "compiled"] + (["eager+graph", "compiled+graph"]
                                                                     if torch.cuda.is_available() else [])
    assert all(r["ms_per_update"] > 0 and 0 < r["host_ms_per_update"] <= r["ms_per_update"] for r in results)
    assert [json.loads(line) for line in out.read_text().splitlines()] == results


def test_checkpoint_save_benchmark(tmp_path):
    """benchmarks/checkpoint_save.py on the CPU: a run's state (weights and LAMB's moments) saved
    by the training thread and through the writer, one JSON line (also to --json-out); its files
    go with it, written in a hidden folder under --dir."""
    sys.path.insert(0, str(BENCH))
    import checkpoint_save
    out = tmp_path / "save.jsonl"
    result = checkpoint_save.main(["--model", "resnet10t", "--saves", "1", "--dir", str(tmp_path), "--json-out", str(out)])
    assert result["checkpoint_mb"] > 3 * 19  # resnet10t's ~4.9 M weights, and two moments as large, in float32
    assert result["blocked_seconds_written_by_training_thread"] > 0 and result["write_seconds_beside"] > 0
    assert result["host_ops_per_second_alone"] > 0 and result["host_ops_per_second_beside_a_write"] > 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == [result]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["save.jsonl"]


def test_augment_memory_counts_what_a_call_holds_at_once():
    """benchmarks/augment_memory.py: the peak is what was held together (two 4 MB tensors alive at
    once, then freed: 8 MB), and the torch form's peak holds at least its output."""
    sys.path.insert(0, str(BENCH))
    import augment_memory
    from fastrsb.pipelines import parse_rand_augment
    from fastrsb.pipelines.torch_augment import TorchRandAugment

    def two_at_once():
        a = torch.ones(1000, 1000)
        b = a * 2
        del a, b
        torch.ones(1000, 1000)

    assert augment_memory.peak_mb(two_at_once, "cpu") == pytest.approx(8.0, rel=0.01)
    spec = parse_rand_augment("rand-m9-mstd0.5")
    images, draws = augment_memory.batch(4, 32, 15, spec.num_layers, "cpu")
    assert images.shape == (4, 32, 32, 3) and draws.shape == (4, 7) and draws[:, 1::3].max() <= 15
    assert set(draws[:, 3::3].flatten().tolist()) <= {0.0, 1.0}
    result = augment_memory.measure(TorchRandAugment(spec, 32, torch.float32), images, draws, repeats=1)
    assert result["peak_mb"] >= 4 * 3 * 32 * 32 * 4 / 1e6 and result["compiled"] is False


def test_augment_memory_names_where_a_calls_time_goes(capsys):
    """--top-kernels N: the N costliest kernels of one call (on the CPU, here, its operators' own
    time), costliest first, in each row, and gpu_report's line of them."""
    sys.path.insert(0, str(BENCH))
    import augment_memory
    import gpu_report
    from fastrsb.pipelines import parse_rand_augment
    from fastrsb.pipelines.torch_augment import TorchRandAugment
    spec = parse_rand_augment("rand-m9-mstd0.5-inc1")
    images, draws = augment_memory.batch(4, 32, 15, spec.num_layers, "cpu")
    top = augment_memory.top_kernels(TorchRandAugment(spec, 32, torch.float32), images, draws, 3)
    assert len(top) == 3 and all(k["name"].startswith("aten::") and k["ms"] >= 0 for k in top)
    assert [k["ms"] for k in top] == sorted((k["ms"] for k in top), reverse=True)
    with pytest.raises(SystemExit):
        augment_memory.parse_args(["--top-kernels", "-1"])
    capsys.readouterr()
    row = {"mode": "augment_memory", "variant": "compiled", "batch_size": 256, "chunk_pixels": 1638400,
           "chunk_images": 64, "peak_mb": 246.0, "ms_per_batch": 5.1, "warp_capacity": 39,
           "top_kernels": [{"name": "triton_poi_fused_warp", "ms": 2.0}, {"name": "triton_red_fused_amax", "ms": 0.5}]}
    assert gpu_report.extras([row])[1] == ("  its costliest kernels in a call: triton_poi_fused_warp 2.00 ms; "
                                           "triton_red_fused_amax 0.50 ms")


def _gpu_checks_dry_run(tmp_path) -> list[tuple[str, list[str]]]:
    """benchmarks/gpu_checks.sh's checks as (name, command), each command as bash expanded it."""
    record = tmp_path / "checks"
    env = {**os.environ, "DRY_RUN": str(record), "OUT": str(tmp_path / "out"), "HOME": str(tmp_path)}
    subprocess.run(["bash", str(BENCH / "gpu_checks.sh"), "100000"], cwd=BENCH.parent, env=env, check=True,
                   capture_output=True)
    fields, checks = record.read_bytes().split(b"\0")[:-1], []  # name, argument count, arguments; ...
    while fields:
        name, count = fields[0].decode(), int(fields[1])
        checks.append((name, [field.decode() for field in fields[2:2 + count]]))
        fields = fields[2 + count:]
    return checks


def _or_terms(expression: str) -> list[str]:
    """The top-level alternatives of a pytest -k expression: 'a or (b and c)' -> ['a', '(b and c)']."""
    terms, depth, start = [], 0, 0
    for i, char in enumerate(expression):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0 and expression.startswith(" or ", i):
            terms.append(expression[start:i].strip())
            start = i + 4
    return terms + [expression[start:].strip()]


def test_every_gpu_check_asks_for_what_exists(tmp_path):
    """A GPU is lent rarely and for minutes: a mistake in gpu_checks.sh (an option, a variant, a recipe
    key, a test name) would cost its check there. Its dry run hands over every command as bash
    expands it, and each is checked here by the parser of the script it calls, as with a GPU."""
    sys.path.insert(0, str(BENCH))
    import augment_memory
    import lamb_update
    import native_stacks
    import throughput
    import timm_parity
    checks = _gpu_checks_dry_run(tmp_path)
    names = [name for name, _ in checks]
    assert len(set(names)) == len(names) >= 15  # CONTINUE=1 skips checks by name
    parse = {"benchmarks/throughput.py": lambda argv: throughput.parse_args(argv, gpu=True),
             "benchmarks/lamb_update.py": lamb_update.parse_args, "benchmarks/augment_memory.py": augment_memory.parse_args,
             "benchmarks/timm_parity.py": timm_parity.parse_args, "benchmarks/native_stacks.py": native_stacks.parse_args}
    assert "native-stacks" in names
    # native_stacks.py samples a command it runs: that command is checked as a check of its own.
    for name, argv in list(checks):
        if argv[1:2] == ["benchmarks/native_stacks.py"]:
            checks.append((f"{name} (sampled)", native_stacks.parse_args(argv[2:]).command))
    selections = []
    for name, argv in checks:
        while argv[0] == "env" or "=" in argv[0]:  # env VAR=value ... python3
            argv = argv[1:]
        assert argv[0] == "python3", name
        if argv[1] == "-c":
            compile(argv[2], name, "exec")
        elif argv[1:3] == ["-m", "pytest"]:
            selections.append(argv[3:])
        else:
            try:
                parse[argv[1]](argv[2:])  # a KeyError: a script this test does not know yet
            except SystemExit:
                pytest.fail(f"check {name}: its command is refused (argparse's message: captured stderr)")
    # The GPU tests in three calls: those that have never passed on a GPU ("(N) and not (S)"), the
    # ones that compile the torch form ("S"), the rest ("not (N) and not (S)"): each test in one of them.
    first, slow, rest = (argv[argv.index("-k") + 1] for argv in selections)
    assert first.startswith("(") and first.endswith(f") and not ({slow})"), first
    never = first[1:-len(f") and not ({slow})")]
    assert rest == f"not ({never}) and not ({slow})"
    for argv, expression in ((selections[0], never), (selections[1], slow)):
        listing = [arg for arg in argv if arg not in ("-q", "-v")] + ["--collect-only", "-q"]  # a test a line
        collected = subprocess.run([sys.executable, "-m", "pytest", *listing],
                                   cwd=BENCH.parent, capture_output=True, text=True)
        assert collected.returncode == 0, collected.stdout  # 5: nothing selected
        selected = [line.lower() for line in collected.stdout.splitlines() if "::" in line]
        for term in _or_terms(expression):  # each alternative names at least one test (pytest -k: substrings)
            words = [w for w in re.findall(r"\w+", term) if w not in ("and", "or", "not")]
            assert "not" not in term.split() and any(all(w.lower() in test for w in words) for test in selected), term


def test_gpu_tests_report_each_outcome_as_it_ends(tmp_path):
    """FASTRSB_REPORT_AT_ONCE=1 (gpu_checks.sh's GPU tests; tests/conftest.py): each test's time and
    outcome, and a failure's traceback, print as the test ends, before pytest's summary (which a
    device call cut by its limit never reaches), and the `-v` outcome lines the CONTINUE logic
    reads stay whole."""
    (tmp_path / "test_two.py").write_text("def test_fails():\n    assert 1 == 2, 'the reason'\n\n\n"
                                          "def test_passes():\n    pass\n")
    env = {**os.environ, "FASTRSB_REPORT_AT_ONCE": "1", "PYTHONPATH": str(BENCH.parent / "tests")}
    run = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "conftest", "-p", "no:cacheprovider",
                          "test_two.py", "--rootdir", str(tmp_path)], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = run.stdout
    assert run.returncode == 1, out
    summary = out.index("= FAILURES =")
    assert re.search(r"^\[\d+\.\d s call failed\] test_two.py::test_fails$", out[:summary], re.M), out
    assert out.index("AssertionError: the reason") < summary
    assert re.search(r"^\[\d+\.\d s call passed\] test_two.py::test_passes$", out[:summary], re.M), out
    assert re.search(r"^test_two.py::test_fails FAILED", out, re.M) and re.search(r"^test_two.py::test_passes PASSED",
                                                                                   out, re.M)
    quiet = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "conftest", "-p", "no:cacheprovider",
                            "test_two.py", "--rootdir", str(tmp_path)], cwd=tmp_path,
                           env={**env, "FASTRSB_REPORT_AT_ONCE": ""}, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True).stdout
    assert "s call" not in quiet and quiet.index("AssertionError: the reason") > quiet.index("= FAILURES =")


def test_a_test_that_hangs_ends_the_run_with_every_threads_stack(tmp_path):
    """The suite's guard (pyproject.toml: pytest's faulthandler_timeout, with exit): a test past the
    limit (here 2 s; the suite's is 900) prints every thread's stack, its own frame among them, and
    ends the run, failed; a test within it runs as ever."""
    import tomllib
    options = tomllib.loads((BENCH.parent / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert options["faulthandler_timeout"] == 900 and options["faulthandler_exit_on_timeout"] is True
    (tmp_path / "test_hang.py").write_text("import time\n\n\ndef test_quick():\n    time.sleep(0.5)\n\n\n"
                                           "def test_hangs():\n    time.sleep(3600)\n")
    # The project's settings, the limit lowered (without the exit, the hour's sleep would outlast
    # this call's timeout: TimeoutExpired, a failure).
    run = subprocess.run([sys.executable, "-m", "pytest", "-v", "-c", str(BENCH.parent / "pyproject.toml"),
                          "-o", "faulthandler_timeout=2", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                          str(tmp_path / "test_hang.py")], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, timeout=300)
    assert run.returncode != 0, run.stdout
    assert "test_hang.py::test_quick PASSED" in run.stdout and "Timeout" in run.stdout
    assert re.search(r'File ".*test_hang.py", line 9 in test_hangs', run.stdout), run.stdout


def test_a_continued_gpu_check_call_resumes_the_gpu_tests_where_a_timeout_cut_them(tmp_path, monkeypatch):
    """CONTINUE=1 (the second device call on a machine): checks an earlier call ran are left out,
    and the GPU tests that ran to an outcome are deselected from a pytest check a timeout cut."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH.parent, capture_output=True,
                            text=True).stdout.strip() or "unknown"  # as the script names it outside a clone
    done = tmp_path / ".cache" / "fastrsb-gpu-checks" / commit
    done.parent.mkdir(parents=True)
    done.write_text("hw-engines\nsynthetic-jpegs\n")  # no pytest check is there: a timeout cut each
    ran = ["tests/test_gpu.py::test_short_compiled_gpu_run", "tests/test_gpu.py::test_graphed_step_trains_as_the_eager_step[True]"]
    Path(f"{done}.tests").write_text("\n".join(ran) + "\n")
    (tmp_path / "first").mkdir()
    first = dict(_gpu_checks_dry_run(tmp_path / "first"))  # a first call on a fresh machine
    monkeypatch.setenv("CONTINUE", "1")
    then = dict(_gpu_checks_dry_run(tmp_path))
    assert {"hw-engines", "synthetic-jpegs"} <= set(first) and not {"hw-engines", "synthetic-jpegs"} & set(then)
    assert "--deselect" not in first["pytest-gpu-never-passed"]
    for name in ("pytest-gpu-never-passed", "pytest-gpu-rest", "pytest-gpu-slow"):
        argv = then[name]
        assert [argv[i + 1] for i, arg in enumerate(argv) if arg == "--deselect"] == ran, name
        assert argv[:argv.index("--deselect")] == first[name]


def test_the_benchmark_refuses_a_mistake_before_it_measures(tmp_path, capsys):
    """What the dry run of the GPU checks relies on: parse_args stops at a mistake, before any JPEG
    is generated (a wrong recipe key, a loader or a variant), and at what needs a GPU without one."""
    sys.path.insert(0, str(BENCH))
    import throughput
    train = ["--mode", "train", "--synthetic-jpegs", "8", "--cache", str(tmp_path)]
    for argv, message in ((train + ["--set", "cuda_graph=true"], "cuda_graph"),
                          (train + ["--variants", "aa_impl=tree,augment_stream=yes"], "augment_stream takes a bool"),
                          (["--mode", "loader", "--synthetic-jpegs", "8", "--loaders", "dali-gpu,pil"], "pil unknown"),
                          # an option the mode would not read: refused, not silently ignored
                          (train + ["--interpolation", "bicubic", "--rounds", "3"],
                           "--rounds, --interpolation: not read in --mode train (there, --interpolation: "
                           "--set train_interpolation=...)"),
                          (["--mode", "loader", "--synthetic-jpegs", "8", "--set", "lr=1"], "--set: not read in --mode loader"),
                          (["--mode", "loader", "--synthetic-jpegs", "8", "--steps", "0"],
                           "argument --steps: must be 1 or more, not 0"),
                          (["--mode", "loader", "--synthetic-jpegs", "8", "--hw-decoder-load", "1.5"],
                           "--hw-decoder-load must lie in [0, 1]"),
                          (["--mode", "loader", "--synthetic-jpegs", "8", "--variants", "step"],
                           "--variants is for --mode train"),
                          (["--mode", "loader"], "--mode loader needs --data DIR or --synthetic-jpegs N")):
        with pytest.raises(SystemExit):
            throughput.parse_args(argv, gpu=True)
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the load is the loader mode's
        throughput.parse_args(train + ["--gpu-load"], gpu=True)
    assert "--gpu-load: not read in --mode train" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # in train mode, a variant: measured beside the same loader without it
        throughput.parse_args(train + ["--stream-handover"], gpu=True)
    assert "--stream-handover: not read in --mode train (there, --stream-handover: --variants " \
           "stream_handover=true)" in capsys.readouterr().err
    assert throughput.parse_args(["--mode", "loader", "--synthetic-jpegs", "8", "--stream-handover"],
                                 gpu=True).stream_handover
    for argv in (train + ["--variants", "aa_impl=torch,augment_stream=true"], ["--mode", "loader", "--loaders", "dali-gpu"],
                 ["--mode", "loader", "--synthetic-jpegs", "8", "--stream-handover"],
                 ["--mode", "loader", "--synthetic-jpegs", "8", "--loaders", "dali-cpu", "--gpu-load"]):
        with pytest.raises(SystemExit):
            throughput.parse_args(argv, gpu=False)
        assert "needs a GPU" in capsys.readouterr().err
    assert throughput.parse_args(train + ["--set", "cuda_graphs=true"], gpu=True).overrides == ["cuda_graphs=true"]
    assert throughput.parse_args(["--mode", "loader", "--synthetic-jpegs", "8"], gpu=False).interpolation == "random"
    # The size measured is the recipe's train size unless told (A1 at 224; it was 160 whatever the
    # recipe, and a --set img_size ran while the rows said 160); two sizes given are refused.
    step = ["--mode", "step", "--recipe"]
    assert [throughput.parse_args(argv, gpu=False).img_size for argv in (
        step + ["a1"], step + ["a3"], step + ["a1", "--img-size", "192"], step + ["a1", "--set", "img_size=128"],
        ["--mode", "loader", "--synthetic-jpegs", "8"])] == [224, 160, 192, 128, 160]
    with pytest.raises(SystemExit):
        throughput.parse_args(step + ["a1", "--img-size", "192", "--set", "img_size=128"], gpu=False)
    assert "--img-size 192 and --set img_size=128: give one" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing generated


def test_the_benchmark_reads_the_train_split_of_a_data_folder(tiny_data, tmp_path):
    """--data DATA as `fastrsb train` takes it reads DATA/train (or timm's training/): the folder
    as it is would be two classes, train and val."""
    sys.path.insert(0, str(BENCH))
    import throughput
    (tmp_path / "training").symlink_to(tiny_data / "train")
    (tmp_path / "validation").symlink_to(tiny_data / "val")
    for given, read in ((tiny_data, tiny_data / "train"), (tiny_data / "train", tiny_data / "train"),
                        (tmp_path, tmp_path / "training")):
        assert throughput.parse_args(["--mode", "loader", "--data", str(given)], gpu=False).data == read


def test_too_few_images_for_a_batch_is_one_line(tmp_path, capsys):
    sys.path.insert(0, str(BENCH))
    import throughput
    with pytest.raises(SystemExit) as stop:
        throughput.main(["--mode", "loader", "--synthetic-jpegs", "8", "--cache", str(tmp_path), "--loaders", "dali-cpu",
                         "--batch-size", "16"])
    assert stop.value.code == 2
    assert "throughput.py: error: 8 images over 1 shard(s) do not fill one batch of 16" in capsys.readouterr().err


# eu-stack -m's output as it prints it (the frames' addresses shortened): a DALI thread in the
# CUDA driver (libcuda's inner functions have no names), and Python's main thread asleep.
EU_STACK_OUTPUT = """PID 4464 - process
TID 4470:
#0  0x00007f00000001 - /usr/lib/x86_64-linux-gnu/libcuda.so.580.95.05
#1  0x00007f00000002 - /usr/lib/x86_64-linux-gnu/libcuda.so.580.95.05
#2  0x00007f00000003 cuCtxSynchronize - /usr/lib/x86_64-linux-gnu/libcuda.so.580.95.05
#3  0x00007f00000004 dali::mm::pool_resource::release_pending() - /site/nvidia/dali/libdali_core.so
#4  0x00007f00000005 dali::exec2::OpTask::Run() - /site/nvidia/dali/libdali.so
TID 4471:
#0  0x00007f00000011 - /usr/lib/x86_64-linux-gnu/libcuda.so.580.95.05
#1  0x00007f00000012 nvjpegDecodeBatchedEx - /site/nvidia/nvjpeg/lib/libnvjpeg.so.13
TID 4464:
#0  0x00007fafa76ed545 clock_nanosleep@GLIBC_2.2.5 - /usr/lib/x86_64-linux-gnu/libc.so.6
#1  0x00007fafa7b15ada time_sleep - /root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0
#2  0x00007fafa79a6ee2 - /root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0
"""


def test_native_stacks_names_the_callers_of_cuda_waits(tmp_path, capsys):
    """native_stacks.py: eu-stack's text parsed thread by thread (a frame's name and module, either
    missing); the summary puts the threads in CUDA first, with their callers, and counts every
    thread's innermost frames over the snapshots; a command that ends before them is said so."""
    sys.path.insert(0, str(BENCH))
    import native_stacks
    threads = native_stacks.parse(EU_STACK_OUTPUT)
    assert threads[4470][:3] == [("", "libcuda.so.580.95.05"), ("", "libcuda.so.580.95.05"),
                                 ("cuCtxSynchronize", "libcuda.so.580.95.05")]
    assert threads[4464][2] == ("", "libpython3.11.so.1.0")
    names = {4470: "[DALI][Exec]3", 4471: "[DALI][Exec]12", 4464: "python3"}
    summary = native_stacks.summarize([(threads, names), (threads, names)])
    waits, every = summary.split("every thread by its innermost")
    assert "2x  [[DALI][Exec]#]" in waits and "python3" not in waits
    assert "nvjpegDecodeBatchedEx (libnvjpeg.so.13)" in waits  # in the driver, though no frame says Synchronize
    assert waits.index("cuCtxSynchronize") < waits.index("dali::mm::pool_resource::release_pending()") \
        < waits.index("dali::exec2::OpTask::Run()")
    assert "2x  [python3]  clock_nanosleep@GLIBC_2.2.5 (libc.so.6) < time_sleep (libpython3.11.so.1.0)" in every
    assert native_stacks.summarize([({4464: threads[4464]}, names)]).splitlines()[1] == "  none"
    ended = native_stacks.main(["--after", "30", "--eu-stack", "eu-stack", "--out", str(tmp_path / "s.txt"), "--",
                                sys.executable, "-c", "pass"])
    assert ended == 1 and "the command ended (rc 0) before the snapshots" in capsys.readouterr().err


def test_native_stacks_reads_what_eu_stack_leaves_unsaid(tmp_path, monkeypatch):
    """A name holding " - " with no module after it stays whole; the driver deep in a stack (a
    callback's thread) is no wait in CUDA, only among its 8 innermost frames; a thread is counted
    by its 6 innermost named frames, whatever lies beyond; an eu-stack that shows no thread is said;
    no command, refused; the GPU counts as busy after three readings in a row over the mark."""
    sys.path.insert(0, str(BENCH))
    import native_stacks
    assert native_stacks.parse("TID 7:\n#0  0x0000000000000001 operator - lambda\n")[7] == [("operator - lambda", "")]
    libc = [(f"f{k}", "libc.so.6") for k in range(8)]
    assert not native_stacks.in_cuda(libc + [("", "libcuda.so.1")])
    assert native_stacks.in_cuda(libc[:7] + [("", "libcuda.so.1")])
    inner = [(f"inner{k}", "libx.so") for k in range(6)]
    snapshots = [({1: inner + [("outer_a", "libx.so")]}, {1: "worker"}), ({1: inner + [("outer_b", "libx.so")]},
                                                                          {1: "worker"})]
    assert "  2x  [worker]  inner0 (libx.so) < " in native_stacks.summarize(snapshots)
    mute = tmp_path / "eu-stack"
    mute.write_text("#!/bin/sh\necho 'eu-stack: cannot attach to process: Operation not permitted' >&2\nexit 1\n")
    mute.chmod(0o755)
    with pytest.raises(RuntimeError, match=f"eu-stack showed no thread of process {os.getpid()} \\(rc 1\\): "
                                           "eu-stack: cannot attach"):
        native_stacks.snapshot(str(mute), os.getpid())
    with pytest.raises(SystemExit):
        native_stacks.parse_args(["--out", str(tmp_path / "s.txt"), "--"])
    readings = iter([60, 60, 10, 60, 60, 60, 60, 60])
    read = []
    monkeypatch.setattr(native_stacks, "_gpu_busy_reader", lambda: lambda: read.append(1) or next(readings))
    monkeypatch.setattr(native_stacks.time, "sleep", lambda seconds: None)
    running = type("Running", (), {"poll": lambda self: None})()
    assert native_stacks.wait_for_work(running, after=60, gpu_busy=50) == "GPU busy >= 50%" and len(read) == 6


@pytest.mark.skipif(shutil.which("eu-stack") is None, reason="needs eu-stack (elfutils; stage_native_tools.sh)")
def test_native_stacks_samples_a_running_command(tmp_path, capsys):
    """native_stacks.py with a real eu-stack on a Python process whose main thread sleeps: every
    snapshot written with its threads named, the sleep counted in each, the command stopped."""
    sys.path.insert(0, str(BENCH))
    import native_stacks
    out = tmp_path / "stacks.txt"
    code = "import time; print('up', flush=True); time.sleep(120)"
    assert native_stacks.main(["--after", "3", "--samples", "3", "--interval", "0.2", "--out", str(out), "--",
                               sys.executable, "-c", code]) == 0
    text = out.read_text()
    assert text.count("===== snapshot") == 3 and re.search(r"^TID \d+ \(python[\d.]*\):$", text, re.M)
    assert re.search(r"3x  \[python[\d.]*\]  \S*nanosleep", capsys.readouterr().out)


def test_rows_say_the_environment_switches_they_ran_with(monkeypatch):
    """throughput.context() (every row's versions and machine) holds the variables set that change
    what a row measures: DALI's (its memory resources, its threads), CUDA's hardware work queues,
    torch's allocator's; none where none is set, and no other variable."""
    sys.path.insert(0, str(BENCH))
    import throughput
    for key in [key for key in os.environ if key.startswith(throughput.ENV_SWITCHES)]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # which GPU, not how it runs
    assert "env" not in throughput.context()
    monkeypatch.setenv("DALI_USE_CUDA_MALLOC_ASYNC", "1")
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "32")
    assert throughput.context()["env"] == {"CUDA_DEVICE_MAX_CONNECTIONS": "32", "DALI_USE_CUDA_MALLOC_ASYNC": "1"}


def test_a_gpu_load_without_a_gpu_says_so():
    """gpu_load.GpuLoad (throughput.py --gpu-load) on a machine without a GPU: a clear error as the
    block begins, nothing started."""
    sys.path.insert(0, str(BENCH))
    from gpu_load import GpuLoad
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: tests/test_gpu.py runs the load")
    load = GpuLoad()
    with pytest.raises(RuntimeError, match="a GPU load needs a GPU"):
        with load:
            pass
    assert load.products == 0 and load.tflops is None


def test_gpu_report_reads_a_run_as_the_readme_shows_it():
    """benchmarks/gpu_report.py on the H200 run of a70b3c8 (committed): the README's rows, and
    issue 13's targets read off them as that run left them (loader memory met by the DALI forms,
    neither speed target met); the torch form's memory (the CPU's file) and a LAMB row as lines."""
    sys.path.insert(0, str(BENCH))
    import gpu_report
    results = BENCH / "results"
    text = gpu_report.main([str(results / "gpu-h200-a70b3c8.jsonl")])
    assert text.startswith("NVIDIA H200 at commit a70b3c8")
    assert ("| A3 end to end | 6,320 | `--mode train` a3, RandAugment tree form, batch 256 |\n"
            "| the training step alone | 10,106 | `--mode step` a3, batch 256 |\n"
            "| the GPU loader alone, no RandAugment | 24,796 |") in text  # the README's opening table
    assert "| the GPU loader alone, A3's RandAugment | 13,685 | `--mode loader` dali-gpu, RandAugment torch form" in text
    assert "At 6,320 img/s, A3's 100 epochs are ~5.6 hours of training on one NVIDIA H200." in text
    assert "| `--mode loader` dali-gpu, RandAugment torch form, batch 256 | 13,685 | 2.38 GiB |" in text
    assert ("| `--mode train` a3, RandAugment tree form, batch 256 | 6,320 (0.62x the step; data wait 4%) | 8.02 GiB |"
            in text)
    assert "RandAugment batch form, `high_priority_stream=true`, batch 256 | 4,160" in text
    assert "no RandAugment, hw_decoder_load 0.9, batch 256 | 24,728" in text
    assert "loader with RandAugment >= 20,000 img/s: NOT met (best 13,685: `--mode loader` dali-gpu, RandAugment torch" in text
    assert "loader memory <= 1.5 GiB: met (0.85 GiB: `--mode loader` dali-gpu, RandAugment tree form" in text
    assert "loader memory <= 1.5 GiB: NOT met (2.38 GiB: `--mode loader` dali-gpu, RandAugment torch form" in text
    assert "A3 end to end >= 10,000 img/s and >= 0.9x the step: NOT met (best 6,320, 0.62x" in text
    loader = {"mode": "loader", "loader": "dali-gpu", "aa": "rand-m6-mstd0.5-inc1", "batch_size": 256,
              "cuda_graphs": True}
    assert gpu_report.label({**loader, "aa_impl": "tree"}).endswith("tree form, cuda_graphs on (a DALI form: nothing "
                                                                     "to capture), batch 256")
    assert "torch form, cuda_graphs on, not captured," in gpu_report.label({**loader, "aa_impl": "torch"})
    # A progressive-resizing ramp's 128 px rows are labelled so, and count towards no target (160 px).
    fast = {"mode": "train", "recipe": "a3", "aa": "rand-m6-mstd0.5-inc1", "aa_impl": "tree", "batch_size": 256,
            "img_size": 128, "images_per_sec": 12000.0, "vs_step": 0.95}
    assert gpu_report.label(fast).endswith("tree form, 128 px, batch 256")
    run = [json.loads(line) for line in (results / "gpu-h200-a70b3c8.jsonl").read_text().splitlines() if line.strip()]
    # Nor does a run without RandAugment (a variant aa=none, the loader's decoding beside the step): it is not A3.
    plain = {**fast, "img_size": 160, "aa": None, "variant": "aa=none"}
    assert "A3 end to end >= 10,000 img/s and >= 0.9x the step: NOT met (best 6,320" in "\n".join(
        gpu_report.targets(run + [fast, plain]))
    assert "| A3 end to end | 6,320 |" in "\n".join(gpu_report.glance(run + [plain]))
    assert "no RandAugment, `aa=none`, batch 256 | 12,000" in "\n".join(gpu_report.table([plain]))
    assert "torch form, CUDA graphs (RandAugment)," in gpu_report.label({**loader, "aa_impl": "torch",
                                                                         "augment_captured": True})
    # A loader row whose batches were handed over on the stream says so, and is not taken for the
    # same loader without it (as its row alone, or as its row without the environment switches).
    handed = {**loader, "aa_impl": "tree", "commit": "c", "env": {}, "stream_handover": True}
    assert "batches handed over on the stream (`--stream-handover`)" in gpu_report.label(handed)
    plain_loader = {**handed, "stream_handover": False}
    assert gpu_report.alone_of({**handed, "gpu_load_tflops": 500.0}, [plain_loader]) is None
    assert gpu_report.alone_of({**handed, "gpu_load_tflops": 500.0}, [plain_loader, handed]) is handed
    assert gpu_report.without_switches_of({**handed, "env": {"CUDA_DEVICE_MAX_CONNECTIONS": "32"}},
                                          [plain_loader]) is None
    # A loader timed beside a GPU load (--gpu-load) is labelled so and counts towards no loader
    # figure: the are for the loader alone.
    loaded = {**loader, "aa_impl": "tree", "cuda_graphs": False, "images_per_sec": 30000.0, "img_size": 160,
              "nvml_process_gib": 0.5, "gpu_load_tflops": 612.4}
    assert gpu_report.label(loaded).endswith("tree form, beside a GPU load (612 TFLOP/s of matrix products), batch 256")
    assert "13,685" in "\n".join(gpu_report.glance(run + [loaded]))
    assert "NOT met (best 13,685" in "\n".join(gpu_report.targets(run + [loaded]))
    assert "0.50 GiB" not in "\n".join(gpu_report.targets(run + [loaded]))
    assert "| 30,000 |" in "\n".join(gpu_report.table([loaded]))  # no row alone to compare it with
    alone = {**loaded, "gpu_load_tflops": None, "images_per_sec": 40000.0}
    assert "| 30,000 (0.75x its pace alone) |" in "\n".join(gpu_report.table([alone, loaded]))
    assert "| 30,000 |" in "\n".join(gpu_report.table([{**alone, "aa_impl": "torch"}, loaded]))  # another form
    # The environment switches a row ran with (throughput.context) are in its label, and a loaded
    # row is put against the row alone with the same switches only.
    malloc_async = {**loaded, "gpu_load_tflops": None, "env": {"DALI_USE_CUDA_MALLOC_ASYNC": "1"}}
    assert gpu_report.label(malloc_async).endswith("tree form, `DALI_USE_CUDA_MALLOC_ASYNC=1`, batch 256")
    queues = {"CUDA_DEVICE_MAX_CONNECTIONS": "32"}
    assert "| 30,000 (0.75x its pace alone) |" in "\n".join(gpu_report.table([
        {**alone, "images_per_sec": 20000.0}, {**alone, "env": queues}, {**loaded, "env": queues}]))
    # A row with switches is put against the same measurement without them (checks 2-3 ask how much
    # 32 queues or expandable segments change), not against another form, nor a loaded row.
    trains = [{"mode": "train", "recipe": "a3", "aa": "rand-m6-mstd0.5-inc1", "aa_impl": "tree", "batch_size": 256,
               "img_size": 160, "variant": variant, "images_per_sec": rate, "vs_step": 0.6, "nvml_process_gib": 9.0,
               **({"env": queues} if switched else {})}
              for variant, rate, switched in (("aa=none", 8000.0, False), ("aa_impl=tree", 7000.0, False),
                                              ("aa_impl=tree", 10500.0, True))]
    assert "| 10,500 (0.60x the step; data wait 0%; 1.50x the pace, 1.00x the memory of the same without the " \
        "switches) |" in "\n".join(gpu_report.table(trains))
    assert "without the switches" not in "\n".join(gpu_report.table([trains[0], trains[2]]))
    assert "without the switches" not in "\n".join(gpu_report.table([{**loaded, "env": None}, {**alone, "env": queues}]))
    rows = [json.loads(line) for line in (results / "augment-memory-cpu-2core.jsonl").read_text().splitlines()]
    eager_on_a_gpu = {"mode": "augment_memory", "variant": "eager", "batch_size": 256, "chunk_pixels": 1638400,
                      "chunk_images": None, "peak_mb": 300.0, "ms_per_batch": 20.0}  # the batch whole, its warp chunked
    assert gpu_report.extras([eager_on_a_gpu]) == ["torch RandAugment form alone (eager, whole batch, its warp in "
                                                   "chunks, batch 256): peak 300 MB, 20.0 ms a batch"]
    lamb = {"mode": "lamb_update", "model": "resnet50", "variant": "compiled+graph", "ms_per_update": 1.25,
            "host_ms_per_update": 0.05}
    lines = gpu_report.extras(rows + [lamb])
    assert lines[-1] == "LAMB update (resnet50, compiled+graph): 1.250 ms, the host 0.050 ms"
    assert any(line.startswith("torch RandAugment form alone (compiled, whole batch, batch 256): peak 648 MB")
               for line in lines)  # the rows from before the chunks
    assert any(line.startswith("torch RandAugment form alone (compiled, chunks of 64 images, batch 256): peak 241 MB")
               for line in lines)


def test_gpu_report_reads_the_newest_run_as_the_readme_shows_it():
    """benchmarks/gpu_report.py on the H200 run of c5b2a17 (committed, the README's newest figures):
    the busy shares of the host and the GPU, the CUDA context's memory before the loader, the
    profiled row named so; a variant of the step is not "the step alone"; a target of two figures
    is met by both; the crops' interpolation and a parity run said."""
    sys.path.insert(0, str(BENCH))
    import gpu_report
    path = BENCH / "results" / "gpu-h200-c5b2a17.jsonl"
    text = gpu_report.main([str(path)])
    assert ("| `--mode loader` dali-gpu, RandAugment torch form, compiled, CUDA graphs (RandAugment), batch 256 | "
            "15,313 (busy: host 11%, GPU 50%) | 1.59 GiB (0.60 before the loader) |") in text
    assert ("CUDA graphs (step and RandAugment), 30 steps, then profiled, batch 256 | 6,874 (busy: host 10%, GPU 64%) "
            "| 8.75 GiB |") in text
    assert "| the training step alone | 12,453 | `--mode step` a3, CUDA graphs (step), batch 256 |" in text
    run = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    step = next(r for r in run if r["mode"] == "step")
    faster = {**step, "variant": "step,channels_last=false", "images_per_sec": 20000.0}  # a variant: not the trainer's
    assert "| the training step alone | 12,453 |" in "\n".join(gpu_report.glance(run + [faster]))
    a3 = next(r for r in run if r["mode"] == "train" and "vs_step" in r)
    fast_beside = {**a3, "images_per_sec": 10500.0, "vs_step": 0.6}  # fast enough, but not 0.9x the step
    assert "0.9x the step: NOT met (best 10,500, 0.60x" in "\n".join(gpu_report.targets([fast_beside]))
    assert "0.9x the step: met (best 10,500, 0.90x" in "\n".join(gpu_report.targets([{**fast_beside, "vs_step": 0.9}]))
    assert gpu_report.label({**a3, "interpolation": "bilinear"}).endswith("bilinear crops, batch 256")
    parity = {"mode": "timm_parity", "recipe": "tiny", "trainer": "timm", "seed": 3, "device": "cpu", "top1": 55.0,
              "top5": 100.0, "seconds": 41.4}
    assert gpu_report.extras([parity]) == ["tiny trained by timm (seed 3, cpu): top-1 55.00, top-5 100.00, 41 s"]


def test_gpu_report_says_how_many_samples_the_torch_forms_warp_took():
    """The torch form's rows since its warp takes the samples that drew a geometric op: how many
    of a chunk (or of the batch, taken whole), or every one (warp_tail 0)."""
    sys.path.insert(0, str(BENCH))
    import gpu_report
    eager_on_a_gpu = {"mode": "augment_memory", "variant": "eager", "batch_size": 256, "chunk_pixels": 1638400,
                      "chunk_images": None, "peak_mb": 300.0, "ms_per_batch": 20.0, "warp_capacity": 96}
    compiled_in_chunks = {**eager_on_a_gpu, "variant": "compiled", "chunk_images": 64, "warp_capacity": 39}
    assert gpu_report.extras([eager_on_a_gpu, compiled_in_chunks, {**compiled_in_chunks, "warp_capacity": 64}]) == [
        "torch RandAugment form alone (eager, whole batch, its warp in chunks, warping 96 of the 256, batch 256): "
        "peak 300 MB, 20.0 ms a batch",
        "torch RandAugment form alone (compiled, chunks of 64 images, warping 39 of each 64, batch 256): peak 300 MB, "
        "20.0 ms a batch",
        "torch RandAugment form alone (compiled, chunks of 64 images, warping every image, batch 256): peak 300 MB, "
        "20.0 ms a batch"]


def test_gpu_report_sets_a_profiled_a3_runs_gpu_work_against_the_target():
    """A profiled A3 row (throughput.py --profile) says whether its GPU work alone keeps the
    issue's 10,000 img/s out of reach; rows without a profile say nothing of it. The row as
    gpu_checks.sh's profile check writes it: one `--mode train` call, so no share of the step
    (the report said nothing of such a row before, reading only rows beside a step)."""
    sys.path.insert(0, str(BENCH))
    import gpu_report
    a3 = {"mode": "train", "recipe": "a3", "aa": "rand-m6-mstd0.5-inc1", "aa_impl": "torch", "batch_size": 256,
          "img_size": 160, "steps": 30, "images_per_sec": 6874.0}
    lines = gpu_report.targets([{**a3, "profile": {"gpu_bound_images_per_sec": 9560.0}}])
    assert "allows at most 9,560 img/s were the GPU never idle: 10,000 out of reach without less GPU work" in lines[-1]
    lines = gpu_report.targets([{**a3, "profile": {"gpu_bound_images_per_sec": 9560.0,
                                                   "kernel_bound_images_per_sec": 9900.0}}])
    assert "10,000 out of reach without less GPU work" in lines[-1]
    lines = gpu_report.targets([{**a3, "profile": {"gpu_bound_images_per_sec": 10700.0,
                                                   "kernel_bound_images_per_sec": 11000.0}}])
    assert "10,700 img/s were the GPU never idle: 10,000 within reach of better overlap alone" in lines[-1]
    # the copies past the bound, the kernels alone within it: a copy engine's work on the SMs' timeline
    lines = gpu_report.targets([{**a3, "profile": {"gpu_bound_images_per_sec": 9560.0,
                                                   "kernel_bound_images_per_sec": 10100.0}}])
    assert ("9,560 img/s were the GPU never idle: 10,000 within reach only with the copies beside the kernels too "
            "(the kernels alone allow 10,100)") in lines[-1]
    # and whose work it is, where the profile split it
    split = {"model": 22.1, "loader": 2.71, "copies": 1.63}
    lines = gpu_report.targets([{**a3, "profile": {"gpu_bound_images_per_sec": 9560.0, "gpu_ms_per_step": split}}])
    assert lines[-1] == ("    of it a step: the model's kernels 22.10 ms, the loader's 2.71 ms (DALI's and the torch "
                         "form's), copies 1.63 ms")
    assert not any("never idle" in line for line in gpu_report.targets([a3, {**a3, "profile": {}}]))


def test_timm_parity_trains_the_recipe_both_ways(tiny_data, tmp_path, capsys):
    """benchmarks/timm_parity.py: the tiny recipe by fastrsb and by timm's parts, one seed, both
    to the end (each validated on all 20 images: top-1 a multiple of 5%), a JSON line each."""
    sys.path.insert(0, str(BENCH))
    import timm_parity
    out = tmp_path / "parity.jsonl"
    results = timm_parity.main(["--recipe", "tiny", "--data", str(tiny_data), "--seeds", "3", "--workers", "1",
                                "--device", "cpu", "--json-out", str(out)])
    assert [(r["trainer"], r["seed"], r["steps"]) for r in results] == [("fastrsb", 3, 12), ("timm", 3, 12)]
    assert results[1]["sampler"] == "RandomSampler"  # create_loader's own
    for r in results:  # every val image counted once: 20, and top-1 a multiple of 5%
        assert r["top1"] <= r["top5"] <= 100 and (r["top1"] / 5).is_integer() and r["seconds"] > 0
        assert (r["val_images"], r["processes"]) == (20, 1)
    assert [json.loads(line)["trainer"] for line in out.read_text().splitlines()] == ["fastrsb", "timm"]
    assert "| timm | " in capsys.readouterr().out
    # Repeated augmentation (A1/A2) on one process: timm's RepeatAugSampler, an epoch of len(data)
    # samples as fastrsb's: 48 images in 3 views a batch of 8, 6 steps an epoch on both sides.
    repeated = timm_parity.main(["--recipe", "tiny", "--data", str(tiny_data), "--seeds", "3", "--workers", "1",
                                 "--device", "cpu", "--set", "aug_repeats=3"])
    assert [(r["trainer"], r["steps"]) for r in repeated] == [("fastrsb", 12), ("timm", 12)]
    assert repeated[1]["sampler"] == "RepeatAugSampler"  # the steps alone would not tell
    shorter = timm_parity.main(["--recipe", "tiny", "--data", str(tiny_data), "--seeds", "3", "--workers", "1",
                                "--device", "cpu", "--trainers", "timm", "--timm-steps-per-epoch", "4"])
    assert [(r["trainer"], r["steps"], r["timm_steps_per_epoch"]) for r in shorter] == [("timm", 8, 4)]
    from timm.data import create_dataset
    views = timm_parity.repeated_views(create_dataset("", root=str(tiny_data / "train"), split="train"),
                                       {"aug_repeats": 3, "batch_size": 8}, 0, "cpu")
    order = list(views.sampler)  # an epoch of 48 samples: 16 images, each 3 times in a row
    assert len(order) == 48 and len(set(order)) == 16 and order[::3] == order[1::3] == order[2::3]
    assert len(views) == 6
    with pytest.raises(SystemExit, match="does not cover model_ema = True"):
        timm_parity.main(["--recipe", "tiny", "--data", str(tiny_data), "--set", "model_ema=true"])
    with pytest.raises(SystemExit):
        timm_parity.parse_args(["--recipe", "demo", "--set", "epoch=3"])  # a key the recipes do not have
    assert "unknown key 'epoch'" in capsys.readouterr().err
    import gpu_report
    assert gpu_report.extras(results)[-1].startswith("tiny trained by timm (seed 3, cpu): top-1 ")  # a GPU run's line


def test_timm_parity_on_several_processes(tiny_data):
    """timm_parity.py --nproc 2: fastrsb's `train --nproc 2` and timm's loop under torch.distributed
    (gloo), with A1/A2's repeated views: each side's batch of 8 is 4 a rank, an epoch of 48 views
    is 6 steps on both; timm's views come from its RepeatAugSampler, one rank each. The processes
    are what each side ran on (fastrsb's starts.jsonl, timm's world size), not the option echoed."""
    sys.path.insert(0, str(BENCH))
    import timm_parity
    results = timm_parity.main(["--recipe", "tiny", "--data", str(tiny_data), "--seeds", "3", "--workers", "1",
                                "--device", "cpu", "--nproc", "2", "--set", "aug_repeats=3"])
    assert [(r["trainer"], r["processes"], r["steps"]) for r in results] == [("fastrsb", 2, 12), ("timm", 2, 12)]
    assert results[1]["sampler"] == "RepeatAugSampler"
    for r in results:  # every val image counted once over the 2 ranks (a rank's half alone: 10)
        assert r["top1"] <= r["top5"] <= 100 and (r["top1"] / 5).is_integer() and r["val_images"] == 20
    # A3's layout (no repeats): timm's DistributedSampler, 24 images a rank, 6 steps an epoch.
    plain = timm_parity.main(["--recipe", "tiny", "--data", str(tiny_data), "--seeds", "3", "--workers", "1",
                              "--device", "cpu", "--nproc", "2", "--trainers", "timm"])
    assert [(r["processes"], r["steps"], r["sampler"]) for r in plain] == [(2, 12, "DistributedSampler")]
    # On 3 ranks each rank takes one view of every image, in the same order: 16 distinct images each.
    from timm.data import create_dataset
    train_set = create_dataset("", root=str(tiny_data / "train"), split="train")
    recipe = {"aug_repeats": 3, "batch_size": 12}
    orders = [list(timm_parity.repeated_views(train_set, recipe, 0, "cpu", rank, 3).sampler) for rank in range(3)]
    assert orders[0] == orders[1] == orders[2] and len(orders[0]) == len(set(orders[0])) == 16
    with pytest.raises(SystemExit):
        timm_parity.parse_args(["--recipe", "tiny", "--nproc", "3"])  # 8 does not split over 3
