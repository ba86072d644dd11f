#!/usr/bin/env bash
# Train on one machine with torchrun: NPROC_PER_NODE ranks (default "auto": one per GPU, else one per CPU).
# Usage: [NPROC_PER_NODE=8] [MAX_RESTARTS=3] launch/single_node.sh CONFIG [--set a.b=c ...] [other `largefr train` options]
# Example: NPROC_PER_NODE=8 launch/single_node.sh configs/ms1mv3_r50.yaml --set train.batch_size=128
#
# Elastic restarts: MAX_RESTARTS=N (default 0) lets torchrun restart every rank up to N times after one
# fails; each restart resumes from the newest complete checkpoint (the run's lock, held by the dead rank 0
# process, is stale and replaced). A lost peer makes the survivors fail within train.collective_timeout_s.
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: without it torchrun hands the restarted workers the same long-lived
# rendezvous TCPStore (same MASTER_PORT) as the failed ones, and the new process group met leftovers of the
# old one (measured: 1 of 4 restarts came up, the others "Connection reset by peer" or a hang); with it each
# rendezvous round gives the workers a fresh store on a new port (measured: 4 of 4, largefr 3 of 3).
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: [NPROC_PER_NODE=N] [MAX_RESTARTS=N] $0 CONFIG [--set a.b=c ...]" >&2
  exit 2
fi
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
exec python -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node "${NPROC_PER_NODE:-auto}" \
  --max-restarts "${MAX_RESTARTS:-0}" -m largefr train "$@"
