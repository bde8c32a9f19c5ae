#!/usr/bin/env bash
# Every GPU check, as ONE device call of at most 9 minutes: the checks in priority order, each under
# its own timeout, skipping what no longer fits the deadline; 6 files under $OUT (log.txt, steps.txt,
# gpu.jsonl, dmon.txt, profile/profile.txt and .json). Planned: ~25 s setup, ~35 s engines and
# JPEGs, ~75 s for five loader processes, ~190 s for A3 with ten variants (one compile), ~2 min of
# GPU tests, then the profile (~50 s), the CUDA path's memory and CUDA graphs with what is left.
# The benchmark prints each JSON line as it is measured: a check cut by its timeout keeps what it
# finished. Commit gpu.jsonl and the profile under benchmarks/results/ with the GPU's name.
#
#   bash benchmarks/gpu_checks.sh [BUDGET_SECONDS]      (default 510; run from the project root)
#   ONLY="synthetic-jpegs train-a3-cuda-graphs" bash benchmarks/gpu_checks.sh 200   (those checks alone)
#
# On the lent machine (no DALI, no network): run ../shared/gpu/stage-dali here first, then make its
# three device calls one right after another; the third is
#   cp .stage/part-2 $HOME/stage/ && bash benchmarks/gpu_checks.sh 510
# with timeout_s 560: with the machine's start and the two transfers, ~10 of the 15 minutes. This
# script unpacks the staged DALI itself (once per machine) and installs the project in place.
# Elsewhere (DALI installed), it runs as it is; OUT defaults to gpu-checks/.
set -uo pipefail
budget=${1:-510}
OUT=${OUT:-gpu-checks}
mkdir -p "$OUT"
t0=$(date +%s)
left() { echo $(( budget - ($(date +%s) - t0) )); }
say() { echo "[$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/log.txt"; }
step() {  # step NEED_S TIMEOUT_S NAME cmd...: skipped unless NEED_S are left; killed after TIMEOUT_S
    local need=$1 limit=$2 name=$3; shift 3
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
    if (( $(left) < need )); then say "SKIP $name ($(left)s left < ${need}s)"; return; fi
    (( limit > $(left) - 5 )) && limit=$(( $(left) - 5 ))
    say "START $name (timeout ${limit}s)"
    echo "===== $name" >>"$OUT/steps.txt"
    timeout -k 5 "$limit" "$@" >>"$OUT/steps.txt" 2>&1
    say "END $name rc=$?"
    tail -n 4 "$OUT/steps.txt" | tee -a "$OUT/log.txt"
}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

if [ -d "$HOME/stage" ] && ! python3 -c "import nvidia.dali" 2>/dev/null; then
    if [ ! -f "$HOME/site/.done" ]; then
        mkdir -p "$HOME/site" && cat "$HOME"/stage/part-* | xz -d -T0 | tar -x -C "$HOME/site" && touch "$HOME/site/.done"
    fi
    export PYTHONPATH=$HOME/site LD_LIBRARY_PATH=$HOME/site/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}
    python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$OUT/steps.txt" 2>&1
fi
say "setup done"
nvidia-smi dmon -s pu -d 1 >"$OUT/dmon.txt" 2>&1 &
dmon=$!
trap 'kill $dmon 2>/dev/null' EXIT
python3 - <<'EOF' 2>&1 | tee -a "$OUT/log.txt"
import os, subprocess, torch, nvidia.dali as dali, timm
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print("commit", commit, "| torch", torch.__version__, "CUDA", torch.version.cuda, "|", torch.cuda.get_device_name(),
      "| DALI", dali.__version__, "| timm", timm.__version__, "| cores", os.cpu_count())
EOF

J=12000
BENCH="python3 benchmarks/throughput.py --json-out $OUT/gpu.jsonl --img-size 160 --batch-size 256"
DATA="--synthetic-jpegs $J"
tiny=$(mktemp -d)
python3 -c "from fastrsb.demo_data import write_demo; write_demo('$tiny', 8, 1, num_classes=2)"
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
# 2. The loader alone, each in a process of its own (its own NVML memory; issue 13: >= 20,000 img/s
#    with A3's RandAugment at batch 256, <= 1.5 GiB), RandAugment in its three forms. Decoding
#    defaults: hw_decoder_load by GPU (1.0 on Hopper), DALI's own buffer padding.
step 40 60 loader-aa-batch $BENCH $DATA --mode loader --loaders dali-gpu --steps 80 --aa-impl batch
step 40 60 loader-aa-torch $BENCH $DATA --mode loader --loaders dali-gpu --steps 80 --aa-impl torch
step 40 60 loader-aa-tree $BENCH $DATA --mode loader --loaders dali-gpu --steps 80 --aa-impl tree
step 40 60 loader-noaa $BENCH $DATA --mode loader --loaders dali-gpu --steps 80 --aa none
# 3. A3 end to end, the model compiled once (~1 min) for all variants: the step alone (the ceiling;
#    issue 13: >= 10,000 img/s and >= 0.9x the step), then each loader setting in turn.
step 180 270 train-a3-variants $BENCH $DATA --mode train --recipe a3 --steps 100 --variants step \
    aa_impl=batch aa_impl=torch aa_impl=tree aa_impl=batch,high_priority_stream=true aa_impl=batch,hw_decoder_load=0.9 \
    aa_impl=batch,workers=16 aa_impl=batch,prefetch=4 aa_impl=batch,concurrency=full \
    aa_impl=batch,stream_policy=per_operator
# 4. The GPU tests (each RandAugment form against the CPU's, compiled runs with each speed key,
#    resume, the torch form without a host sync).
step 100 200 pytest-gpu python3 -m pytest -q -ra -m gpu tests -p no:cacheprovider
# 5. Where a step's time goes: 15 steps under torch.profiler (inductor's cache from step 3 makes
#    this compile short).
step 60 100 train-a3-profile $BENCH $DATA --mode train --recipe a3 --steps 30 --aa-impl batch \
    --profile "$OUT/profile" --profile-steps 15
# 6. The whole step as one CUDA graph (fastrsb.step.GraphedStep): the step alone and A3 end to end
#    with the two fastest RandAugment forms at a70b3c8 (tree in training, torch in the loader alone),
#    then the tests of the graphs (the graphed step against the eager one, a short run with the
#    key, the captured torch RandAugment against the eager one).
step 120 150 train-a3-cuda-graphs $BENCH $DATA --mode train --recipe a3 --steps 100 --set cuda_graphs=true \
    --variants step aa_impl=tree aa_impl=torch
step 60 120 pytest-graphs python3 -m pytest -q -ra -m gpu tests -p no:cacheprovider -k "graphed or captured or cuda_graphs"
# 7. If time is left: the memory of nvJPEG's CUDA path (hw_decoder_load 0.9).
step 30 60 loader-noaa-hw0.9 $BENCH $DATA --mode loader --loaders dali-gpu --steps 80 --aa none --hw-decoder-load 0.9
say "done ($(left)s left)"
