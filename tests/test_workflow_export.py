"""falqon.export: a compressed-tensors float-quantized checkpoint that transformers loads on CPU,
holding exactly the trained FP8 weights and scales (the proxy mode's "fp8" export, and the FP8 base
of the adapter mode's "fp8+lora"); bad input refused. The adapter mode's formats and falqon.merge
are tested in tests/test_adapter_deploy.py."""

import copy
import json

import pytest
import torch
from safetensors import safe_open

import falqon
from falqon import FalqonConfig, FalqonError
from falqon.data import byte_tokenizer
from falqon_testing import rel_err
from workflow_testing import tiny_causal_lm

transformers = pytest.importorskip("transformers")
compressed_tensors = pytest.importorskip("compressed_tensors")


def trained(dtype=torch.float32, arch="llama", update_mode="proxy", **model_kw):
    model = tiny_causal_lm(arch, **model_kw).to(dtype)
    falqon.meld(model, FalqonConfig(rank=4, topk=4, update_mode=update_mode,
                                    exclude_modules=["lm_head", "layers.1.mlp.down_proj"]),
                progress=False, verbose=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    falqon.attach(opt, model)
    for _ in range(2):  # move the weights away from their melded start
        model(input_ids=torch.randint(0, 272, (2, 12))).logits.float().logsumexp(-1).mean() \
            .backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()


@pytest.mark.parametrize("arch, activations, tol", [
    # The proxy mode's export: the same FP8 weights (they hold every update) and the same
    # dynamic per-tensor FP8 activation quantisation as the training forward: only float32
    # summation order differs. (Qwen2: q/k/v carry a bias.)
    ("llama", "tensor", 1e-4),
    ("qwen2", "tensor", 1e-4),
    # Per-token activation scales (or none) round activations differently from the per-tensor
    # training forward: an FP8 rounding difference (about 3% per GEMM), well under 10% overall.
    ("llama", "token", 0.1),
    ("llama", None, 0.1),
])
def test_export_loads_in_transformers_and_matches(tmp_path, arch, activations, tol):
    model = trained(arch=arch)
    falqon.export(model, tmp_path, activations=activations)
    x = torch.randint(0, 272, (2, 14))
    with torch.no_grad():
        ref = model(input_ids=x).logits
        out = load(tmp_path)(input_ids=x).logits
    assert rel_err(out, ref) < tol


@pytest.mark.parametrize("mode, history, declared", [
    ("adapter", 0, "token"),    # x quantised per row in training: per-token activations
    ("adapter", 4, "tensor"),   # delayed scaling quantises x per tensor
    ("proxy", 0, "tensor"),
])
def test_export_declares_the_trained_activation_quantisation_by_default(tmp_path, mode, history,
                                                                        declared):
    model = tiny_causal_lm("llama")
    falqon.meld(model, FalqonConfig(rank=4, update_mode=mode, amax_history_len=history),
                progress=False, verbose=False)
    falqon.export(model.eval(), tmp_path, verbose=False)
    config = json.loads((tmp_path / "config.json").read_text())
    group = config["quantization_config"]["config_groups"]["group_0"]
    assert group["input_activations"]["strategy"] == declared
    info = json.loads((tmp_path / "falqon_export.json").read_text())
    assert info["activations"] == declared
    falqon.export(model, tmp_path / "chosen", activations="tensor", verbose=False)
    chosen = json.loads((tmp_path / "chosen" / "config.json").read_text())
    assert chosen["quantization_config"]["config_groups"]["group_0"]["input_activations"][
        "strategy"] == "tensor"


@pytest.mark.parametrize("mode", ["proxy", "adapter"])
def test_export_holds_the_trained_fp8_bytes_and_a_valid_config(tmp_path, mode):
    """The proxy mode's default "fp8" and the adapter mode's default "fp8+lora" both write the
    trained FP8 weight rows as they are (in the adapter mode W never changed)."""
    model = trained(update_mode=mode)
    falqon.export(model, tmp_path)
    info = json.loads((tmp_path / "falqon_export.json").read_text())
    assert info["format"] == ("fp8" if mode == "proxy" else "fp8+lora")
    assert (tmp_path / "adapter").is_dir() == (mode == "adapter")
    config = json.loads((tmp_path / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "float-quantized"
    assert q["ignore"] == ["lm_head", "model.layers.1.mlp.down_proj"]
    compressed_tensors.QuantizationConfig.model_validate(q)  # the library's own validation
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for name, layer in falqon.melded_layers(model):
            w = f.get_tensor(f"{name}.weight")
            assert w.dtype == torch.float8_e4m3fn and w.shape == (layer.out_features,
                                                                  layer.in_features)
            # exactly the trained bytes: no re-quantisation; A's rows are not exported
            assert torch.equal(w.view(torch.uint8),
                               layer.weight[:layer.out_features].view(torch.uint8))
            assert torch.equal(f.get_tensor(f"{name}.weight_scale"),
                               layer.weight_scale.reshape(1))
            assert f"{name}.lora_B" not in keys
        down = f.get_tensor("model.layers.1.mlp.down_proj.weight")
        assert down.dtype == torch.float32  # skipped layers stay in the model dtype
    loaded = load(tmp_path)
    layer = dict(falqon.melded_layers(model))["model.layers.0.mlp.up_proj"]
    q_up = loaded.model.layers[0].mlp.up_proj
    assert torch.equal(q_up.weight_scale.reshape(()), layer.weight_scale)


def test_export_bf16_model_with_tied_embeddings(tmp_path):
    model = trained(torch.bfloat16, tie_word_embeddings=True)
    fp32 = copy.deepcopy(model).float()  # MeldedLinear keeps its FP8 weight and fp32 scale
    tokenizer = byte_tokenizer()
    falqon.export(model, tmp_path, tokenizer=tokenizer)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = load(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    x = torch.randint(0, 272, (2, 14))
    with torch.no_grad():
        ref = model(input_ids=x).logits.float()
        err = rel_err(loaded(input_ids=x).logits.float(), ref)
        # Both sides round activations, dequantised weights and every layer's output to bf16
        # at different places; the size of that noise is how far the bf16 melded model is from
        # the same model in float32. The export must agree with the melded model as well.
        noise = rel_err(ref, fp32(input_ids=x).logits)
    assert err < 2 * noise + 1e-3, (err, noise)


@pytest.mark.parametrize("mode", ["proxy", "adapter"])
def test_export_errors(tmp_path, mode):
    with pytest.raises(FalqonError, match="no MeldedLinear layers"):
        falqon.export(tiny_causal_lm("llama"), tmp_path)
    model = trained(update_mode=mode)
    with pytest.raises(ValueError, match="activations must be one of"):
        falqon.export(model, tmp_path, activations="channel")
    with pytest.raises(FalqonError, match=r"format must be one of \('fp8\+lora', 'fp8', 'bf16'\), "
                                          r"got 'fp16'"):
        falqon.export(model, tmp_path, format="fp16")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FalqonError, match="exists and is not a directory"):
        falqon.export(model, tmp_path / "file")
    seq = torch.nn.Sequential(torch.nn.Linear(32, 32))
    falqon.meld(seq, FalqonConfig(rank=4, exclude_modules=None, update_mode=mode),
                progress=False, verbose=False)
    with pytest.raises(FalqonError, match="needs a transformers model"):
        falqon.export(seq, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["file"]  # nothing written
    if mode == "proxy":  # B is no adapter of the proxy mode's forward
        with pytest.raises(FalqonError, match=r"'fp8\+lora' needs update_mode='adapter'"):
            falqon.export(model, tmp_path / "out", format="fp8+lora")
        assert not (tmp_path / "out").exists()
