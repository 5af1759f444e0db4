#!/usr/bin/env bash
# The test suite (CPU, gloo). Extra arguments go to pytest, e.g. `bash launchers/test.sh -k format`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# A clone that was never set up (no venv yet) is set up first, and a venv installed before the last
# change of pyproject.toml (a new test dependency, say) is brought up to date: the same idempotent setup.sh.
VENV="${AMBERT_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ] || [ "$ROOT/pyproject.toml" -nt "$VENV/.ambert-installed" ]; then
  bash launchers/setup.sh
fi
export DS_ACCELERATOR=cpu HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Test files run two at a time on 2 cores (pytest-xdist, a file to a worker, the longest first: a
# serial run leaves ~40% of 2 cores idle while its jobs start up, rendezvous and wait), up to 4 at a
# time on more cores. AMBERT_TEST_WORKERS=1 runs them one after another.
workers="${AMBERT_TEST_WORKERS:-$(nproc)}"
[ "$workers" -gt 4 ] && workers=4
parallel=()
[ "$workers" -gt 1 ] && parallel=(-n "$workers" --dist loadfile --no-loadscope-reorder)
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "${parallel[@]}" "$@" tests
