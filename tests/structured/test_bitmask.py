"""The token bitmask: xgrammar's CPU kernel and the tensor-op path GPUs use agree, for every
row or a subset, and leave unlisted rows alone."""

from __future__ import annotations

import torch

from kvserve.structured.grammar import allocate_bitmask, apply_bitmask


def test_both_paths_agree_on_all_rows_and_subsets():
    g = torch.Generator().manual_seed(0)
    vocab = 1000  # not a multiple of 32: the last word is partly padding
    logits = torch.randn(5, vocab, generator=g)
    mask = allocate_bitmask(5, vocab)
    mask.copy_(torch.randint(-(2**31), 2**31 - 1, mask.shape, generator=g, dtype=torch.int64).to(torch.int32))
    bits = ((mask[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).bool().view(5, -1)[:, :vocab]
    for rows in ([0, 1, 2, 3, 4], [1, 3]):
        cpu = logits.clone()
        apply_bitmask(cpu, mask, rows)  # fp32 contiguous on CPU: xgrammar's kernel
        other = logits.clone().double()  # any other dtype / device: the tensor-op path
        apply_bitmask(other, mask, rows)
        want = logits.clone()
        for r in rows:
            want[r].masked_fill_(~bits[r], float("-inf"))
        assert torch.equal(cpu, want)
        assert torch.equal(other.float(), want)
