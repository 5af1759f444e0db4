#!/usr/bin/env bash
# Multi-node pre-training with the deepspeed launcher over pdsh + passwordless ssh (its default).
# Run on the first node of the hostfile; the launcher starts every rank on every node.
#
#   HOSTFILE=launchers/hostfile.example RECIPE=pipeline/recipes/bert-base.yaml \
#     bash launchers/multinode_pdsh.sh data.path=/shared/data/zh output_dir=/shared/runs/bert-base \
#     parallelism.micro_batch_size=16
#
# bert-base.yaml's global batch (256 sequences) is micro-batch 32 x 8 ranks: on the example hostfile's
# 16 ranks, micro-batch 16 (on 32 ranks, 8; the start-up check names the value for any other count).
#
# Parameters (environment):
#   HOSTFILE      nodes and slots (default launchers/hostfile.example)
#   RECIPE        run config (default pipeline/recipes/bert-base.yaml)
#   DS_CONFIG     DeepSpeed JSON (default: the recipe's parallelism.deepspeed_config)
#   MASTER_ADDR   address of the first node reachable from all nodes (default: first host of HOSTFILE)
#   MASTER_PORT   rendezvous port (default 29500)
# Requirements: the repository and the venv at the same path on every node (shared file system),
# passwordless ssh between nodes, pdsh installed. The checkpoint directory must be shared.
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
HOSTFILE="${HOSTFILE:-launchers/hostfile.example}"
RECIPE="${RECIPE:-pipeline/recipes/bert-base.yaml}"
MASTER_ADDR="${MASTER_ADDR:-$(awk '!/^#/ && NF {print $1; exit}' "$HOSTFILE")}"
MASTER_PORT="${MASTER_PORT:-29500}"
NUM_NODES="$(awk '!/^#/ && NF' "$HOSTFILE" | wc -l)"
ds_args=()
[ -n "${DS_CONFIG:-}" ] && ds_args=(--deepspeed_config "$DS_CONFIG")
# .deepspeed_env (one VAR=value a line, in $HOME or the working directory) is exported on every
# node by the launcher: put NCCL_* / HF_* settings there.
exec "${AMBERT_VENV:-$ROOT/.venv}/bin/deepspeed" \
  --hostfile "$HOSTFILE" --num_nodes "$NUM_NODES" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  pipeline/pretrain.py --config "$RECIPE" "${ds_args[@]}" --resume auto "$@"
