"""Builds falqon._C, the C++/CUDA extension behind torch.ops.falqon.

The CUDA sources (csrc/cuda/*.cu) are compiled whenever nvcc and a CUDA build of torch are
present, with or without a GPU. Environment:

  TORCH_CUDA_ARCH_LIST  GPU architectures to compile for, e.g. "8.9;9.0a;10.0a". Unset: the
                        visible GPU's, or DEFAULT_ARCHS when there is none.
  CUDA_HOME             the CUDA toolkit; unset: found from nvcc on PATH or /usr/local/cuda.
  FALQON_BUILD_CUDA=0   build the CPU reference only.
  MAX_JOBS              parallel compile jobs (ninja).
  FALQON_BUILD_TEMP     folder for the object files and ninja's build file; unset: setuptools'
                        build/temp.<platform>-<python> in the checkout, for editable installs too
                        (setuptools would give those a throwaway folder), so that every kind of
                        build (editable, in-place, wheel) reuses the others' objects and ninja
                        recompiles only what changed: it tracks each object's source, the headers
                        it includes and its exact compile command.

cuBLASLt comes from the toolkit or, where the toolkit has no cuBLAS, from the nvidia-cublas wheel
that a CUDA build of torch depends on.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# FP8 tensor cores start at Ada (8.9); 9.0a lets cuBLASLt and our kernels use Hopper's own
# instructions. Used only when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible.
DEFAULT_ARCHS = "8.9;9.0a"


def _find_cuda_home():
    """A toolkit folder holding bin/nvcc and include/cuda_runtime.h, or None.

    torch's own guess takes the folder above the first nvcc on PATH, which is wrong where that
    nvcc is a wrapper script (/usr/local/bin/nvcc -> CUDA_HOME=/usr/local)."""

    def is_toolkit(path):
        return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
            os.path.join(path, "include", "cuda_runtime.h"))

    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    return next((c for c in candidates if is_toolkit(c)), None)


_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home  # before torch.utils.cpp_extension reads it

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _cublaslt_paths():
    """(include dirs, library dirs, linker flag) for cuBLASLt: the toolkit's, else torch's wheel."""
    roots = []
    if _cuda_home:
        roots.append((os.path.join(_cuda_home, "include"), [os.path.join(_cuda_home, "lib64"),
                                                            os.path.join(_cuda_home, "lib")]))
    try:
        import nvidia  # namespace package of the nvidia-* wheels that torch depends on

        for base in nvidia.__path__:
            for sub in sorted(os.listdir(base)):  # cu13/ (CUDA 13 wheels) or cublas/ (CUDA 12)
                roots.append((os.path.join(base, sub, "include"), [os.path.join(base, sub, "lib")]))
    except ImportError:
        pass
    for inc, libdirs in roots:
        if not os.path.isfile(os.path.join(inc, "cublasLt.h")):
            continue
        for libdir in libdirs:
            libs = sorted(glob.glob(os.path.join(libdir, "libcublasLt.so*")), key=len)
            if libs:
                name = os.path.basename(libs[0])
                flag = "-lcublasLt" if name == "libcublasLt.so" else f"-l:{name}"
                return [inc], [libdir], flag
    raise RuntimeError(
        "falqon: cublasLt.h and libcublasLt.so were found neither in the CUDA toolkit "
        f"({_cuda_home}) nor in torch's nvidia wheels; install nvidia-cublas or set "
        "FALQON_BUILD_CUDA=0 for a CPU-only build")


def _arch_list():
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs:
        archs = DEFAULT_ARCHS
        if torch.cuda.is_available():
            archs = ";".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i)
                                     for i in range(torch.cuda.device_count())}))
            archs = archs.replace("9.0", "9.0a")
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    return archs


def _write_build_info(with_cuda, archs):
    """falqon/_build_info.py: what this build holds, for `falqon info`."""
    info = {
        "with_cuda": with_cuda,
        "cuda_archs": archs.replace(" ", ";").split(";") if with_cuda else [],
        "torch": torch.__version__,
        "cuda": torch.version.cuda if with_cuda else None,
    }
    with open(os.path.join(ROOT, "falqon", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py at build time.\n")
        for key, value in info.items():
            f.write(f"{key.upper()} = {value!r}\n")


def _extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    with_cuda = (torch.version.cuda is not None and _cuda_home is not None and bool(cuda_sources)
                 and os.environ.get("FALQON_BUILD_CUDA", "1") != "0")
    cxx = ["-O3"]  # the C++ standard is the one torch's headers ask for (C++20 from 2.10 on)
    if not with_cuda:
        _write_build_info(False, "")
        return CppExtension("falqon._C", sources, extra_compile_args={"cxx": cxx})
    archs = _arch_list()
    inc, libdirs, lt_flag = _cublaslt_paths()
    _write_build_info(True, archs)
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo",
            # Resource report (registers, spills) in the build log; see benchmarks/NOTES.md.
            "-Xptxas=-v" if os.environ.get("FALQON_PTXAS_VERBOSE") else "-Xptxas=-O3"]
    defines = ["-DFALQON_WITH_CUDA"]
    if "9.0a" in archs.replace(" ", ";").split(";"):
        defines.append("-DFALQON_SM90A")  # the Hopper kernels (TMA, wgmma) may be launched
    return CUDAExtension(
        "falqon._C",
        sources + cuda_sources,
        include_dirs=[os.path.join(ROOT, "csrc")] + inc,
        library_dirs=libdirs,
        extra_compile_args={"cxx": cxx + defines, "nvcc": nvcc + defines},
        # Wheels: libcublasLt of torch's nvidia-cublas wheel sits beside site-packages/falqon.
        extra_link_args=[lt_flag, "-Wl,-rpath,$ORIGIN/../nvidia/cu13/lib",
                         "-Wl,-rpath,$ORIGIN/../nvidia/cublas/lib"],
    )


class _BuildExt(BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)):
    def finalize_options(self):
        # Only where --build-temp was not given: then build_temp comes from the `build` command,
        # which for an editable install is a temporary folder deleted after the build.
        if self.build_temp is None:
            chosen = os.environ.get("FALQON_BUILD_TEMP")
            if not chosen and getattr(self, "editable_mode", False):
                build = self.get_finalized_command("build")
                # The name `build` gives its build_temp in a non-editable build.
                chosen = os.path.join(build.build_base,
                                      f"temp.{build.plat_name}-{sys.implementation.cache_tag}")
            if chosen:
                self.build_temp = os.path.abspath(chosen)
        super().finalize_options()


setup(
    packages=find_packages(include=["falqon", "falqon.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": _BuildExt},
)
