"""`falqon info` (falqon/info.py), on the CPU: arch coverage rules, cuobjdump parsing, the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import falqon
from falqon import info
from falqon.info import Arch, BinaryCheck, collect, compare_archs, coverage, format_report

H100, L40S, A100, B200, RTX5090 = (9, 0), (8, 9), (8, 0), (10, 0), (12, 0)


@pytest.mark.parametrize("entry,expected", [
    ("9.0a", Arch(9, 0, "a")), ("8.9", Arch(8, 9)), ("10.0a", Arch(10, 0, "a")),
    ("10.0f", Arch(10, 0, "f")), ("8.6+PTX", Arch(8, 6, "", True)), (" 12.0 ", Arch(12, 0)),
    ("Hopper", None), ("9", None), ("", None),
])
def test_arch_parse(entry, expected):
    assert Arch.parse(entry) == expected


@pytest.mark.parametrize("sm,expected", [
    ("sm_90a", Arch(9, 0, "a")), ("sm_89", Arch(8, 9)), ("sm_100a", Arch(10, 0, "a")),
    ("sm_103f", Arch(10, 3, "f")), ("sm_120", Arch(12, 0)),
])
def test_arch_from_cuobjdump_name(sm, expected):
    assert Arch.from_sm(sm) == expected
    assert expected.sm == sm


@pytest.mark.parametrize("archs,cc,covered,words", [
    (["9.0a"], H100, True, "sm_90a"),
    (["9.0a"], L40S, False, "TORCH_CUDA_ARCH_LIST=8.9"),     # 8.9 needs 8.9
    (["8.9", "9.0a"], L40S, True, "sm_89"),
    (["9.0a"], B200, False, "10.0a"),                         # an "a" build runs on its cc only
    (["10.0a"], B200, True, "sm_100a"),
    (["10.0a"], (10, 3), False, "not covered"),
    (["10.0f"], (10, 3), True, "sm_100f"),                    # family builds cover the family
    (["8.0"], L40S, True, "sm_80"),                           # same major, higher minor
    (["8.9"], H100, False, "not covered"),                    # SASS never crosses a major
    (["8.9+PTX"], H100, True, "PTX"),                         # ... PTX does, through the JIT
    (["9.0a+PTX"], B200, False, "not covered"),               # arch-specific PTX does not
    ([], H100, False, "not covered"),
])
def test_coverage_rules(archs, cc, covered, words):
    ok, text = coverage([Arch.parse(a) for a in archs], cc)
    assert ok is covered
    assert words in text


# As cuobjdump 13 lists a falqon/_C*.so (one cubin per .cu file and arch).
LIST_ELF = """\
ELF file    1: gemm.sm_89.cubin
ELF file    2: gemm.sm_90a.cubin
ELF file    3: quantize.sm_89.cubin
ELF file    4: quantize.sm_90a.cubin
"""
LIST_PTX = "PTX file    1: quantize.sm_90a.ptx\n"


def test_parse_cuobjdump():
    assert info.parse_cuobjdump(LIST_ELF, "elf") == ["sm_89", "sm_90a"]
    assert info.parse_cuobjdump(LIST_PTX, "ptx") == ["sm_90a"]
    assert info.parse_cuobjdump(LIST_PTX, "elf") == []
    assert info.parse_cuobjdump("", "elf") == []


def test_find_cuobjdump_falls_back_to_tritons(monkeypatch, tmp_path):
    """Without cuobjdump on PATH or in a toolkit, the one that triton's package ships is used."""
    import importlib.machinery
    import os
    pkg = tmp_path / "site" / "triton"
    tool = pkg / "backends" / "nvidia" / "bin" / "cuobjdump"
    tool.parent.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-toolkit"))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(info.os.path, "isfile",
                        lambda p, isfile=os.path.isfile: p != "/usr/local/cuda/bin/cuobjdump"
                        and isfile(p))
    spec = importlib.machinery.ModuleSpec("triton", None, origin=str(pkg / "__init__.py"))
    monkeypatch.setattr(info.importlib.util, "find_spec",
                        lambda name: spec if name == "triton" else None)
    tool.write_text("#!/bin/sh\n")
    assert info._find_cuobjdump() is None          # there, but not executable
    tool.chmod(0o755)
    assert info._find_cuobjdump() == str(tool)
    monkeypatch.setattr(info.importlib.util, "find_spec", lambda name: None)
    assert info._find_cuobjdump() is None          # no triton either


def test_compare_archs_reports_disagreement():
    recorded = [Arch.parse("8.9"), Arch.parse("9.0a")]
    agree = BinaryCheck(True, "x.so", "cuobjdump", ["sm_89", "sm_90a"], [])
    assert compare_archs(recorded, agree) is None
    missing = BinaryCheck(True, "x.so", "cuobjdump", ["sm_90a"], [])
    assert "sm_89" in compare_archs(recorded, missing)
    assert compare_archs(recorded, BinaryCheck(False, note="no cuobjdump")) is None
    assert "PTX" in compare_archs([Arch.parse("9.0a+PTX")],
                                  BinaryCheck(True, "x.so", "c", ["sm_90a"], []))


CUDA_BUILD = {"with_cuda": True, "cuda_archs": ["8.9", "9.0a"], "torch": None, "cuda": "13.0"}


def test_collect_h100_with_matching_binary():
    import torch
    build = dict(CUDA_BUILD, torch=torch.__version__)
    binary = BinaryCheck(True, "x.so", "cuobjdump", ["sm_89", "sm_90a"], [])
    rep = collect(gpus=[("NVIDIA H100 80GB HBM3", H100)], binary=binary, build=build)
    assert rep["gpus"][0]["covered"] and rep["gpus"][0]["fp8"]
    assert "FP8 available" in rep["mode"]
    assert rep["warnings"] == []
    text = format_report(rep)
    assert "NVIDIA H100 80GB HBM3, compute capability 9.0: covered by sm_90a" in text
    assert "sm_89, sm_90a" in text
    json.dumps(rep)  # JSON-able


def test_collect_judges_by_the_binary_and_warns_on_disagreement():
    # Recorded 8.9 and 9.0a, but the binary holds only sm_90a: an L40S is not covered.
    binary = BinaryCheck(True, "x.so", "cuobjdump", ["sm_90a"], [])
    rep = collect(gpus=[("NVIDIA L40S", L40S)], binary=binary, build=CUDA_BUILD)
    assert not rep["gpus"][0]["covered"]
    assert "do not run on this GPU" in rep["mode"]
    assert any("disagree" in w and "sm_89" in w for w in rep["warnings"])


def test_collect_old_gpu_and_forced_emulation(monkeypatch):
    binary = BinaryCheck(False, note="not checked")
    rep = collect(gpus=[("NVIDIA A100", A100)], binary=binary,
                  build=dict(CUDA_BUILD, cuda_archs=["8.0", "9.0a"]))
    assert rep["gpus"][0]["covered"] and not rep["gpus"][0]["fp8"]
    assert "emulate FP8" in rep["mode"] and "8.9" in rep["mode"]
    # Only this variable: others set where the tests run (FALQON_DATA_DIR, say) would be listed too.
    for name in [n for n in os.environ if n.startswith("FALQON_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("FALQON_FORCE_EMULATION", "1")
    rep = collect(gpus=[("NVIDIA H100", H100)], binary=binary, build=CUDA_BUILD)
    assert rep["emulation_forced"] and "FALQON_FORCE_EMULATION=1" in rep["mode"]
    assert rep["environment"]["FALQON_FORCE_EMULATION"] == "1"
    assert "environment   FALQON_FORCE_EMULATION=1" in format_report(rep)


def test_collect_cpu_only_build_and_version_mismatch():
    build = {"with_cuda": False, "cuda_archs": [], "torch": "1.0.0", "cuda": None}
    rep = collect(gpus=[("NVIDIA H100", H100)], binary=BinaryCheck(False, note="n/a"), build=build)
    assert not rep["gpus"][0]["covered"]
    assert "no CUDA kernels" in rep["mode"]
    assert any("torch 1.0.0" in w for w in rep["warnings"])
    rep = collect(gpus=[], binary=BinaryCheck(False, note="n/a"), build=build)
    assert "CPU reference" in rep["mode"]


def test_main_prints_this_machine(capsys):
    assert info.main([]) == 0
    out = capsys.readouterr().out
    assert f"falqon {falqon.__version__}" in out
    assert "running       torch" in out and "mode" in out
    assert info.main(["--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["falqon"] == falqon.__version__
    assert rep["build"] == falqon.build_info()


def test_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "falqon.info"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"falqon {falqon.__version__}")
