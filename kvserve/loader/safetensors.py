"""Weights from an HF folder: single or sharded safetensors, or pickled .bin (weights_only)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Iterator

import torch

logger = logging.getLogger(__name__)

# (checkpoint name, full shape) -> (dim, start, length) of the slice this rank loads, or None
# for the whole tensor (tensor parallelism; see LlamaForCausalLM.weight_shard).
ShardFn = Callable[[str, tuple[int, ...]], "tuple[int, int, int] | None"]


def narrow(tensor: torch.Tensor, name: str, shard: ShardFn | None) -> torch.Tensor:
    """Slice an in-memory (or memory-mapped) tensor to this rank's shard."""
    if shard is None:
        return tensor
    spec = shard(name, tuple(tensor.shape))
    if spec is None:
        return tensor
    dim, start, length = spec
    length = max(0, min(length, tensor.shape[dim] - start))
    return tensor.narrow(dim, start, length)


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint files of an HF folder, safetensors preferred over pickled .bin."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: shards listed in {index.name} are missing: {missing}")
        return [folder / s for s in shards]
    st = sorted(folder.glob("*.safetensors"))
    if st:
        return st
    bin_index = folder / "pytorch_model.bin.index.json"
    if bin_index.is_file():
        shards = sorted(set(json.loads(bin_index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        return bins
    raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {folder}")


def iter_weights(
    folder: Path, dtype: torch.dtype, shard: ShardFn | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from every checkpoint file, cast to `dtype`, one file at a time.
    With `shard`, only each tensor's slice for this rank is read (safetensors slices lazily;
    `.bin` files are memory-mapped and narrowed before the copy)."""
    from safetensors import safe_open

    for path in weight_files(folder):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    spec = None
                    if shard is not None:
                        sl = f.get_slice(name)
                        spec = shard(name, tuple(sl.get_shape()))
                    if spec is None:
                        yield name, _cast(f.get_tensor(name), dtype)
                        continue
                    dim, start, length = spec
                    end = min(start + length, sl.get_shape()[dim])
                    index = (slice(start, end),) if dim == 0 else (slice(None), slice(start, end))
                    yield name, _cast(sl[index], dtype)
        else:
            # Pickles can run code on load: only plain tensors are accepted.
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            for name, tensor in state.items():
                yield name, _cast(narrow(tensor, name, shard), dtype)
            del state


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating tensors to the compute dtype; integer ones (MXFP4 blocks and scales) as stored."""
    return t.to(dtype) if t.is_floating_point() else t
