"""Checkpoint tensors -> model parameters, with fused q/k/v and gate/up shards.

Every parameter (and every shard of a fused one) must be filled exactly once; `finish()` fails
loudly, naming what is missing, so a half-loaded model can never run.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from kvserve.models.layers import WeightLoadError, copy_into


class FusedWeightLoader:
    def __init__(
        self,
        model: nn.Module,
        fused_mapping: dict[str, tuple[str, int]],
        shard_sizes: Callable[[str], list[int]],
    ) -> None:
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.fused_mapping = fused_mapping
        self.shard_sizes = shard_sizes
        self.filled: set[tuple[str, int]] = set()
        self.unexpected: list[str] = []

    def load(self, name: str, tensor: torch.Tensor) -> None:
        for ckpt_frag, (fused_frag, shard) in self.fused_mapping.items():
            if f".{ckpt_frag}." in name:
                target = name.replace(f".{ckpt_frag}.", f".{fused_frag}.")
                param = self.params.get(target)
                if param is None:
                    self.unexpected.append(name)
                    return
                sizes = self.shard_sizes(fused_frag)
                if name.endswith(".weight") or name.endswith(".bias"):
                    copy_into(param, tensor, name, offset=sum(sizes[:shard]))
                self.filled.add((target, shard))
                return
        param = self.params.get(name)
        if param is None:
            self.unexpected.append(name)
            return
        copy_into(param, tensor, name)
        self.filled.add((name, -1))

    def finish(self, tied: set[str] = frozenset()) -> None:
        if self.unexpected:
            raise WeightLoadError(
                f"checkpoint has tensors the model does not: {self.unexpected[:8]}"
                + (" ..." if len(self.unexpected) > 8 else "")
            )
        missing: list[str] = []
        for pname in self.params:
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
