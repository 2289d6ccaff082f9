#!/usr/bin/env bash
# Wheel smoke check: builds a wheel of falqon with its CUDA kernels for sm_90a from a clean copy
# of the sources, installs it apart from the checkout (pip --target into a temp dir, so that it
# reuses the Python environment's torch and nothing else of the repo), and checks that
#   - the wheel holds the compiled library and the package, and no tests or benchmarks,
#   - `import falqon` comes from the wheel, the CPU ops and MeldedLinear work,
#   - `python -m falqon.info` runs and lists sm_90a (and, where cuobjdump is found, that the
#     library really holds sm_90a code).
# No GPU needed. The CUDA compile is most of the time (a few minutes on 2 cores).
#
#   scripts/check_wheel.sh [SOURCE_DIR]     (default: this checkout)
# Environment: PYTHON (default .venv/bin/python, else python3), TORCH_CUDA_ARCH_LIST (9.0a),
# MAX_JOBS (2), CUDA_HOME (found by setup.py), KEEP=1 keeps the temp dir.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
src=$(cd "${1:-$repo}" && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then PYTHON=$repo/.venv/bin/python; else PYTHON=python3; fi
fi
arch=${TORCH_CUDA_ARCH_LIST:-9.0a}
want_sm="sm_$(echo "${arch%%;*}" | tr -d '.')"   # 9.0a -> sm_90a: the first arch must be listed
tmp=$(mktemp -d)
if [ "${KEEP:-0}" = 1 ]; then echo "temp dir: $tmp"; else trap 'rm -rf "$tmp"' EXIT; fi
t0=$(date +%s)
step() { echo "== [$(( $(date +%s) - t0 )) s] $*"; }
fail() { echo "check_wheel: FAIL: $*" >&2; exit 1; }

ls "$src"/csrc/cuda/*.cu >/dev/null 2>&1 ||
  fail "$src/csrc/cuda has no .cu sources: the wheel would hold the CPU reference only"

# A clean copy: tracked and untracked-not-ignored files only, so that an in-place build of the
# checkout (falqon/_C*.so, build/, falqon/_build_info.py) cannot leak into the wheel.
step "copying the sources of $src"
mkdir -p "$tmp/src"
(cd "$src" && git ls-files -z --cached --others --exclude-standard |
  while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
  xargs -0 cp --parents -t "$tmp/src")

step "building the wheel (TORCH_CUDA_ARCH_LIST=$arch, MAX_JOBS=${MAX_JOBS:-2}) with $PYTHON"
export TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=${MAX_JOBS:-2}
unset FALQON_BUILD_CUDA
(
  cd "$tmp/src"
  if "$PYTHON" -c "import build" 2>/dev/null; then
    # --no-isolation: build against the installed torch; -x: the `wheel` package that
    # pyproject lists is not needed by setuptools >= 70.1, which builds wheels itself.
    "$PYTHON" -m build --wheel --no-isolation -x --outdir "$tmp/dist" .
  else
    "$PYTHON" -m pip wheel --no-deps --no-build-isolation -w "$tmp/dist" .
  fi
) >"$tmp/build.log" 2>&1 || { tail -40 "$tmp/build.log"; fail "the wheel did not build"; }
whl=$(ls "$tmp"/dist/falqon-*.whl)
step "built $(basename "$whl") ($(du -h "$whl" | cut -f1))"

"$PYTHON" - "$whl" <<'EOF' || fail "the wheel's contents"
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
libs = [n for n in names if n.startswith("falqon/_C") and n.endswith(".so")]
assert len(libs) == 1, f"expected one falqon/_C*.so, found {libs}"
for need in ("falqon/__init__.py", "falqon/ops.py", "falqon/modules.py", "falqon/info.py",
             "falqon/_build_info.py"):
    assert need in names, f"{need} missing from the wheel"
stray = [n for n in names if n.split("/")[0] in ("tests", "benchmarks", "scripts", "csrc")]
assert not stray, f"the wheel holds files outside the package: {stray[:5]}"
print(f"wheel contents ok: {libs[0]} and {len(names)} files")
EOF

step "installing it into $tmp/site"
"$PYTHON" -m pip install -q --no-deps --no-index --target "$tmp/site" "$whl"

cd "$tmp"   # away from the checkout: `import falqon` must find the wheel's copy
export PYTHONPATH=$tmp/site
step "importing falqon from the wheel"
"$PYTHON" - "$tmp/site" "$arch" <<'EOF' || fail "import or the CPU ops"
import os, sys
import torch
import falqon
site, arch = sys.argv[1], sys.argv[2]
assert os.path.realpath(falqon.__file__).startswith(os.path.realpath(site)), (
    f"falqon was imported from {falqon.__file__}, not from the wheel in {site}")
info = falqon.build_info()
assert info["with_cuda"] and arch.split(";")[0] in info["cuda_archs"], info
assert info["torch"] == torch.__version__, (info["torch"], torch.__version__)
layer = falqon.MeldedLinear.from_linear(torch.nn.Linear(64, 32), rank=8)
x = torch.randn(3, 64, requires_grad=True)
layer(x).sum().backward()
assert x.grad is not None and layer.lora_B.grad is not None
print(f"falqon {falqon.__version__} from {os.path.dirname(falqon.__file__)}: {info}")
EOF

step "python -m falqon.info"
"$PYTHON" -m falqon.info | tee "$tmp/info.txt"
"$PYTHON" -m falqon.info --json >"$tmp/info.json"
"$PYTHON" - "$tmp/info.json" "$arch" "$want_sm" <<'EOF' || fail "falqon info"
import json, sys
rep, arch, want_sm = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
assert arch.split(";")[0] in rep["build"]["cuda_archs"], rep["build"]
b = rep["binary"]
if b["checked"]:
    assert want_sm in b["sass"], f"cuobjdump finds {b['sass']} in the library, not {want_sm}"
    print(f"cuobjdump: the library holds {', '.join(b['sass'])}")
else:
    print(f"binary not inspected: {b['note']}")
assert not [w for w in rep["warnings"] if "disagree" in w], rep["warnings"]
EOF
grep -q "$arch" "$tmp/info.txt" || fail "falqon info does not list $arch"
step "wheel check passed"
