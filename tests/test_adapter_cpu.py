"""The adapter update mode on the CPU reference: the ops against formulas written here in float64,
the module against LoRA-FA's formula, meld_init's LoRA-sized A, opcheck and torch.compile.

Tolerances (the header of test_ops_cpu.py gives the arithmetic):
- The forward's adapter term is T(fp32(y_base) + scaling * fp32 sum of r products) with
  T = the activation dtype: the products of 16-bit values are exact in fp32, their sum over r
  terms errs by at most gamma_r * sum|terms| (Higham), then one rounding to T, half an ulp
  (2^-8 relative for bf16). y_base and xa are the proxy forward's, bit for bit (same code).
- The dgrad operand G = [g | scaling g B | 0] is quantised as one tensor; the test builds G with
  the op's own fp32 arithmetic (torch.mm on the CPU is deterministic), so its FP8 image must match
  bit for bit, and dx = (G_q @ W'_q) * s_G * s is exact in float64 but for fp32 accumulation
  (gamma_K) and the final rounding, as for the proxy mode's dx.
"""

import copy

import pytest
import torch
from torch import nn

import falqon
from falqon import ops
from falqon import FalqonConfig, MeldedLinear
from falqon.config import ADAPTER_GAIN
from falqon.modules import ADAPTER_ROW_NORM
from falqon_testing import adapter_operand, fp8_bytes, opcheck, rel_err
from cpu_formulas import (E4M3, E5M2, UNIT_ROUNDOFF, product_bound, quantize_delayed_formula,
                          quantize_formula, random_weight)


def adapter_layer(n, k, rank, bias=False, alpha=None, **kwargs):
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(random_weight(n, k))
    layer = falqon.MeldedLinear.from_linear(lin, rank=rank, alpha=alpha, svd="exact",
                                            update_mode="adapter", **kwargs)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.05)  # a trained adapter: B far from zero
    return lin, layer


def adapter_term_bound(y_ref, xa, B, scaling, dtype):
    """|op - ref| for ref = y_base + scaling xa B^T in float64 from the op's own y_base and xa."""
    r = xa.shape[-1]
    u = 2.0 ** -24
    gamma = r * u / (1 - r * u)
    terms = scaling * (xa.abs() @ B.abs().t())
    return UNIT_ROUNDOFF[dtype] * y_ref.abs() + (gamma + u) * terms + 2 * u * y_ref.abs()


# ---- forward ---------------------------------------------------------------------------------

@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n,k,rank,alpha", [(64, 48, 8, None), (96, 160, 16, 64.0), (32, 64, 20, 5.0)])
def test_adapter_forward_is_the_proxy_forward_plus_the_adapter(act_dtype, bias, n, k, rank, alpha):
    _, layer = adapter_layer(n, k, rank, bias=bias, alpha=alpha)
    x = torch.randn(2, 3, k).to(act_dtype)
    B = layer.lora_B.detach()
    args = (x, layer.weight, layer.weight_scale, B,
            None if layer.bias is None else layer.bias.to(act_dtype), None, layer.scaling, None, None)
    y0, xa0, amax0 = torch.ops.falqon.melded_linear(*args, False)
    y, xa, amax = torch.ops.falqon.melded_linear(*args, True)
    assert y.shape == y0.shape == (2, 3, n) and y.dtype == act_dtype
    assert y.is_contiguous(), "the adapter mode returns a contiguous y"
    assert torch.equal(xa, xa0) and torch.equal(amax, amax0), "the same FP8 product underneath"
    # B enters in the activation dtype (PEFT's autocast does the same), the sum in fp32.
    B_t = B.to(act_dtype).double()
    ref = y0.double() + layer.scaling * (xa0.double() @ B_t.t())
    bound = adapter_term_bound(ref, xa0.double(), B_t, layer.scaling, act_dtype)
    assert bool(((y.double() - ref).abs() <= bound).all())
    assert (y != y0).any(), "setup: the adapter changes the output"


def test_adapter_forward_with_zero_B_equals_the_proxy_forward():
    _, layer = adapter_layer(48, 64, 8, bias=True)
    x = torch.randn(7, 64, dtype=torch.bfloat16)
    zero = torch.zeros_like(layer.lora_B)
    args = (x, layer.weight, layer.weight_scale, zero, layer.bias.bfloat16(), None, 1.0, None, None)
    assert torch.equal(torch.ops.falqon.melded_linear(*args, True)[0],
                       torch.ops.falqon.melded_linear(*args, False)[0])


# ---- backward ----------------------------------------------------------------------------------

@pytest.mark.parametrize("grad_dtype", [E5M2, E4M3])
@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("transposed", [False, True])
def test_adapter_grad_input_is_one_fp8_product_over_every_row(grad_dtype, act_dtype, transposed):
    n, k, rank = 64, 96, 12
    _, layer = adapter_layer(n, k, rank, alpha=24.0, transposed_copy=transposed)
    g = torch.randn(3, 5, n).to(act_dtype)
    rows = layer.weight.shape[0]
    assert layer.weight_t is None or layer.weight_t.shape == (k, rows)
    dx, amax = torch.ops.falqon.melded_linear_grad_input(
        g, layer.weight, layer.weight_scale, layer.weight_t, grad_dtype, None,
        layer.lora_B.detach(), layer.scaling)
    G = adapter_operand(g.reshape(-1, n), layer.lora_B.detach(), layer.scaling, rows)
    Gq, sG = quantize_formula(G, grad_dtype)
    assert amax.item() == G.abs().amax().item(), "the amax of the whole operand"
    wq, s = layer.weight.double(), layer.weight_scale.double()
    ref = (Gq.double() @ wq) * sG.double() * s
    bound = product_bound(Gq.double().abs(), wq.abs(), rows, act_dtype, ref, sG.double() * s)
    assert dx.shape == (3, 5, k) and dx.dtype == act_dtype
    assert bool(((dx.reshape(-1, k).double() - ref).abs() <= bound).all())
    # ... and the unquantised formula dx = g (W + scaling B A) within the gradient format's noise.
    formula = g.reshape(-1, n).double() @ layer.merged_weight(torch.float64)
    assert rel_err(dx.reshape(-1, k).double(), formula) < {E5M2: 0.08, E4M3: 0.04}[grad_dtype]


@pytest.mark.parametrize("kind", ["empty", "below", "above"])
def test_adapter_grad_input_with_a_delayed_scale(kind):
    n, k, rank = 32, 64, 8
    _, layer = adapter_layer(n, k, rank)
    g = torch.randn(17, n, dtype=torch.bfloat16)
    B = layer.lora_B.detach()
    G = adapter_operand(g, B, layer.scaling, layer.weight.shape[0])
    own = G.abs().amax().item()
    history = {"empty": torch.zeros(4), "below": torch.tensor([0.0, own / 3, own / 2, 0.0]),
               "above": torch.tensor([own * 2, 0.0, own, own * 3])}[kind]
    dx, amax = torch.ops.falqon.melded_linear_grad_input(
        g, layer.weight, layer.weight_scale, None, E5M2, history, B, layer.scaling)
    Gq, sG, amax_ref = quantize_delayed_formula(G, E5M2, history)
    assert amax.item() == amax_ref.item()
    wq, s = layer.weight.double(), layer.weight_scale.double()
    ref = (Gq.double() @ wq) * sG.double() * s
    bound = product_bound(Gq.double().abs(), wq.abs(), wq.shape[0], torch.bfloat16, ref,
                          sG.double() * s)
    assert bool(((dx.double() - ref).abs() <= bound).all())


@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float32])
def test_adapter_backward_op_is_grad_input_and_dB(act_dtype):
    n, k, rank = 48, 32, 8
    _, layer = adapter_layer(n, k, rank, alpha=4.0)
    g = torch.randn(2, 9, n).to(act_dtype)
    xa = torch.randn(2, 9, rank).to(act_dtype)
    B = layer.lora_B.detach()
    dx, dB, amax = ops.melded_linear_backward(g, xa, layer.weight, layer.weight_scale, None,
                                              layer.scaling, None, None, torch.float32, B)
    dx_ref, amax_ref = torch.ops.falqon.melded_linear_grad_input(
        g, layer.weight, layer.weight_scale, None, None, None, B, layer.scaling)
    assert torch.equal(dx, dx_ref) and torch.equal(amax, amax_ref)
    _, dB_proxy, _ = ops.melded_linear_backward(g, xa, layer.weight, layer.weight_scale, None,
                                                layer.scaling, None, None, torch.float32)
    assert torch.equal(dB, dB_proxy), "dB is the same formula in both modes"


def test_adapter_ops_reject_a_B_that_does_not_fit():
    _, layer = adapter_layer(32, 48, 8)
    g = torch.randn(4, 32)
    with pytest.raises(RuntimeError, match="lora_B has 16 rows"):
        ops.melded_linear_grad_input(g, layer.weight, layer.weight_scale, None, None, None,
                                     torch.zeros(16, 8))
    with pytest.raises(RuntimeError, match="rows"):
        ops.melded_linear_grad_input(g, layer.weight, layer.weight_scale, None, None, None,
                                     torch.zeros(32, 24))
    with pytest.raises(RuntimeError, match="lora_B must be float32, float16 or bfloat16"):
        ops.melded_linear_grad_input(g, layer.weight, layer.weight_scale, None, None, None,
                                     torch.zeros(32, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="rank 4 but xa has 8"):
        ops.melded_linear_backward(g, torch.randn(4, 8), layer.weight, layer.weight_scale,
                                   lora_B=torch.zeros(32, 4))
    # The adapter mode's transposed copy holds every row of W'.
    rows_only = layer.weight[:32].t().contiguous()
    with pytest.raises(RuntimeError, match="every row of the melded weight"):
        ops.melded_linear(torch.randn(4, 48), layer.weight, layer.weight_scale, layer.lora_B,
                          None, rows_only, 1.0, None, None, True)


# ---- the module --------------------------------------------------------------------------------

def lora_fa_reference(layer, lin_bias, x, g):
    """y, dx and dB of y = x W^T + b + scaling (x A^T) B^T in float64 with the layer's own W and
    A (dequantised) and B: LoRA-FA with falqon's A."""
    W = layer.dequantized_weight(torch.float64)
    A = layer.adapter_A(torch.float64)
    xd = x.detach().double().requires_grad_(True)
    B = layer.lora_B.detach().double().requires_grad_(True)
    y = xd @ W.t() + layer.scaling * (xd @ A.t()) @ B.t()
    if lin_bias is not None:
        y = y + lin_bias.double()
    y.backward(g.double())
    return y.detach(), xd.grad, B.grad


def test_adapter_module_matches_lora_fa_within_fp8_noise():
    lin, layer = adapter_layer(64, 96, 16, bias=True, alpha=32.0)
    x = torch.randn(4, 6, 96, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(4, 6, 64, dtype=torch.bfloat16)
    y = layer(x)
    y.backward(g)
    y_ref, dx_ref, dB_ref = lora_fa_reference(layer, lin.bias.detach(), x, g)
    # x is quantised to E4M3 (2^-4 relative per element), g to E5M2 (2^-3): a few % rms.
    assert rel_err(y.double(), y_ref) < 0.05
    assert rel_err(x.grad.double(), dx_ref) < 0.08
    assert rel_err(layer.lora_B.grad.double(), dB_ref) < 0.05
    assert layer.lora_B.grad.dtype == torch.float32


def test_adapter_training_fits_a_low_rank_target_and_never_changes_W():
    torch.manual_seed(0)
    lin, layer = adapter_layer(64, 128, 8)
    with torch.no_grad():
        layer.lora_B.zero_()
    w0 = layer.weight.clone()
    # A target the adapter can express exactly: W + B* A with a random B*.
    B_star = torch.randn(64, 8) * 0.2
    target = layer.merged_weight().addmm(B_star, layer.adapter_A(), alpha=layer.scaling)
    opt = torch.optim.Adam([layer.lora_B], lr=1e-2)
    x_val = torch.randn(256, 128)
    start = (layer(x_val) - x_val @ target.t()).pow(2).mean().item()
    for _ in range(150):
        x = torch.randn(128, 128)
        loss = (layer(x) - x @ target.t()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = (layer(x_val) - x_val @ target.t()).pow(2).mean().item()
    assert end < 0.05 * start, (start, end)
    assert torch.equal(fp8_bytes(layer.weight), fp8_bytes(w0)), "W' never changes"
    assert rel_err(layer.lora_B.detach(), B_star) < 0.1


def test_proxy_update_is_refused_in_the_adapter_mode_and_attach_is_harmless():
    _, layer = adapter_layer(32, 48, 8)
    with pytest.raises(ValueError, match="adapter mode"):
        layer.proxy_update()
    model = nn.Sequential(nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 48))
    falqon.meld(model, falqon.FalqonConfig(rank=8, exclude_modules=None), progress=False,
                verbose=False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    handle = falqon.attach(opt, model)
    weights = [fp8_bytes(m.weight).clone() for _, m in falqon.melded_layers(model)]
    model(torch.randn(5, 48)).square().mean().backward()
    opt.step()
    assert handle.state.step == 1, "the step counter advances (checkpoints carry it)"
    for w, (_, m) in zip(weights, falqon.melded_layers(model)):
        assert torch.equal(fp8_bytes(m.weight), w)
        assert m.lora_B.abs().sum() > 0, "B keeps its update (nothing folds or zeroes it)"


def test_transposed_copy_gives_the_same_gradients():
    torch.manual_seed(1)
    lin = nn.Linear(64, 48)
    nn.init.normal_(lin.weight, std=0.05)
    plain = falqon.MeldedLinear.from_linear(lin, rank=8, svd="exact")
    copied = falqon.MeldedLinear.from_linear(lin, rank=8, svd="exact", transposed_copy=True)
    with torch.no_grad():
        plain.lora_B.normal_(std=0.1)
        copied.lora_B.copy_(plain.lora_B)
    x = torch.randn(10, 64, requires_grad=True)
    outs = []
    for layer in (plain, copied):
        x.grad = None
        y = layer(x)
        y.square().sum().backward()
        outs.append((y.detach(), x.grad.clone(), layer.lora_B.grad.clone()))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


# ---- meld_init's LoRA-sized A ------------------------------------------------------------------

def test_meld_init_scales_A_to_loras_row_norm_and_keeps_W_bit_for_bit():
    w = random_weight(256, 512) * 10  # amax well above a LoRA-sized A's: the cap does not bind
    proxy_w, proxy_s = ops.meld_init(w, 16, "exact")
    adapter_w, adapter_s = ops.meld_init(w, 16, "exact", adapter_row_norm=ADAPTER_ROW_NORM)
    q, s = falqon.quantize(w, E4M3)
    assert adapter_s.item() == s.item() == proxy_s.item()
    assert torch.equal(fp8_bytes(adapter_w[:256]), fp8_bytes(q)), "W's FP8 rows are W's own"
    A_proxy = proxy_w[256:272].float() * proxy_s
    A = adapter_w[256:272].float() * adapter_s
    rms = A.pow(2).sum(1).mean().sqrt().item()
    assert rms == pytest.approx(ADAPTER_ROW_NORM, rel=0.05)  # E4M3 rounding of the rows
    # The same directions, one factor apart (each row within its E4M3 rounding).
    cos = torch.nn.functional.cosine_similarity(A, A_proxy, dim=1)
    assert bool((cos > 0.99).all())
    assert not adapter_w[272:].float().any(), "the padding rows stay zero"


def test_meld_init_caps_A_at_the_weights_amax():
    w = random_weight(64, 96) * 0.1  # a small weight: LoRA's row norm would exceed its amax
    melded, scale = ops.meld_init(w, 8, "exact", adapter_row_norm=ADAPTER_ROW_NORM)
    assert scale.item() == falqon.quantize(w, E4M3)[1].item(), "A never raises W's scale"
    A = melded[64:72].float() * scale
    assert A.abs().max().item() <= w.abs().max().item()
    assert A.abs().max().item() >= 0.9 * w.abs().max().item(), "capped at the amax, not below"
    with pytest.raises(RuntimeError, match="adapter_row_norm must be a finite number"):
        ops.meld_init(w, 8, adapter_row_norm=-1.0)
    with pytest.raises(RuntimeError, match="adapter_row_norm must be a finite number"):
        ops.meld_init(w, 8, adapter_row_norm=float("inf"))


# ---- the adapter gain ---------------------------------------------------------------------------

def test_adapter_gain_multiplies_the_adapters_output_and_only_in_the_adapter_mode():
    assert FalqonConfig().adapter_gain == ADAPTER_GAIN == 10.0
    assert FalqonConfig(rank=8, alpha=16).scaling == 20.0
    assert FalqonConfig(rank=8, alpha=16, adapter_gain=1).scaling == 2.0
    assert FalqonConfig(rank=8, alpha=16, update_mode="proxy").scaling == 2.0
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=False)
    layers = {g: MeldedLinear.from_linear(linear, rank=8, alpha=16, adapter_gain=g, svd="exact")
              for g in (1.0, 3.0)}
    assert layers[3.0].scaling == 3 * layers[1.0].scaling == 6.0
    B = torch.randn(48, 8)
    x = torch.randn(5, 64)
    base = layers[1.0](x).detach()  # B = 0: the gain changes nothing yet
    assert torch.equal(layers[3.0](x), base)
    for layer in layers.values():
        layer.lora_B.data.copy_(B)
    delta = {g: (layer(x) - base).double() for g, layer in layers.items()}
    torch.testing.assert_close(delta[3.0], 3 * delta[1.0], rtol=1e-5, atol=1e-5)
    proxy = MeldedLinear.from_linear(linear, rank=8, alpha=16, update_mode="proxy",
                                     adapter_gain=3.0)
    assert proxy.adapter_gain == 1.0 and proxy.scaling == 2.0  # the proxy mode ignores it


@pytest.mark.parametrize("gain", [0, -1.0, float("inf"), float("nan"), True, "2"])
def test_adapter_gain_must_be_a_positive_finite_number(gain):
    with pytest.raises(ValueError, match="adapter_gain must be a positive finite number"):
        FalqonConfig(adapter_gain=gain)
    with pytest.raises(ValueError, match="adapter_gain must be a positive finite number"):
        MeldedLinear(64, 48, rank=8, adapter_gain=gain)


# ---- opcheck and torch.compile -----------------------------------------------------------------

def test_opcheck_adapter_ops():
    lin, layer = adapter_layer(32, 48, 8, bias=True)
    x = torch.randn(4, 48, requires_grad=True)
    B = torch.randn(32, 8, requires_grad=True)
    wt = layer.weight.t().contiguous()
    opcheck(torch.ops.falqon.melded_linear.default,
            (x, layer.weight, layer.weight_scale, B, layer.bias, None, 0.5, None, None, True))
    opcheck(torch.ops.falqon.melded_linear.default,
            (x.detach().bfloat16().requires_grad_(), layer.weight, layer.weight_scale, B, None, wt,
             2.0, E4M3, torch.rand(2, 3) + 1, True))
    opcheck(torch.ops.falqon.melded_linear_grad_input.default,
            (torch.randn(4, 32), layer.weight, layer.weight_scale, wt, None, None, B.detach(), 0.5))
    opcheck(torch.ops.falqon.melded_linear_grad_input.default,
            (torch.randn(2, 4, 32, dtype=torch.bfloat16), layer.weight, layer.weight_scale, None,
             E4M3, torch.rand(3), B.detach(), 2.0))
    opcheck(torch.ops.falqon.melded_linear_backward.default,
            (torch.randn(4, 32), torch.randn(4, 8), layer.weight, layer.weight_scale, wt, 0.5,
             E4M3, torch.rand(3), torch.float32, B.detach()))
    opcheck(torch.ops.falqon.meld_init.default,
            (lin.weight.detach(), 8, "randomized", 4, 2, 0, ADAPTER_ROW_NORM))


def test_adapter_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = falqon.MeldedLinear.from_linear(nn.Linear(64, 128), rank=8)
            self.down = falqon.MeldedLinear.from_linear(nn.Linear(128, 64, bias=False), rank=16,
                                                        amax_history_len=4)
            with torch.no_grad():
                self.up.lora_B.normal_(std=0.1)
                self.down.lora_B.normal_(std=0.1)

        def forward(self, x):
            return x + self.down(nn.functional.silu(self.up(x)))

    eager_block = Block()
    compiled_block = copy.deepcopy(eager_block)
    x = torch.randn(2, 9, 64)

    def run(block, fn):
        out = []
        for _ in range(3):  # the delayed layer's history fills over the calls
            xi = x.clone().requires_grad_()
            for p in (block.up.lora_B, block.down.lora_B):
                p.grad = None
            y = fn(xi)
            y.square().mean().backward()
            out.append((y.detach(), xi.grad, block.up.lora_B.grad.clone(),
                        block.down.lora_B.grad.clone()))
        return out

    eager = run(eager_block, eager_block)
    compiled = run(compiled_block, torch.compile(compiled_block, fullgraph=True))
    for e_step, c_step in zip(eager, compiled):
        for e, c in zip(e_step, c_step):
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
    assert torch.equal(eager_block.down.amax_history, compiled_block.down.amax_history)
