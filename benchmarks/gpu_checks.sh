#!/usr/bin/env bash
# Every GPU check, as one device call of at most 8 minutes (issue 13) and a second for what it did
# not reach: the checks in priority order, each under its own timeout, skipping what no longer fits
# the deadline; 6 files under $OUT (log.txt, steps.txt, gpu.jsonl, dmon.txt, profile/profile.txt
# and .json). First what no GPU run has measured yet (the
# torch RandAugment form compiled and replayed as a CUDA graph; the whole step as one CUDA graph;
# their tests), then the figures of a70b3c8 again at this commit. Seen on the H200 at a70b3c8: ~20 s
# setup and versions, ~15 s engines and JPEGs, ~15-20 s a loader process, ~60-80 s to compile A3 and
# ~12 s a train variant after it, 171 s for the 20 GPU tests, ~40 s the profile (compiling the torch
# RandAugment form: ~10 s on 2 CPU cores here, not yet timed on the GPU).
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
# On the lent machine (no DALI, no network): run ../shared/gpu/stage-dali here first, then make its
# three device calls one right after another; the third is
#   cp .stage/part-2 $HOME/stage/ && bash benchmarks/gpu_checks.sh 470
# with timeout_s 490 (8 minutes with the copy), and at once (a machine idle for 30 s is given back)
# a fourth,
#   CONTINUE=1 bash benchmarks/gpu_checks.sh 310
# with timeout_s 330: with the machine's start and the two transfers, ~14 of the 15 minutes. This
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
EOF
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
# 2. New since a70b3c8: the torch RandAugment form compiled (its ~900 calls a batch fused) and
#    replayed as a CUDA graph, in the loader alone (at a70b3c8, eager and uncaptured: 13,685
#    img/s, the fastest form; issue 13: >= 20,000 at batch 256, <= 1.5 GiB); then A3 with the whole
#    step as one CUDA graph (the recipe's compile compiles the torch form too; at a70b3c8 without
#    graphs: the step alone 10,106 img/s, the tree form end to end 6,320, the torch form 5,560),
#    and the torch form on a stream of the loader's own (augment_stream: its kernels beside the last
#    step's instead of after them), then the GPU tests of what is new (the graphed step, the
#    compiled and the captured RandAugment, the geometric ops resampled bilinear or bicubic per
#    sample (new at c2b8fcb: every figure from here on includes timm's bicubic half of the warps,
#    ~2.8x a bilinear warp's cost on the CPU), the short runs with cuda_graphs and with the compiled
#    torch form (each epoch's peak memory on its line, new since 0e0d8b0), the loader's own
#    stream, NVML's handle by UUID (the start-up memory line, doctor),
#    the "mixed" decoders reading a JPEG's pixels as stored whatever its EXIF orientation (new at
#    569cf77, as timm's PIL does) and reading BMP, TIFF, WebP, palette/alpha and 16-bit PNGs as the
#    CPU's (new since 75928e1), cutting random crops by timm's law (new since 2b8f856), and a loader
#    that fails on a broken file saying how to find it and shutting its pipelines down (new at
#    38fdf0f); the rest come in check 6).
step 60 120 loader-aa-torch-compiled-graphs $BENCH $DATA --mode loader --loaders dali-gpu --steps 80 \
    --aa-impl torch --compile-augment --cuda-graphs
step 120 200 train-a3-cuda-graphs $BENCH $DATA --mode train --recipe a3 --steps 100 --set cuda_graphs=true \
    --variants step aa_impl=torch aa_impl=tree aa_impl=torch,augment_stream=true aa_impl=torch,high_priority_stream=true
NEW_TESTS="gpu_two_pipelines or gpu_train_loader_with or batch_kept_across or graphed_step or captured_torch or rand_augment_on_the_gpu or resampling_on_the_gpu or bicubic_warp or (speed_key and cuda_graphs) or short_compiled or stream_of_its_own or nvml or startup_states or doctor_on_a_gpu or exif_orientation or other_formats or random_crops or by_its_index or fails_stops"
gpu_tests 100 200 pytest-gpu-new "$NEW_TESTS"
# 3. The LAMB update alone on ResNet-50's parameters, eager and compiled, each also as a CUDA graph:
#    is the compiled update why the step alone fell from 11,812 (915cdf8: eager LAMB, no mixing) to
#    10,106 img/s (a70b3c8)? (Check 5's `step,mixing=false` is 915cdf8's step, update compiled.)
step 30 60 lamb-update python3 benchmarks/lamb_update.py --model resnet50 --steps 50 --json-out "$OUT/gpu.jsonl"
#    The torch RandAugment form alone, compiled in chunks of 64 images (its default since adbe658)
#    and on the whole batch, and eager (on a GPU: the whole batch, its warp in chunks): torch's
#    peak memory in one call and its time (on 2 CPU cores at a524a95, with the bicubic filter
#    where drawn, chunked: eager 585 MB, compiled 167; whole: 2,025 and 353; the loader's 1.5 GiB
#    bound leaves ~0.5 GiB beside DALI's ~1). Compiled, does chunking cost the GPU time (4 calls a
#    batch, uncaptured)?
step 45 100 augment-memory python3 benchmarks/augment_memory.py --json-out "$OUT/gpu.jsonl"
# 4. Where a step's time goes with the graphs: 15 steps under torch.profiler (inductor's cache from
#    check 2 makes this compile short).
step 60 100 train-a3-profile $BENCH $DATA --mode train --recipe a3 --steps 30 --set cuda_graphs=true \
    --aa-impl torch --profile "$OUT/profile" --profile-steps 15
# 5. The figures of a70b3c8 at this commit, without graphs: the step alone and each form end to end
#    (one compile; the torch form compiled and not), then each loader alone in a process of its own
#    (its own NVML memory).
step 150 200 train-a3-variants $BENCH $DATA --mode train --recipe a3 --steps 100 --variants step step,mixing=false \
    aa_impl=tree aa_impl=torch aa_impl=torch,compile_augment=false aa_impl=batch
step 60 120 loader-aa-torch-compiled $BENCH $DATA --mode loader --loaders dali-gpu --steps 80 --aa-impl torch \
    --compile-augment
#    A3 as `fastrsb train a3` likely runs it on one H200: the recipe's whole batch of 2,048 in one
#    micro-batch, if the probe finds it fits (estimated from torch's 5.65 GiB peak at 256 at
#    a70b3c8: ~45 GiB), so each launch serves 8x the images of the issue's batch of 256.
step 100 180 train-a3-b2048 $BENCH $DATA --mode train --recipe a3 --batch-size 2048 --steps 15 \
    --variants step aa_impl=tree aa_impl=torch
step 40 60 loader-aa-torch-graphs $BENCH $DATA --mode loader --loaders dali-gpu --steps 80 --aa-impl torch --cuda-graphs
step 40 60 loader-aa-torch $BENCH $DATA --mode loader --loaders dali-gpu --steps 80 --aa-impl torch
step 40 60 loader-aa-tree $BENCH $DATA --mode loader --loaders dali-gpu --steps 80 --aa-impl tree
step 40 60 loader-noaa $BENCH $DATA --mode loader --loaders dali-gpu --steps 80 --aa none
step 40 60 loader-aa-batch $BENCH $DATA --mode loader --loaders dali-gpu --steps 80 --aa-impl batch
# 6. The GPU tests of what had passed at a70b3c8 (20 in all then, 171 s).
gpu_tests 60 150 pytest-gpu-rest "not ($NEW_TESTS)"
# 7. The demo trained by fastrsb on the GPU (DALI's GPU loader, compiled, bf16) and by timm's parts,
#    one seed: the GPU path's accuracy beside timm's (on 2 CPU cores, seed 0: 87.92 and 90.00; over
#    5 seeds 90.42 +- 1.69 and 90.92 +- 1.99). No GPU run has trained to an accuracy yet.
step 120 240 timm-parity-demo python3 benchmarks/timm_parity.py --recipe demo --seeds 0 --workers 8 \
    --json-out "$OUT/gpu.jsonl"
# 8. Progressive resizing's saving on the GPU (new at 26a9101): A3 end to end, and its step alone,
#    with 128 px crops (the README's example ramp trains epochs 1-62 at 128 px, 63-100 at 160),
#    beside check 5's 160 px figures.
step 90 150 train-a3-128px $BENCH $DATA --mode train --recipe a3 --img-size 128 --steps 100 --variants step \
    aa_impl=tree
say "done ($(left)s left)"
