"""DDP and FSDP2 with melded models: two processes, gloo on the CPU (CI) and NCCL on two GPUs
with FP8 (skipped elsewhere; NVLink multicast kept off), through falqon.distributed.

One spawn runs every scenario (starting processes costs more than the steps): DDP over a melded
tiny LLaMA in both update modes, ranks fed different data, gradient accumulation under no_sync;
the ranks' melded state compared bit for bit; a deliberately diverged rank repaired by
broadcast_melded; a checkpoint written by rank 0 alone and loaded in this (one-process) run.
FSDP2 (fully_shard per decoder layer and on the model): the FP8 weights and B sharded by rows,
trained in both modes against this process's one-process run on both ranks' data (the same
mean gradient), saved with torch.distributed.checkpoint and loaded into an unsharded model.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import falqon
from falqon import FalqonConfig
from falqon.distributed import (DDP_IGNORE_ATTR, broadcast_melded, fp8_tensor_names,
                                mark_ddp_ignored, ranks_identical, state_digest)
from falqon.trained_a import a_image_rows
from falqon_testing import has_fp8_cuda
from workflow_testing import tiny_causal_lm

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")
WORLD = 2
STEPS = 4
# "train_a": the adapter mode with A trained (FalqonConfig(train_a=True)).
MODES = ("adapter", "proxy", "train_a")
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1"}
BACKENDS = (
    "gloo",
    pytest.param("nccl", marks=pytest.mark.skipif(
        not (has_fp8_cuda() and torch.cuda.device_count() >= WORLD and dist.is_nccl_available()),
        reason=f"needs {WORLD} CUDA GPUs with FP8 and NCCL")),
)


def device_of(backend: str, rank: int = 0) -> torch.device:
    return torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")


def melded(mode: str, device=torch.device("cpu"), **cfg):
    model = tiny_causal_lm("llama").to(device)
    if mode == "train_a":
        mode, cfg = "adapter", {**cfg, "train_a": True}
    falqon.meld(model, FalqonConfig(rank=4, topk=3, update_mode=mode, **cfg), progress=False,
                verbose=False)
    return model


def needs_attach(mode: str) -> bool:
    """The proxy update, or a trained A's rows, after each optimizer step."""
    return mode != "adapter"


def _train(ddp, model, opt, rank: int, device) -> None:
    """STEPS optimizer steps, each over two micro-batches (the first under no_sync), with data
    that differs between ranks."""
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(STEPS):
        for micro in range(2):
            x = torch.randint(0, 272, (2, 16), generator=gen).to(device)
            ctx = ddp.no_sync() if micro == 0 else torch.enable_grad()
            with ctx:
                ddp(input_ids=x, labels=x).loss.div(2).backward()
        opt.step()
        opt.zero_grad()


def _scenario(mode: str, rank: int, out: str, device) -> dict:
    model = melded(mode, device, transposed_copy=True)
    if device.type == "cuda":  # the GPU meld's randomised SVD: rank 0's result for every rank
        broadcast_melded(model, src=0)
    ddp = nn.parallel.DistributedDataParallel(model)  # float8 tensors: DDP must skip them
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    if needs_attach(mode):
        falqon.attach(opt, model)
    before = state_digest(model)
    _train(ddp, model, opt, rank, device)
    result = {"changed": state_digest(model) != before, "identical": ranks_identical(model)}
    if rank == 0:
        falqon.save_pretrained(model, os.path.join(out, f"ckpt-{mode}"))
        result["digest"] = state_digest(model).hex()
    dist.barrier()
    # A rank that diverged (here: rank 1's B and FP8 bytes changed) is repaired from rank 0.
    layer = falqon.melded_layers(model)[0][1]
    if rank == 1:
        with torch.no_grad():
            layer.lora_B.add_(1.0)
            layer.weight.view(torch.uint8)[0, 0] ^= 1
    result["diverged_seen"] = not ranks_identical(model)
    broadcast_melded(model, src=0)
    result["repaired"] = ranks_identical(model)
    return result


def _batches(rank: int, device) -> list:
    gen = torch.Generator().manual_seed(200 + rank)
    return [torch.randint(0, 272, (2, 16), generator=gen).to(device) for _ in range(STEPS)]


def fsdp_check_optimizer(model):
    """SGD for the FSDP2-against-one-process comparison: its step is linear in the gradient, so
    the reduction's rounding stays rounding (Adam's first steps move every element by about lr
    whatever its gradient's size, which turns a last-bit difference in a near-zero gradient
    into a difference of lr). lr 10 makes the proxy mode fold ~1.5% of the FP8 bytes."""
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=10.0)


def _fsdp_scenario(mode: str, rank: int, out: str, device) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard

    model = melded(mode, device)
    if device.type == "cuda":
        broadcast_melded(model, src=0)
    if rank == 0:  # the starting point of the one-process reference
        torch.save(model.state_dict(), os.path.join(out, f"fsdp-start-{mode}.pt"))
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    weight = falqon.melded_layers(model)[0][1].weight
    result = {"sharded": tuple(weight.to_local().shape) != tuple(weight.shape)}
    opt = fsdp_check_optimizer(model)
    if needs_attach(mode):
        falqon.attach(opt, model)
    for x in _batches(rank, device):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    result["digest"] = state_digest(model).hex()  # collective: whole tensors gathered
    dcp.save(model.state_dict(), checkpoint_id=os.path.join(out, f"dcp-{mode}"))
    # The replicated state alone (sharded=False: no gather): equal, and a rank whose replicated
    # buffer differs is seen.
    result["replicated_identical"] = ranks_identical(model, sharded=False)
    scale = falqon.melded_layers(model)[0][1].weight_scale
    if rank == 1:
        scale.mul_(2.0)
    result["replicated_diverged_seen"] = not ranks_identical(model, sharded=False)
    if rank == 1:
        scale.div_(2.0)
    return result


def _fsdp_gradient_factor(device) -> float:
    """FSDP2's reduced gradient over the ranks' mean, on a layer whose gradient is the same on
    every rank: 1 where the reduction averages. Gloo's AVG reduce-scatter has not averaged in
    some torch releases (pytorch/pytorch#162338: it summed); torchcomms#287 found a gloo AVG
    dividing by the tensor's element count instead of the world size, which gives 1 whenever the
    two are equal, so the layer is sized for numel != world. Not yet seen on the GPU machine's
    torch 2.11 (whose FSDP2 comparison failed with the earlier 2 x 2 probe reading 1)."""
    from torch.distributed.fsdp import fully_shard

    layer = nn.Linear(8, 4 * WORLD, bias=False, device=device)
    nn.init.ones_(layer.weight)
    fully_shard(layer)
    layer(torch.ones(1, 8, device=device)).sum().backward()
    # every element's gradient is 1, so this rank's shard says it; not full_tensor(), whose
    # functional all-gather segfaulted on gloo under torch 2.11 (run 62)
    return float(layer.weight.grad.to_local().mean())


def _worker(rank: int, port: int, out: str, backend: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **NO_MULTICAST)
    torch.set_num_threads(1)
    device = device_of(backend, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=WORLD, device_id=(
        device if device.type == "cuda" else None))
    try:
        results = {mode: _scenario(mode, rank, out, device) for mode in MODES}
        results.update({f"fsdp-{mode}": _fsdp_scenario(mode, rank, out, device)
                        for mode in MODES})
        results["fsdp_gradient_factor"] = _fsdp_gradient_factor(device)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=BACKENDS)
def ddp_run(request, tmp_path_factory):
    backend = request.param
    out = tmp_path_factory.mktemp(f"ddp-{backend}")
    mp.spawn(_worker, args=(_free_port(), str(out), backend), nprocs=WORLD, join=True)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return out, ranks, device_of(backend)


@pytest.mark.parametrize("mode", MODES)
def test_ddp_ranks_train_and_stay_bit_identical(ddp_run, mode):
    _, ranks, _ = ddp_run
    for r in ranks:
        assert r[mode]["changed"], "the steps must have changed the melded state"
        assert r[mode]["identical"], "DDP-reduced B and the proxy update keep ranks identical"


@pytest.mark.parametrize("mode", MODES)
def test_broadcast_melded_repairs_a_diverged_rank(ddp_run, mode):
    _, ranks, _ = ddp_run
    assert all(r[mode]["diverged_seen"] for r in ranks), "ranks_identical must see a difference"
    assert all(r[mode]["repaired"] for r in ranks)


@pytest.mark.parametrize("mode", MODES)
def test_a_checkpoint_written_by_rank_0_loads_in_one_process(ddp_run, mode):
    out, ranks, device = ddp_run
    loaded = falqon.from_pretrained(tiny_causal_lm("llama").to(device), out / f"ckpt-{mode}")
    assert state_digest(loaded).hex() == ranks[0][mode]["digest"]


def _one_process_reference(mode: str, device, start):
    """What FSDP2's two ranks compute, in one process from the ranks' starting state: each
    step's gradient is the mean of the two ranks' batch gradients."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' setting: the CPU GEMMs' summation order depends on it
    try:
        model = melded(mode, device)
        model.load_state_dict(torch.load(start, map_location=device))
        _train_like_fsdp(model, mode, device)
    finally:
        torch.set_num_threads(threads)
    return model


def _train_like_fsdp(model, mode: str, device) -> None:
    opt = fsdp_check_optimizer(model)
    if needs_attach(mode):
        falqon.attach(opt, model)
    for xs in zip(*(_batches(r, device) for r in range(WORLD))):
        for x in xs:
            model(input_ids=x, labels=x).loss.div(WORLD).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("mode", MODES)
def test_fsdp2_shards_the_fp8_weights_and_trains_like_one_process(ddp_run, mode):
    out, ranks, device = ddp_run
    fsdp = [r[f"fsdp-{mode}"] for r in ranks]
    assert all(r["sharded"] for r in fsdp), "fully_shard must shard the FP8 weights"
    assert fsdp[0]["digest"] == fsdp[1]["digest"], "every rank gathers the same whole state"
    assert all(r["replicated_identical"] and r["replicated_diverged_seen"] for r in fsdp)
    if ranks[0]["fsdp_gradient_factor"] != 1.0:
        pytest.skip(f"this torch's FSDP2 on {device.type} does not average the ranks' "
                    f"gradients (factor {ranks[0]['fsdp_gradient_factor']:g} of the mean; "
                    f"pytorch/pytorch#162338): no one-process run to compare with")
    # The same steps as one process: B within float32 summation-order noise, the FP8 weights
    # equal where no rounding tie decided differently (compared where either run changed them).
    start = out / f"fsdp-start-{mode}.pt"
    ref = _one_process_reference(mode, device, start)
    initial = torch.load(start, map_location=device)
    loaded = melded(mode, device)
    import torch.distributed.checkpoint as dcp

    state = loaded.state_dict()
    dcp.load(state, checkpoint_id=str(out / f"dcp-{mode}"))  # resharded into one process
    loaded.load_state_dict(state)
    moved_rows = 0
    for (name, a), (_, b) in zip(falqon.melded_layers(loaded), falqon.melded_layers(ref)):
        torch.testing.assert_close(a.lora_B, b.lora_B, rtol=1e-3, atol=1e-5, msg=name)
        if mode == "train_a":  # A trained on the shards as in one process, its rows its image
            torch.testing.assert_close(a.lora_A, b.lora_A, rtol=1e-3, atol=1e-5, msg=name)
            n, r = a.out_features, a.rank
            image, _ = a_image_rows(a.lora_A, a.weight_scale)
            assert torch.equal(a.weight[n:n + r].view(torch.uint8), image.view(torch.uint8)), name
            rows = (a.weight[n:n + r].view(torch.uint8) == b.weight[n:n + r].view(torch.uint8))
            assert rows.float().mean().item() > 0.99, name
            moved_rows += int((a.weight[n:n + r].view(torch.uint8) !=
                               initial[f"{name}.weight"][n:n + r].view(torch.uint8)).sum())
        if mode == "proxy":
            w_a, w_b = a.weight.view(torch.uint8), b.weight.view(torch.uint8)
            moved = (w_a != initial[f"{name}.weight"].view(torch.uint8)) | (
                w_b != initial[f"{name}.weight"].view(torch.uint8))
            assert moved.any(), f"{name}: the proxy update changed no FP8 byte"
            same = (w_a == w_b)[moved].float().mean().item()
            assert same > 0.99, (name, same)
    if mode == "train_a":  # (B starts at zero, so q/k's A barely moves in 4 steps; v/o's does)
        assert moved_rows > 0, "the sharded sync wrote no A row"
    if mode == "adapter":  # W' never changes in the adapter mode
        assert all(torch.equal(a.weight.view(torch.uint8), b.weight.view(torch.uint8))
                   for (_, a), (_, b) in zip(falqon.melded_layers(loaded),
                                             falqon.melded_layers(ref)))


def test_meld_lists_the_float8_tensors_for_ddp_to_ignore():
    model = melded("adapter", transposed_copy=True)
    names = getattr(model, DDP_IGNORE_ATTR)
    assert names == sorted(fp8_tensor_names(model))
    assert {n.rpartition(".")[2] for n in names} == {"weight", "weight_t"}
    fp8 = {n for n, t in [*model.named_parameters(), *model.named_buffers()]
           if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)}
    assert set(names) == fp8
    # Names the user listed are kept.
    setattr(model, DDP_IGNORE_ATTR, ["model.embed_tokens.weight"])
    mark_ddp_ignored(model)
    assert "model.embed_tokens.weight" in getattr(model, DDP_IGNORE_ATTR)
    # from_pretrained marks them too.
    assert getattr(falqon.from_pretrained(tiny_causal_lm("llama"), _saved(model)),
                   DDP_IGNORE_ATTR) == names


def _saved(model):
    import tempfile

    path = tempfile.mkdtemp()
    falqon.save_pretrained(model, path)
    return path


def test_collectives_need_a_process_group():
    with pytest.raises(RuntimeError, match="needs an initialised process group"):
        broadcast_melded(melded("adapter"))
    with pytest.raises(RuntimeError, match="needs an initialised process group"):
        ranks_identical(melded("adapter"))
