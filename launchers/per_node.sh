#!/usr/bin/env bash
# Start ONE node of a multi-node job, without ssh: run this on every node (e.g. from your own
# scheduler, a container entrypoint or by hand), each with its NODE_RANK. All nodes must use the
# same HOSTFILE, MASTER_ADDR (node 0's address) and MASTER_PORT.
#
#   node 0:  NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash launchers/per_node.sh data.path=/shared/data/zh parallelism.micro_batch_size=16
#   node 1:  NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash launchers/per_node.sh data.path=/shared/data/zh parallelism.micro_batch_size=16
#   (bert-base's global batch 256 = micro-batch 16 x the example hostfile's 16 ranks)
#
# Parameters (environment):
#   NODE_RANK     this node's index in HOSTFILE (required)
#   MASTER_ADDR   node 0's address, reachable from all nodes (required)
#   MASTER_PORT   rendezvous port (default 29500)
#   HOSTFILE      the job's nodes and slots (default launchers/hostfile.example); only slot counts
#                 and the order matter here, the names are labels
#   RECIPE        run config (default pipeline/recipes/bert-base.yaml)
#   DS_CONFIG     DeepSpeed JSON (default: the recipe's parallelism.deepspeed_config)
# Extra arguments are key=value overrides for pipeline/pretrain.py.
set -euo pipefail
# Paths given relative to the directory the script is started from (HOSTFILE=myhosts) are made
# absolute before the cd to the repository (the defaults are paths inside it).
from_caller() { case "$1" in /*) printf '%s\n' "$1" ;; *) if [ -e "$1" ]; then printf '%s\n' "$PWD/$1"; else printf '%s\n' "$1"; fi ;; esac; }
for var in HOSTFILE RECIPE DS_CONFIG; do
  if [ -n "${!var:-}" ]; then printf -v "$var" '%s' "$(from_caller "${!var}")"; fi
done
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
: "${NODE_RANK:?set NODE_RANK (0 on the first node)}"
: "${MASTER_ADDR:?set MASTER_ADDR (node 0 address)}"
HOSTFILE="${HOSTFILE:-launchers/hostfile.example}"
RECIPE="${RECIPE:-pipeline/recipes/bert-base.yaml}"
MASTER_PORT="${MASTER_PORT:-29500}"
NUM_NODES="$(awk '!/^#/ && NF' "$HOSTFILE" | wc -l)"
ds_args=()
[ -n "${DS_CONFIG:-}" ] && ds_args=(--deepspeed_config "$DS_CONFIG")
exec "${AMBERT_VENV:-$ROOT/.venv}/bin/deepspeed" --hostfile "$HOSTFILE" --num_nodes "$NUM_NODES" --no_ssh \
  --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  pipeline/pretrain.py --config "$RECIPE" "${ds_args[@]}" --resume auto "$@"
