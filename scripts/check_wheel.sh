#!/usr/bin/env bash
# Wheel smoke check: builds a wheel of falqon with its CUDA kernels for sm_90a, installs it apart
# from the checkout (pip --target into a temp dir, so that it reuses the Python environment's
# torch and nothing else of the repo), and checks that
#   - the wheel holds the library that this build linked (build_lib and the wheel's staging
#     folder are fresh temp folders, so nothing an earlier build left can end up in it), and its
#     other package files are the sources' (each byte for byte a tracked or untracked-not-ignored
#     file of SOURCE_DIR; every module of SOURCE_DIR/falqon there), besides _build_info.py;
#     no tests, benchmarks, scripts or csrc,
#   - `import falqon` comes from the wheel, the CPU ops and MeldedLinear work,
#   - `python -m falqon.info` runs and lists sm_90a and, where cuobjdump is found (the toolkit's,
#     or the one triton ships), that the library really holds sm_90a code.
# No GPU needed.
#
#   scripts/check_wheel.sh [--reuse-build] [--require-sass] [SOURCE_DIR]   (default: this checkout)
#
# By default the wheel is built from a clean copy of SOURCE_DIR's sources (tracked and
# untracked-not-ignored files) in a temp dir: a full CUDA compile (about 5.5 min on 2 cores).
# --reuse-build  builds in SOURCE_DIR itself, so that the compile reuses the object files that
#                earlier builds left in its build/temp.* (setup_env.sh's editable install, setup.py
#                build_ext): ninja recompiles every object whose source, included headers or
#                compile command changed, and the library is linked afresh into the fresh
#                build_lib, so the wheel is still made from these sources; it costs a link instead
#                of a compile (CI uses this). SOURCE_DIR's falqon/_build_info.py, which the build
#                rewrites, is put back as it was.
# --require-sass fails where no cuobjdump is found, instead of trusting the recorded archs.
# Environment: PYTHON (default .venv/bin/python, else python3), TORCH_CUDA_ARCH_LIST (9.0a),
# MAX_JOBS (2), CUDA_HOME (found by setup.py), KEEP=1 keeps the temp dir.
set -euo pipefail
reuse=0 require_sass=0
while [ $# -gt 0 ]; do
  case "$1" in
    --reuse-build) reuse=1 ;;
    --require-sass) require_sass=1 ;;
    -*) echo "usage: $0 [--reuse-build] [--require-sass] [SOURCE_DIR]" >&2; exit 2 ;;
    *) break ;;
  esac
  shift
done
repo=$(cd "$(dirname "$0")/.." && pwd)
src=$(cd "${1:-$repo}" && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then PYTHON=$repo/.venv/bin/python; else PYTHON=python3; fi
fi
arch=${TORCH_CUDA_ARCH_LIST:-9.0a}
want_sm="sm_$(echo "${arch%%;*}" | tr -d '.')"   # 9.0a -> sm_90a: the first arch must be listed
tmp=$(mktemp -d)
cleanup() {
  if [ -f "$tmp/build_info.orig" ]; then cp -p "$tmp/build_info.orig" "$src/falqon/_build_info.py"
  elif [ -f "$tmp/build_info.absent" ]; then rm -f "$src/falqon/_build_info.py"; fi
  if [ "${KEEP:-0}" = 1 ]; then echo "temp dir: $tmp"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT
t0=$(date +%s)
step() { echo "== [$(( $(date +%s) - t0 )) s] $*"; }
fail() { echo "check_wheel: FAIL: $*" >&2; exit 1; }

ls "$src"/csrc/cuda/*.cu >/dev/null 2>&1 ||
  fail "$src/csrc/cuda has no .cu sources: the wheel would hold the CPU reference only"

# The sources: tracked and untracked-not-ignored files, so that what an in-place build of the
# checkout made (falqon/_C*.so, build/, falqon/_build_info.py) is never taken for a source.
(cd "$src" && git ls-files -z --cached --others --exclude-standard |
  while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done) >"$tmp/sources" ||
  fail "cannot list the sources of $src (not a git checkout?)"
if [ "$reuse" = 1 ]; then
  build_dir=$src
  step "building in $src, reusing the object files that ninja finds up to date"
  if [ -f "$src/falqon/_build_info.py" ]; then cp -p "$src/falqon/_build_info.py" "$tmp/build_info.orig"
  else touch "$tmp/build_info.absent"; fi
else
  build_dir=$tmp/src
  step "copying the sources of $src"
  mkdir -p "$build_dir"
  (cd "$src" && xargs -0 cp --parents -t "$build_dir" <"$tmp/sources")
  unset FALQON_BUILD_TEMP   # the copy's own build/temp.*: a build independent of the checkout's
fi
# build_lib (where the library is linked and the package gathered) and bdist_wheel's staging
# folder are fresh temp folders, set through distutils' extra config file, so that nothing an
# earlier build left in build/lib.* or build/bdist.* can end up in the wheel.
cat >"$tmp/dist-extra.cfg" <<CFG
[build]
build_lib = $tmp/build-lib
[bdist_wheel]
bdist_dir = $tmp/bdist
CFG
export DIST_EXTRA_CONFIG=$tmp/dist-extra.cfg

step "building the wheel (TORCH_CUDA_ARCH_LIST=$arch, MAX_JOBS=${MAX_JOBS:-2}) with $PYTHON"
export TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=${MAX_JOBS:-2}
# The environment's scripts first on PATH, as an activated venv has them (setup_env.sh builds in
# one): its ninja, not the system's; ninja versions hash commands differently in .ninja_log, and
# another version would recompile every object of an earlier build.
PATH="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
export PATH
unset FALQON_BUILD_CUDA
(
  cd "$build_dir"
  # build.__main__: a bare `import build` succeeds on the checkout's build/ folder (a namespace
  # package) where pypa's build is not installed.
  if "$PYTHON" -c "import build.__main__" 2>/dev/null; then
    # --no-isolation: build against the installed torch; -x: the `wheel` package that
    # pyproject lists is not needed by setuptools >= 70.1, which builds wheels itself.
    "$PYTHON" -m build --wheel --no-isolation -x --outdir "$tmp/dist" .
  else
    # -v: the backend's output (ninja's, the compiler's) in the log too.
    "$PYTHON" -m pip wheel -v --no-deps --no-build-isolation -w "$tmp/dist" .
  fi
) >"$tmp/build.log" 2>&1 || { tail -40 "$tmp/build.log"; fail "the wheel did not build"; }
whl=$(ls "$tmp"/dist/falqon-*.whl)
step "built $(basename "$whl") ($(du -h "$whl" | cut -f1))"
if grep -q "ninja: no work to do" "$tmp/build.log"; then
  echo "objects: all up to date (ninja: no work to do); the library was linked afresh"
else
  echo "objects: ninja ran $(grep -cE '^\s*\[[0-9]+/[0-9]+\] ' "$tmp/build.log" || true) compile steps"
fi
fresh=$(ls "$tmp"/build-lib/falqon/_C*.so 2>/dev/null) ||
  fail "no falqon/_C*.so in the fresh build_lib $tmp/build-lib: setuptools ignored DIST_EXTRA_CONFIG"

"$PYTHON" - "$whl" "$src" "$tmp/sources" "$fresh" <<'EOF' || fail "the wheel's contents"
import hashlib, os, sys, zipfile
whl, src, sources, fresh = sys.argv[1:]
z = zipfile.ZipFile(whl)
names = z.namelist()
libs = [n for n in names if n.startswith("falqon/_C") and n.endswith(".so")]
assert len(libs) == 1, f"expected one falqon/_C*.so, found {libs}"
with open(fresh, "rb") as f:
    assert hashlib.sha256(z.read(libs[0])).digest() == hashlib.sha256(f.read()).digest(), (
        f"the wheel's {libs[0]} is not the library this build linked ({fresh})")
stray = [n for n in names if n.split("/")[0] in ("tests", "benchmarks", "scripts", "csrc")]
assert not stray, f"the wheel holds files outside the package: {stray[:5]}"
# Besides the two files the build makes, the package is the sources: each file byte for byte,
# every module.
with open(sources, "rb") as f:
    srcs = {p for p in f.read().decode().split("\0") if p.startswith("falqon/")}
made = {libs[0], "falqon/_build_info.py"}
assert "falqon/_build_info.py" in names, "falqon/_build_info.py missing from the wheel"
pkg = [n for n in names if n.startswith("falqon/") and not n.endswith("/") and n not in made]
foreign = [n for n in pkg if n not in srcs]
assert not foreign, f"the wheel holds files that are not sources: {foreign[:5]}"


def same(name):
    with open(os.path.join(src, name), "rb") as f:
        return z.read(name) == f.read()


differ = [n for n in pkg if not same(n)]
assert not differ, f"the wheel's copies differ from the sources: {differ[:5]}"
missing = sorted(p for p in srcs if p.endswith(".py") and p not in names)
assert not missing, f"modules missing from the wheel: {missing[:5]}"
print(f"wheel contents ok: {libs[0]} (the library this build linked), {len(pkg)} package files "
      f"identical to the sources, _build_info.py; {len(names)} files in all")
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
"$PYTHON" - "$tmp/info.json" "$arch" "$want_sm" "$require_sass" <<'EOF' || fail "falqon info"
import json, sys
rep, arch, want_sm = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
require_sass = sys.argv[4] == "1"
assert arch.split(";")[0] in rep["build"]["cuda_archs"], rep["build"]
b = rep["binary"]
if b["checked"]:
    assert want_sm in b["sass"], f"cuobjdump finds {b['sass']} in the library, not {want_sm}"
    print(f"cuobjdump ({b['tool']}): the library holds {', '.join(b['sass'])}")
else:
    assert not require_sass, f"--require-sass, but the binary was not inspected: {b['note']}"
    print(f"binary not inspected: {b['note']}")
assert not [w for w in rep["warnings"] if "disagree" in w], rep["warnings"]
EOF
grep -q "$arch" "$tmp/info.txt" || fail "falqon info does not list $arch"
step "wheel check passed"
