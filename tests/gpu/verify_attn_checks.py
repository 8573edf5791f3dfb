"""The grouped verify attention (`kvserve/attention/triton/verify.py`) against the PyTorch
reference backend: requests' k + 1 verify rows (one block table, lengths L + 1 .. L + k + 1)
mixed with plain decode rows, short groups (fewer drafts) and CUDA-graph padding rows (length 0,
slot -1), with many splits (reduce kernel) and one (direct). Shared by the GPU test
(`tests/gpu/test_verify_attention.py`) and the CPU test that runs these under TRITON_INTERPRET=1
on tiny shapes (`tests/spec_decode/test_verify_attention.py`; `python -m tests.gpu.verify_attn_checks`)."""

from __future__ import annotations

import numpy as np
import torch

from kvserve.attention.base import AttentionMetadata
from kvserve.runner.cuda_graphs import verify_groups
from tests.gpu.test_triton_attention import assert_close, make_batch, reference


def _rows_batch(reqs: list[tuple[int, int]], heads: tuple[int, int], head_dim: int, dtype, device: str, seed: int,
                pad: int):
    """`reqs`: (cached context, rows) per request; rows > 1 = a verify step's rows. Returns q, k,
    v, the kernel's cache, the reference output, and (seq_lens, block tables, slots, request of
    each row) of the one-row layout, `pad` padding rows appended."""
    q, k, v, cache, cache_ref, md = make_batch(reqs, *heads, head_dim, 16, dtype, device, seed)
    scale = head_dim**-0.5
    ref = reference(q, k, v, cache_ref, md, scale)  # causal within each request = the rows' view
    lens, table_rows, owner = [], [], []
    for i, (ctx, n) in enumerate(reqs):
        for j in range(n):
            lens.append(ctx + j + 1)
            table_rows.append(i)
            owner.append(i)
    gen = torch.Generator().manual_seed(seed + 1)
    if pad:
        q = torch.cat([q, torch.randn(pad, *q.shape[1:], generator=gen).to(dtype).to(device)])
        k = torch.cat([k, torch.randn(pad, *k.shape[1:], generator=gen).to(dtype).to(device)])
        v = torch.cat([v, torch.randn(pad, *v.shape[1:], generator=gen).to(dtype).to(device)])
        ref = torch.cat([ref, torch.zeros(pad, *ref.shape[1:], device=device)])
        lens += [0] * pad
        owner += [len(reqs) + i for i in range(pad)]
    bt = md.block_tables[torch.tensor(table_rows, device=device)]
    if pad:
        bt = torch.cat([bt, torch.zeros(pad, bt.shape[1], dtype=bt.dtype, device=device)])
    slots = torch.cat([md.slot_mapping, torch.full((pad,), -1, dtype=torch.int64, device=device)])
    return q, k, v, cache, ref, lens, bt, slots, owner, scale


def check_case(reqs: list[tuple[int, int]], device: str, dtype=torch.float32, heads=(8, 2), head_dim: int = 16,
               width: int = 3, pad: int = 0, num_sms: int | None = None, seed: int = 0,
               expect_grouped: bool = True) -> float:
    """Grouped verify attention through `TritonBackend.forward` (as a verify graph's metadata
    drives it) equals the reference; returns the largest absolute difference. `expect_grouped`
    False: the query tile would be too large, so the rows go through the per-row kernel."""
    from kvserve.attention.triton import backend as tb

    q, k, v, cache, ref, lens, bt, slots, owner, scale = _rows_batch(reqs, heads, head_dim, dtype, device, seed, pad)
    groups = verify_groups(np.asarray(owner), width)
    assert (groups > 0).sum() >= len(reqs)
    n = len(lens)
    md = AttentionMetadata(
        query_start_loc=torch.arange(n + 1, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        block_tables=bt, slot_mapping=slots, max_query_len=1, max_seq_len=1 << 30,
        query_start_loc_cpu=list(range(n + 1)), seq_lens_cpu=[1] * n, block_size=16, is_pure_decode=True,
        has_padding=pad > 0, verify_groups=torch.tensor(groups, device=device), verify_width=width,
    )
    out = torch.full_like(q, float("nan"))
    if num_sms is not None:  # fewer SMs: fewer splits
        orig, tb._num_sms = tb._num_sms, lambda d: num_sms
    try:
        backend = tb.TritonBackend()
        backend.forward(q, k, v, cache, md, scale, out=out)
        assert (md.backend_cache["triton"].grouped_splits > 0) == expect_grouped  # which kernel ran
    finally:
        if num_sms is not None:
            tb._num_sms = orig
    assert_close(out, ref, dtype)
    if pad:
        assert torch.equal(out[-pad:], torch.zeros_like(out[-pad:])), "padding rows must be zeros"
    return float((out.float() - ref).abs().max())


def check_groups() -> None:
    got = verify_groups(np.array([7, 7, 7, 3, 5, 5, 9, 9, 9, 9, 9, 9, 9]), 5)
    assert got.tolist() == [3, -1, -2, 1, 2, -1, 5, -1, -2, -3, -4, 2, -1], got.tolist()
    assert verify_groups(np.array([], dtype=np.int64), 5).tolist() == []
    assert verify_groups(np.array([1, 2, 3]), 4).tolist() == [1, 1, 1]


# (cached context, rows): verify steps of 3 rows at several contexts, a short one (2 rows), a
# plain decode row, a verify step from an empty cache.
REQS = [(0, 3), (5, 1), (30, 3), (63, 2), (64, 3), (129, 3)]


def run(device: str, dtype=torch.float32) -> None:
    check_groups()
    for num_sms in (None, 1):  # many splits (reduce) / one split (direct)
        for heads, width in (((8, 2), 3), ((4, 4), 5), ((8, 2), 5)):  # M_PAD 16, 16 (G=1), 32
            reqs = REQS if width == 3 else [(c, min(n + 2, width)) for c, n in REQS]
            check_case(reqs, device, dtype, heads=heads, width=width, pad=2, num_sms=num_sms,
                       seed=width + heads[0] + (num_sms or 0))
    # 5 rows x 16 query heads per KV head: above the verify kernel's 64-row tile, rows one by one
    check_case([(30, 5), (5, 1)], device, dtype, heads=(32, 2), width=5, pad=1, seed=9, expect_grouped=False)


if __name__ == "__main__":
    run("cpu")
    print("verify attention checks passed")
