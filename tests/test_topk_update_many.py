"""The grouped proxy update (ops.topk_update_many_) on the CPU: exactly the per-layer op applied
layer by layer, its non-finite discard, its argument checks, and ProxyUpdater's grouped path; and
the row order both ops share (left-to-right fp32 row sums, ties to the lower row index). The CUDA
kernels' version is tests/test_cuda_topk_many.py."""

import copy

import pytest
import torch
from torch import nn

import falqon
from falqon import FalqonConfig, MeldedLinear, ops
from falqon.training import ProxyUpdater, proxy_state
from falqon_testing import fp8_bytes, opcheck


def melded_weight(K, N, r, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.02
    a = torch.randn(r, K, generator=g) * 0.005
    pad = torch.zeros(ops.padded_rank(r) - r, K)
    return falqon.quantize(torch.cat([w, a, pad]), ops.E4M3)[0]


def random_layers(seed=0):
    """Layers of different K, N, r, k and B dtypes, with and without weight_t, B holding exact
    ties (repeated rows) and magnitudes that move the selected FP8 weights."""
    g = torch.Generator().manual_seed(seed)
    specs = [  # K, N, r, k, B dtype, weight_t
        (64, 32, 8, 5, torch.float32, True),
        (48, 64, 4, 7, torch.bfloat16, False),
        (32, 16, 16, 100, torch.float32, True),   # k > N: every row
        (80, 48, 3, 0, torch.float16, True),      # k = 0: only the reset
        (16, 96, 24, 12, torch.float32, False),
    ]
    layers = []
    for i, (K, N, r, k, dtype, with_t) in enumerate(specs):
        w = melded_weight(K, N, r, seed * 100 + i)
        B = torch.randn(N, r, generator=g) * 20 * torch.rand(N, 1, generator=g)
        B[N // 2:N // 2 + 4] = B[1]  # exact ties with row 1 (same values, same order)
        B = B.to(dtype)
        wt = w[:N].t().contiguous() if with_t else None
        layers.append((w, B, wt, k, 0.5 + i / 4))
    return layers


def clone_all(layers):
    return [(w.clone(), B.clone(), None if wt is None else wt.clone(), k, s)
            for w, B, wt, k, s in layers]


def assert_same(a, b):
    for (w1, B1, t1, _, _), (w2, B2, t2, _, _) in zip(a, b):
        assert torch.equal(fp8_bytes(w1), fp8_bytes(w2))
        assert torch.equal(B1, B2) and B1.dtype == B2.dtype
        assert (t1 is None) == (t2 is None)
        if t1 is not None:
            assert torch.equal(fp8_bytes(t1), fp8_bytes(t2))


@pytest.mark.parametrize("keep", ["drop", "keep", "mixed"])
@pytest.mark.parametrize("seed", [0, 1])
def test_grouped_op_is_the_per_layer_op_in_order(keep, seed):
    layers = random_layers(seed)
    keeps = [keep == "keep" or (keep == "mixed" and i % 2 == 0) for i in range(len(layers))]
    one = clone_all(layers)
    for (w, B, wt, k, s), kr in zip(one, keeps):
        ops.topk_update_(w, B, wt, k, s, kr)
    many = clone_all(layers)
    finite = ops.topk_update_many_([x[0] for x in many], [x[1] for x in many],
                                   [x[2] for x in many], [x[3] for x in many],
                                   [x[4] for x in many], keeps)
    assert finite.dtype == torch.bool and finite.tolist() == [True] * len(layers)
    assert_same(one, many)
    # The update did something worth comparing: selected rows moved, B was reset.
    moved = [not torch.equal(fp8_bytes(a[0]), fp8_bytes(b[0])) for a, b in zip(layers, many)]
    assert sum(moved) >= 3


def selected_rows(B, k, keep_residual=True):
    """Rows the per-layer op applies, read from which rows of B it zeroes (keep_residual)."""
    N, r = B.shape
    w = melded_weight(32, N, r, 7)
    B = B.clone()
    ops.topk_update_(w, B, None, k, 1.0, keep_residual)
    return (B == 0).all(1).nonzero().flatten().tolist()


def test_ties_go_to_the_lower_row_index():
    B = torch.ones(96, 8)
    assert selected_rows(B, 10) == list(range(10))
    B[48:] = 2.0
    assert selected_rows(B, 10) == list(range(48, 58))
    B[[70, 20]] = float("nan")  # a NaN score ranks above every number; among NaNs, row order
    assert selected_rows(B, 1) == [20]
    assert selected_rows(B, 3) == [20, 48, 70]


def test_scores_are_left_to_right_fp32_sums():
    # Row 0 = [1, e, e, ..., e], e = 2^-24: from the left each 1 + e rounds back to 1 (a tie, to
    # even), so its score is 1, below row 1's 1 + 2^-23; summed in another order (the e's first,
    # as a vectorised or pairwise sum does) it is 1 + 63 e, above row 1. The documented order
    # picks row 1, on every backend.
    e = 2.0 ** -24
    B = torch.full((16, 64), 0.01)
    B[0] = e
    B[0, 0] = 1.0
    B[1] = 0
    B[1, 0] = 1.0 + 2.0 ** -23
    assert selected_rows(B, 1) == [1]
    w = melded_weight(32, 16, 64, 3)
    B_many = B.clone()
    ops.topk_update_many_([w], [B_many], None, [1], [1.0], True)
    assert (B_many == 0).all(1).nonzero().flatten().tolist() == [1]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_discard_nonfinite_changes_no_weight_and_zeroes_every_B(bad):
    layers = random_layers()
    layers[2][1][3, 1] = bad
    many = clone_all(layers)
    finite = ops.topk_update_many_([x[0] for x in many], [x[1] for x in many],
                                   [x[2] for x in many], [x[3] for x in many],
                                   [x[4] for x in many], True, discard_nonfinite=True)
    assert finite.tolist() == [True, True, False, True, True]
    for (w0, _, t0, _, _), (w, B, t, _, _) in zip(layers, many):
        assert torch.equal(fp8_bytes(w), fp8_bytes(w0)) and not B.any()
        assert t is None or torch.equal(fp8_bytes(t), fp8_bytes(t0))
    # Without the discard: the per-layer ops, and the same flags.
    one, many = clone_all(layers), clone_all(layers)
    for w, B, wt, k, s in one:
        ops.topk_update_(w, B, wt, k, s, True)
    finite = ops.topk_update_many_([x[0] for x in many], [x[1] for x in many],
                                   [x[2] for x in many], [x[3] for x in many],
                                   [x[4] for x in many], True)
    assert finite.tolist() == [True, True, False, True, True]
    assert_same(one, many)


@pytest.mark.parametrize("discard", [False, True])
def test_opcheck_topk_update_many(discard):
    layers = random_layers()[:3]
    ws, Bs = [x[0].clone() for x in layers], [x[1].clone() for x in layers]
    wts = [x[2].clone() for x in layers if x[2] is not None]
    wt_layers = [i for i, x in enumerate(layers) if x[2] is not None]
    opcheck(torch.ops.falqon.topk_update_many_.default,
            (ws, Bs, wts, wt_layers, [3, 2, 4], [1.0, 0.5, 2.0], [False, True, False], discard))
    opcheck(torch.ops.falqon.topk_update_many_.default,
            ([x[0].clone() for x in layers], [x[1].clone() for x in layers], [], [], [3, 2, 4],
             [1.0, 0.5, 2.0], [True, True, True]))


def _bad_calls():
    (w0, B0, t0, _, _), (w1, B1, _, _, _) = random_layers()[:2]
    op = torch.ops.falqon.topk_update_many_.default
    return {
        "lengths": (lambda: op([w0, w1], [B0], [], [], [1, 1], [1.0, 1.0], [False, False]),
                    "one entry per layer, got 2, 1, 2, 2 and 2"),
        "weight_t_layers": (lambda: op([w0], [B0], [t0], [3], [1], [1.0], [False]),
                            "weight_t_layers must name distinct layers in \\[0, 1\\)"),
        "B dtype": (lambda: op([w0, w1], [B0, B1.to(torch.int32)], [], [], [1, 1], [1.0, 1.0],
                               [False, False]), "layer 1: lora_B must be a floating"),
        "weight dtype": (lambda: op([w0.float(), w1], [B0, B1], [], [], [1, 1], [1.0, 1.0],
                                    [False, False]), "layer 0: the melded weight must be"),
        "k": (lambda: op([w0], [B0], [], [], [-1], [1.0], [False]), "layer 0: k must be >= 0"),
        "scaling": (lambda: op([w0], [B0], [], [], [1], [0.0], [False]), "layer 0: scaling"),
        "device": (lambda: op([w0, w1.to("meta")], [B0, B1.to("meta")], [], [], [1, 1],
                              [1.0, 1.0], [False, False]), "layer 1 is on meta but layer 0"),
        "shared": (lambda: op([w0, w0], [B0, B0.clone()], [], [], [1, 1], [1.0, 1.0],
                              [False, False]), "two layers share one of their weights"),
    }


@pytest.mark.parametrize("name", list(_bad_calls()))
def test_bad_arguments_fail_with_one_line(name):
    call, match = _bad_calls()[name]
    with pytest.raises(RuntimeError, match=f"^falqon.topk_update_many_: .*{match}") as info:
        call()
    assert len(str(info.value).strip().splitlines()) == 1, str(info.value)


def test_wrapper_checks_weight_ts_length():
    w, B, _, _, _ = random_layers()[0]
    with pytest.raises(ValueError, match="falqon.topk_update_many_: no layers"):
        ops.topk_update_many_([], [], None, [], [])
    with pytest.raises(ValueError, match="one entry .* per layer, got 2 for 1 layers"):
        ops.topk_update_many_([w], [B], [None, None], [1], [1.0])


# ---- ProxyUpdater's grouped path (forced on the CPU; on CUDA it is the default) -------------

def proxy_model(**cfg):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 48), nn.GELU(),
                          nn.Linear(48, 32))
    return falqon.meld(model, FalqonConfig(rank=4, exclude_modules=None, update_mode="proxy",
                                           **cfg), progress=False, verbose=False)


def train(model, steps, grouped, monkeypatch, poison_step=None):
    monkeypatch.setattr(ProxyUpdater, "grouped", lambda self: grouped)
    params = [m.lora_B for m in model.modules() if isinstance(m, MeldedLinear)]
    opt = torch.optim.AdamW(params, lr=0.05)
    handle = falqon.attach(opt, model)
    torch.manual_seed(2)
    for step in range(steps):
        x, y = torch.randn(16, 32), torch.randn(16, 32)
        loss = (model(x) - y).pow(2).mean()
        if step == poison_step:
            loss = loss * float("nan")
        loss.backward()
        opt.step()
        opt.zero_grad()
    handle.remove()
    return model, opt


@pytest.mark.parametrize("keep_residual", [False, True])
def test_proxy_updater_grouped_path_equals_per_layer(keep_residual, monkeypatch):
    base = proxy_model(topk=3, warmup_steps=1, keep_residual=keep_residual)
    a, _ = train(copy.deepcopy(base), 3, False, monkeypatch)
    b, _ = train(copy.deepcopy(base), 3, True, monkeypatch)
    for (name, t1), t2 in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(t1.reshape(-1).view(torch.uint8), t2.reshape(-1).view(torch.uint8)), name
    assert proxy_state(a) == proxy_state(b)


def test_proxy_updater_grouped_path_discards_a_nan_step(monkeypatch):
    base = proxy_model(topk=3)
    with pytest.warns(RuntimeWarning, match="non-finite lora_B"):
        a, opt_a = train(copy.deepcopy(base), 3, False, monkeypatch, poison_step=1)
    with pytest.warns(RuntimeWarning, match="non-finite lora_B"):
        b, opt_b = train(copy.deepcopy(base), 3, True, monkeypatch, poison_step=1)
    assert proxy_state(b).skipped_steps == 1 and proxy_state(b).step == 2
    for (name, t1), t2 in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(t1.reshape(-1).view(torch.uint8), t2.reshape(-1).view(torch.uint8)), name


def test_proxy_updater_groups_only_on_one_cuda_device():
    model = proxy_model()
    updater = ProxyUpdater(model)
    assert not updater.grouped()  # the CPU: each layer's own op


def test_grouped_topk_switch(monkeypatch):
    model = proxy_model()
    assert ProxyUpdater(model).grouped_enabled
    monkeypatch.setenv("FALQON_GROUPED_TOPK", "0")
    assert not ProxyUpdater(model).grouped_enabled
