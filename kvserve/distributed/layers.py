"""Tensor-parallel building blocks.

Column- and row-parallel projections are ordinary `Linear`s of the local shard's shape (so every
linear method — CPU prepacking, GGML blocks, the fused GPU paths — applies to them unchanged); the model adds one
`all_reduce` after each row-parallel projection, and the loader slices the checkpoint (see
`LlamaForCausalLM.weight_shard`), fused with the RMSNorm after it where it can
(`parallel_state.all_reduce_rmsnorm`). Only the vocabulary-parallel embedding needs its own module.
At tensor_parallel_size 1 the models build `nn.Embedding` instead.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kvserve.distributed import parallel_state as ps
from kvserve.models import fused_ops


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + per) of the embedding table; ids outside them give zeros, and the
    all-reduce sums the one rank that owns each id. `partial()` leaves that all-reduce to the
    caller (the model fuses it with the first layer's RMSNorm)."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.start, self.per_rank = ps.vocab_shard(vocab_size)
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        return ps.all_reduce(self.partial(input_ids))

    def partial(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> this rank's rows only
        if fused_ops.enabled_for(input_ids) and self.weight.stride(1) == 1:
            from kvserve.models import triton_ops

            return triton_ops.embedding_shard(input_ids, self.weight, self.start)  # one kernel, same bits
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        h = F.embedding(local.masked_fill(outside, 0), self.weight)
        h.masked_fill_(outside[:, None], 0)
        return h
