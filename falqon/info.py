"""`falqon info` (or `python -m falqon.info`): what this build of falqon holds and whether this
machine's GPU can run it: the torch and CUDA it was built against and the ones running, the GPU
architectures compiled in (as recorded at build time and, where cuobjdump is at hand, as found in
the binary), each GPU's compute capability and whether a compiled architecture covers it, and
whether the FP8 path or the emulated one will run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field

import torch

import falqon
from ._extension import build_info

# FP8 tensor cores (and the float8 conversion instructions) start at Ada, compute capability 8.9.
FP8_MIN_CAPABILITY = (8, 9)
EMULATION_ENV = "FALQON_FORCE_EMULATION"


@dataclass(frozen=True)
class Arch:
    """One entry of TORCH_CUDA_ARCH_LIST: "8.9", "9.0a", "10.0f", "8.6+PTX"."""

    major: int
    minor: int
    suffix: str = ""     # "a": arch-specific (runs on exactly this capability), "f": family
    ptx: bool = False    # PTX embedded as well, JIT-compiled by the driver for newer GPUs

    @classmethod
    def parse(cls, entry: str) -> "Arch | None":
        m = re.fullmatch(r"\s*(\d+)\.(\d+)([af]?)(\+PTX)?\s*", entry, flags=re.IGNORECASE)
        if not m:
            return None
        return cls(int(m[1]), int(m[2]), m[3].lower(), bool(m[4]))

    @classmethod
    def from_sm(cls, name: str, ptx: bool = False) -> "Arch":
        """From a cuobjdump name: sm_90a -> 9.0a, sm_100f -> 10.0f, sm_89 -> 8.9."""
        m = re.fullmatch(r"sm_(\d+)(\d)([af]?)", name)
        if not m:
            raise ValueError(f"not an sm_XY name: {name!r}")
        return cls(int(m[1]), int(m[2]), m[3], ptx)

    @property
    def sm(self) -> str:
        return f"sm_{self.major}{self.minor}{self.suffix}"

    def runs_natively_on(self, cc: tuple[int, int]) -> bool:
        """Whether this SASS runs on a GPU of compute capability cc: an "a" build only on that
        exact capability; a plain or "f" (family) build on the same major version at the same or
        a higher minor (binary compatibility within a major version)."""
        if self.suffix == "a":
            return cc == (self.major, self.minor)
        return cc[0] == self.major and cc[1] >= self.minor

    def ptx_runs_on(self, cc: tuple[int, int]) -> bool:
        # PTX of compute_XY is JIT-compiled for any GPU of capability >= X.Y; arch-specific
        # ("a") PTX only for that exact capability.
        if not self.ptx:
            return False
        if self.suffix == "a":
            return cc == (self.major, self.minor)
        return cc >= (self.major, self.minor)


def coverage(archs: list[Arch], cc: tuple[int, int]) -> tuple[bool, str]:
    """(covered, explanation) for a GPU of compute capability cc and the compiled archs."""
    native = [a.sm for a in archs if a.runs_natively_on(cc)]
    if native:
        return True, f"covered by {', '.join(native)}"
    jit = [f"compute_{a.major}{a.minor}{a.suffix}" for a in archs if a.ptx_runs_on(cc)]
    if jit:
        return True, (f"only through PTX ({', '.join(jit)}), JIT-compiled by the driver at first "
                      "use: slow start-up, no architecture-specific instructions, and the driver "
                      "must be as new as the CUDA that built it")
    want = f"{cc[0]}.{cc[1]}" + ("a" if cc in ((9, 0), (10, 0), (10, 3)) else "")
    return False, (f"not covered: no compiled architecture runs on {cc[0]}.{cc[1]}; rebuild with "
                   f"TORCH_CUDA_ARCH_LIST={want}")


def parse_cuobjdump(listing: str, kind: str) -> list[str]:
    """The sm_XY[a|f] names of `cuobjdump --list-elf` (kind "elf") or `--list-ptx` ("ptx") output,
    e.g. "ELF file    1: _C.cpython-312-x86_64-linux-gnu.1.sm_90a.cubin"."""
    ext = "cubin" if kind == "elf" else "ptx"
    found = re.findall(rf"\bsm_(\d+[af]?)\.{ext}\b", listing)
    return sorted({f"sm_{s}" for s in found}, key=_sm_key)


def _sm_key(sm: str) -> tuple:
    m = re.fullmatch(r"sm_(\d+)([af]?)", sm)
    return (int(m[1]), m[2]) if m else (0, sm)


def _find_cuobjdump() -> str | None:
    candidates = [shutil.which("cuobjdump")]
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            candidates.append(os.path.join(os.environ[env], "bin", "cuobjdump"))
    candidates.append("/usr/local/cuda/bin/cuobjdump")
    # Triton, which CUDA builds of torch depend on, ships its own cuobjdump: the one at hand where
    # the toolkit has none (a minimal toolkit, a machine with pip's CUDA wheels only).
    try:
        triton = importlib.util.find_spec("triton")
    except (ImportError, ValueError):
        triton = None
    if triton is not None and triton.origin:
        candidates.append(os.path.join(os.path.dirname(triton.origin), "backends", "nvidia", "bin",
                                       "cuobjdump"))
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


@dataclass
class BinaryCheck:
    checked: bool
    library: str | None = None
    tool: str | None = None
    sass: list[str] = field(default_factory=list)
    ptx: list[str] = field(default_factory=list)
    note: str = ""


def check_binary(library: str | None) -> BinaryCheck:
    """The GPU code really in falqon/_C*.so, read with cuobjdump when it is at hand."""
    if not library or not os.path.isfile(library):
        return BinaryCheck(False, library, note="the compiled library falqon._C was not found")
    tool = _find_cuobjdump()
    if tool is None:
        return BinaryCheck(False, library, note="not checked: cuobjdump is neither on PATH, "
                                                "in CUDA_HOME/bin nor in triton's package")
    out = {}
    for kind in ("elf", "ptx"):
        try:
            res = subprocess.run([tool, f"--list-{kind}", library], capture_output=True, text=True,
                                 timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return BinaryCheck(False, library, tool, note=f"cuobjdump failed: {exc}")
        # cuobjdump exits non-zero on a file without device code of that kind.
        out[kind] = res.stdout if res.returncode == 0 else ""
    sass, ptx = parse_cuobjdump(out["elf"], "elf"), parse_cuobjdump(out["ptx"], "ptx")
    note = "" if sass or ptx else "the library holds no GPU code"
    return BinaryCheck(True, library, tool, sass, ptx, note)


def compare_archs(recorded: list[Arch], binary: BinaryCheck) -> str | None:
    """A sentence where the recorded archs and those found in the binary disagree, else None."""
    if not binary.checked:
        return None
    want_sass = sorted({a.sm for a in recorded}, key=_sm_key)
    want_ptx = sorted({a.sm for a in recorded if a.ptx}, key=_sm_key)
    problems = []
    if want_sass != binary.sass:
        problems.append(f"SASS recorded {want_sass or 'none'} but the binary holds "
                        f"{binary.sass or 'none'}")
    if want_ptx and want_ptx != binary.ptx:
        problems.append(f"PTX recorded {want_ptx} but the binary holds {binary.ptx or 'none'}")
    return "; ".join(problems) or None


@dataclass
class GPU:
    index: int
    name: str
    capability: str
    covered: bool | None
    coverage: str
    fp8: bool


def _gpus() -> list[tuple[str, tuple[int, int]]]:
    if not torch.cuda.is_available():
        return []
    return [(torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
            for i in range(torch.cuda.device_count())]


def _library_path() -> str | None:
    spec = importlib.util.find_spec("falqon._C")
    return spec.origin if spec else None


def collect(gpus: list[tuple[str, tuple[int, int]]] | None = None,
            binary: BinaryCheck | None = None, build: dict | None = None) -> dict:
    """Everything `falqon info` reports, as a JSON-able dict. The arguments replace what is read
    from this machine (for tests)."""
    build = build_info() if build is None else build
    gpus = _gpus() if gpus is None else gpus
    binary = check_binary(_library_path()) if binary is None else binary
    entries = build.get("cuda_archs") or []
    archs = [a for a in map(Arch.parse, entries) if a is not None]
    unknown = [e for e in entries if Arch.parse(e) is None]
    # Judge coverage by what is in the binary where it was read, else by the recorded list.
    if binary.checked and (binary.sass or binary.ptx):
        effective = ([Arch.from_sm(s) for s in binary.sass]
                     + [Arch.from_sm(s, ptx=True) for s in binary.ptx])
    else:
        effective = archs
    with_cuda = bool(build.get("with_cuda"))
    forced = os.environ.get(EMULATION_ENV) == "1"
    warnings = []
    gpu_rows = []
    for i, (name, cc) in enumerate(gpus):
        fp8 = tuple(cc) >= FP8_MIN_CAPABILITY
        if with_cuda:
            covered, text = coverage(effective, tuple(cc))
        else:
            covered, text = False, "this build has no CUDA kernels (a CPU-only build)"
        gpu_rows.append(GPU(i, name, f"{cc[0]}.{cc[1]}", covered, text, fp8))
    mismatch = compare_archs(archs, binary)
    if mismatch:
        warnings.append(f"the recorded GPU archs and the binary disagree: {mismatch}")
    if unknown:
        warnings.append(f"unrecognised arch entries {unknown} (named archs are not checked)")
    built_torch, running_torch = build.get("torch"), torch.__version__
    if built_torch and built_torch.split("+")[0] != running_torch.split("+")[0]:
        warnings.append(f"built against torch {built_torch} but torch {running_torch} is running: "
                        "rebuild falqon (torch's C++ ABI changes between releases)")
    built_cuda, running_cuda = build.get("cuda"), torch.version.cuda
    if with_cuda and built_cuda and running_cuda and \
            built_cuda.split(".")[0] != running_cuda.split(".")[0]:
        warnings.append(f"built with CUDA {built_cuda} but torch runs CUDA {running_cuda}")
    return {
        "falqon": falqon.__version__,
        "path": os.path.dirname(falqon.__file__),
        "build": build,
        "runtime": {"torch": running_torch, "cuda": running_cuda,
                    "python": platform.python_version()},
        "binary": asdict(binary),
        "gpus": [asdict(g) for g in gpu_rows],
        "mode": _mode(with_cuda, gpu_rows, forced),
        "emulation_forced": forced,
        # The kernels' switches (FALQON_FORCE_EMULATION, fast accumulation, ...) set for this run.
        "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith("FALQON_")},
        "warnings": warnings,
    }


def _mode(with_cuda: bool, gpus: list[GPU], forced: bool) -> str:
    """Which implementation the ops on the current GPU (device 0) will run, in words."""
    if not gpus:
        return ("no CUDA GPU: the ops run the CPU reference (FP8 emulated by casts), which is for "
                "tests and small runs")
    g = gpus[0]
    if not with_cuda:
        return ("this build has no CUDA kernels: CUDA tensors cannot be used (build with nvcc and a "
                "CUDA build of torch)")
    if not g.covered:
        return f"the CUDA kernels do not run on this GPU: {g.coverage}"
    if forced:
        return (f"{EMULATION_ENV}=1: the CUDA ops emulate FP8 (reference numerics on the GPU, "
                "slower than bf16)")
    if not g.fp8:
        return (f"compute capability {g.capability} < 8.9, no FP8 tensor cores: the CUDA ops "
                "emulate FP8 (reference numerics on the GPU, slower than bf16)")
    return "FP8 available: the CUDA ops run FP8 tensor-core GEMMs (cuBLASLt) and fused kernels"


def format_report(info: dict) -> str:
    b, rt, bin_ = info["build"], info["runtime"], info["binary"]
    archs = ", ".join(b.get("cuda_archs") or []) or "none"
    built_cuda = b.get("cuda") or "none (no CUDA kernels)"
    lines = [
        f"falqon {info['falqon']}  ({info['path']})",
        f"built with    torch {b.get('torch') or 'unknown'}, CUDA {built_cuda}, GPU archs: {archs}",
        f"running       torch {rt['torch']}, CUDA {rt['cuda'] or 'none (CPU build of torch)'}, "
        f"Python {rt['python']}",
    ]
    if bin_["checked"]:
        found = ", ".join(bin_["sass"]) or "no SASS"
        if bin_["ptx"]:
            found += f"; PTX {', '.join(bin_['ptx'])}"
        lines.append(f"in the binary {found}  (cuobjdump: {bin_['tool']})"
                     + (f"; {bin_['note']}" if bin_["note"] else ""))
    else:
        lines.append(f"in the binary {bin_['note']}")
    if not info["gpus"]:
        lines.append("GPU           none visible")
    for g in info["gpus"]:
        lines.append(f"GPU {g['index']:<9} {g['name']}, compute capability {g['capability']}: "
                     f"{g['coverage']}")
    lines.append(f"mode          {info['mode']}")
    if info["environment"]:
        lines.append("environment   " + " ".join(f"{k}={v}" for k, v in info["environment"].items()))
    for w in info["warnings"]:
        lines.append(f"warning       {w}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="falqon info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
