"""Weights from an HF folder: single or sharded safetensors, or pickled .bin (weights_only)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

import torch

logger = logging.getLogger(__name__)


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


def iter_weights(folder: Path, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from every checkpoint file, cast to `dtype`, one file at a time."""
    from safetensors import safe_open

    for path in weight_files(folder):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name).to(dtype)
        else:
            # Pickles can run code on load: only plain tensors are accepted.
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            for name, tensor in state.items():
                yield name, tensor.to(dtype)
            del state
