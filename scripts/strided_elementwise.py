"""Do the model's elementwise ops pay for falqon's strided y (row stride N + r16)?

Times fwd+bwd of silu(gate) * up (the LLaMA MLP) and of a residual add at LLaMA-7B sizes (8192
tokens), once on contiguous tensors and once on views of (M, N + 64) products, as melded layers
return them; CUDA events, GPU only. Run 12 in benchmarks/NOTES.md.

    python scripts/strided_elementwise.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

M, HIDDEN, INTERMEDIATE, R16 = 8192, 4096, 11008, 64


def time_us(fn, *args, reps: int = 50) -> float:
    for _ in range(5):
        fn(*args)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn(*args)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e3


def mlp(gate: torch.Tensor, up: torch.Tensor) -> None:
    y = F.silu(gate) * up
    y.backward(torch.ones_like(y))


def residual(h: torch.Tensor, o: torch.Tensor) -> None:
    y = h + o
    y.backward(torch.ones_like(y))


def operand(cols: int, extra: int) -> torch.Tensor:
    """A (M, cols) bf16 leaf, or a (M, cols) view of a (M, cols + extra) one."""
    base = torch.randn(M, cols + extra, device="cuda", dtype=torch.bfloat16).requires_grad_()
    return base if not extra else base[:, :cols]


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("strided_elementwise: needs a CUDA GPU")
    for name, extra in (("contiguous", 0), ("strided (N + 64)", R16)):
        gate, up = operand(INTERMEDIATE, extra), operand(INTERMEDIATE, extra)
        h = operand(HIDDEN, 0)
        o = operand(HIDDEN, extra)
        print(f"{name:18s} silu(gate)*up fwd+bwd {time_us(mlp, gate, up):8.1f} us   "
              f"residual add fwd+bwd {time_us(residual, h, o):8.1f} us")


if __name__ == "__main__":
    main()
