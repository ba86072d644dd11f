#!/usr/bin/env bash
# Train on NNODES machines: run this once on every node, with the same MASTER_ADDR:MASTER_PORT (the
# rendezvous endpoint, reachable from all nodes; node 0 hosts it) and that node's NODE_RANK.
# Usage: NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 [MASTER_PORT=29500] [NPROC_PER_NODE=8] [MAX_RESTARTS=0] \
#        launch/multi_node.sh CONFIG [--set a.b=c ...]
# MAX_RESTARTS=0 (default): static rendezvous; node ranks are the given NODE_RANKs, and
# global rank = NODE_RANK * NPROC_PER_NODE + local rank.
# MAX_RESTARTS=N > 0: elastic restarts (see single_node.sh) need the c10d rendezvous: the static one keeps
# one TCPStore for every round, so a restarted group meets the failed one's leftovers. Node ranks then
# follow the order in which the nodes join (RDZV_ID names the job; default: MASTER_ADDR:MASTER_PORT).
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: NNODES=N NODE_RANK=R MASTER_ADDR=HOST [MASTER_PORT=P] [MAX_RESTARTS=N] $0 CONFIG [--set a.b=c ...]" >&2
  exit 2
fi
: "${NNODES:?set NNODES (number of nodes)}"
: "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1, this node)}"
: "${MASTER_ADDR:?set MASTER_ADDR (host name or address of node 0)}"
restarts="${MAX_RESTARTS:-0}"
endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}"
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
if [ "$restarts" = "0" ]; then
  rdzv=(--node_rank "$NODE_RANK" --rdzv_backend static --rdzv_endpoint "$endpoint")
else
  rdzv=(--rdzv_backend c10d --rdzv_endpoint "$endpoint" --rdzv_id "${RDZV_ID:-largefr-$endpoint}")
fi
exec python -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "${NPROC_PER_NODE:-auto}" \
  --max-restarts "$restarts" "${rdzv[@]}" -m largefr train "$@"
