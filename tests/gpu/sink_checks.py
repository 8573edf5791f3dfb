"""Attention sinks (gpt-oss) in the Triton attention kernels against the PyTorch reference
backend: decode (one split and several, so the reduce kernel adds the sink), prefill chunks on a
cached prefix, mixed batches, with and without a sliding window, an odd GQA group (3). Shared by
the GPU test (`tests/gpu/test_triton_attention.py`) and the CPU test that runs these under
TRITON_INTERPRET=1 on tiny shapes (`tests/models/test_gpt_oss.py`; `python -m tests.gpu.sink_checks`)."""

from __future__ import annotations

import torch

from kvserve.attention.base import AttentionMetadata
from kvserve.attention.torch_ref import TorchRefBackend
from tests.gpu.test_triton_attention import TOL, assert_close, make_batch

# (cached context, query length): prefills, a chunk on a cached prefix, decodes at several lengths.
MIXED = [(0, 21), (37, 9), (70, 1), (5, 1), (0, 1), (130, 1)]
DECODES = [(n - 1, 1) for n in (1, 2, 17, 64, 65, 150)]


def _ref(q, k, v, cache_ref, md, scale, window, sinks):
    md_ref = AttentionMetadata(
        md.query_start_loc, md.seq_lens, md.block_tables, md.slot_mapping, md.max_query_len,
        md.max_seq_len, md.query_start_loc_cpu, md.seq_lens_cpu, md.block_size, md.is_pure_decode,
    )
    return TorchRefBackend().forward(
        q.float(), k.float(), v.float(), cache_ref, md_ref, scale, window,
        sinks=None if sinks is None else sinks.float(),
    )


def check_case(seqs, window, device, dtype=torch.float32, heads=(6, 2), head_dim=16, route_decodes=True,
               num_sms: int | None = None, seed: int = 0, with_sinks: bool = True) -> float:
    from kvserve.attention.triton import backend as tb

    q, k, v, cache, cache_ref, md = make_batch(seqs, *heads, head_dim, 16, dtype, device, seed)
    sinks = (torch.randn(heads[0], generator=torch.Generator().manual_seed(seed)) * 2).to(device)
    if not with_sinks:
        sinks = None
    scale = head_dim**-0.5
    ref = _ref(q, k, v, cache_ref, md, scale, window, sinks)
    out = torch.full_like(q, float("nan"))
    if num_sms is not None:  # fewer SMs: fewer decode splits
        orig, tb._num_sms = tb._num_sms, lambda d: num_sms
    try:
        tb.TritonBackend(route_decodes=route_decodes).forward(q, k, v, cache, md, scale, window, out=out, sinks=sinks)
    finally:
        if num_sms is not None:
            tb._num_sms = orig
    assert_close(out, ref, dtype)
    if sinks is not None:  # the sinks matter: without them the reference differs
        plain = _ref(q, k, v, cache_ref, md, scale, window, None)
        assert (plain - ref).abs().max() > 10 * TOL[dtype]
    return float((out.float() - ref).abs().max())


def run(device: str) -> None:
    for window in (None, 7):
        for seqs in (MIXED, DECODES):
            for num_sms in (None, 1):  # many splits (reduce kernel) / one split (direct)
                check_case(seqs, window, device, num_sms=num_sms, seed=len(seqs) + (window or 0))
        check_case(MIXED, window, device, route_decodes=False, seed=3)
        check_case(MIXED, window, device, seed=4, with_sinks=False)  # other models: no sink term


if __name__ == "__main__":
    run("cuda" if torch.cuda.is_available() else "cpu")
    print("sink checks passed")
