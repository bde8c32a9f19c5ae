"""A profile of the training path that explains itself: where a step's time goes, from a
torch.profiler trace of the timed steps (throughput.py --mode train --profile).

It answers: how busy the GPU was (the union of its kernels' and copies' intervals over the
wall time), which kernels took the GPU's time, the loader's (DALI, nvJPEG, and torch's for the
torch RandAugment form) apart from the model's and the copies, how much CPU time the main
thread spent per step, in which operators, and where the host blocked (device syncs, copies,
waiting for the loader; on the trainer's thread or the loader's), and the share of the time the
loop waited for data, as the trainer reports it.
On the CPU there are no kernels: the top operators are the whole story.
"""
from __future__ import annotations

import json
from pathlib import Path

from fastrsb.pipelines.loader import AUGMENT_RANGE as LOADER_RANGE

# Kernels and copies launched by the loader (DALI's own, nvJPEG's, nvImageCodec's), by name; and
# the profiler range the loader's torch work runs in, in the trainer's thread (the torch
# RandAugment form, whose kernels are torch's or inductor's: by name they would pass for the model's).
LOADER_MARKERS = ("dali", "nvjpeg", "nvimgcodec", "jpeg", "npp")
# Host calls that launch work on the GPU.
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cudaGraphLaunch", "cuLaunchKernel", "cuLaunchKernelEx")
# Host calls that wait for the device, and the torch op that reads a value back.
BLOCKING = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
            "aten::_local_scalar_dense")


def _is_device(event) -> bool:
    return str(getattr(event, "device_type", "")).endswith("CUDA")


def _is_kernel(event) -> bool:
    """A kernel or copy that ran on the GPU; not a user annotation (record_function's range, such
    as "Optimizer.step#Lamb.step", which the trace also places on the GPU's timeline: it spans
    the kernels launched inside it and the gaps between them, so counting it counted them twice:
    6.4 ms a step of 'kernel' time on the H200 at a70b3c8)."""
    return _is_device(event) and not getattr(event, "is_user_annotation", False)


def _part(name: str, in_loader_range: bool = False) -> str:
    """Whose a kernel is: the loader's (by name, or launched inside LOADER_RANGE), a copy or fill
    (either side's: the trace does not say whose stream), or the model's."""
    lowered = name.lower()
    if in_loader_range or any(m in lowered for m in LOADER_MARKERS):
        return "loader"
    return "copies" if lowered.startswith(("memcpy", "memset")) else "model"


def _launched_in(kernel, launchers: dict, range_name: str) -> bool:
    """Whether the host op that launched `kernel` (the trace links them by correlation id) ran
    inside a profiler range named `range_name`."""
    event = launchers.get(getattr(kernel, "linked_correlation_id", 0))
    while event is not None:
        if event.name == range_name:
            return True
        event = getattr(event, "cpu_parent", None)
    return False


def _launched_during(kernel, launch_starts: dict, ranges: list[tuple[float, float]]) -> bool:
    """Whether the runtime call that launched `kernel` (cudaLaunchKernel, cudaGraphLaunch: the
    same CUPTI correlation id as the kernel's) started inside one of `ranges`. A CUDA graph's
    replay is no torch op, so its kernels likely link to none, which _launched_in cannot place: at
    c5b2a17 the captured torch form's kernels, launched inside the loader's range, were counted
    as the model's (the top one, 2.0 ms a step). Any thread's launch counts: while the trainer's
    thread is inside the loader's range it launches the loader's work, and DALI's kernels are
    told by their names anyway."""
    start = launch_starts.get(getattr(kernel, "id", 0))
    return start is not None and any(low <= start <= high for low, high in ranges)


def _union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of (start, end) intervals in microseconds, in seconds."""
    total, end = 0.0, -float("inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total / 1e6


def summarize(prof, *, steps: int, wall_seconds: float, host_seconds: float, data_wait_seconds: float,
              device: str, top: int = 10, images_per_step: int | None = None) -> dict:
    """The summary of a profiler run over `steps` steps that took `wall_seconds`; host_seconds: the
    main thread's CPU time over them (time.thread_time); data_wait_seconds: time in next(loader);
    images_per_step: the batch, for the pace the GPU's own work allows."""
    events = list(prof.events())
    kernels = [e for e in events if _is_kernel(e)]
    # torch's own host events (ops, ranges) by id; a kernel's linked_correlation_id is the id of the
    # op that launched it. (Runtime calls such as cudaLaunchKernel carry CUPTI's ids, another
    # numbering, and a link of their own: left out.)
    launchers = {e.id: e for e in events
                 if not _is_device(e) and getattr(e, "id", 0) and not getattr(e, "linked_correlation_id", 0)}
    by_kernel: dict[tuple[str, str], float] = {}  # (name, part): one eager kernel may serve both sides
    # {stream: {part: seconds}}: the trace's device_resource_id is the stream a GPU event ran on (-1
    # where a trace does not say)
    by_stream: dict[int, dict[str, float]] = {}
    # The loader's ranges, and where each runtime launch call started, by its CUPTI correlation id
    loader_ranges = [(e.time_range.start, e.time_range.end) for e in events
                     if not _is_device(e) and e.name == LOADER_RANGE]
    launch_starts = {e.id: e.time_range.start for e in events
                     if not _is_device(e) and e.name in LAUNCHES and getattr(e, "id", 0)}
    for k in kernels:
        part = _part(k.name, _launched_in(k, launchers, LOADER_RANGE)
                     or _launched_during(k, launch_starts, loader_ranges))
        seconds = (k.time_range.end - k.time_range.start) / 1e6
        by_kernel[(k.name, part)] = by_kernel.get((k.name, part), 0.0) + seconds
        stream = getattr(k, "device_resource_id", None)
        on_stream = by_stream.setdefault(-1 if stream is None else int(stream), {})
        on_stream[part] = on_stream.get(part, 0.0) + seconds
    by_part = {"loader": 0.0, "model": 0.0, "copies": 0.0}
    for (_, part), seconds in by_kernel.items():
        by_part[part] += seconds
    # The trainer's thread: the one that ran torch's ops. The others are DALI's and its decoders':
    # at c5b2a17 the host blocked 9.4 ms a step in cudaDeviceSynchronize (~1 call a step) and 19 ms
    # in cudaEventSynchronize (~234 calls), the trace's threads unsaid; a device-wide sync on a
    # loader thread each batch would keep the loader's work from overlapping the step's.
    trainer = {getattr(e, "thread", None) for e in events if not _is_device(e) and e.name.startswith("aten::")}
    # The split holds only where the trace numbers the threads of torch's ops and of CUDA's runtime
    # calls alike: the trainer launches kernels (or its graph), so one launch must be on its thread.
    launches = [e for e in events if not _is_device(e) and e.name in LAUNCHES]
    split = not launches or any(getattr(e, "thread", None) in trainer for e in launches)
    blocking: dict[str, float] = {}
    elsewhere: dict[str, float] = {}
    for e in events:
        if not _is_device(e) and e.name in BLOCKING:
            seconds = (e.time_range.end - e.time_range.start) / 1e6
            blocking[e.name] = blocking.get(e.name, 0.0) + seconds
            if split and getattr(e, "thread", None) not in trainer:
                elsewhere[e.name] = elsewhere.get(e.name, 0.0) + seconds
    per_step = 1000.0 / steps  # seconds over the run -> ms per step
    busy = _union_seconds([(k.time_range.start, k.time_range.end) for k in kernels]) if kernels else None
    # The kernels' share of it alone: a copy (host to device, the JPEGs' and the draws'; 1.6 ms a
    # step at c5b2a17) runs on a copy engine, beside other streams' kernels, not on the SMs.
    computing = [k for k in kernels if not k.name.lower().startswith("memcpy")]
    computing_busy = _union_seconds([(k.time_range.start, k.time_range.end) for k in computing]) if computing else None
    summary = {
        "device": device, "steps": steps, "wall_ms_per_step": wall_seconds * per_step,
        "host_cpu_ms_per_step": host_seconds * per_step,
        "data_wait_share": data_wait_seconds / wall_seconds if wall_seconds else 0.0,
        "gpu_busy_share": busy / wall_seconds if busy is not None and wall_seconds else None,
        # The most images a second these steps' GPU work allows, were the GPU never idle (loader and
        # step overlapping perfectly; copies count as busy, though a copy engine could run them
        # beside kernels): at c5b2a17, A3 with the torch form, 26.8 ms of work a step for 256
        # images, ~9,560 img/s, under issue 13's 10,000 with the copies counted as busy.
        "gpu_bound_images_per_sec": images_per_step * steps / busy if busy and images_per_step else None,
        # the same for the kernels alone, were every copy run beside them on a copy engine
        "kernel_bound_images_per_sec": (images_per_step * steps / computing_busy
                                        if computing_busy and images_per_step else None),
        "gpu_ms_per_step": {part: seconds * per_step for part, seconds in by_part.items()} if kernels else None,
        "blocking_ms_per_step": {name: seconds * per_step for name, seconds in sorted(blocking.items())},
        # of which on threads other than the trainer's; None where the trace's threads could not be told apart
        "blocking_elsewhere_ms_per_step": ({name: seconds * per_step for name, seconds in sorted(elsewhere.items())}
                                           if split else None),
    }
    if kernels:
        # Which streams the GPU's work came from, busiest first: CUDA feeds streams to the GPU through
        # a context's hardware queues, 8 unless CUDA_DEVICE_MAX_CONNECTIONS says otherwise, and more
        # busy streams than queues share one (a stream's work then waits behind another's).
        summary["streams"] = [
            {"stream": stream, **{part: seconds * per_step for part, seconds in parts.items()}}
            for stream, parts in sorted(by_stream.items(), key=lambda item: -sum(item[1].values()))]
        ranked = sorted(by_kernel.items(), key=lambda item: -item[1])[:top]
        summary["top_kernels"] = [
            {"name": name[:120], "ms_per_step": seconds * per_step, "part": part}
            for (name, part), seconds in ranked]
    # What the host spends its time in, on the GPU too: there the main thread launches every kernel
    # (a70b3c8 on the H200: 63 ms of CPU a step against 30 ms of kernels), so its top operators say
    # what a CUDA graph or a leaner step would save.
    ops = sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)[:top]
    summary["top_cpu_ops"] = [{"name": op.key[:120], "ms_per_step": op.self_cpu_time_total / 1000.0 / steps,
                               "calls_per_step": op.count / steps} for op in ops]
    return summary


def render(summary: dict) -> str:
    lines = [f"{summary['steps']} steps on {summary['device']}: {summary['wall_ms_per_step']:.2f} ms a step, "
             f"the main thread busy {summary['host_cpu_ms_per_step']:.2f} ms of it, "
             f"waiting for the loader {summary['data_wait_share']:.0%} of the time"]
    if summary["gpu_busy_share"] is not None:
        gpu = summary["gpu_ms_per_step"]
        lines.append(f"GPU busy {summary['gpu_busy_share']:.0%} of the time; kernels {gpu['model']:.2f} ms a step "
                     f"for the model, {gpu['loader']:.2f} ms for the loader, copies {gpu['copies']:.2f} ms")
    if summary.get("gpu_bound_images_per_sec"):
        kernels_alone = summary.get("kernel_bound_images_per_sec")
        lines.append(f"the GPU's own work allows at most {summary['gpu_bound_images_per_sec']:,.0f} img/s "
                     f"({summary['gpu_busy_share'] * summary['wall_ms_per_step']:.2f} ms a step busy), were it never "
                     "idle" + (f"; its kernels alone {kernels_alone:,.0f} (the copies beside them on the copy engines)"
                               if kernels_alone else ""))
    if summary["blocking_ms_per_step"]:
        lines.append("the host blocked in: " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in
                                                         summary["blocking_ms_per_step"].items()) + " a step")
    if summary.get("blocking_ms_per_step") and summary.get("blocking_elsewhere_ms_per_step", {}) is None:
        lines.append("  (on which threads: unknown, the trace numbers torch's threads and CUDA's calls apart)")
    if summary.get("blocking_elsewhere_ms_per_step"):
        lines.append("  of which on other threads than the trainer's (the loader's): " + ", ".join(
            f"{name} {ms:.2f} ms" for name, ms in summary["blocking_elsewhere_ms_per_step"].items()))
    if summary.get("streams"):
        lines.append(f"the GPU's work came from {len(summary['streams'])} streams (CUDA's hardware queues: 8 unless "
                     "CUDA_DEVICE_MAX_CONNECTIONS; more busy streams share one): " + "; ".join(
                         f"{row['stream']}: " + ", ".join(f"{part} {row[part]:.2f} ms" for part in
                                                          ("model", "loader", "copies") if part in row)
                         for row in summary["streams"]))
    for row in summary.get("top_kernels", []):
        lines.append(f"  {row['ms_per_step']:8.3f} ms  {row['part']:<6}  {row['name']}")
    if summary.get("top_cpu_ops"):
        lines.append("the host's top operators (self CPU time):")
    for row in summary.get("top_cpu_ops", []):
        lines.append(f"  {row['ms_per_step']:8.3f} ms  {row['calls_per_step']:6.1f} calls  {row['name']}")
    return "\n".join(lines)


def write(summary: dict, folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    text, data = folder / "profile.txt", folder / "profile.json"
    text.write_text(render(summary) + "\n")
    data.write_text(json.dumps(summary, indent=1) + "\n")
    return text, data


# A lent GPU machine hands back files of at most 16 MiB: a larger trace would be lost with it.
TRACE_LIMIT_BYTES = 15 * 2**20


def write_trace(prof, folder: Path) -> Path | None:
    """The profiled steps' whole timeline (torch.profiler's Chrome trace: every thread's host calls
    and every stream's kernels and copies, to open in Perfetto or chrome://tracing), gzipped, as
    FOLDER/trace.json.gz: where the summary says how long the host blocked, the timeline says on
    which thread, behind which kernels. None, and no file, if it would be over TRACE_LIMIT_BYTES."""
    import gzip
    import os
    import tempfile
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        raw = Path(scratch) / "trace.json"
        prof.export_chrome_trace(str(raw))
        packed = folder / "trace.json.gz"
        with open(raw, "rb") as source, gzip.open(packed, "wb", compresslevel=6) as target:
            while chunk := source.read(1 << 20):
                target.write(chunk)
    if os.path.getsize(packed) > TRACE_LIMIT_BYTES:
        packed.unlink()
        return None
    return packed
