"""The device seam: every attention implementation speaks this interface.

A step's batch is flat: `T` tokens from `S` sequences laid end to end, no padding. Sequence
`i` owns query rows `query_start_loc[i] : query_start_loc[i + 1]`; those rows are its tokens at
positions `seq_lens[i] - query_len_i ... seq_lens[i] - 1` (everything before them is already in
the paged cache). A decode is simply a sequence with query length 1; a (chunked) prefill has
more. Attention is causal within each sequence and never crosses sequences.

KV cache layout, one tensor per layer: `[2, num_blocks, block_size, num_kv_heads, head_dim]`
(index 0 = K, 1 = V). Token `j` of sequence `i` lives in block `block_tables[i, j // block_size]`
at offset `j % block_size`; its flat slot is `block * block_size + offset`. A slot of -1 in
`slot_mapping` means "do not write" (used to pad CUDA-graph batches).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    """Built once per step by the model runner; read by every layer."""

    # [S + 1] int32, device: prefix sums of query lengths.
    query_start_loc: torch.Tensor
    # [S] int32, device: context length of each sequence *including* this step's tokens.
    seq_lens: torch.Tensor
    # [S, max_blocks_per_seq] int32, device: padded with 0 past each sequence's last block.
    block_tables: torch.Tensor
    # [T] int64, device: cache slot for each new token (-1 = skip).
    slot_mapping: torch.Tensor
    max_query_len: int
    max_seq_len: int
    # Host copies so CPU-side code can loop without device syncs.
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    block_size: int
    # True when every sequence is a decode (query length 1): lets backends take a fast path.
    is_pure_decode: bool = False
    # Steps with prefill rows (None in all-decode steps): each sequence's whole prompt length,
    # which a chunked prefill's chunk does not show (LongRoPE picks its factors by it).
    prompt_lens_cpu: list[int] | None = None
    # True when slot_mapping holds -1 entries (padded CUDA-graph batches).
    has_padding: bool = False
    # Pure-decode steps with speculative verify rows (set by `runner/cuda_graphs.py`): [S] int32,
    # device. Consecutive rows of one request (its k + 1 verify positions: one block table,
    # increasing seq_lens) form a group; the group's first row holds its row count n
    # (1..verify_width), each other row -(its offset from the first). A backend may attend all
    # rows of a group together (reading each K/V tile once); None = every row on its own.
    verify_groups: torch.Tensor | None = None
    verify_width: int = 1  # the most rows of a group (k + 1)
    # Per-step scratch space a backend fills on the first layer and reuses on the others
    # (index tensors, kernel launch plans). Keyed by backend name.
    backend_cache: dict[str, Any] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


class AttentionBackend(ABC):
    """Computes causal attention for a flat batch and writes the new K/V into the cache."""

    name: str = "base"
    # True when the model may store k/v itself (fused into its RoPE kernel) and then call
    # forward(..., kv_written=True); a backend without it never receives kv_written=True.
    fuses_kv_write: bool = False

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        kv_written: bool = False,  # the caller already stored k and v at the slot mapping
        sinks: torch.Tensor | None = None,  # [num_heads] fp32 logits (gpt-oss)
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        """Store k/v at `metadata.slot_mapping` (unless `kv_written`), then attend each query
        over its sequence's cached keys (positions <= its own; within `sliding_window` of it
        when set). `sinks`: one learned logit per query head that joins each row's softmax
        denominator (exp(sink) added to it) and attends to no value, so a head can put weight
        on "nothing"; the logit is not scaled by `scale`."""


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    has_padding: bool | None = None,
) -> None:
    """Scatter this step's K/V into their cache slots (PyTorch version; slot -1 skipped).
    `has_padding=None` checks the slots for -1 itself (a device sync)."""
    num_blocks, block_size = kv_cache.shape[1], kv_cache.shape[2]
    flat = kv_cache.view(2, num_blocks * block_size, *kv_cache.shape[3:])
    if has_padding is None:
        has_padding = bool((slot_mapping < 0).any())
    if has_padding:
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))
