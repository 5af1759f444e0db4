#!/usr/bin/env bash
# Every benchmark in one command; each prints its ratios measured side by side in the same run.
#
#   bash tests/bench/run_all.sh            # ~15-25 min on 2 CPU cores
#   bash tests/bench/run_all.sh model      # only the benchmarks whose name contains "model"
#
# Output goes to the console and to runs/bench/<name>.txt. Run on an otherwise idle machine: the
# 2-worker / 2-rank ratios need both cores, and every benchmark prints the load average it saw.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${AMBERT_VENV:-$ROOT/.venv}/bin/python"
export DS_ACCELERATOR=cpu HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
BENCHES="data_prep_zh data_prep_en data_prep_memory verify model pretrain"
case "${1:-}" in
  -h|--help) sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; echo "benchmarks: $BENCHES"; exit 0 ;;
esac
if [ -n "${1:-}" ] && ! echo "$BENCHES" | tr ' ' '\n' | grep -q -- "${1}"; then
  echo "error: no benchmark name contains '$1' (benchmarks: $BENCHES)" >&2; exit 2
fi
mkdir -p runs/bench
for bench in $BENCHES; do
  case "$bench" in *"${1:-}"*) ;; *) continue ;; esac
  echo "=== tests/bench/bench_$bench.py ($(date +%H:%M:%S), load $(cut -d' ' -f1 /proc/loadavg))"
  "$PY" "tests/bench/bench_$bench.py" 2>&1 | tee "runs/bench/$bench.txt"
done
