#!/usr/bin/env bash
# Runs the accuracy study on the GPU machine: makes the carried peer wheels (.whl/, see
# scripts/fetch_peer_wheels.sh) importable from /tmp/site, then python3 -m studies.accuracy "$@".
# Issue 12's comparison in three calls of under 9.5 minutes, each started while the machine is
# still warm (runs/study holds the pretrained model and the pilot's picks):
#   studies/run_gpu.sh --stages pretrain,pilot --methods issue12 --lr falqon=0.9 \
#       --budget pretrain=235,pilot=180
#   studies/run_gpu.sh --stages pilot,gsm8k --skip-done --methods issue12 --lr falqon=0.9
#   studies/run_gpu.sh --stages roleplay,report --methods issue12 --lr falqon=0.9
# falqon must be built in this checkout with its CUDA kernels (falqon/_C*.so); without them the
# falqon runs are recorded as skipped with that reason.
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=${PEER_SITE:-/tmp/site}
if compgen -G ".whl/*.whl" >/dev/null && [ ! -d "$SITE/torchao" ] && [ ! -d "$SITE/bitsandbytes" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import falqon, torch; i = falqon.build_info(); print('falqon', i, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())" || true
exec python3 -m studies.accuracy "$@"
