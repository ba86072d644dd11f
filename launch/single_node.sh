#!/usr/bin/env bash
# Train on one machine with torchrun: NPROC_PER_NODE ranks (default "auto": one per GPU, else one per CPU).
# Usage: launch/single_node.sh CONFIG [--set a.b=c ...] [other `largefr train` options]
# Example: NPROC_PER_NODE=8 launch/single_node.sh configs/ms1mv3_r50.yaml --set train.batch_size=128
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG [--set a.b=c ...]" >&2
  exit 2
fi
exec python -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node "${NPROC_PER_NODE:-auto}" \
  -m largefr train "$@"
