#!/usr/bin/env bash
# The MoBA paper's fidelity check at small scale (issue 11, item 7): one small Llama trained from scratch
# twice on the same tokens (same seed, same data order) of the embedded corpus' package-level documents at
# 8K tokens, with full attention and with MoBA (block 512, top-3, every layer); then python -m train.eval of
# both: per-position loss (trailing-token loss), passkey retrieval and the routing recall at 2K-8K tokens.
# Everything lands under ${OUT:-out}/repro (eval.json of each run, the PNGs, metrics and eval logs).
#   STEPS=1500 ROOT=runs/repro OUT=out bash launch/repro_small.sh
# EXTRA="key=value ..." appends overrides to both runs, LENGTHS the eval lengths (a CPU smoke test:
#   STEPS=2 LENGTHS=[512,1024] EXTRA="model.hidden_size=64 model.intermediate_size=128 model.num_layers=2
#   model.num_heads=4 model.num_kv_heads=2 data.seq_len=1024 train.micro_batch_size=1 data.vocab_size=1024")
# PY is the Python that runs it: by default this checkout's .venv/bin/python, else python.
set -euo pipefail
if [ -z "${PY:-}" ]; then
  venv_py="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"
  [ -x "$venv_py" ] && PY=$venv_py || PY=python
fi
OUT=${OUT:-out}/repro
ROOT=${ROOT:-runs/repro}
STEPS=${STEPS:-1500}
LENGTHS=${LENGTHS:-[2048,4096,8192]}
read -r -d '' -a EXTRA_ARGS <<< "${EXTRA:-}" || true  # every line of EXTRA (read stops at EOF with 1)
mkdir -p "$OUT"
export WANDB_MODE=disabled
COMMON=(model.hidden_size=512 model.intermediate_size=1408 model.num_layers=8 model.num_heads=8 model.num_kv_heads=8
        data.documents=package data.seq_len=8192 data.packing=concat train.micro_batch_size=4
        "train.max_steps=$STEPS" optim.lr=1e-3 optim.warmup_steps=100 train.eval_every=250 train.eval_batches=8
        checkpoint.every=500 checkpoint.keep=1 logging.wandb.mode=disabled seed=0 moba.full_attn_layers=[]
        "${EXTRA_ARGS[@]}")
# The two runs train side by side (one GPU holds both small models; the data cache is safe to build twice).
"$PY" -m train "hydra.run.dir=$ROOT/full" schedule=full "${COMMON[@]}" > "$OUT/full_train.log" 2>&1 &
full_pid=$!
"$PY" -m train "hydra.run.dir=$ROOT/moba" schedule=moba moba.block_size=512 moba.top_k=3 "${COMMON[@]}" \
  > "$OUT/moba_train.log" 2>&1 &
moba_pid=$!
status=0
wait "$full_pid" || status=$?
wait "$moba_pid" || status=$?
tail -n 3 "$OUT/full_train.log" "$OUT/moba_train.log"
[ "$status" -eq 0 ] || { echo "a training run failed (exit $status): logs in $OUT" >&2; exit "$status"; }
# recall is measured for MoBA 512 / top-3 in both models; each keeps the attention it trained with
"$PY" -m train.eval "$ROOT/full" "$ROOT/moba" "eval.lengths=$LENGTHS" eval.documents=package eval.trials=4 \
  moba.block_size=512 moba.top_k=3 2>&1 | tail -n 4
for run in full moba; do
  for f in eval.json eval_position_loss.png eval_passkey.png eval_routing.png metrics.jsonl eval.jsonl; do
    cp "$ROOT/$run/$f" "$OUT/${run}_$f" 2>/dev/null || true
  done
done
ls -l "$OUT"
