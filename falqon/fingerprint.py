"""SHA-256 fingerprints of tensors: every tensor's name, dtype, shape and bytes, in order. The CLI
fingerprints a run's base weights with it (falqon.cli.run_dir, also while meld_pretrained loads
them); falqon.distributed compares ranks' melded state with it."""

from __future__ import annotations

import hashlib

import torch


class Fingerprint:
    """A SHA-256 fed one named tensor at a time, in order."""

    def __init__(self):
        self._h = hashlib.sha256()

    @torch.no_grad()
    def update(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().reshape(-1).contiguous()
        self._h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        self._h.update(t.cpu().view(torch.uint8).numpy().tobytes())

    def digest(self) -> bytes:
        return self._h.digest()

    def value(self) -> str:
        return "sha256:" + self._h.hexdigest()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the model's state dict: every tensor's name, dtype, shape and bytes."""
    fingerprint = Fingerprint()
    for name, t in model.state_dict().items():
        fingerprint.update(name, t)
    return fingerprint.value()


__all__ = ["Fingerprint", "weights_fingerprint"]
