#!/usr/bin/env bash
# Downloads the benchmark peers that the GPU machine lacks (bitsandbytes for QLoRA NF4, torchao for
# float8 training, liger-kernel for falqon.fuse's liger backend and the *_liger benchmark methods)
# as wheels into .whl/ (gitignored), for Python 3.12 on manylinux x86_64: the GPU machine's
# interpreter. Run it on a machine with access to PyPI; the GPU machine has none.
# scripts/gpu_check.sh installs whatever it finds in .whl/ with
#   python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
# Versions: torchao 0.17.0 is the release built against torch 2.11 (the GPU machine's torch);
# bitsandbytes 0.50.2 ships CUDA 13 binaries and is the version BENCHMARKS.md's anchors used.
# liger-kernel 0.8.5 is pure Python (0.9 MB); it needs torch and triton (torch's) and, for
# its transformers patches, transformers >= 5.
# All are fetched without dependencies: what they need (numpy, packaging, triton) is on that
# machine.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCHAO_VERSION=${TORCHAO_VERSION:-0.17.0}
BITSANDBYTES_VERSION=${BITSANDBYTES_VERSION:-0.50.2}
LIGER_VERSION=${LIGER_VERSION:-0.8.5}
DEST=${DEST:-.whl}
PYTHON=${PYTHON:-python3}
LIMIT_MIB=60

mkdir -p "$DEST"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done

fetch() {  # NAME VERSION
  # Keep one version of each package: two would stop the install on the GPU machine.
  find "$DEST" -maxdepth 1 -iname "$1-*.whl" ! -iname "$1-$2-*.whl" -delete
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$DEST" "$1==$2"
}

fetch torchao "$TORCHAO_VERSION"
fetch bitsandbytes "$BITSANDBYTES_VERSION"
fetch liger_kernel "$LIGER_VERSION"

total=0
for f in "$DEST"/*.whl; do
  size=$(stat -c %s "$f")
  total=$((total + size))
  printf '%8.1f MiB  %s\n' "$(echo "$size / 1048576" | bc -l)" "$f"
done
printf '%8.1f MiB  total\n' "$(echo "$total / 1048576" | bc -l)"
if (( total > LIMIT_MIB * 1048576 )); then
  echo "fetch_peer_wheels: the wheels take more than $LIMIT_MIB MiB; the device tool carries 64 MiB" \
       "with the working tree" >&2
  exit 1
fi
