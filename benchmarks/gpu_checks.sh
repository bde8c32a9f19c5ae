#!/usr/bin/env bash
# Every GPU check, as one device call of at most 8 minutes (issue 13) and a second for what it did
# not reach: the checks in priority order, each under its own timeout, skipping what no longer fits
# the deadline; 8 files under $OUT (log.txt, steps.txt, gpu.jsonl, dmon.txt, profile/profile.txt,
# .json and trace.json.gz, the profiled steps' timeline; stacks.txt). First whether the loader's
# work waits for the GPU's other work (each loader form alone and beside a GPU load, then the
# loader and A3 with 32 hardware work queues instead of CUDA's 8), then why A3 end to end stays
# near 0.6x the step (c5b2a17's run), then A3 as the recipe runs it by default,
# the GPU tests never passed on a GPU, the rest of them, the other loader forms alone, the demo's
# accuracy, and last what c5b2a17 measured, again. Seen on the H200 at c5b2a17:
# ~17 s setup and versions, ~15 s engines and JPEGs, ~55 s the torch form's loader process with its
# compile, ~90 s to compile A3 and ~10 s a train variant after it, the GPU tests 400 s for 20 of
# them (two compiled the torch form at shapes of their own, 100-180 s each from a cold cache; now
# at the loader's, whose compile check 3 leaves in inductor's cache), ~45 s
# the LAMB update, ~70 s the torch form's memory, ~45 s the profile.
# The benchmark prints each JSON line as it is measured: a check cut by its timeout keeps what it
# finished. Commit gpu.jsonl and the profile under benchmarks/results/ with the GPU's name;
# `python benchmarks/gpu_report.py gpu.jsonl` prints them as the README's table and against issue 13.
#
#   bash benchmarks/gpu_checks.sh [BUDGET_SECONDS]      (default 470; run from the project root)
#   ONLY="synthetic-jpegs train-a3-cuda-graphs" bash benchmarks/gpu_checks.sh 200   (those checks alone)
#   CONTINUE=1 bash benchmarks/gpu_checks.sh 230        (on the same machine: what earlier calls at
#                                                        this commit did not reach, and the GPU tests
#                                                        a timeout cut short, from the first not run)
#
# On the lent machine (no DALI, no network): run ../shared/gpu/stage-dali here first, then
# benchmarks/stage_native_tools.sh (eu-stack for the native stacks), then make stage-dali's three
# device calls one right after another; the third carries [".stage/part-2",
# ".stage/native-tools.tar.gz"] and is
#   cp .stage/part-2 $HOME/stage/ && bash benchmarks/gpu_checks.sh 470
# with timeout_s 490 (8 minutes with the copy), and at once (a machine idle for 30 s is given back)
# a fourth,
#   CONTINUE=1 bash benchmarks/gpu_checks.sh N
# with timeout_s N + 20, N the budget_left_s of the third call's reply less ~45 (at c5b2a17: 392
# left, N = 345; the whole lease 851 s of the 900, the machine's start ~30 s of it). This
# script unpacks the staged DALI itself (once per machine) and installs the project in place.
# Elsewhere (DALI installed), it runs as it is; OUT defaults to gpu-checks/.
#   DRY_RUN=FILE bash benchmarks/gpu_checks.sh          (no GPU needed: runs nothing, writes each
#       check's name and command to FILE, NUL-separated: name, argument count, arguments; the CPU
#       tests check every command against the scripts it calls: tests/test_benchmark.py)
set -uo pipefail
budget=${1:-470}
DRY_RUN=${DRY_RUN:-}
OUT=${OUT:-gpu-checks}
mkdir -p "$OUT"
t0=$(date +%s)
left() { echo $(( budget - ($(date +%s) - t0) )); }
say() { echo "[$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/log.txt"; }
# The checks a call has run (whatever their end) at this commit, kept in $HOME between the calls of
# one machine: CONTINUE=1 skips them.
done_file="$HOME/.cache/fastrsb-gpu-checks/$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
mkdir -p "$(dirname "$done_file")" && touch "$done_file"
step() {  # step NEED_S TIMEOUT_S NAME cmd...: skipped unless NEED_S are left; killed after TIMEOUT_S
    local need=$1 limit=$2 name=$3; shift 3
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
    if [ -n "${CONTINUE:-}" ] && grep -qx "$name" "$done_file"; then return; fi
    if [ -n "$DRY_RUN" ]; then printf '%s\0' "$name" "$#" "$@" >>"$DRY_RUN"; return; fi
    if (( $(left) < need )); then say "SKIP $name ($(left)s left < ${need}s)"; return; fi
    (( limit > $(left) - 5 )) && limit=$(( $(left) - 5 ))
    say "START $name (timeout ${limit}s)"
    echo "===== $name" >>"$OUT/steps.txt"
    timeout -k 5 "$limit" "$@" >>"$OUT/steps.txt" 2>&1
    local rc=$?
    say "END $name rc=$rc"
    # Done whatever its end, but for GPU tests cut by their timeout: a later call takes them up
    # again, less the tests that ran (gpu_tests).
    [[ $name == pytest-* ]] && (( rc == 124 || rc == 137 )) || echo "$name" >>"$done_file"
    tail -n 4 "$OUT/steps.txt" | tee -a "$OUT/log.txt"
}
# The GPU tests that have run to an outcome at this commit on this machine, by node id: a later
# call (CONTINUE=1) leaves them out, so a pytest check its timeout cut resumes where it stopped.
tests_done="$done_file.tests"
touch "$tests_done"
gpu_tests() {  # gpu_tests NEED_S TIMEOUT_S NAME SELECTION: the GPU tests that `pytest -k SELECTION` picks
    local need=$1 limit=$2 name=$3 selection=$4 ran=() id
    if [ -n "${CONTINUE:-}" ]; then
        while read -r id; do ran+=(--deselect "$id"); done <"$tests_done"
    fi
    # -v: a line a test as it ends, so the output of a run its timeout cut says which tests ran.
    step "$need" "$limit" "$name" python3 -m pytest -v -ra -m gpu tests -p no:cacheprovider -k "$selection" \
        ${ran[@]+"${ran[@]}"}
    if [ -z "$DRY_RUN" ] && [ -f "$OUT/steps.txt" ]; then
        grep -oE '^tests/[^ ]+::[^ ]+ (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)' "$OUT/steps.txt" | cut -d' ' -f1 \
            >>"$tests_done"
    fi
}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

if [ -z "$DRY_RUN" ] && [ -d "$HOME/stage" ] && ! python3 -c "import nvidia.dali" 2>/dev/null; then
    if [ ! -f "$HOME/site/.done" ]; then
        mkdir -p "$HOME/site" && cat "$HOME"/stage/part-* | xz -d -T0 | tar -x -C "$HOME/site" && touch "$HOME/site/.done"
    fi
    export PYTHONPATH=$HOME/site LD_LIBRARY_PATH=$HOME/site/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}
    python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$OUT/steps.txt" 2>&1
fi
say "setup done"
if [ -z "$DRY_RUN" ]; then
    nvidia-smi dmon -s pu -d 1 >"$OUT/dmon.txt" 2>&1 &
    dmon=$!
    trap 'kill $dmon 2>/dev/null' EXIT
    python3 - <<'EOF' 2>&1 | tee -a "$OUT/log.txt"
import os, subprocess, torch, nvidia.dali as dali, timm
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print("commit", commit, "| torch", torch.__version__, "CUDA", torch.version.cuda, "|", torch.cuda.get_device_name(),
      "| DALI", dali.__version__, "| timm", timm.__version__, "| cores", os.cpu_count())
# What this torch offers to keep SMs for the loader (a CUDA green context for the step: its API
# changed from 2.10's create()/set_context() to 2.12's Stream(); some need the cuda.bindings package),
# and the stream priorities the GPU has: facts for the next fix, printed, not used.
try:
    import inspect, importlib.util
    green = getattr(torch.cuda, "green_contexts", None)
    api = "none" if green is None else ", ".join(
        f"{name}{inspect.signature(getattr(green.GreenContext, name))}" for name in ("create", "Stream", "set_context")
        if hasattr(green.GreenContext, name))
    try:
        bindings = importlib.util.find_spec("cuda.bindings") is not None
    except ImportError:
        bindings = False
    priorities = getattr(torch.cuda.Stream, "priority_range", lambda: "unknown")()
    print("green contexts:", api, "| cuda.bindings:", bindings, "| SMs",
          torch.cuda.get_device_properties(0).multi_processor_count, "| stream priorities (least, greatest):", priorities)
except Exception as err:
    print("green contexts: could not tell:", err)
EOF
    # Which native profilers the machine has (none has been looked for yet): nsys with CUDA
    # backtraces, or gdb's stacks of every thread, would name the caller of the device-wide sync.
    found=$(for t in nsys ncu gdb py-spy perf eu-stack; do command -v "$t" >/dev/null && printf '%s ' "$t"; done)
    say "tools: $found"
fi
# eu-stack for the native stacks (check 3): the machine's, else the staged one (stage_native_tools.sh).
EU_STACK=$(command -v eu-stack || true)
if [ -n "$DRY_RUN" ]; then
    EU_STACK=eu-stack
elif [ -z "$EU_STACK" ] && [ -f .stage/native-tools.tar.gz ]; then
    tools=$HOME/native-tools
    mkdir -p "$tools" && tar -xzf .stage/native-tools.tar.gz -C "$tools"
    printf '#!/bin/sh\nLD_LIBRARY_PATH=%s/lib exec %s/bin/eu-stack "$@"\n' "$tools" "$tools" >"$tools/eu-stack"
    chmod +x "$tools/eu-stack"
    if "$tools/eu-stack" --version >/dev/null 2>&1; then
        EU_STACK=$tools/eu-stack
    else
        say "the staged eu-stack does not run here: $("$tools/eu-stack" --version 2>&1 | head -1)"
    fi
fi

J=12000
BENCH="python3 benchmarks/throughput.py --json-out $OUT/gpu.jsonl --img-size 160 --batch-size 256"
DATA="--synthetic-jpegs $J"
tiny=tiny-data  # a dry run's stand-in
if [ -z "$DRY_RUN" ]; then
    tiny=$(mktemp -d)
    python3 -c "from fastrsb.demo_data import write_demo; write_demo('$tiny', 8, 1, num_classes=2)"
fi
# 1. The hardware JPEG engines DALI finds (nvImageCodec's log), and a first GPU batch.
step 30 45 hw-engines env DALI_NVIMGCODEC_LOG_LEVEL=3 python3 -c "
from fastrsb.pipelines import train_loader
x, y = next(iter(train_loader('$tiny/train', 8, 160, device='cuda')))
print('first batch', tuple(x.shape), x.dtype, x.device)"
grep -i -m 6 "hardware\|hw decoder\|nvjpg" "$OUT/steps.txt" 2>/dev/null | tee -a "$OUT/log.txt"
step 120 150 synthetic-jpegs python3 -c "
import sys; sys.path.insert(0, 'benchmarks')
from synthetic import synthetic_jpegs
synthetic_jpegs('data/bench/synthetic-$J', $J)"
# 2. Does the loader's own work wait for the GPU's other work? Each loader form alone, then beside
#    products of large matrices that keep every SM busy from a thread and a stream of their own
#    (--gpu-load: benchmarks/gpu_load.py) and depend on nothing the loader makes. If the loader
#    keeps its pace beside them, its work runs beside the GPU's and A3's ~0.6x is made in the
#    trainer's loop; if it falls to about the sum of its time and the load's, something in the
#    loader waits for the whole GPU (the ~1 device-wide sync a step at c5b2a17, or its kernels
#    queued behind the load's).
step 40 60 loader-noaa $BENCH $DATA --mode loader --loaders dali-gpu --steps 80 --aa none
step 40 60 loader-noaa-beside-load $BENCH $DATA --mode loader --loaders dali-gpu --steps 80 --aa none --gpu-load
step 40 60 loader-aa-tree $BENCH $DATA --mode loader --loaders dali-gpu --steps 80 --aa-impl tree
step 40 60 loader-aa-tree-beside-load $BENCH $DATA --mode loader --loaders dali-gpu --steps 80 --aa-impl tree \
    --gpu-load
#    Then the same with 32 hardware work queues instead of CUDA's 8. CUDA feeds each stream's work to
#    the GPU through one of a context's queues ("connections": CUDA_DEVICE_MAX_CONNECTIONS, 8 unless
#    set, at most 32); with more streams than queues, streams share one, and a stream's work waits
#    behind whatever another stream queued there before it (a false dependency). nvImageCodec makes
#    a stream for each of DALI's threads (its CUDA decoder's, 16 here, made even where the hardware
#    takes every JPEG) and one for its hardware decoder; DALI's executor and torch have their own:
#    the few busy ones likely share a queue. A3's graph queues a whole 20 ms step at once, and the
#    hardware decoder waits on its stream every batch (its source) and nvJPEG within it (c5b2a17's
#    ~234 event syncs a step): each such wait can sit behind the step's kernels, and the loader
#    alone behind the torch form's. If the loader and A3 run faster with 32, the serialization is
#    the queues' (the fix: the variable set before CUDA starts). gpu_report.py puts each row run
#    with switches against the same measurement without them.
step 40 60 loader-aa-tree-32-queues env CUDA_DEVICE_MAX_CONNECTIONS=32 $BENCH $DATA --mode loader \
    --loaders dali-gpu --steps 80 --aa-impl tree
step 40 60 loader-aa-tree-32-queues-beside-load env CUDA_DEVICE_MAX_CONNECTIONS=32 $BENCH $DATA --mode loader \
    --loaders dali-gpu --steps 80 --aa-impl tree --gpu-load
step 120 200 train-a3-32-queues env CUDA_DEVICE_MAX_CONNECTIONS=32 $BENCH $DATA --mode train --recipe a3 \
    --steps 100 --set cuda_graphs=true --variants aa_impl=tree aa=none
# 3. Why A3 end to end stays near 0.6x the step. At c5b2a17 (cuda_graphs on): the step alone 12,453
#    img/s, the loader alone with the torch form compiled and captured 15,313, A3 with both 7,085:
#    about the sum of their times, as if the loader's GPU work (DALI's decoding ~10 ms a batch at
#    a70b3c8's 24,796 img/s, the torch form ~5 ms) never overlapped the step's 20 ms; the tree form
#    7,329. The profile: the host blocked in ~234 event syncs a batch (about one an image; the
#    trainer's thread, its step one graph, makes few such calls: the decoder's threads, likely) and
#    ~1 device-wide sync, as if the decoder waited on the GPU image by image behind the step's
#    kernels (the profile now says which threads: profile_summary.py). One compile, with
#    cuda_graphs: the tree form again; no RandAugment (if this stays near 1 / (1/24,796 + 1/12,453)
#    = 8,290, DALI's decoding itself does not overlap the step); no RandAugment with DALI's queue 4
#    deep, and A3's tree form so; then two pipelines taking turns (two decoders, each with its own
#    streams and threads: if one decoder's latency under the step is the bound, two should come
#    near twice as fast) without RandAugment, in the tree form, and in the torch form on the
#    loader's own stream; and the tree form from DALI's earlier executor (exec_dynamic=false: its
#    batches copied into torch's memory, DALI's buffers freed in its own stream order instead of
#    when torch lets go of them). Second, right after the baseline, the tree form with each batch
#    handed over on the trainer's stream (stream_handover): DALI's iterator takes every batch with
#    share_outputs(), which without a stream waits on the host for the batch's GPU work (its
#    docstring: "synchronized with the host"; exec2's PopOutputs: a cudaEventSynchronize), so the
#    trainer's thread cannot queue the next step before the batch is done (where the batch comes
#    late, the GPU then waits for the host's hand-over, mixing and graph launch). Bound to the
#    stream, the wait moves onto the GPU. Then no RandAugment, with and without it.
step 150 280 train-a3-overlap $BENCH $DATA --mode train --recipe a3 --steps 100 --set cuda_graphs=true \
    --variants aa_impl=tree aa_impl=tree,stream_handover=true aa=none aa=none,stream_handover=true \
    aa=none,prefetch=4 aa_impl=tree,prefetch=4 aa=none,pipelines=2 aa_impl=tree,pipelines=2 \
    aa_impl=torch,pipelines=2,augment_stream=true aa_impl=tree,exec_dynamic=false
#    The same in a process whose DALI takes its GPU memory from CUDA's stream-ordered allocator
#    (DALI_USE_CUDA_MALLOC_ASYNC=1) instead of its own pool, which may wait on the host for frees
#    pending on other streams, torch's included (DALI's mm/async_pool.h): if the loader's next
#    batch waits for memory the step still holds, this runs faster.
step 80 150 train-a3-malloc-async env DALI_USE_CUDA_MALLOC_ASYNC=1 $BENCH $DATA --mode train --recipe a3 \
    --steps 100 --set cuda_graphs=true --variants aa_impl=tree aa=none
#    The loader alone in the torch form, compiled and captured (15,313 img/s at c5b2a17, the fastest
#    form, short of the 20,000; 1.59 GiB, over the 1.5), then so with 32 queues (the form's kernels
#    run on the trainer's stream, DALI's decoding on its own), then with torch's expandable
#    segments: at c5b2a17 torch reserved 0.63 GiB for a peak of 0.33 allocated; segments that grow
#    in place, instead of new ones beside the old, may reserve less of the difference (inductor's
#    cache makes the second and third compiles short).
step 60 120 loader-aa-torch-compiled-graphs $BENCH $DATA --mode loader --loaders dali-gpu --steps 80 \
    --aa-impl torch --compile-augment --cuda-graphs
#    (and with each batch handed over on the stream: the form's graph queued at once, not after a
#    host wait for DALI's batch; 15,313 img/s is about DALI's time plus the form's, one after the other)
step 60 120 loader-aa-torch-compiled-graphs-handover $BENCH $DATA --mode loader --loaders dali-gpu --steps 80 \
    --aa-impl torch --compile-augment --cuda-graphs --stream-handover
step 60 120 loader-aa-torch-compiled-graphs-32-queues env CUDA_DEVICE_MAX_CONNECTIONS=32 $BENCH $DATA \
    --mode loader --loaders dali-gpu --steps 80 --aa-impl torch --compile-augment --cuda-graphs
step 60 120 loader-aa-torch-compiled-graphs-expandable env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    $BENCH $DATA --mode loader --loaders dali-gpu --steps 80 --aa-impl torch --compile-augment --cuda-graphs
#    Then 15 steps under torch.profiler as at c5b2a17 (the torch form, graphs; inductor's cache from
#    above makes the compile short), its summary now saying which threads blocked (the trainer's,
#    or DALI's and its decoders'), and their whole timeline beside it (profile/trace.json.gz: every
#    thread's calls and every stream's kernels, for Perfetto).
step 60 100 train-a3-profile $BENCH $DATA --mode train --recipe a3 --steps 30 --set cuda_graphs=true \
    --aa-impl torch --profile "$OUT/profile" --profile-steps 15
#    Then who waits: every thread's native stack, 8 snapshots a second apart while A3 trains as the
#    recipe does (tree form) with graphs, once the GPU is busy (inductor's cache from above makes
#    the start short): which function of DALI's, nvImageCodec's, nvJPEG's or torch's calls each
#    CUDA wait, the device-wide one above all (native_stacks.py; the stacks in $OUT/stacks.txt).
if [ -n "$EU_STACK" ]; then
    step 80 150 native-stacks python3 benchmarks/native_stacks.py --eu-stack "$EU_STACK" --after 120 --gpu-busy 60 \
        --samples 8 --out "$OUT/stacks.txt" -- $BENCH $DATA --mode train --recipe a3 --steps 5000 \
        --set cuda_graphs=true
else
    say "SKIP native-stacks (no eu-stack here: run benchmarks/stage_native_tools.sh and carry its file)"
fi
# 4. A3 as the recipe runs it by default (no CUDA graphs), at this commit: the step alone with LAMB's
#    update eager now that it is compiled only inside a graph (2e93e03: 10,106 img/s at a70b3c8 with
#    it compiled, 11,812 at 915cdf8 eager), and the tree and torch forms end to end (6,320 and 5,560
#    at a70b3c8).
step 120 200 train-a3-default $BENCH $DATA --mode train --recipe a3 --steps 100 --variants step step,mixing=false \
    aa_impl=tree aa_impl=torch
# 5. The GPU tests that have never passed on a GPU: the DALI forms' geometric ops per sample as
#    drawn and the GPU's bicubic warp (CV-CUDA's Catmull-Rom, a = -0.5, against a numpy model of it
#    and timm's: rewritten at 0ce1429 after the test that held it to the CPU's failed at c5b2a17),
#    the "mixed" decoders reading a JPEG's pixels as stored whatever its EXIF orientation, and BMP,
#    TIFF, WebP, palette/alpha and 16-bit PNGs as the CPU's, random crops by timm's law, a loader
#    that fails on a broken file saying how to find it and shutting its pipelines down, progressive
#    resizing compiled and captured, the high-priority stream's short run. Each prints its time and
#    any traceback as it ends (FASTRSB_REPORT_AT_ONCE: tests/conftest.py).
export FASTRSB_REPORT_AT_ONCE=1
NEVER_PASSED="gpu_load or earlier_executor or cuda_graphs_auto or warm_ups or resampling_on_the_gpu or bicubic_warp"
NEVER_PASSED="$NEVER_PASSED or exif_orientation or other_formats or random_crops or fails_stops"
NEVER_PASSED="$NEVER_PASSED or progressive_resizing_trains or (speed_key and high_priority) or consumers_stream"
NEVER_PASSED="$NEVER_PASSED or runs_far_ahead"
# The two that capture the compiled torch form took 100-180 s each at c5b2a17, compiling it at
# shapes of their own from a cold cache (one was cut before it ended, the other passed on the
# second call). They now run it at the loader's A3 chunk, which check 3 compiled, so inductor's
# cache serves them (on 2 CPU cores: 27 s -> 3 s), as it serves the rest's two compiled ones
# (test_torch_rand_augment_on_the_gpu_is_the_cpus..., test_short_compiled_gpu_run). Next after the
# never-passed ones: the captured one has never passed.
SLOW_TESTS="captured_torch_rand_augment or captured_torch_form"
gpu_tests 100 200 pytest-gpu-never-passed "($NEVER_PASSED) and not ($SLOW_TESTS)"
gpu_tests 60 200 pytest-gpu-slow "$SLOW_TESTS"
# 6. The rest of the GPU tests (all passed at c5b2a17 or a70b3c8).
gpu_tests 60 200 pytest-gpu-rest "not ($NEVER_PASSED) and not ($SLOW_TESTS)"
# 7. The other loader forms alone in a process of their own (their own NVML memory) at this commit
#    (no RandAugment and the tree form: check 2; a70b3c8: 24,796 / tree 8,870 / torch eager 13,685
#    / batch 3,529): the torch form compiled, uncaptured, and eager; the batch form.
step 60 120 loader-aa-torch-compiled $BENCH $DATA --mode loader --loaders dali-gpu --steps 80 --aa-impl torch \
    --compile-augment
step 40 60 loader-aa-torch $BENCH $DATA --mode loader --loaders dali-gpu --steps 80 --aa-impl torch
step 40 60 loader-aa-batch $BENCH $DATA --mode loader --loaders dali-gpu --steps 80 --aa-impl batch
#    The torch form alone on A3's batch, its warp on every sample of a chunk and on the 39 of 64 that
#    hold the samples that drew a geometric op (warp_capacity, new at 33b7134): the form's GPU time a
#    batch, each way. At c5b2a17 A3 with the torch form kept the GPU busy 26.8 ms a step, which
#    bounds it at ~9,560 img/s with the copies counted as busy (the kernels alone: 9,940-10,170);
#    the form's and the mixing's kernels likely ~4 ms of it (that profile counted the captured
#    form's as the model's; d655f70's splits them). On 2 CPU cores the compiled warp went 87 -> 53
#    ms a chunk.
#    Each row keeps the call's 8 costliest kernels (--top-kernels): at c5b2a17 the compiled form alone
#    took 5.1 ms a batch of 256 here, and A3's profile named only its largest two (2.0, 0.66 ms a step).
#    Since 513a965 the warp computes a pixel's point and taps once for its three channels (on 2 CPU
#    cores a chunk's warp 43-45 -> 36 ms, the form 1.90 -> 1.67 s a batch): the warp-tail 0 row
#    against c5b2a17's 5.1 ms says what that is worth here.
step 80 160 augment-warp python3 benchmarks/augment_memory.py --chunk-pixels 1638400 --warp-tail 0 1e-15 \
    --top-kernels 8 --json-out "$OUT/gpu.jsonl"
#    And on the whole batch at once (compiled, the warp takes 96 of 256, 37.5%, where chunks of 64
#    take 39 of each, 61%): on 2 CPU cores as fast as in chunks (2.0 s a batch either way) for
#    twice the memory (340 MB against 165, at 2ac0f30); here at c5b2a17, every sample warped either
#    way, 5.3 ms a batch against 5.1 in chunks (810 MB against 246). With fewer samples warped whole,
#    the time against check 7's chunks says whether larger chunks now pay for their memory.
step 60 120 augment-whole-batch python3 benchmarks/augment_memory.py --chunk-pixels 0 --top-kernels 8 \
    --json-out "$OUT/gpu.jsonl"
# 8. The demo trained by fastrsb on the GPU (DALI's GPU loader, compiled, bf16) and by timm's parts,
#    one seed: the GPU path's accuracy beside timm's (on 2 CPU cores, seed 0: 87.92 and 90.00; over
#    5 seeds 90.42 +- 1.69 and 90.92 +- 1.99). No GPU run has trained to an accuracy yet.
step 120 240 timm-parity-demo python3 benchmarks/timm_parity.py --recipe demo --seeds 0 --workers 8 \
    --json-out "$OUT/gpu.jsonl"
#    A3 as `fastrsb train a3` likely runs it on one H200: the recipe's whole batch of 2,048 in one
#    micro-batch, if the probe finds it fits (estimated from torch's 5.65 GiB peak at 256 at
#    a70b3c8: ~45 GiB), so each launch serves 8x the images of the issue's batch of 256.
step 100 180 train-a3-b2048 $BENCH $DATA --mode train --recipe a3 --batch-size 2048 --steps 15 \
    --variants step aa_impl=tree aa_impl=torch
# 9. Progressive resizing's saving on the GPU (new at 26a9101): A3 end to end, and its step alone,
#    with 128 px crops (the README's example ramp trains epochs 1-62 at 128 px, 63-100 at 160),
#    beside check 4's 160 px figures.
step 90 150 train-a3-128px $BENCH $DATA --mode train --recipe a3 --img-size 128 --steps 100 --variants step \
    aa_impl=tree
# 10. Measured at c5b2a17 already (benchmarks/results/gpu-h200-c5b2a17*), again at this commit if
#    time is left: A3 with the whole step captured in each form (7,085-7,601), the LAMB update (eager
#    3.05 ms, compiled 6.51, captured 1.26 / 0.59) and the torch form's memory (its loader alone
#    again: check 3).
step 120 200 train-a3-cuda-graphs $BENCH $DATA --mode train --recipe a3 --steps 100 --set cuda_graphs=true \
    --variants step aa_impl=torch aa_impl=tree aa_impl=torch,augment_stream=true aa_impl=torch,high_priority_stream=true
step 30 60 lamb-update python3 benchmarks/lamb_update.py --model resnet50 --steps 50 --json-out "$OUT/gpu.jsonl"
step 45 100 augment-memory python3 benchmarks/augment_memory.py --json-out "$OUT/gpu.jsonl"
say "done ($(left)s left)"
