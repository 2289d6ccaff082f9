"""The fine-tuning methods of the study, the stochastic-rounding variant of the proxy update and
the meter of the update mass that reaches the FP8 weights.

Every method starts from the same pretrained bf16 checkpoint and trains the same seven
projections of every decoder layer (q, k, v, o, gate, up, down) at the same rank and alpha:
  full_bf16         AdamW on every parameter, fp32 master weights, bf16 autocast (the reference).
  lora_bf16         PEFT LoRA over the frozen bf16 base (adapters fp32, PEFT's default).
  qlora_nf4         PEFT LoRA over a bitsandbytes NF4 base (transformers' BitsAndBytesConfig,
                    bf16 compute).
  lora_fp8_torchao  torchao float8 training of the frozen base (convert_to_float8_training on the
                    seven projections: dynamic per-tensor scales, E4M3 forward, E5M2 gradients),
                    then PEFT LoRA wraps each Float8Linear (a subclass of nn.Linear, so PEFT's
                    default LoRA layer takes it): the base GEMMs are FP8, the adapters bf16/fp32.
                    torchao computes the frozen weight's gradient GEMM too (its autograd function
                    does not look at requires_grad): it costs time, not accuracy.
  falqon_adapter    falqon.meld with FalqonConfig(update_mode="adapter"): B is a real LoRA-FA
                    adapter in the forward (y = x W^T + scaling (x A^T) B^T), trained in fp32 and
                    never folded during training; A is rescaled to a PEFT LoRA A's row norm, so
                    LoRA's learning rates carry over. No optimizer hook. At the end of a run the
                    model is also merged (falqon.merge) into bf16 and into FP8 and evaluated.
  falqon_adapter_rand, falqon_adapter_wsvd
                    the same with FalqonConfig(adapter_init="random") (a seeded Gaussian A,
                    LoRA-FA's) and adapter_init="weight_svd" (W's top-r right singular vectors,
                    PiSSA's subspace) instead of the SVD of W's FP8 quantisation error; each its
                    own learning-rate pilot on falqon_adapter's grid. Whether the subspace A
                    spans matters for a long fine-tune is what they measure.
  falqon_adapter_train_a
                    the adapter mode with A trained too (LoRA over the melded FP8 base, A's fp32
                    master written into the FP8 rows of W' after each step): a study-only probe
                    (studies/train_a.py) of whether the frozen A is what keeps the adapter mode
                    behind LoRA on role-play; its own pilot on falqon_adapter's grid.
  falqon_adapter_train_a_lib
                    the library's version of it, FalqonConfig(train_a=True) + falqon.attach
                    (falqon/trained_a.py: dA in the backward, A's rows rewritten after each step,
                    B's gain 2 and A's parameter 5x the applied A, placed so that the probe's
                    best learning rate lands on LoRA's); its own pilot on LoRA's grid.
  falqon*           (every other falqon method) FalqonConfig(update_mode="proxy") + falqon.attach:
                    the paper's proxy update, k rows of B folded into the FP8 weight after each
                    optimizer step; the published policy is k = 10 with B dropped (zeroed) after
                    each update and k = r during the warm-up.
  falqon_sr         ours: the same selection, but the folded rows are cast to E4M3 with stochastic
                    rounding, so updates smaller than half an FP8 step survive in expectation.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import torch
from torch import nn

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
E4M3_MAX = 448.0
E4M3_MANTISSA_BITS = 3
E4M3_MIN_EXP = -6  # the lowest normal binade; subnormals share its spacing, 2^-9


@dataclass(frozen=True)
class Method:
    name: str
    kind: str    # full | lora | qlora | torchao | falqon
    family: str  # methods of a family share the learning rate picked by the pilot
    topk: int | str = 10  # falqon: rows folded per step; "r" = the rank, "all" = every row
    keep_residual: bool = False
    stochastic: bool = False
    update_mode: str = "proxy"  # falqon: "proxy" (the paper's top-k update) or "adapter"
    adapter_init: str = "error_svd"  # falqon's adapter mode: FalqonConfig.adapter_init
    train_a: bool = False  # the adapter mode with A trained too (studies/train_a.py)
    train_a_lib: bool = False  # the same through FalqonConfig(train_a=True)
    about: str = ""

    @property
    def proxy(self) -> bool:
        """A falqon method with the proxy update (the update-mass meter and stochastic rounding
        apply to these only)."""
        return self.kind == "falqon" and self.update_mode == "proxy"

    @property
    def adapter(self) -> bool:
        """A falqon method in the adapter mode (its runs also evaluate the merged model)."""
        return self.kind == "falqon" and self.update_mode == "adapter"


METHODS = {m.name: m for m in (
    Method("lora_bf16", "lora", "lora", about="PEFT LoRA, bf16 base"),
    Method("falqon_adapter", "falqon", "falqon_adapter", update_mode="adapter",
           about="falqon, adapter mode (B in the forward, never folded during training)"),
    Method("falqon", "falqon", "falqon", topk=10, about="falqon, published policy (k=10, drop)"),
    Method("full_bf16", "full", "full", about="full fine-tune, bf16 autocast"),
    Method("qlora_nf4", "qlora", "lora", about="PEFT LoRA, bitsandbytes NF4 base"),
    Method("lora_fp8_torchao", "torchao", "lora", about="PEFT LoRA, torchao float8 base"),
    Method("falqon_keep", "falqon", "falqon_keep", topk=10, keep_residual=True,
           about="falqon k=10, keep-residual policy"),
    Method("falqon_sr", "falqon", "falqon_sr", topk=10, stochastic=True,
           about="falqon k=10, stochastic rounding of the row update (ours)"),
    Method("falqon_k1", "falqon", "falqon", topk=1, about="falqon k=1"),
    Method("falqon_k50", "falqon", "falqon", topk=50, about="falqon k=50"),
    Method("falqon_kr", "falqon", "falqon", topk="r", about="falqon k=r"),
    # Added after the first run showed that the top-k selection, not the FP8 rounding, discards
    # most of the update: every row folded each step, with round-to-nearest and stochastic
    # rounding, at falqon's learning rate.
    Method("falqon_kall", "falqon", "falqon", topk="all", about="falqon, every row (k = N)"),
    Method("falqon_kall_sr", "falqon", "falqon", topk="all", stochastic=True,
           about="falqon k = N, stochastic rounding (ours)"),
    # Added after the H200 run in which falqon_adapter led LoRA at 50 and 100 steps and trailed it
    # at 150 and 200: does the subspace of the frozen A matter for a longer fine-tune?
    Method("falqon_adapter_rand", "falqon", "falqon_adapter_rand", update_mode="adapter",
           adapter_init="random", about="falqon, adapter mode, random A (LoRA-FA's)"),
    Method("falqon_adapter_wsvd", "falqon", "falqon_adapter_wsvd", update_mode="adapter",
           adapter_init="weight_svd",
           about="falqon, adapter mode, A = W's top-r right singular vectors"),
    # Added after the A-subspace run: no frozen A closed role-play's gap, while LoRA over an FP8
    # or NF4 base (A trained) matched LoRA. Is it the freezing?
    Method("falqon_adapter_train_a", "falqon", "falqon_adapter_train_a", update_mode="adapter",
           train_a=True, about="falqon, adapter mode, A trained too (study-only probe)"),
    # Added after the probe ended below LoRA on both tasks: the library's trained A.
    Method("falqon_adapter_train_a_lib", "falqon", "falqon_adapter_train_a_lib",
           update_mode="adapter", train_a_lib=True,
           about="falqon, adapter mode, FalqonConfig(train_a=True)"),
)}
# Run order: the comparison the study is about first (issue 12: falqon_adapter against lora_bf16),
# so that a stage short of time drops the least important runs (each skipped run is recorded with
# the reason).
DEFAULT_METHODS = tuple(METHODS)
# The methods issue 12 is judged on (`--methods issue12`).
ISSUE12_METHODS = ("lora_bf16", "falqon_adapter", "falqon", "qlora_nf4", "lora_fp8_torchao")
# The adapter-mode A comparison (`--methods adapter_init`): bf16 LoRA and the three inits of A.
ADAPTER_INIT_METHODS = ("lora_bf16", "falqon_adapter", "falqon_adapter_rand",
                        "falqon_adapter_wsvd")
# Does training A close the adapter mode's gap (`--methods train_a`)?
TRAIN_A_METHODS = ("lora_bf16", "falqon_adapter", "falqon_adapter_train_a",
                   "falqon_adapter_train_a_lib")
METHOD_SETS = {"all": DEFAULT_METHODS, "issue12": ISSUE12_METHODS,
               "adapter_init": ADAPTER_INIT_METHODS, "train_a": TRAIN_A_METHODS}
FAMILIES = {"full": "full_bf16", "lora": "lora_bf16", "falqon_adapter": "falqon_adapter",
            "falqon": "falqon", "falqon_keep": "falqon_keep",
            "falqon_sr": "falqon_sr", "falqon_adapter_rand": "falqon_adapter_rand",
            "falqon_adapter_wsvd": "falqon_adapter_wsvd",
            "falqon_adapter_train_a": "falqon_adapter_train_a",
            "falqon_adapter_train_a_lib": "falqon_adapter_train_a_lib"}  # family -> pilot method
# Pilot learning rates, on the 1-2-5 sequence (neighbours 2x or 2.5x apart, so that two
# methods whose best rates are "within 3x" can be told apart from two a grid step apart). The
# adapter mode's A is rescaled to a PEFT LoRA A's row norm and its output multiplied by the
# adapter gain (falqon.config.ADAPTER_GAIN), so its grid is LoRA's. In the proxy mode, FP8 E4M3
# weights round away updates under half a step (6.25% of the value), and the update is B A with A
# built from W's small quantisation error, so the proxy methods need far larger Adam learning
# rates than LoRA; the pilot extends a grid whose best value sits on an edge.
LR_GRIDS = {"full": (5e-5, 1e-4, 2e-4), "lora": (2e-3, 5e-3, 1e-2, 2e-2),
            "falqon_adapter": (2e-3, 5e-3, 1e-2, 2e-2),
            "falqon": (2e-2, 5e-2, 1e-1), "falqon_keep": (5e-3, 1e-2, 2e-2),
            "falqon_sr": (5e-3, 1e-2, 2e-2),
            "falqon_adapter_rand": (2e-3, 5e-3, 1e-2, 2e-2),
            "falqon_adapter_wsvd": (2e-3, 5e-3, 1e-2, 2e-2),
            "falqon_adapter_train_a": (2e-3, 5e-3, 1e-2, 2e-2),
            "falqon_adapter_train_a_lib": (2e-3, 5e-3, 1e-2, 2e-2)}


def lr_neighbour(lr: float, up: bool) -> float:
    """The next learning rate above (up) or below `lr` on the 1-2-5 sequence."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    mantissa = round(lr / 10 ** exponent, 6)
    steps = (1.0, 2.0, 5.0)
    i = min(range(3), key=lambda j: abs(steps[j] - mantissa))
    j = i + (1 if up else -1)
    return steps[j % 3] * 10.0 ** (exponent + j // 3)


def resolve_methods(names) -> list[Method]:
    """The methods named, in the order given; a set name (METHOD_SETS: all, issue12) stands for
    its methods. Duplicates are dropped."""
    names = list(dict.fromkeys(m for n in names for m in METHOD_SETS.get(n, (n,))))
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(METHODS)} and the "
                         f"sets {', '.join(METHOD_SETS)}")
    return [METHODS[n] for n in names]


def skip_reason(method: Method, device: torch.device) -> str | None:
    """Why this method cannot run here, or None."""
    if method.kind == "qlora":
        if device.type != "cuda":
            return "QLoRA NF4 needs CUDA (bitsandbytes 4-bit kernels)"
        return _import_problem("bitsandbytes")
    if method.kind == "torchao":
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
            return "torchao float8 training needs a CUDA GPU with FP8 (compute capability >= 8.9)"
        return _import_problem("torchao.float8")
    if method.kind == "falqon":
        problem = _import_problem("falqon")
        if problem:
            return problem
        import falqon

        missing = [n for n in ("FalqonConfig", "meld", "attach") if not hasattr(falqon, n)]
        if missing:
            return (f"this falqon has no {', '.join(missing)} (the public API of branch "
                    f"`workflow`)")
        fields = getattr(falqon.FalqonConfig, "__dataclass_fields__", {})
        if "update_mode" not in fields:
            return "this falqon's FalqonConfig has no update_mode (adapter/proxy)"
        if method.adapter_init != "error_svd" and "adapter_init" not in fields:
            return "this falqon's FalqonConfig has no adapter_init (random/weight_svd)"
        if method.train_a_lib and "train_a" not in fields:
            return "this falqon's FalqonConfig has no train_a"
        key = {"cuda": "CUDA", "cpu": "CPU"}.get(device.type)
        if key is None or not torch._C._dispatch_has_kernel_for_dispatch_key(
                "falqon::melded_linear", key):
            return (f"falqon was built without {device.type} kernels (build the extension with "
                    f"its CUDA sources: TORCH_CUDA_ARCH_LIST=9.0a python3 setup.py build_ext "
                    f"--inplace)")
    return None


def _import_problem(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 (a broken install raises more than ImportError)
        return f"{module} not importable: {type(exc).__name__}: {exc}"
    return None


# ---- stochastic rounding to E4M3 ----------------------------------------------------------------

def e4m3_spacing(a: torch.Tensor) -> torch.Tensor:
    """Distance between neighbouring E4M3 values in the binade of |a| (a float32, >= 0)."""
    _, exp = torch.frexp(a)  # a = m 2^exp, m in [0.5, 1): the binade starts at 2^(exp - 1)
    exp = torch.where(a > 0, exp - 1, torch.full_like(exp, E4M3_MIN_EXP)).clamp_min(E4M3_MIN_EXP)
    # 2^(exp - 3) built from its float32 bits (exact on every device, unlike pow / ldexp).
    return ((exp.to(torch.int32) - E4M3_MANTISSA_BITS + 127) << 23).view(torch.float32)


def stochastic_round_e4m3(x: torch.Tensor, generator: torch.Generator | None = None
                          ) -> torch.Tensor:
    """x (float32) rounded to a neighbouring E4M3 value at random, up with probability equal to
    the distance from the lower neighbour in units of the spacing, so E[result] = x exactly for
    |x| <= 448; saturated at +-448 first. The result is float32 on the E4M3 grid (its cast to
    float8_e4m3fn is exact). Equivalent to adding uniform noise of one step at the value's
    exponent and truncating; written with frexp so that it runs on any device."""
    x = x.float().clamp(-E4M3_MAX, E4M3_MAX)
    a = x.abs()
    step = e4m3_spacing(a)
    low = torch.floor(a / step) * step  # exact: step is a power of two
    frac = (a - low) / step             # in [0, 1); the top of a binade is the next one's start
    up = torch.rand(a.shape, generator=generator, device=a.device) < frac
    return torch.copysign(low + up * step, x)


@torch.no_grad()
def stochastic_topk_update_(layer, k: int | None = None,
                            generator: torch.Generator | None = None) -> None:
    """falqon.topk_update_ with a stochastic cast: the same rows (the k largest L1 norms of B),
    W'[T] = SR(W'[T] + scaling * B[T] A_q) in the scaled domain, a NaN update leaves the row as
    it was, then B is reset per the layer's policy. Plain torch ops, any device."""
    n, r = layer.out_features, layer.rank
    b = layer.lora_B
    k = min(layer.topk if k is None else k, n)
    if k > 0:
        e4m3 = layer.weight.dtype
        idx = torch.topk(b.float().abs().sum(1), k, sorted=False).indices
        w_bytes = layer.weight.view(torch.uint8)  # FP8 rows are moved as bytes
        rows = w_bytes.index_select(0, idx).view(e4m3).float()
        a_q = layer.weight[n:n + r].float()
        updated = rows + (b.index_select(0, idx).float() @ a_q) * layer.scaling
        new = torch.where(updated.isnan(), rows, stochastic_round_e4m3(updated, generator))
        new = new.to(e4m3)
        w_bytes.index_copy_(0, idx, new.view(torch.uint8))
        if layer.weight_t is not None:
            layer.weight_t.view(torch.uint8).index_copy_(1, idx,
                                                         new.t().contiguous().view(torch.uint8))
    if layer.keep_residual and k > 0:
        b.index_fill_(0, idx, 0)
    elif not layer.keep_residual:
        b.zero_()


# ---- how much of the proposed update reaches the weights -----------------------------------------

class UpdateMassMeter:
    """Wraps every melded layer's proxy_update (which falqon.attach calls after each optimizer
    step) and, on sampled steps, measures in the real domain:
      proposed  sum |scaling * B A| over all rows (B as the optimizer left it),
      selected  the same over the k rows the update folds in,
      applied   sum |W_after - W_before|,
      projection  <W_after - W_before, scaling * B A> / |scaling * B A|^2 (the signed share of
                  the proposed update that arrived; 1 = all of it, exactly).
    Each is summed over layers and sampled steps; the ratios are mass-weighted over the run.
    sum |B A| costs an (N x r) @ (r x K) product per layer, so only every `every`-th step is
    measured (call begin_step before each optimizer step)."""

    def __init__(self, layers, every: int):
        if every < 1:
            raise ValueError(f"mass sampling interval must be >= 1, got {every}")
        self.every, self.active, self.calls, self.samples = every, False, 0, 0
        self._sums = None
        for layer in layers:
            layer.proxy_update = self._wrap(layer, layer.proxy_update)

    def begin_step(self, step: int) -> None:
        self.active = step % self.every == 0
        if self.active:
            self.samples += 1

    def _wrap(self, layer, inner):
        def proxy_update(k=None):
            self.calls += 1
            if not self.active:
                return inner(k)
            with torch.no_grad():
                n = layer.out_features
                b = layer.lora_B.float()
                proposed = (b @ layer.adapter_A()).mul_(layer.scaling)
                k_eff = min(layer.topk if k is None else k, n)
                idx = torch.topk(b.abs().sum(1), k_eff, sorted=False).indices
                before = layer.dequantized_weight()
                inner(k)
                delta = layer.dequantized_weight() - before
                sums = torch.stack([proposed.abs().sum(), proposed.abs()[idx].sum(),
                                    delta.abs().sum(), (delta * proposed).sum(),
                                    proposed.square().sum()]).double()
                self._sums = sums if self._sums is None else self._sums + sums
        return proxy_update

    def summary(self) -> dict:
        if self.calls == 0:
            raise RuntimeError("falqon.attach never called MeldedLinear.proxy_update: the update "
                               "mass meter and the stochastic-rounding variant rely on it")
        if self._sums is None:
            return {"mass_samples": 0}
        proposed, selected, applied, dot, square = self._sums.tolist()
        ratio = (lambda a, b: a / b if b > 0 else None)
        return {"update_mass_fraction": ratio(applied, proposed),
                "selected_mass_fraction": ratio(selected, proposed),
                "update_projection": ratio(dot, square), "mass_samples": self.samples}


# ---- building a method's model and optimizer ------------------------------------------------------

@dataclass
class RunSettings:
    rank: int
    alpha: float
    dtype: torch.dtype         # of the frozen base and the activations (bf16 on GPUs)
    falqon_warmup_steps: int   # steps of k = r (the published warm-up)
    mass_every: int
    seed: int = 0


@dataclass
class Setup:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    params: list
    trainable: int
    meter: UpdateMassMeter | None = None
    handle: object = None


def load_base(ckpt: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device)


def _peft(model: nn.Module, s: RunSettings) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=s.rank, lora_alpha=s.alpha, target_modules=list(PROJECTIONS),
                     lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def _meld(method: Method, base: nn.Module, s: RunSettings) -> tuple[nn.Module, list]:
    """falqon.meld of the seven projections in the method's update mode: (model, melded layers).
    Proxy methods pass their top-k policy; the adapter mode has none."""
    import falqon

    if method.proxy:
        # "all": more rows than any layer has; topk_update_ clamps k to the layer's out_features.
        topk = {"r": s.rank, "all": 1 << 30}.get(method.topk, method.topk)
        policy = dict(topk=topk, warmup_steps=s.falqon_warmup_steps,
                      keep_residual=method.keep_residual)
    else:  # the default A is left to FalqonConfig (a falqon from before adapter_init)
        policy = {} if method.adapter_init == "error_svd" else {"adapter_init": method.adapter_init}
        if method.train_a_lib:
            policy["train_a"] = True
    cfg = falqon.FalqonConfig(rank=s.rank, alpha=s.alpha, update_mode=method.update_mode,
                              target_modules=list(PROJECTIONS), seed=s.seed, **policy)
    model = falqon.meld(base, cfg, progress=False, verbose=False)
    layers = [m for m in model.modules() if isinstance(m, falqon.MeldedLinear)]
    if len(layers) != len(PROJECTIONS) * model.config.num_hidden_layers:
        raise RuntimeError(f"falqon.meld melded {len(layers)} layers, expected "
                           f"{len(PROJECTIONS) * model.config.num_hidden_layers}")
    return model, layers


def _proxy_instruments(method: Method, layers: list, device: torch.device,
                       s: RunSettings) -> UpdateMassMeter:
    """A proxy method's stochastic-rounding update (falqon_sr*) and its update-mass meter, both
    installed as wrappers of each layer's proxy_update (which falqon.attach calls)."""
    if method.stochastic:
        gen = torch.Generator(device=device)
        gen.manual_seed(s.seed)
        for layer in layers:
            layer.proxy_update = (lambda k=None, _l=layer: stochastic_topk_update_(_l, k, gen))
    return UpdateMassMeter(layers, s.mass_every)


def build(method: Method, ckpt: str, device: torch.device, lr: float, s: RunSettings) -> Setup:
    """The method's model (from the checkpoint, on `device`) and its AdamW optimizer."""
    meter = handle = None
    if method.kind == "full":
        model = load_base(ckpt, device, torch.float32)  # fp32 master weights; autocast computes
    elif method.kind == "lora":
        model = _peft(load_base(ckpt, device, s.dtype), s)
    elif method.kind == "qlora":
        from transformers import BitsAndBytesConfig, LlamaForCausalLM

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        index = device.index if device.index is not None else torch.cuda.current_device()
        base = LlamaForCausalLM.from_pretrained(ckpt, dtype=s.dtype, quantization_config=quant,
                                                device_map={"": index})
        model = _peft(base, s)
    elif method.kind == "torchao":
        from torchao.float8 import convert_to_float8_training

        base = load_base(ckpt, device, s.dtype)
        convert_to_float8_training(
            base, module_filter_fn=lambda mod, fqn: fqn.rsplit(".", 1)[-1] in PROJECTIONS)
        model = _peft(base, s)
    elif method.kind == "falqon":
        model, layers = _meld(method, load_base(ckpt, device, s.dtype), s)
        if method.proxy:
            meter = _proxy_instruments(method, layers, device, s)
        if method.train_a:  # lora_A on every layer, before the optimizer collects parameters
            from . import train_a

            probes = train_a.install(layers)
            meter = train_a.RangeMeter(probes)
    else:
        raise ValueError(f"unknown method kind {method.kind!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError(f"{method.name}: the model has no trainable parameter")
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    if method.proxy or method.train_a_lib:  # the frozen-A adapter mode needs no hook
        import falqon

        handle = falqon.attach(optimizer, model)
        if method.train_a_lib:
            from . import train_a

            meter = train_a.LibraryRange(model)
    if method.train_a:  # A's FP8 rows follow lora_A after every step
        handle = train_a.sync_after_steps(optimizer, probes)
    model.train()
    return Setup(model, optimizer, params, sum(p.numel() for p in params), meter, handle)
