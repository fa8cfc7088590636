#!/usr/bin/env bash
# Issue 5's scale-out run: one node of 8 GPUs, ZeRO-3 + Ulysses sequence parallelism over all 8, a
# Llama-3-8B-shaped model (LAYERS deep), MoBA (block 4096, top-12, last 3 layers full) at SEQ tokens.
# Trains STEPS1 steps with a checkpoint, then resumes from it to STEPS2 (a second launch, resume=auto),
# and appends tokens/s and peak memory to ${OUT:-out}/scaleout.md.
#   launch/scaleout_8gpu.sh                       # 8 GPUs, 512K tokens, 8 layers
#   NPROC=2 SEQ=131072 launch/scaleout_8gpu.sh    # the same script on 2 GPUs
#   NPROC=2 DEVICE=cpu SEQ=1024 LAYERS=2 EXTRA="model.hidden_size=64 ..." launch/scaleout_8gpu.sh   # CPU rehearsal
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-8}; SEQ=${SEQ:-524288}; LAYERS=${LAYERS:-8}; STEPS1=${STEPS1:-3}; STEPS2=${STEPS2:-6}
DEVICE=${DEVICE:-cuda}; OUT=${OUT:-out}; RUN=${RUN:-runs/scaleout_sp${NPROC}_${SEQ}}
mkdir -p "$OUT"
if [ "$DEVICE" = cpu ]; then export DS_ACCELERATOR=cpu LOCAL_SIZE=$NPROC; fi
args=(model=llama3_8b "model.num_layers=$LAYERS" moba=paper_1m "data.seq_len=$SEQ" "parallel.sp_size=$NPROC"
      parallel.zero_stage=3 train.activation_checkpointing=true "checkpoint.every=$STEPS1" checkpoint.export_hf=false
      train.eval_batches=1 optim.warmup_steps=2 "device=$DEVICE" "hydra.run.dir=$RUN" ${EXTRA:-})
run() { python -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m train "${args[@]}" "$@"; }
run "train.max_steps=$STEPS1" resume=none
run "train.max_steps=$STEPS2" resume=auto
python - "$RUN" "$OUT/scaleout.md" "$NPROC" "$SEQ" "$LAYERS" <<'PY'
import json, statistics, sys
run, out, nproc, seq, layers = sys.argv[1:]
rows = [json.loads(x) for x in open(f"{run}/metrics.jsonl") if x.strip()]
tps = statistics.median(r["tokens_per_s"] for r in rows[1:] or rows)
mem = max((r.get("mem_gb") or 0) for r in rows)
losses = ", ".join("%.4f" % r["loss"] for r in rows)
line = f"| {nproc} | {seq} | {layers} | {tps:.0f} | {tps / int(nproc):.0f} | {mem:.1f} | {losses} |"
open(out, "a").write(line + "\n")
print("GPUs | seq_len | layers | tokens/s | tokens/s/GPU | peak GiB/GPU | losses per step\n" + line)
PY
