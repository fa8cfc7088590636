#!/usr/bin/env bash
# Reproduces the GPU numbers of BENCHMARKS.md on a 2-GPU machine (results under ${OUT:-out}/):
# backend check, flash-backend kernel points, 1M-token triton fwd+bwd, and the training benchmark
# (MoBA on one GPU and sp=2 on two at 32K, full attention baseline).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export WANDB_MODE=offline TORCH_CUDA_ARCH_LIST=9.0
python launch/gpu_check.py --write "$OUT/backend" 2>&1 | tail -4
BACKEND=$(cat "$OUT/backend" 2>/dev/null || echo flash)
CUDA_VISIBLE_DEVICES=1 timeout 200 python -m train.bench_kernels --points 1048576:4096:12 --methods triton \
  --no-check --reps 1 --output "$OUT/bench_1m.md" --json "$OUT/kernels_1m.json" > "$OUT/bench_1m.log" 2>&1 &
CUDA_VISIBLE_DEVICES=0 timeout 200 python -m train.bench_kernels --points 32768:2048:3 131072:4096:12 131072:512:8 \
  --methods flash,triton --no-check --reps 2 --output "$OUT/bench_flash.md" --json "$OUT/kernels_flash.json" \
  > "$OUT/bench_flash.log" 2>&1
wait
tail -n 8 "$OUT/bench_flash.log" "$OUT/bench_1m.log"
MODEL="model.hidden_size=1024 model.intermediate_size=2816 model.num_layers=8 model.num_heads=16 model.num_kv_heads=8"
python -m train.bench --points 32768:full,32768:2048:3,32768:2048:3@sp2 --steps 6 --run-root /tmp/bench \
  --output "$OUT/train_bench.md" --json "$OUT/train.json" -- $MODEL moba.backend=$BACKEND 2>&1 | tail -n 14
