"""Checkpoint tensors -> model parameters, with fused q/k/v and gate/up shards.

A projection's weight goes to its `Linear.load_shard` (its linear method decides how it is
stored: dense, or GGML blocks kept quantized); everything else is copied into its parameter.
Every parameter (and every shard of a fused one) must be filled exactly once; `finish()` fails
loudly, naming what is missing, so a half-loaded model can never run.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from kvserve.models.layers import WeightLoadError, copy_into
from kvserve.models.linear import Linear, QuantizedTensor


class FusedWeightLoader:
    def __init__(
        self,
        model: nn.Module,
        fused_mapping: dict[str, tuple[str, int]],
        shard_sizes: Callable[[str], list[int]],
    ) -> None:
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.linears = {name: m for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, Linear)}
        for name, m in self.linears.items():
            m.label = f"{name}.weight"
        self.fused_mapping = fused_mapping
        self.shard_sizes = shard_sizes
        self.filled: set[tuple[str, int]] = set()
        self.unexpected: list[str] = []

    def load(self, name: str, tensor: torch.Tensor | QuantizedTensor) -> None:
        target, shard = name, -1
        for ckpt_frag, (fused_frag, index) in self.fused_mapping.items():
            if f".{ckpt_frag}." in name:
                target, shard = name.replace(f".{ckpt_frag}.", f".{fused_frag}."), index
                break
        owner, _, leaf = target.rpartition(".")
        linear = self.linears.get(owner)
        if linear is not None and leaf == "weight":
            linear.load_shard(tensor, shard)
        else:
            param = self.params.get(target)
            if param is None:
                self.unexpected.append(name)
                return
            if isinstance(tensor, QuantizedTensor):
                tensor = tensor.dequantize(torch.float32)
            offset = 0 if shard < 0 else sum(self.shard_sizes(target.rsplit(".", 2)[-2])[:shard])
            copy_into(param, tensor, name, offset=offset)
        self.filled.add((target, shard))

    def finish(self, tied: set[str] = frozenset()) -> None:
        if self.unexpected:
            raise WeightLoadError(
                f"checkpoint has tensors the model does not: {self.unexpected[:8]}"
                + (" ..." if len(self.unexpected) > 8 else "")
            )
        expected = set(self.params) | {f"{name}.weight" for name in self.linears}
        missing: list[str] = []
        for pname in sorted(expected):
            if pname in tied:
                continue
            frag = next((f for f in self.shard_sizes_keys() if f".{f}." in pname), None)
            if frag is None:
                if (pname, -1) not in self.filled:
                    missing.append(pname)
            else:
                n = len(self.shard_sizes(frag))
                missing.extend(f"{pname}[shard {s}]" for s in range(n) if (pname, s) not in self.filled)
        if missing:
            raise WeightLoadError(
                f"checkpoint is missing {len(missing)} parameter(s): {missing[:8]}"
                + (" ..." if len(missing) > 8 else "")
            )

    def shard_sizes_keys(self) -> set[str]:
        return {frag for frag, _ in self.fused_mapping.values()}
