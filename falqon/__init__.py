"""FALQON: LoRA fine-tuning with FP8 arithmetic, the adapter melded into the FP8 weight.

    import falqon
    layer = falqon.MeldedLinear.from_linear(nn.Linear(4096, 4096), rank=64, topk=10)
    y = layer(x); y.sum().backward(); opt.step(); layer.proxy_update()
"""

from . import ops
from ._extension import build_info
from .modules import MeldedLinear, check_meldable
from .ops import meld_init, melded_linear, melded_linear_grad_input, quantize, topk_update_

__version__ = "0.1.0"

__all__ = [
    "MeldedLinear", "build_info", "check_meldable", "meld_init", "melded_linear",
    "melded_linear_grad_input", "ops", "quantize", "topk_update_",
]
