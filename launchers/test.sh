#!/usr/bin/env bash
# The test suite (CPU, gloo). Extra arguments go to pytest, e.g. `bash launchers/test.sh -k format`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# A clone that was never set up (no venv yet) is set up first: the same idempotent setup.sh.
if [ ! -x "${AMBERT_VENV:-$ROOT/.venv}/bin/python" ]; then
  bash launchers/setup.sh
fi
export DS_ACCELERATOR=cpu HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${AMBERT_VENV:-$ROOT/.venv}/bin/python" -m pytest -q -p no:cacheprovider "$@" tests
