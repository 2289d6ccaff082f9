"""CPU smoke test of benchmarks/distributed.py: two gloo worker processes, the tiny shape, a few
steps of each method on one process, under DDP and under FSDP2."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from falqon_testing import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import distributed as bench_distributed  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or
                                not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")
TINY = ["--device", "cpu", "--model", "tiny", "--rank", "4", "--batch", "2", "--seq", "16",
        "--warmup", "1", "--steps", "2"]


def test_distributed_benchmark_records_every_mode_and_method(tmp_path, capsys):
    out = tmp_path / "distributed.json"
    records = bench_distributed.main([*TINY, "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["records"] == json.loads(json.dumps(records))
    assert saved["config"]["gpus"] == 2 and saved["config"]["batch"] == 2
    got = {(r["mode"], r["method"]): r for r in records}
    assert set(got) == {(mode, method) for mode in ("single", "ddp", "fsdp2")
                        for method in ("falqon_adapter", "falqon")}
    for (mode, method), r in got.items():
        assert r["kind"] == "distributed" and "skipped" not in r, r
        assert r["gpus"] == (1 if mode == "single" else 2)
        assert r["tokens_per_s"] == pytest.approx(r["gpus"] * 2 * 16 / r["s_per_step"])
        assert r["scaling"] == pytest.approx(r["tokens_per_s"] / got["single", method][
            "tokens_per_s"])
        assert r["ranks_identical"] is (None if mode == "single" else True)
        assert len(r["loss"]) == r["gpus"] and all(l == l for l in r["loss"])  # finite
        assert r["peak_gib"] is None  # no device memory on the CPU
    table = capsys.readouterr().out
    assert "ranks identical" in table and "fsdp2" in table


def test_the_trained_a_method_keeps_ddp_ranks_identical(tmp_path):
    # lora_A is a trainable parameter (DDP reduces its gradient) and A's FP8 rows are rewritten
    # from it after each step by falqon.attach's hook: the ranks must agree on both
    records = bench_distributed.main([*TINY, "--methods", "falqon_adapter_train_a", "--modes",
                                      "ddp", "--steps", "3", "--out", str(tmp_path / "d.json")])
    ddp = next(r for r in records if r["mode"] == "ddp")
    assert ddp["ranks_identical"] is True and ddp["method"] == "falqon_adapter_train_a"


def test_the_workers_start_with_nvlink_multicast_off(monkeypatch):
    import os

    for name in bench_distributed.NO_MULTICAST:
        monkeypatch.delenv(name, raising=False)
    seen = {}

    def spawn(fn, args, nprocs, join):
        seen.update({k: os.environ.get(k) for k in bench_distributed.NO_MULTICAST})
        raise RuntimeError("not started")

    monkeypatch.setattr("torch.multiprocessing.spawn", spawn)
    with pytest.raises(RuntimeError, match="not started"):
        bench_distributed.main(TINY)
    assert seen == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                    "NVSHMEM_DISABLE_NVLS": "1"}


def test_each_rank_gets_its_share_of_the_cores(monkeypatch):
    # Every rank at every core made fsdp2_offload's CPU optimizer step 20x slower on two H200s
    # (benchmarks/NOTES.md run 57); OMP_NUM_THREADS, where set, is the user's choice.
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(bench_distributed.os, "sched_getaffinity", lambda pid: set(range(32)),
                        raising=False)
    assert bench_distributed.rank_threads(2) == 16
    assert bench_distributed.rank_threads(64) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert bench_distributed.rank_threads(2) == 3


def test_profile_prints_the_busiest_ops_of_rank_0(tmp_path, capfd):
    bench_distributed.main([*TINY, "--methods", "falqon_adapter", "--modes", "ddp", "--profile",
                            "3", "--out", str(tmp_path / "d.json")])
    out = capfd.readouterr().out  # the spawned ranks write to the file descriptor
    assert out.count("== profile of one step, rank 0:") == 2  # single and ddp, rank 0 alone
    assert "ddp falqon_adapter: " in out and "s/step on rank 0" in out


def test_records_say_which_fusion_backend_ran():
    args = bench_distributed.parse_args(TINY)
    fuse = {"backend": "compile", "fused": {"compiled_layers": 2}, "skipped": []}
    rank = {"s_per_step": 0.5, "loss": 1.0, "peak_gib": None, "ranks_identical": True}
    results = [{"mode": mode, "method": "falqon_fused",
                "ranks": [{**rank, "fuse": fuse}] * (1 if mode == "single" else 2)}
               for mode in ("single", "ddp")]
    records = bench_distributed.records_of(results, args)
    assert [r["fuse"] for r in records] == [fuse, fuse]
    plain = bench_distributed.records_of([{**results[0], "ranks": [{**rank, "fuse": None}]}], args)
    assert "fuse" not in plain[0]
