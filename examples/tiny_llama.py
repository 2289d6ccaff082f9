"""Meld a small LLaMA-architecture model and fine-tune it a few steps, printing the loss.

Runs on CPU (the reference ops) or a GPU (the CUDA kernels). The model has random weights and
the text is real instruction data (../shared/data/gsm8k_train.json) when present, else this
machine's Python standard library sources, as bytes: it shows the machinery, not a useful model.

    python examples/tiny_llama.py --steps 30
"""

import argparse
import json
import pathlib
import time

import torch
from torch import nn

import falqon


def text_corpus() -> bytes:
    data = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k_train.json"
    if data.is_file():
        records = json.loads(data.read_text())
        return "\n\n".join(f"{r['instruction']}\n{r['output']}" for r in records).encode()
    import json as stdlib_module  # any standard-library package's sources will do

    root = pathlib.Path(stdlib_module.__file__).parent
    return b"\n".join(p.read_bytes() for p in sorted(root.glob("*.py")))


def meld_linear_layers(model: nn.Module, rank: int, topk: int, update_mode: str) -> list:
    melded = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name != "lm_head":
                layer = falqon.MeldedLinear.from_linear(child, rank=rank, topk=topk,
                                                        update_mode=update_mode)
                setattr(parent, name, layer)
                melded.append(layer)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in melded:
        layer.lora_B.requires_grad_(True)
    return melded


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--update-mode", choices=falqon.config.UPDATE_MODES, default="adapter")
    parser.add_argument("--topk", type=int, default=10, help="proxy mode: rows folded per step")
    # The adapter mode trains B like LoRA (a LoRA learning rate, a little high for a random
    # backbone); the proxy mode needs a large one: FP8 weights round away updates under half a step.
    parser.add_argument("--lr", type=float, default=None,
                        help="default: 2e-3 (adapter mode), 5e-2 (proxy mode)")
    args = parser.parse_args()
    lr = args.lr if args.lr is not None else {"adapter": 2e-3, "proxy": 5e-2}[args.update_mode]

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=704,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=args.seq)
    model = LlamaForCausalLM(config).to(device, dtype)
    layers = meld_linear_layers(model, args.rank, args.topk, args.update_mode)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"melded {len(layers)} linear layers on {device}; {trainable:,} trainable parameters")

    tokens = torch.frombuffer(bytearray(text_corpus()), dtype=torch.uint8).long()
    opt = torch.optim.AdamW([l.lora_B for l in layers], lr=lr)
    start = time.time()
    for step in range(1, args.steps + 1):
        offsets = torch.randint(0, len(tokens) - args.seq - 1, (args.batch,))
        batch = torch.stack([tokens[o:o + args.seq] for o in offsets]).to(device)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if args.update_mode == "proxy":
            for layer in layers:
                layer.proxy_update()
        if step == 1 or step % 5 == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.4f}  ({time.time() - start:.1f} s)")


if __name__ == "__main__":
    main()
