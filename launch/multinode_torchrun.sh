#!/usr/bin/env bash
# Several nodes with torchrun's c10d rendezvous. Run the same command on every node:
#   NNODES=4 RDZV_HOST=node001 launch/multinode_torchrun.sh parallel.sp_size=8 parallel.zero_stage=3
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then [ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python; fi
: "${NNODES:?set NNODES}" "${RDZV_HOST:?set RDZV_HOST (the first node)}"
NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
exec "$PY" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$NPROC" \
  --rdzv_backend c10d --rdzv_endpoint "$RDZV_HOST:${RDZV_PORT:-29500}" --rdzv_id "${RDZV_ID:-moba-cpt}" \
  -m train "$@"
