#!/usr/bin/env bash
# One-shot, idempotent set-up of a node for the AMBERT pipeline.
#
#   bash launchers/setup.sh            # venv in ./.venv, CPU torch if no NVIDIA GPU is visible
#   AMBERT_TORCH=skip bash launchers/setup.sh   # keep whatever torch the venv already has
#
# What it does (each step is skipped when already done, so a second run takes seconds):
#   1. Debian packages: OpenMPI (mpi4py), Boost/zlib/bz2/lzma (KenLM's lmplz), ninja (DeepSpeed JIT).
#   2. A virtual environment (AMBERT_VENV, default ./.venv).
#   3. torch: the CPU wheel on machines without an NVIDIA driver (from PyTorch CPU index when it can
#      be reached, else from the sources pip is configured with); on GPU nodes the default
#      (CUDA) wheel from PyPI, unless AMBERT_TORCH names a spec or "skip".
#   4. The project itself (pip install -e '.[dev]').
#   5. KenLM's lmplz/build_binary, compiled from the `kenlm` sdist on PyPI into ./third_party/kenlm/bin
#      (no distribution ships lmplz; the pip wheel is only the query module).
#   6. On machines without a GPU, DeepSpeed's CPU communication op (JIT-built once, not by the first job).
#   7. The project's bytecode (compileall), read even where PYTHONDONTWRITEBYTECODE is set.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${AMBERT_VENV:-$ROOT/.venv}"
PY="${AMBERT_PYTHON:-python3}"
KENLM_PREFIX="$ROOT/third_party/kenlm"
log() { printf '[setup %(%H:%M:%S)T] %s\n' -1 "$*"; }

# ---- 1. system packages ------------------------------------------------------------------
need_apt=()
command -v mpirun >/dev/null 2>&1 || need_apt+=(libopenmpi-dev openmpi-bin)
[ -f /usr/include/boost/program_options.hpp ] || need_apt+=(libboost-program-options-dev libboost-system-dev libboost-thread-dev libboost-test-dev)
[ -f /usr/include/zlib.h ] || need_apt+=(zlib1g-dev)
[ -f /usr/include/bzlib.h ] || need_apt+=(libbz2-dev)
[ -f /usr/include/lzma.h ] || need_apt+=(liblzma-dev)
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
command -v g++ >/dev/null 2>&1 || need_apt+=(g++)
command -v ninja >/dev/null 2>&1 || need_apt+=(ninja-build)
"$PY" -c "import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" 2>/dev/null \
  || need_apt+=(python3-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=(); [ "$(id -u)" -ne 0 ] && SUDO=(sudo)
  # Without root or sudo (a cluster login node) this step cannot be done here: say what is missing and
  # what needs it, and go on (a GPU training node needs none of KenLM's; the steps that do say so).
  missing="install them (an administrator, or your cluster's modules), then run this script again: ${need_apt[*]} (Open MPI: mpi4py and the MPI launchers; Boost/zlib/bz2/lzma, cmake, g++: KenLM's lmplz; ninja: DeepSpeed's CPU ops; python3-dev: data_prep/_native.c, optional)"
  if ! command -v apt-get >/dev/null 2>&1; then
    log "WARNING: not a Debian/Ubuntu system; $missing"
  elif [ ${#SUDO[@]} -gt 0 ] && ! command -v sudo >/dev/null 2>&1; then
    log "WARNING: not root and no sudo, so no system packages can be installed; $missing"
  else
    log "installing system packages: ${need_apt[*]}"
    if ! { "${SUDO[@]}" apt-get update -qq \
           && "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null; }; then
      log "WARNING: apt-get could not install the system packages (see above); $missing"
    fi
  fi
fi

# ---- 2. virtual environment --------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip wheel setuptools
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

# ---- 3. torch ----------------------------------------------------------------------------
TORCH_SPEC="${AMBERT_TORCH:-auto}"
TORCH_INDEX=()
have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
# A venv set up on a CPU machine (a login node, the demo) holds the CPU build: on a GPU node it would
# train every rank on the CPU. Replaced by PyPI's CUDA build (AMBERT_TORCH=skip keeps it).
if [ "$TORCH_SPEC" = "auto" ] && have_gpu \
   && "$VENV/bin/python" -c "import sys, torch; sys.exit(torch.version.cuda is not None or getattr(torch.version, 'hip', None) is not None)" 2>/dev/null; then
  log "this node has an NVIDIA GPU but $VENV holds a CPU-only torch: replacing it with the CUDA build"
  "$VENV/bin/python" -m pip uninstall -q -y torch
fi
if [ "$TORCH_SPEC" != "skip" ] && ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if [ "$TORCH_SPEC" = "auto" ]; then
    if have_gpu; then
      TORCH_SPEC="torch>=2.4"          # GPU node: PyPI's default CUDA build
    else
      TORCH_SPEC="torch==2.13.0"       # CPU node: a CPU wheel (a range would pull a multi-GB CUDA build)
      # PyPI's torch wheels are CUDA builds: the CPU one comes from PyTorch's index when it can be
      # reached (a machine whose pip is configured with a local wheel mirror gets it from there).
      if "$VENV/bin/python" -c 'import urllib.request as u; u.urlopen("https://download.pytorch.org/whl/cpu/torch/", timeout=5)' 2>/dev/null; then
        TORCH_SPEC="torch==2.13.0+cpu"
        TORCH_INDEX=(--extra-index-url https://download.pytorch.org/whl/cpu)
      fi
    fi
  fi
  log "installing $TORCH_SPEC"
  "${PIP[@]}" "${TORCH_INDEX[@]}" "$TORCH_SPEC"
fi

# ---- 4. the project ----------------------------------------------------------------------
stamp="$VENV/.ambert-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ] || [ "$ROOT/setup.py" -nt "$stamp" ] \
   || [ "$ROOT/data_prep/_native.c" -nt "$stamp" ]; then
  log "installing the project and its dependencies (and compiling data_prep/_native.c)"
  "${PIP[@]}" -e "$ROOT[dev]"
  touch "$stamp"
fi
# The C word numbering and sentence splitting of the Chinese build (optional: without a C compiler the
# build runs the same steps in Python, ~1.5-2 s slower per 20 MB of text).
if ! (cd "$ROOT" && AMBERT_PURE_PYTHON= "$VENV/bin/python" -c "import sys; from data_prep.languages import load_native; sys.exit(load_native() is None)") 2>/dev/null; then
  log "warning: data_prep/_native.c did not compile (gcc and the Python headers, python3-dev, are needed; then touch data_prep/_native.c and run this again): the Chinese build uses its slower Python path"
fi

# ---- 5. KenLM lmplz / build_binary -------------------------------------------------------
if [ ! -x "$KENLM_PREFIX/bin/lmplz" ] || [ ! -x "$KENLM_PREFIX/bin/build_binary" ]; then
  log "building KenLM lmplz/build_binary from the kenlm sdist (~1 min)"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  "$VENV/bin/python" -m pip download -q --no-deps --no-binary kenlm --no-build-isolation -d "$work" kenlm
  tar -xzf "$work"/kenlm-*.tar.gz -C "$work"
  src="$(find "$work" -maxdepth 1 -type d -name 'kenlm-*' | head -1)"
  cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release >"$work/cmake.log" 2>&1 \
    || { tail -30 "$work/cmake.log"; exit 1; }
  make -C "$src/build" -j"$(nproc)" lmplz build_binary >"$work/make.log" 2>&1 \
    || { tail -30 "$work/make.log"; exit 1; }
  mkdir -p "$KENLM_PREFIX/bin.tmp"
  cp "$src/build/bin/lmplz" "$src/build/bin/build_binary" "$KENLM_PREFIX/bin.tmp/"
  rm -rf "$KENLM_PREFIX/bin" && mv "$KENLM_PREFIX/bin.tmp" "$KENLM_PREFIX/bin"
fi

# ---- 6. DeepSpeed's CPU op -----------------------------------------------------------------
# On a machine without a GPU, DeepSpeed's CPU all-reduce JIT-compiles its shared-memory op on the
# first init_distributed (~40 s on 2 cores, under a lock a killed start-up leaves behind: README,
# Known limitations). Built here once, into the directory every later job loads it from (torch
# rebuilds it only when its sources or flags change; a built op loads in ~2 s).
if ! have_gpu; then
  log "DeepSpeed's CPU communication op (built the first time: ~40 s)"
  # With the venv's ninja, the one every job uses (pipeline.parallel puts it first on PATH): a build log
  # of Debian's older ninja makes the venv's rebuild the op, and the reverse. Into the venv's own
  # torch_extensions/ (pipeline.parallel.use_this_environments_extensions_dir), where every job of this
  # venv loads it from: torch's default, ~/.cache/torch_extensions, is shared by every venv of the user.
  (cd "$ROOT" && PATH="$VENV/bin:$PATH" DS_ACCELERATOR=cpu "$VENV/bin/python" -c "from pipeline.parallel import use_this_environments_extensions_dir
use_this_environments_extensions_dir()
from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
ShareMemCommBuilder().load(verbose=False)") >/dev/null 2>&1 \
    || log "could not build DeepSpeed's CPU op now (the first CPU job builds it instead)"
fi

# ---- 7. the project's bytecode -------------------------------------------------------------
# An editable install compiles nothing, and where PYTHONDONTWRITEBYTECODE is set (as in this
# project's CI image) every process would compile data_prep/ and pipeline/ again (~0.1 s each; a
# training launch starts one per rank). Python reads these caches even then; stale ones are ignored.
"$VENV/bin/python" -m compileall -q -j 0 "$ROOT/data_prep" "$ROOT/pipeline" "$ROOT/tests" >/dev/null || true

log "ready: $VENV (python $("$VENV/bin/python" -c 'import sys;print(sys.version.split()[0])'),"\
" torch $("$VENV/bin/python" -c 'import torch;print(torch.__version__)')), lmplz in $KENLM_PREFIX/bin"
