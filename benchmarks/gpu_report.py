"""One GPU run's figures (the gpu.jsonl that benchmarks/gpu_checks.sh writes) as the README's table
and against issue 13's targets, so that a run's numbers reach the README as they were measured,
not retyped, and the next decisions (RandAugment's default form, cuda_graphs) read off one screen.

    python benchmarks/gpu_report.py benchmarks/results/gpu-h200-<commit>.jsonl

First the README's opening table ("Where it stands"): the best of each kind at batch 256 and A3's
training time at that pace. Then rows: every loader and training measurement, in the order
measured, labelled by what ran (mode, RandAugment's form, compiled, captured as a CUDA graph, the
variant's settings, batch), with images/s, the share of the step alone (training rows) and memory
(NVML's figure for the process; the loaders also the CUDA context's share where the run recorded
it). Then the LAMB update and the torch form's memory, where the run has them.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

LOADER_MEMORY_GIB = 1.5  # issue 13: the loader alone at batch 256 (NVML)
LOADER_AA_IMAGES = 20_000  # issue 13: the GPU loader with A3's RandAugment at 160 px, batch 256
TRAIN_IMAGES, TRAIN_VS_STEP = 10_000, 0.9  # issue 13: A3 end to end, batch 256, and its share of the step
A3_IMAGES = 100 * 1_281_167  # A3's 100 epochs of ImageNet-1k's train set


def label(row: dict) -> str:
    """What a row measured, in words: e.g. `--mode loader` dali-gpu, RandAugment torch form, compiled."""
    if row["mode"] == "step":
        what = f"`--mode step` {row.get('recipe', '')}"
    else:
        what = f"`--mode {row['mode']}` {row['loader'] if row['mode'] == 'loader' else row.get('recipe', '')}"
    parts = [what.strip()]
    if row["mode"] != "step":
        parts.append(f"RandAugment {row['aa_impl']} form" if row.get("aa") else "no RandAugment")
    if row.get("compile_augment"):
        parts.append("compiled")
    if row.get("augment_captured") or row.get("step_captured"):
        captured = [name for key, name in (("step_captured", "step"), ("augment_captured", "RandAugment"))
                    if row.get(key)]
        parts.append(f"CUDA graphs ({' and '.join(captured)})")
    elif row.get("cuda_graphs") and row["mode"] == "loader" and not (row.get("aa") and row.get("aa_impl") == "torch"):
        parts.append("cuda_graphs on (a DALI form: nothing to capture)")  # only the torch form replays in a loader
    elif row.get("cuda_graphs"):
        parts.append("cuda_graphs on, not captured")
    if row.get("interpolation") not in (None, "random"):  # rows of before 2026-12-01: bilinear, unsaid
        parts.append(f"{row['interpolation']} crops")
    if row["mode"] == "loader" and row.get("hw_decoder_load", 1.0) != 1.0:
        parts.append(f"hw_decoder_load {row['hw_decoder_load']}")
    if row["mode"] == "loader" and row.get("stream_handover"):  # (train rows say it in their variant)
        parts.append("batches handed over on the stream (`--stream-handover`)")
    if row.get("env"):  # environment switches (throughput.ENV_SWITCHES), e.g. CUDA_DEVICE_MAX_CONNECTIONS=32
        parts.append(", ".join(f"`{key}={value}`" for key, value in sorted(row["env"].items())))
    if row.get("gpu_load_tflops") is not None:  # throughput.py --gpu-load
        parts.append(f"beside a GPU load ({row['gpu_load_tflops']:,.0f} TFLOP/s of matrix products)")
    # The variant's other settings (its form is named above already).
    settings = [item for item in (row.get("variant") or "").split(",")
                if item and item not in ("step", "default") and not item.startswith("aa_impl=")]
    if settings:
        parts.append(", ".join(f"`{item}`" for item in settings))
    if row.get("profile"):  # its pace is the timed steps' before the profiled ones (throughput._profile)
        parts.append(f"{row['steps']} steps, then profiled")
    if row.get("img_size") not in (None, 160):  # A3's 160 px goes unsaid
        parts.append(f"{row['img_size']} px")
    parts.append(f"batch {row['batch_size']}")
    return ", ".join(parts)


def _memory(row: dict) -> str:
    process = row.get("nvml_process_gib")
    if not isinstance(process, (int, float)):
        return "—"
    context = row.get("nvml_before_loader_gib")
    return f"{process:.2f} GiB" + (f" ({context:.2f} before the loader)" if isinstance(context, (int, float)) else "")


def at_issue_size(rows: list[dict]) -> list[dict]:
    """The rows issue 13's figures are for: batch 256 at 160 px, A3's crops (rows of other sizes, a
    progressive-resizing ramp's 128 px, are in the full table only)."""
    return [r for r in rows if r.get("batch_size") == 256 and r.get("img_size") in (None, 160)]


def gpu_loaders_alone(rows: list[dict]) -> list[dict]:
    """The GPU loader's rows with nothing else on the GPU: issue 13's loader figures (a row timed
    beside a GPU load, `--gpu-load`, is in the full table only)."""
    return [r for r in rows if r.get("mode") == "loader" and r.get("loader") == "dali-gpu"
            and r.get("gpu_load_tflops") is None]


def alone_of(row: dict, rows: list[dict]) -> dict | None:
    """For a loader row timed beside a GPU load: the row of the same loader, form, size, commit and
    environment switches timed alone (what check 2 of gpu_checks.sh compares), or None."""
    same = ("loader", "aa", "batch_size", "img_size", "commit", "env") + (("aa_impl",) if row.get("aa") else ())
    return next((r for r in rows if r.get("mode") == "loader" and r.get("gpu_load_tflops") is None
                 and all(r.get(key) == row.get(key) for key in same) and _same_handover(r, row)), None)


def _same_handover(a: dict, b: dict) -> bool:
    """Both rows' batches handed over alike (rows made before stream_handover existed lack the key)."""
    return bool(a.get("stream_handover")) == bool(b.get("stream_handover"))


def without_switches_of(row: dict, rows: list[dict]) -> dict | None:
    """For a row run with environment switches (`env`: 32 work queues, expandable segments, ...):
    the row of the same measurement, commit and process kind run without any (what checks 2-3 of
    gpu_checks.sh compare), or None."""
    same = ("mode", "loader", "recipe", "aa", "aa_impl", "batch_size", "img_size", "commit", "variant",
            "compile_augment", "cuda_graphs")
    return next((r for r in rows if not r.get("env") and r.get("mode") in ("loader", "train", "step")
                 and (r.get("gpu_load_tflops") is None) == (row.get("gpu_load_tflops") is None)
                 and all(r.get(key) == row.get(key) for key in same) and _same_handover(r, row)), None)


def a3_trains(rows: list[dict]) -> list[dict]:
    """The end-to-end rows that ran A3 as it is: with its RandAugment (an `aa=none` variant, which
    measures the loader's decoding beside the step, is in the full table only)."""
    return [r for r in rows if r.get("mode") == "train" and "vs_step" in r and r.get("aa")]


def glance(rows: list[dict]) -> list[str]:
    """The README's opening table: the best row of each kind at batch 256 (the step alone as the
    trainer runs it: no variant of it), then A3's 100 epochs at the best end-to-end pace."""
    at_256 = at_issue_size(rows)
    loaders = gpu_loaders_alone(at_256)
    kinds = [("A3 end to end", a3_trains(at_256)),
             ("the training step alone", [r for r in at_256 if r.get("mode") == "step"
                                          and r.get("variant") in (None, "step")]),
             ("the GPU loader alone, no RandAugment", [r for r in loaders if not r.get("aa")]),
             ("the GPU loader alone, A3's RandAugment", [r for r in loaders if r.get("aa")])]
    lines = ["| | img/s | the best row |", "|---|---:|---|"]
    best_train = None
    for name, candidates in kinds:
        if candidates:
            best = max(candidates, key=lambda r: r["images_per_sec"])
            best_train = best_train or (best if best["mode"] == "train" else None)
            lines.append(f"| {name} | {best['images_per_sec']:,.0f} | {label(best)} |")
    if best_train is not None:
        hours = A3_IMAGES / best_train["images_per_sec"] / 3600
        lines += ["", f"At {best_train['images_per_sec']:,.0f} img/s, A3's 100 epochs are ~{hours:.1f} hours of "
                      f"training on one {best_train.get('device_name', 'GPU')}."]
    return lines


def table(rows: list[dict]) -> list[str]:
    """The README's table: what | img/s | memory."""
    lines = ["| what | img/s | memory (NVML, the process) |", "|---|---:|---:|"]
    for row in rows:
        if row.get("mode") not in ("loader", "step", "train"):
            continue
        rate = f"{row['images_per_sec']:,.0f}"
        notes = []
        if "vs_step" in row:
            notes += [f"{row['vs_step']:.2f}x the step", f"data wait {row.get('data_wait', 0):.0%}"]
        if row.get("gpu_load_tflops") is not None and (alone := alone_of(row, rows)) is not None:
            notes.append(f"{row['images_per_sec'] / alone['images_per_sec']:.2f}x its pace alone")
        if row.get("env") and (base := without_switches_of(row, rows)) is not None:
            ratios = f"{row['images_per_sec'] / base['images_per_sec']:.2f}x the pace"
            if row.get("nvml_process_gib") and base.get("nvml_process_gib"):
                ratios += f", {row['nvml_process_gib'] / base['nvml_process_gib']:.2f}x the memory"
            notes.append(f"{ratios} of the same without the switches")
        if "host_busy" in row:  # since 2026-12-01: the host thread's and the GPU's busy shares, timed steps
            gpu = f", GPU {row['gpu_busy']:.0%}" if "gpu_busy" in row else ""
            notes.append(f"busy: host {row['host_busy']:.0%}{gpu}")
        if notes:
            rate += f" ({'; '.join(notes)})"
        lines.append(f"| {label(row)} | {rate} | {_memory(row)} |")
    return lines


def extras(rows: list[dict]) -> list[str]:
    """The LAMB update, the torch form's memory and the parity runs, one line each."""
    lines = []
    for row in rows:
        if row.get("mode") == "lamb_update":
            lines.append(f"LAMB update ({row['model']}, {row['variant']}): {row['ms_per_update']:.3f} ms, "
                         f"the host {row['host_ms_per_update']:.3f} ms")
        elif row.get("mode") == "timm_parity":
            lines.append(f"{row['recipe']} trained by {row['trainer']} (seed {row['seed']}, {row['device']}): "
                         f"top-1 {row['top1']:.2f}, top-5 {row['top5']:.2f}, {row['seconds']:.0f} s")
        elif row.get("mode") == "augment_memory":
            chunks = (f"chunks of {row['chunk_images']} images" if row.get("chunk_images")
                      else "whole batch, its warp in chunks" if row.get("chunk_pixels") else "whole batch")
            if row.get("warp_capacity") is not None:  # since the warp takes the samples that drew it (1e-15 tail)
                of = f"each {row['chunk_images']}" if row.get("chunk_images") else f"the {row['batch_size']}"
                taken = row["warp_capacity"] < (row.get("chunk_images") or row["batch_size"])
                chunks += f", warping {row['warp_capacity']} of {of}" if taken else ", warping every image"
            lines.append(f"torch RandAugment form alone ({row['variant']}, {chunks}, batch {row['batch_size']}): "
                         f"peak {row['peak_mb']:,.0f} MB, {row['ms_per_batch']:.1f} ms a batch")
            if row.get("top_kernels"):  # augment_memory.py --top-kernels
                lines.append("  its costliest kernels in a call: " + "; ".join(
                    f"{kernel['name'][:60]} {kernel['ms']:.2f} ms" for kernel in row["top_kernels"][:5]))
    return lines


def targets(rows: list[dict]) -> list[str]:
    """Issue 13's targets, each with the best row that bears on it: met or not."""
    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    at_256 = at_issue_size(rows)
    lines = []
    loaders = gpu_loaders_alone(at_256)
    with_aa = [r for r in loaders if r.get("aa")]
    if with_aa:
        best = max(with_aa, key=lambda r: r["images_per_sec"])
        met = verdict(best["images_per_sec"] >= LOADER_AA_IMAGES)
        lines.append(f"loader with RandAugment >= {LOADER_AA_IMAGES:,} img/s: {met} "
                     f"(best {best['images_per_sec']:,.0f}: {label(best)})")
    for row in loaders:
        process = row.get("nvml_process_gib")
        if isinstance(process, (int, float)):
            lines.append(f"loader memory <= {LOADER_MEMORY_GIB} GiB: {verdict(process <= LOADER_MEMORY_GIB)} "
                         f"({process:.2f} GiB: {label(row)})")
    trains = a3_trains(at_256)
    if trains:
        best = max(trains, key=lambda r: r["images_per_sec"])
        ok = best["images_per_sec"] >= TRAIN_IMAGES and best["vs_step"] >= TRAIN_VS_STEP
        lines.append(f"A3 end to end >= {TRAIN_IMAGES:,} img/s and >= {TRAIN_VS_STEP}x the step: {verdict(ok)} "
                     f"(best {best['images_per_sec']:,.0f}, {best['vs_step']:.2f}x: {label(best)})")
    # A profiled run (gpu_checks.sh's `--mode train --profile`: one call, no step row beside it, so
    # no vs_step): could better overlap alone reach the target, with its GPU work?
    profiled = [r for r in at_256 if r.get("mode") == "train" and r.get("aa") and r.get("profile")]
    for row in profiled:
        profile = row["profile"]
        bound, kernels_alone = profile.get("gpu_bound_images_per_sec"), profile.get("kernel_bound_images_per_sec")
        if bound:
            if bound >= TRAIN_IMAGES:
                reach = "within reach of better overlap alone"
            elif kernels_alone and kernels_alone >= TRAIN_IMAGES:
                reach = (f"within reach only with the copies beside the kernels too (the kernels alone allow "
                         f"{kernels_alone:,.0f})")
            else:
                reach = "out of reach without less GPU work a step"
            lines.append(f"  its GPU work, profiled, allows at most {bound:,.0f} img/s were the GPU never idle: "
                         f"{TRAIN_IMAGES:,} {reach} ({label(row)})")
            parts = profile.get("gpu_ms_per_step")
            if parts:  # whose work to cut: the model's, or the loader's (DALI's, and the torch form's)
                lines.append(f"    of it a step: the model's kernels {parts.get('model', 0):.2f} ms, the loader's "
                             f"{parts.get('loader', 0):.2f} ms (DALI's and the torch form's), copies "
                             f"{parts.get('copies', 0):.2f} ms")
    return lines


def report(rows: list[dict]) -> str:
    head = rows[0] if rows else {}
    title = (f"{head.get('device_name', '?')} at commit {head.get('commit', '?')} (torch {head.get('torch', '?')}, "
             f"DALI {head.get('dali', '?')}, timm {head.get('timm', '?')})")
    note = ("(The training rows of one `--variants` run share a process: their memory is the process's so far, "
            "cumulative; each loader row ran alone.)")
    return "\n".join([title, "", *glance(rows), "", *table(rows), "", note, "", *extras(rows), "",
                      *targets(rows)]) + "\n"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("jsonl", type=Path, help="a gpu.jsonl from benchmarks/gpu_checks.sh")
    args = p.parse_args(argv)
    rows = [json.loads(line) for line in args.jsonl.read_text().splitlines() if line.strip()]
    text = report(rows)
    print(text, end="")
    return text


if __name__ == "__main__":
    main()
