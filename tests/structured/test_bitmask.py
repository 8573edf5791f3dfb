"""The token bitmask: applied to every row or a subset, in fp32 and other dtypes, it sets
exactly the disallowed tokens of the listed rows to -inf and leaves unlisted rows alone; it
agrees with xgrammar's own kernel."""

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
        apply_bitmask(cpu, mask, rows)
        other = logits.clone().double()
        apply_bitmask(other, mask, rows)
        want = logits.clone()
        for r in rows:
            want[r].masked_fill_(~bits[r], float("-inf"))
        assert torch.equal(cpu, want)
        assert torch.equal(other.float(), want)


def test_matches_xgrammar_kernel():
    import xgrammar as xgr

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4099, generator=g)
    mask = allocate_bitmask(3, 4099)
    mask.copy_(torch.randint(-(2**31), 2**31 - 1, mask.shape, generator=g, dtype=torch.int64).to(torch.int32))
    ours, theirs = logits.clone(), logits.clone()
    apply_bitmask(ours, mask, [0, 2])
    xgr.apply_token_bitmask_inplace(theirs, mask, vocab_size=4099, indices=[0, 2])
    assert torch.equal(ours, theirs)
