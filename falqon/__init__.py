"""FALQON: LoRA fine-tuning with FP8 arithmetic, the adapter melded into the FP8 weight.

    import falqon
    model = falqon.meld(model, falqon.FalqonConfig(rank=16, topk=10))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    falqon.attach(optimizer, model)          # or Trainer(..., callbacks=[falqon.FalqonCallback()])
    falqon.fuse(model)                       # GPU: Liger's RMSNorm/SwiGLU/RoPE/loss or torch.compile
    ...train as usual...; falqon.save_pretrained(model, "out"); falqon.export(model, "out-fp8")
    (the FP8 base + a PEFT LoRA adapter; format="bf16" or "fp8" merges the adapter instead, and
    falqon.merge(model, precision) gives the merged model in memory)

A checkpoint too large to load whole: falqon.meld_pretrained(path, config) melds each layer as
it loads (falqon.meld_from_config: seeded random weights, for benchmarks).

One layer: falqon.MeldedLinear.from_linear(nn.Linear(4096, 4096), rank=64, topk=10).
"""

from . import ops
from ._extension import build_info
from .modules import MeldedLinear, check_meldable
from .ops import (meld_init, melded_linear, melded_linear_backward, melded_linear_grad_input,
                  quantize, quantize_delayed, quantize_rows, topk_update_, topk_update_many_)
from .config import FalqonConfig, FalqonError
from .convert import MeldSummary, meld, melded_layers, melded_summary
from .training import attach
from .checkpoint import from_pretrained, save_pretrained
from .export import export
from .merge import MergeReport, merge
from .fusion import FuseReport, fuse, fusion_report
from .loading import meld_from_config, meld_pretrained

__version__ = "0.1.0"

__all__ = [
    "FalqonCallback", "FalqonConfig", "FalqonError", "FuseReport", "MeldSummary", "MeldedLinear",
    "MergeReport", "attach", "build_info", "check_meldable", "export", "from_pretrained", "fuse",
    "fusion_report", "meld", "meld_from_config", "meld_init", "meld_pretrained",
    "melded_layers", "merge", "melded_linear", "melded_linear_backward", "melded_linear_grad_input",
    "melded_summary", "ops",
    "quantize", "quantize_delayed", "quantize_rows", "save_pretrained", "topk_update_",
    "topk_update_many_",
]


def __getattr__(name):
    # FalqonCallback subclasses transformers.TrainerCallback: imported on first use only, so
    # that `import falqon` does not import transformers.
    if name == "FalqonCallback":
        from .training import FalqonCallback

        return FalqonCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
