"""Deploying the adapter mode: falqon.merge (bf16 / fp8, and the report of how much of the update an
FP8 merge keeps) and falqon.export's formats "fp8+lora" (FP8 base + PEFT LoRA adapter, loaded by
transformers + PEFT, in the layout vLLM's LoRA loader reads), "bf16" and "fp8", compared with the
trained melded model on CPU.

Tolerances. The melded model quantises every linear layer's input to FP8 (per tensor) in its
forward. A deployed model that computes a product from the unquantised input (the PEFT adapter's
x A^T, every product of a bf16 merge) differs from it by that rounding: about 3% per GEMM, under
10% of the logits over the tiny two-layer models (the bound test_workflow_export.py uses for
per-token or no activation quantisation). Where a deployed model and falqon.merge's model compute
with the same dense weights the same way, they agree to float32 round-off (1e-5). Every loose
comparison also checks that the adapter's own effect on the logits is several times the bound, so
that a lost or wrong adapter cannot pass it.
"""

import copy
import json
import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

import falqon
from falqon import FalqonConfig, FalqonError, MeldedLinear
from falqon.config import ADAPTER_GAIN
from falqon.data import byte_tokenizer
from falqon_testing import rel_err
from workflow_testing import tiny_causal_lm

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")
peft = pytest.importorskip("peft")

ACTIVATION_ROUNDING = 0.1  # see the module's doc
ROUND_OFF = 1e-5
EXCLUDED = "model.layers.1.mlp.down_proj"
# What vLLM's LoRA loader accepts for LLaMA-style models (its supported module leaf names).
VLLM_LLAMA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def trained(update_mode="adapter", arch="llama", dtype=torch.float32, steps=2, lr=None,
            adapter_init="error_svd", **model_kw):
    """A tiny melded model after `steps` AdamW steps (B far from zero), in eval mode. lr: 0.1
    over the adapter gain (the same update of the output in both modes) by default."""
    if lr is None:
        lr = 0.1 / (ADAPTER_GAIN if update_mode == "adapter" else 1.0)
    model = tiny_causal_lm(arch, **model_kw).to(dtype)
    falqon.meld(model, FalqonConfig(rank=4, alpha=8, topk=4, update_mode=update_mode,
                                    exclude_modules=["lm_head", EXCLUDED],
                                    adapter_init=adapter_init),
                progress=False, verbose=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    falqon.attach(opt, model)
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x = torch.randint(0, 272, (2, 12), generator=gen)
        model(input_ids=x).logits.float().logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@torch.no_grad()
def logits(model, x):
    return model(input_ids=x).logits.float()


@torch.no_grad()
def adapter_effect(model, x):
    """How far the adapter moves the melded model's logits: rel_err(without B, with B)."""
    without = copy.deepcopy(model)
    for _, layer in falqon.melded_layers(without):
        layer.lora_B.zero_()
    return rel_err(logits(without, x), logits(model, x))


def load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()


def tokens():
    return torch.randint(0, 272, (2, 14))


# ---- falqon.merge -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["adapter", "proxy"])
@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_merge_gives_plain_linear_layers_with_the_merged_weight(mode, precision):
    model = trained(mode)
    layers = dict(falqon.melded_layers(model))
    merged = falqon.merge(copy.deepcopy(model), precision=precision)
    assert not falqon.melded_layers(merged) and falqon.convert.melded_config(merged) is None
    for name, layer in layers.items():
        linear = merged.get_submodule(name)
        assert type(linear) is nn.Linear and linear.weight.dtype == torch.float32
        assert not linear.weight.requires_grad
        w = layer.dequantized_weight()
        if mode == "adapter":
            w = w + layer.scaling * layer.lora_B.detach() @ layer.adapter_A()
        if precision == "fp8":
            if mode == "adapter":  # re-quantised at a fresh scale, amax / 448
                q, scale = falqon.quantize(w)
                assert torch.equal(scale, w.abs().amax() / 448)
            else:  # the trained bytes, which hold every update
                q, scale = layer.weight[:layer.out_features], layer.weight_scale
            w = q.float() * scale
        torch.testing.assert_close(linear.weight, w, rtol=1e-6, atol=1e-7)
    x = tokens()
    err = rel_err(logits(merged, x), logits(model, x))
    assert err < ACTIVATION_ROUNDING, err
    if mode == "adapter":
        assert adapter_effect(model, x) > 3 * ACTIVATION_ROUNDING


def test_merge_in_the_model_dtype_with_bias_and_in_place():
    model = trained("adapter", arch="qwen2", dtype=torch.bfloat16)  # q/k/v carry a bias
    melded = dict(falqon.melded_layers(model))
    q_proj = melded["model.layers.0.self_attn.q_proj"]
    expected = q_proj.merged_weight(torch.bfloat16)
    assert falqon.merge(model, "bf16", verbose=True) is model  # in place
    linear = model.model.layers[0].self_attn.q_proj
    assert linear.weight.dtype == linear.bias.dtype == torch.bfloat16
    assert torch.equal(linear.weight, expected) and torch.equal(linear.bias, q_proj.bias)
    assert model.falqon_merge_report.precision == "bf16"
    logits(model, tokens())  # runs as a plain bf16 model
    again = trained("adapter", arch="qwen2", dtype=torch.bfloat16)
    falqon.merge(again, "fp8", dtype=torch.float32)
    assert again.model.layers[0].self_attn.q_proj.bias.dtype == torch.float32


def one_layer(update_mode="adapter", seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 96))
    falqon.meld(model, FalqonConfig(rank=8, exclude_modules=None, update_mode=update_mode),
                progress=False, verbose=False)
    return model, model[0]


@torch.no_grad()
def test_merge_report_measures_what_the_fp8_rounding_keeps():
    model, layer = one_layer()
    w = layer.dequantized_weight()
    smallest_step = layer.weight_scale * 2.0 ** -9  # E4M3's subnormal step, in W's units
    noise = torch.randn_like(layer.lora_B)
    cases = {}
    for size in (0.0, 1e-8, 1.0):
        layer.lora_B.copy_(noise * size)
        update = layer.scaling * layer.lora_B @ layer.adapter_A()
        merged = falqon.merge(copy.deepcopy(model), "fp8")
        report = merged.falqon_merge_report
        delta = merged[0].weight - w
        stats = report.layers["0"]
        assert math.isclose(stats["update_l1"], update.abs().sum().item(), rel_tol=1e-5)
        assert math.isclose(stats["change_l1"], delta.abs().sum().item(), rel_tol=1e-5)
        assert math.isclose(stats["dot"], (delta * update).sum().item(), rel_tol=1e-5,
                            abs_tol=1e-12)
        assert math.isclose(report.total("update_sq"), update.square().sum().item(),
                            rel_tol=1e-5)
        cases[size] = (report, update, merged[0].weight)
    # B = 0: no update to measure, and the fresh scale gives W's FP8 values back.
    report, _, weight = cases[0.0]
    assert math.isnan(report.signed_share) and math.isnan(report.kept_l1)
    assert torch.equal(weight, w)
    # An update under half of every step rounds away: the merged FP8 bytes are W's (the fresh
    # scale moves a few float32 ulps, which is all that sum|dW| sees).
    report, update, _ = cases[1e-8]
    assert update.abs().max() < smallest_step / 2
    q, _ = falqon.quantize(layer.dequantized_weight() + update)
    assert torch.equal(q.view(torch.uint8), layer.weight[:layer.out_features].view(torch.uint8))
    assert abs(report.signed_share) < 0.1
    # A large update survives the rounding (up to FP8's relative precision).
    report, _, _ = cases[1.0]
    assert 0.97 < report.signed_share < 1.03 and 0.9 < report.kept_l1 < 1.2
    assert "carry" in str(report) and "%" in str(report)
    # The dense merge keeps the update up to float32 round-off.
    dense = falqon.merge(copy.deepcopy(model), "bf16").falqon_merge_report
    assert abs(dense.signed_share - 1) < 1e-5 and abs(dense.kept_l1 - 1) < 1e-4
    assert json.loads(json.dumps(dense.to_dict()))["totals"]["update_l1"] > 0


def test_merge_report_of_the_proxy_mode_and_errors():
    model, _ = one_layer("proxy")
    report = falqon.merge(copy.deepcopy(model), "fp8").falqon_merge_report
    assert report.update_mode == "proxy" and math.isnan(report.signed_share)
    assert report.to_dict()["signed_share"] is None  # JSON has no NaN
    assert "proxy mode" in str(report)
    with pytest.raises(FalqonError, match="precision must be one of"):
        falqon.merge(model, "fp16")
    with pytest.raises(FalqonError, match="no MeldedLinear layers"):
        falqon.merge(nn.Sequential(nn.Linear(16, 16)))
    assert falqon.melded_layers(model)  # a refused merge changes nothing


# ---- export "fp8+lora": the FP8 base + a PEFT LoRA adapter -------------------------------------

def peft_model(path):
    return peft.PeftModel.from_pretrained(load(path), str(path / "adapter")).eval()


@pytest.mark.parametrize("arch, dtype", [("llama", torch.float32), ("qwen2", torch.float32),
                                         ("llama", torch.bfloat16)])
def test_fp8_lora_export_loads_in_peft_and_matches(tmp_path, arch, dtype):
    model = trained(arch=arch, dtype=dtype)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    falqon.export(model, tmp_path)  # the adapter mode's default
    assert all(torch.equal(v.view(torch.uint8) if v.element_size() == 1 else v,
                           state[k].view(torch.uint8) if v.element_size() == 1 else state[k])
               for k, v in model.state_dict().items()), "export must not modify the model"
    assert json.loads((tmp_path / "falqon_export.json").read_text())["format"] == "fp8+lora"
    loaded = peft_model(tmp_path)
    melded = dict(falqon.melded_layers(model))
    wrapped = {n.removeprefix("base_model.model."): m for n, m in loaded.named_modules()
               if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert wrapped.keys() == melded.keys()  # the skipped layer with a target's name is excluded
    for name, layer in melded.items():
        assert torch.equal(wrapped[name].lora_A["default"].weight, layer.adapter_A())
        # PEFT scales by lora_alpha / r only: the adapter gain is folded into B.
        assert torch.equal(wrapped[name].lora_B["default"].weight,
                           layer.lora_B.detach() * layer.adapter_gain)
        assert wrapped[name].scaling["default"] * layer.adapter_gain == layer.scaling
        assert wrapped[name].scaling["default"] == 2.0
    x = tokens()
    err = rel_err(logits(loaded, x), logits(model, x))
    assert err < ACTIVATION_ROUNDING, err
    assert adapter_effect(model, x) > 3 * ACTIVATION_ROUNDING


def test_fp8_lora_export_without_activation_quantisation_is_the_merged_model(tmp_path):
    """Weight-only FP8 base + adapter computes x W^T + scaling (x A^T) B^T with the exact
    weights: the dense merge's logits up to float32 round-off."""
    model = trained()
    falqon.export(model, tmp_path, activations=None)
    x = tokens()
    merged = falqon.merge(copy.deepcopy(model), "bf16")
    assert rel_err(logits(peft_model(tmp_path), x), logits(merged, x)) < ROUND_OFF


@pytest.mark.parametrize("init", ["random", "weight_svd"])
def test_exports_of_a_non_default_adapter_init_match_the_trained_model(tmp_path, init):
    """The exports read A from the melded weight, whatever it was initialised from: the PEFT
    adapter holds that A and matches the trained model, the bf16 export its dense merge."""
    model = trained(adapter_init=init)
    falqon.export(model, tmp_path / "lora")
    loaded = peft_model(tmp_path / "lora")
    wrapped = {n.removeprefix("base_model.model."): m for n, m in loaded.named_modules()
               if isinstance(m, peft.tuners.lora.LoraLayer)}
    for name, layer in falqon.melded_layers(model):
        assert torch.equal(wrapped[name].lora_A["default"].weight, layer.adapter_A())
    x = tokens()
    assert rel_err(logits(loaded, x), logits(model, x)) < ACTIVATION_ROUNDING
    assert adapter_effect(model, x) > 3 * ACTIVATION_ROUNDING
    falqon.export(model, tmp_path / "bf16", format="bf16")
    merged = falqon.merge(copy.deepcopy(model), "bf16")
    assert rel_err(logits(load(tmp_path / "bf16"), x), logits(merged, x)) < ROUND_OFF


def vllm_module_name(key: str) -> tuple[str, str]:
    """(module, "lora_A" or "lora_B") of a tensor name, as vLLM's parse_fine_tuned_lora_name
    reads a PEFT adapter's keys (it refuses any other name)."""
    parts = key.split(".")
    assert parts[:2] == ["base_model", "model"] and parts[-1] == "weight", key
    assert parts[-2] in ("lora_A", "lora_B"), key
    return ".".join(parts[2:-2]), parts[-2]


def test_fp8_lora_adapter_has_the_layout_vllm_loads(tmp_path):
    model = trained()
    falqon.export(model, tmp_path, tokenizer=byte_tokenizer())
    adapter = tmp_path / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json",
                                                         "adapter_model.safetensors"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    # vLLM's PEFTHelper: r, lora_alpha, target_modules required; no modules_to_save, no DoRA,
    # no bias; scaling = lora_alpha / r (no rsLoRA).
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert config["lora_alpha"] / config["r"] * model.falqon_config.adapter_gain == \
        model.falqon_config.scaling
    assert config["modules_to_save"] is None and config["use_dora"] is False
    assert config["bias"] == "none" and config["use_rslora"] is False
    assert config["target_modules"] == sorted(VLLM_LLAMA_MODULES)
    assert config["exclude_modules"] == [EXCLUDED]
    assert config["base_model_name_or_path"] == str(tmp_path.resolve())
    melded = dict(falqon.melded_layers(model))
    seen = {}
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        for key in f.keys():
            module, which = vllm_module_name(key)
            assert module.rpartition(".")[2] in VLLM_LLAMA_MODULES
            layer = melded[module]
            tensor = f.get_tensor(key)
            assert tensor.dtype == torch.float32
            assert tensor.shape == ((layer.rank, layer.in_features) if which == "lora_A"
                                    else (layer.out_features, layer.rank))
            seen.setdefault(module, set()).add(which)
    assert seen == {name: {"lora_A", "lora_B"} for name in melded}  # both, for every layer, only
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "config.json").is_file()


# ---- export "bf16" and "fp8" (merged) -----------------------------------------------------------

@pytest.mark.parametrize("mode", ["adapter", "proxy"])
def test_bf16_export_is_a_plain_checkpoint_of_the_merged_model(tmp_path, mode):
    model = trained(mode)
    falqon.export(model, tmp_path, format="bf16")
    config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "scale" in k or "lora" in k]
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    loaded = load(tmp_path)
    assert not any(hasattr(m, "quantization_scheme") for m in loaded.modules())
    x = tokens()
    merged = falqon.merge(copy.deepcopy(model), "bf16")
    assert rel_err(logits(loaded, x), logits(merged, x)) < ROUND_OFF
    err = rel_err(logits(loaded, x), logits(model, x))
    assert err < ACTIVATION_ROUNDING, err


def test_bf16_export_of_a_bf16_model_with_tied_embeddings(tmp_path):
    model = trained(dtype=torch.bfloat16, tie_word_embeddings=True)
    falqon.export(model, tmp_path, format="bf16")
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied: written once
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    loaded = load(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    merged = falqon.merge(copy.deepcopy(model), "bf16")
    state, ours = loaded.state_dict(), merged.state_dict()
    assert state.keys() == ours.keys() and all(torch.equal(v, ours[k]) for k, v in state.items())
    x = tokens()
    # The one difference: the in-memory model's rotary inv_freq buffer went through bf16 with
    # model.to(bfloat16), the loaded one's is float32; that is bf16 noise, the size of the
    # distance from the bf16 model to the same model in float32.
    noise = rel_err(logits(merged, x), logits(copy.deepcopy(merged).float(), x))
    err = rel_err(logits(loaded, x), logits(merged, x))
    assert err < 2 * noise + 1e-3, (err, noise)


def test_fp8_export_of_the_adapter_mode_requantises_and_reports(tmp_path, capsys):
    model = trained()
    report = falqon.export(model, tmp_path, format="fp8")
    printed = capsys.readouterr().out
    assert "falqon merge (fp8)" in printed and "carry" in printed
    info = json.loads((tmp_path / "falqon_export.json").read_text())
    assert info["format"] == "fp8" and info["merge"]["signed_share"] == report.signed_share
    assert 0 < report.signed_share <= 1.05
    assert not (tmp_path / "adapter").exists()
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        for name, layer in falqon.melded_layers(model):
            q, scale = falqon.quantize(layer.merged_weight())
            assert torch.equal(f.get_tensor(f"{name}.weight").view(torch.uint8),
                               q.view(torch.uint8))
            assert torch.equal(f.get_tensor(f"{name}.weight_scale"), scale.reshape(1))
    x = tokens()
    # Against the trained model: the same per-tensor activation quantisation; the merged weights'
    # one extra E4M3 rounding (at most half a step, 6.25% of a value) is of the size of the FP8
    # weight rounding itself, a few % per GEMM: the same 10% bound.
    err = rel_err(logits(load(tmp_path), x), logits(model, x))
    assert err < ACTIVATION_ROUNDING, err
    assert adapter_effect(model, x) > 3 * ACTIVATION_ROUNDING
    # Weight-only: exactly falqon.merge's fp8 model.
    falqon.export(model, tmp_path / "w8", format="fp8", activations=None, verbose=False)
    merged = falqon.merge(copy.deepcopy(model), "fp8")
    assert rel_err(logits(load(tmp_path / "w8"), x), logits(merged, x)) < ROUND_OFF
    assert merged.falqon_merge_report.to_dict()["totals"] == info["merge"]["totals"]


def test_fp8_export_of_the_proxy_mode_is_unchanged(tmp_path, capsys):
    model = trained("proxy")
    assert falqon.export(model, tmp_path) is None  # no merge: the bytes are the trained ones
    assert "falqon merge" not in capsys.readouterr().out
    info = json.loads((tmp_path / "falqon_export.json").read_text())
    assert info["format"] == "fp8" and info["merge"] is None
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        for name, layer in falqon.melded_layers(model):
            assert torch.equal(f.get_tensor(f"{name}.weight").view(torch.uint8),
                               layer.weight[:layer.out_features].view(torch.uint8))
    assert isinstance(model.model.layers[0].mlp.up_proj, MeldedLinear)
