"""Attention metadata of a pure-decode step, as the runner builds it (shared by the CPU kernel
and decoder-stack tests)."""

from __future__ import annotations

import torch

from kvserve.attention.base import AttentionMetadata


def decode_metadata(tables: torch.Tensor, lens: list[int], slots: torch.Tensor, block_size: int) -> AttentionMetadata:
    """One query row per sequence: sequence i has lens[i] tokens (its new one included), its
    blocks in row i of `tables` and its new token's K/V going to slots[i]."""
    n = len(lens)
    return AttentionMetadata(
        query_start_loc=torch.arange(n + 1, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        block_tables=tables,
        slot_mapping=slots,
        max_query_len=1,
        max_seq_len=max(lens),
        query_start_loc_cpu=list(range(n + 1)),
        seq_lens_cpu=lens,
        block_size=block_size,
        is_pure_decode=True,
    )
