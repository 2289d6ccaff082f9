#!/usr/bin/env bash
# Sets up .venv with torch and falqon (built from this checkout) and the test extras.
# Idempotent: a second run only rebuilds the extension when csrc/ or setup.py changed.
#   TORCH_SPEC            the torch to install (default torch==2.14.1, the CUDA 13.0 build that
#                         lies on disk on this project's machines; elsewhere pip downloads it)
#   TORCH_CUDA_ARCH_LIST  GPU archs to compile (default: the visible GPU's, else 8.9;9.0a)
#   CUDA_HOME             the CUDA toolkit (default: found from nvcc, else /usr/local/cuda)
#   FALQON_BUILD_CUDA=0   CPU reference only (no nvcc needed)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if ! python -c "import torch" 2>/dev/null; then
  echo "== installing ${TORCH_SPEC:-torch==2.14.1}"
  pip install -q "${TORCH_SPEC:-torch==2.14.1}"
fi
pip install -q "setuptools>=70" wheel ninja

stamp="$VENV/.falqon-build"
want=$(find setup.py pyproject.toml csrc -type f -print0 | sort -z | xargs -0 sha1sum | sha1sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! python -c "import falqon" 2>/dev/null; then
  echo "== building falqon (CUDA sources compile where nvcc is found; takes a few minutes on 2 cores)"
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  pip install -q --no-build-isolation -e ".[test]"
  echo "$want" >"$stamp"
fi
python -c "import falqon, torch; i = falqon.build_info(); print('falqon', falqon.__version__, 'torch', torch.__version__, 'CUDA kernels' if i['with_cuda'] else 'CPU only', ' '.join(i['cuda_archs']))"
