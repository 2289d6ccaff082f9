"""Where falqon.loading gets a model's weights from, one tensor at a time: a local checkpoint's
safetensors files (memory-mapped; every header checked before the first tensor is read), or
seeded random numbers made on the device (benchmarks: a model whose checkpoint no disk holds)."""

from __future__ import annotations

import json
import pathlib
import zlib

import torch
from torch import nn

from .config import FalqonError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# safetensors' dtype names of floating tensors (get_slice(...).get_dtype()).
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


class CheckpointWeights:
    """The tensors of a transformers checkpoint directory: model.safetensors, or the shards that
    model.safetensors.index.json names. Opening it checks what can be checked without reading a
    weight: the index parses, every shard exists and has a whole, valid header (safetensors
    refuses a truncated file), and every tensor the index maps to a shard is in that shard. Each
    error is a FalqonError naming the file. Tensors are read one at a time from the memory-mapped
    files (host memory: one tensor)."""

    threadsafe = True  # read() may run in a helper thread (the next layer read ahead)

    def __init__(self, directory):
        from safetensors import safe_open

        self.directory = pathlib.Path(directory)
        self.files: dict[str, str] = {}  # tensor name -> shard file name
        index = self.directory / INDEX_FILE
        if index.is_file():
            weight_map = _read_index(index)
            shards = sorted(set(weight_map.values()))
        elif (self.directory / SINGLE_FILE).is_file():
            weight_map, shards = None, [SINGLE_FILE]
        else:
            others = sorted(p.name for p in self.directory.glob("*.bin"))
            hint = (f" (it holds {others[0]}: falqon loads safetensors; re-save the model with "
                    f"save_pretrained)") if others else ""
            raise FalqonError(f"{self.directory} has no {SINGLE_FILE} nor {INDEX_FILE}{hint}")
        self._handles = {}
        for shard in shards:
            path = self.directory / shard
            if not path.is_file():
                raise FalqonError(f"{path} is missing: {INDEX_FILE} maps tensors to it")
            try:
                self._handles[shard] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:  # noqa: BLE001 (safetensors' own error type)
                raise FalqonError(f"{path} is truncated or not a safetensors file: "
                                  f"{_first_line(exc)}") from None
        for shard, handle in self._handles.items():
            keys = set(handle.keys())
            if weight_map is None:
                self.files.update(dict.fromkeys(keys, shard))
                continue
            wanted = sorted(k for k, f in weight_map.items() if f == shard)
            lacking = [k for k in wanted if k not in keys]
            if lacking:
                raise FalqonError(f"{self.directory / shard} does not hold {lacking[0]}"
                                  f"{_more(lacking)}, which {INDEX_FILE} maps to it: a shard of "
                                  f"another checkpoint?")
            self.files.update(dict.fromkeys(wanted, shard))

    def where(self, key: str | None) -> str:
        """The file that holds `key` (the directory for None)."""
        return str(self.directory if key is None else self.directory / self.files[key])

    def find(self, names: list[str], prefix: str, is_param: bool) -> str | None:
        """The checkpoint's name for the model tensor known by `names` (tied tensors have
        several), trying each with and without the model's base_model_prefix, or None."""
        for name in names:
            for cand in (name, name.removeprefix(prefix + ".") if prefix else name,
                         f"{prefix}.{name}" if prefix else name):
                if cand in self.files:
                    return cand
        return None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self.files[key]].get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        """safetensors' name of the stored dtype ("BF16", "F8_E4M3", "I64", ...)."""
        return self._handles[self.files[key]].get_slice(key).get_dtype()

    def read(self, key: str, module: nn.Module, attr: str, shape, dtype, device) -> torch.Tensor:
        """The tensor on the host, as stored (the loader casts and moves it)."""
        try:
            return self._handles[self.files[key]].get_tensor(key)
        except Exception as exc:  # noqa: BLE001 (an I/O error of the mapped file)
            raise FalqonError(f"{self.where(key)}: cannot read {key}: "
                              f"{_first_line(exc)}") from None

    def close(self) -> None:
        self._handles.clear()


class RandomWeights:
    """Seeded random weights made on the device, as transformers initialises a fresh model:
    normal(0, std) for nn.Linear and nn.Embedding weights (and any other parameter), ones for
    norm weights, zeros for biases; std is the model config's initializer_range. Each tensor
    has its own generator, seeded from `seed` and the tensor's name, so a tensor's values do not
    depend on what was drawn before it (a model cut to fewer layers keeps the layers it has)."""

    threadsafe = False

    def __init__(self, std: float = 0.02, seed: int = 0):
        self.std, self.seed = float(std), int(seed)

    def where(self, key: str | None) -> str:
        return f"random weights (seed {self.seed})"

    def find(self, names: list[str], prefix: str, is_param: bool) -> str | None:
        """Every parameter is made (buffers stay as the model built them)."""
        return names[0] if is_param else None

    def read(self, key: str, module: nn.Module, attr: str, shape, dtype, device) -> torch.Tensor:
        is_norm = "norm" in type(module).__name__.lower()
        if attr == "bias" or not dtype.is_floating_point:
            return torch.zeros(shape, dtype=dtype, device=device)
        if is_norm:
            return torch.ones(shape, dtype=dtype, device=device)
        seed = self.seed * 1_000_003 + zlib.crc32(key.encode())
        gen = torch.Generator(device=device).manual_seed(seed)
        return torch.randn(shape, generator=gen, dtype=dtype, device=device).mul_(self.std)

    def close(self) -> None:
        pass


def _read_index(index: pathlib.Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FalqonError(f"{index} is not valid JSON: {exc}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) and v and "/" not in v
            for k, v in weight_map.items()):
        raise FalqonError(f"{index} has no usable weight_map (tensor name -> shard file name)")
    return weight_map


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _more(items: list) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


__all__ = ["CheckpointWeights", "INDEX_FILE", "RandomWeights", "SINGLE_FILE"]
