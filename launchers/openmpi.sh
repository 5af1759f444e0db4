#!/usr/bin/env bash
# Multi-node pre-training over Open MPI, two ways (MODE=deepspeed | mpirun).
#
#   MODE=deepspeed: `deepspeed --launcher openmpi` builds the mpirun command from the hostfile.
#   MODE=mpirun:    plain mpirun; pipeline/pretrain.py finds rank/world size through mpi4py
#                   (deepspeed.init_distributed(auto_mpi_discovery=True)).
#
#   HOSTFILE=launchers/hostfile.example MODE=mpirun NP=16 bash launchers/openmpi.sh data.path=/shared/data/zh
#
# Parameters (environment):
#   MODE          deepspeed | mpirun (default mpirun)
#   HOSTFILE      DeepSpeed-style hostfile ("host slots=N"; Open MPI reads the same syntax)
#   NP            total processes for MODE=mpirun (default: sum of slots)
#   RECIPE        run config (default pipeline/recipes/bert-base.yaml)
#   MASTER_PORT   rendezvous port (default 29500)
#   MPI_ARGS      extra mpirun arguments, e.g. "--mca btl_tcp_if_include eth0"
#                 (as root add "--allow-run-as-root"; more ranks than cores: "--oversubscribe")
# Extra arguments are key=value overrides for pipeline/pretrain.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${AMBERT_VENV:-$ROOT/.venv}"
MODE="${MODE:-mpirun}"
HOSTFILE="${HOSTFILE:-launchers/hostfile.example}"
RECIPE="${RECIPE:-pipeline/recipes/bert-base.yaml}"
MASTER_PORT="${MASTER_PORT:-29500}"
NP="${NP:-$(awk '!/^#/ && NF {split($2, a, "="); n += a[2]} END {print n}' "$HOSTFILE")}"
read -r -a mpi_extra <<< "${MPI_ARGS:-}"
case "$MODE" in
  deepspeed)
    # The openmpi launcher does not forward DS_ACCELERATOR & co.: list them in .deepspeed_env.
    exec "$VENV/bin/deepspeed" --launcher openmpi --hostfile "$HOSTFILE" --master_port "$MASTER_PORT" \
      --launcher_args "${MPI_ARGS:-}" \
      pipeline/pretrain.py --config "$RECIPE" --resume auto "$@"
    ;;
  mpirun)
    exec mpirun -np "$NP" --hostfile "$HOSTFILE" --map-by ppr:"$(awk '!/^#/ && NF {split($2, a, "="); print a[2]; exit}' "$HOSTFILE")":node \
      -x PATH -x LD_LIBRARY_PATH -x MASTER_PORT="$MASTER_PORT" -x DS_ACCELERATOR -x HF_DATASETS_OFFLINE -x HF_HUB_OFFLINE \
      "${mpi_extra[@]}" \
      "$VENV/bin/python" pipeline/pretrain.py --config "$RECIPE" --resume auto "$@"
    ;;
  *) echo "MODE must be deepspeed or mpirun, got $MODE" >&2; exit 2 ;;
esac
