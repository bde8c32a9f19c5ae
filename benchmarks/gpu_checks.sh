#!/usr/bin/env bash
# Every check that needs a GPU, in one go, for a machine with an NVIDIA GPU where fastrsb, DALI
# and timm are installed; run it from the project root. Results land in OUT (JSON lines in
# OUT/gpu.jsonl, logs beside them) to be committed under benchmarks/results/.
#
#   benchmarks/gpu_checks.sh OUT [tests|loader|loader-aa|train|all]   (default: all)
#
# Each part stays under a device call's 10 minutes:
# tests:     nvidia-smi, the hardware JPEG engines DALI finds, the GPU-marked tests.
# loader:    the GPU train loader alone at 160 px, no RandAugment, over hw_decoder_load x DALI
#            threads (9 runs), and timm's loader on the same JPEGs for comparison.
# loader-aa: the same sweep with A3's RandAugment on the GPU.
# train:     A3's training step at 160 and 224 px, and the trainer's path end to end at 160 px.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_checks.sh OUT [tests|loader|loader-aa|train|all]}
part=${2:-all}
py=${PYTHON:-python3}
jpegs=${JPEGS:-20000}
mkdir -p "$out"
bench() { "$py" benchmarks/throughput.py "$@" --json-out "$out/gpu.jsonl" 2>>"$out/bench-stderr.txt" | tail -4; }

if [[ $part == tests || $part == all ]]; then
    nvidia-smi >"$out/nvidia-smi.txt" 2>&1
    tiny=$(mktemp -d)
    "$py" -c "from fastrsb.demo_data import write_demo; write_demo('$tiny', 8, 1, num_classes=2)"
    DALI_NVIMGCODEC_LOG_LEVEL=3 "$py" -c "
from fastrsb.pipelines import train_loader
next(iter(train_loader('$tiny/train', 8, 160, device='cuda')))" >"$out/hw-engines.txt" 2>&1
    grep -i -m 5 "hardware\|hw decoder\|nvjpg" "$out/hw-engines.txt"
    "$py" -m pytest -q -ra -m gpu tests >"$out/pytest-gpu.txt" 2>&1
    tail -3 "$out/pytest-gpu.txt"
fi

sweep() {  # $1: the RandAugment string, or none
    for load in 0.75 0.9 1.0; do
        for threads in 6 8 12; do
            echo "== dali-gpu aa=$1 hw_decoder_load=$load threads=$threads"
            bench --mode loader --loaders dali-gpu --synthetic-jpegs "$jpegs" --img-size 160 --batch-size 256 \
                --steps 60 --aa "$1" --hw-decoder-load "$load" --workers "$threads"
        done
    done
}

if [[ $part == loader || $part == all ]]; then
    sweep none
    echo "== timm (PIL, all cores) on the same JPEGs, A3's RandAugment"
    bench --mode loader --loaders timm --synthetic-jpegs "$jpegs" --img-size 160 --batch-size 256 --steps 20
fi

if [[ $part == loader-aa || $part == all ]]; then
    sweep rand-m6-mstd0.5-inc1
fi

if [[ $part == train || $part == all ]]; then
    for size in 160 224; do
        echo "== step a3 ${size} px"
        bench --mode step --recipe a3 --img-size "$size" --batch-size 256 --steps 50 --warmup 10
    done
    echo "== train a3 160 px (DALI GPU loader with RandAugment, mixup/cutmix, compiled step)"
    bench --mode train --recipe a3 --synthetic-jpegs "$jpegs" --img-size 160 --batch-size 256 --steps 60 --warmup 10
fi
