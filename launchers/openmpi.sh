#!/usr/bin/env bash
# Multi-node pre-training over Open MPI, two ways (MODE=deepspeed | mpirun).
#
#   MODE=deepspeed: `deepspeed --launcher openmpi` builds the mpirun command from the hostfile.
#   MODE=mpirun:    plain mpirun; pipeline/pretrain.py takes rank / world size from Open MPI's
#                   OMPI_COMM_WORLD_* and the rendezvous from MASTER_ADDR / MASTER_PORT (plain mpirun
#                   without MASTER_ADDR falls back to DeepSpeed's mpi4py discovery).
#
#   HOSTFILE=launchers/hostfile.example MODE=mpirun NP=16 bash launchers/openmpi.sh data.path=/shared/data/zh \
#     parallelism.micro_batch_size=16   # bert-base's global batch 256 = micro-batch 16 x 16 ranks
#
# Parameters (environment):
#   MODE          deepspeed | mpirun (default mpirun)
#   HOSTFILE      DeepSpeed-style hostfile ("host slots=N"; Open MPI reads the same syntax)
#   NP            total processes for MODE=mpirun (default: sum of slots)
#   RECIPE        run config (default pipeline/recipes/bert-base.yaml)
#   DS_CONFIG     DeepSpeed JSON (default: the recipe's parallelism.deepspeed_config)
#   MASTER_ADDR   rendezvous host for MODE=mpirun (default: the hostfile's first host; without it
#                 DeepSpeed's MPI discovery would take rank 0's first `hostname -I` address)
#   MASTER_PORT   rendezvous port (default 29500)
#   OMP_NUM_THREADS  torch threads per rank for MODE=mpirun (default: this node's cores / its slots)
#   MPI_ARGS      extra mpirun arguments, e.g. "--mca btl_tcp_if_include ib0" (MODE=deepspeed: DeepSpeed
#                 adds "--mca btl_tcp_if_include eth0" unless MPI_ARGS names btl_tcp_if_include: name the
#                 nodes' interface there if it is not eth0)
#                 (as root add "--allow-run-as-root"; more ranks than cores: "--oversubscribe");
#                 split like a shell line (shlex), so a value with spaces can be quoted:
#                 MPI_ARGS='-x NCCL_IB_HCA="mlx5_0 mlx5_1"' (DeepSpeed splits --launcher_args the same way)
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
VENV="${AMBERT_VENV:-$ROOT/.venv}"
MODE="${MODE:-mpirun}"
HOSTFILE="${HOSTFILE:-launchers/hostfile.example}"
RECIPE="${RECIPE:-pipeline/recipes/bert-base.yaml}"
MASTER_PORT="${MASTER_PORT:-29500}"
if [ ! -f "$HOSTFILE" ]; then
  echo "HOSTFILE $HOSTFILE: no such file (one line per node: \"<hostname> slots=<GPUs>\", see launchers/hostfile.example)" >&2; exit 2
fi
SLOTS="$(awk '!/^#/ && NF {split($2, a, "="); print a[2]; exit}' "$HOSTFILE")"
if ! [[ "$SLOTS" =~ ^[1-9][0-9]*$ ]]; then
  echo "HOSTFILE $HOSTFILE: its first host line has no slots=N (GPUs on that node), e.g. \"node001 slots=8\"" >&2; exit 2
fi
NP="${NP:-$(awk '!/^#/ && NF {split($2, a, "="); n += a[2]} END {print n}' "$HOSTFILE")}"
# MPI_ARGS split as DeepSpeed splits --launcher_args (shlex): quotes group a value with spaces
mpi_extra=()
MPI_ARGS="${MPI_ARGS:-}"
if [ -n "${MPI_ARGS// /}" ]; then
  py="$VENV/bin/python"; [ -x "$py" ] || py=python3
  mapfile -d '' -t mpi_extra < <("$py" -c 'import shlex, sys; sys.stdout.write("".join(a + "\0" for a in shlex.split(sys.argv[1])))' "$MPI_ARGS" 2>/dev/null)
  if [ "${#mpi_extra[@]}" -eq 0 ]; then
    echo "MPI_ARGS could not be split like a shell line (an unbalanced quote?): $MPI_ARGS" >&2; exit 2
  fi
fi
ds_args=()
[ -n "${DS_CONFIG:-}" ] && ds_args=(--deepspeed_config "$DS_CONFIG")
case "$MODE" in
  deepspeed)
    # DeepSpeed's openmpi runner forwards neither MASTER_PORT (remote ranks would use 29500) nor
    # DS_ACCELERATOR / HF_*: passed with -x here (other variables: .deepspeed_env or MPI_ARGS).
    # (quoted for DeepSpeed's shlex split: a value may hold spaces)
    forward="-x $(printf '%q' "MASTER_PORT=$MASTER_PORT")"
    for var in DS_ACCELERATOR HF_DATASETS_OFFLINE HF_HUB_OFFLINE; do
      if [ -n "${!var:-}" ]; then forward+=" -x $(printf '%q' "$var=${!var}")"; fi
    done
    exec "$VENV/bin/deepspeed" --launcher openmpi --hostfile "$HOSTFILE" --master_port "$MASTER_PORT" \
      --launcher_args "$forward ${MPI_ARGS:-}" \
      pipeline/pretrain.py --config "$RECIPE" "${ds_args[@]}" --resume auto "$@"
    ;;
  mpirun)
    # Only the variables that are set (mpirun warns about each -x VAR it cannot find). No binding by
    # default: Open MPI pins each of <= 2 ranks to ONE core, where the data loader's workers and
    # torch's threads would share it (MPI_ARGS may give its own --bind-to / --map-by).
    # Unbound, each rank's torch would start a thread per core of the node: the node's cores shared
    # between its ranks instead (as torchrun sets OMP_NUM_THREADS), unless OMP_NUM_THREADS is given.
    cores="$(nproc 2>/dev/null || echo 1)"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / SLOTS > 0 ? cores / SLOTS : 1 ))}"
    MASTER_ADDR="${MASTER_ADDR:-$(awk '!/^#/ && NF {print $1; exit}' "$HOSTFILE")}"
    forward=(-x PATH -x MASTER_ADDR="$MASTER_ADDR" -x MASTER_PORT="$MASTER_PORT" -x OMP_NUM_THREADS)
    for var in LD_LIBRARY_PATH DS_ACCELERATOR HF_DATASETS_OFFLINE HF_HUB_OFFLINE; do
      if [ -n "${!var:-}" ]; then forward+=(-x "$var"); fi
    done
    placement=(--map-by "ppr:$SLOTS:node")
    case " ${mpi_extra[*]:-} " in *" --map-by "*|*" --npernode "*) placement=() ;; esac
    case " ${mpi_extra[*]:-} " in *" --bind-to "*) ;; *) placement+=(--bind-to none) ;; esac
    exec mpirun -np "$NP" --hostfile "$HOSTFILE" "${placement[@]}" "${forward[@]}" \
      "${mpi_extra[@]}" \
      "$VENV/bin/python" pipeline/pretrain.py --config "$RECIPE" "${ds_args[@]}" --resume auto "$@"
    ;;
  *) echo "MODE must be deepspeed or mpirun, got $MODE" >&2; exit 2 ;;
esac
