"""Programmatic dependent launch (models/pdl.py): the decode kernels launched with PDL give the
same bits as launched the ordinary way, in a CUDA graph where every kernel reads what the one
before it wrote (a kernel that touched its inputs before its wait would read stale values:
each replay starts from different inputs)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kvserve.models import pdl  # noqa: E402

needs_hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
    reason="needs a CUDA GPU with compute capability 9.0 or later (PDL)",
)


def test_invalid_setting_is_a_value_error(monkeypatch):
    monkeypatch.setenv("KVSERVE_PDL", "yes")
    pdl._requested.cache_clear()
    try:
        with pytest.raises(ValueError, match="KVSERVE_PDL"):
            pdl._requested()
    finally:
        monkeypatch.delenv("KVSERVE_PDL")
        pdl._requested.cache_clear()


def test_never_on_cpu():
    assert not pdl.enabled(torch.device("cpu"))


def _layers(x, r, weights, cos_sin, positions, cache, slots, block_tables, seq_lens, qsl):
    """A few Llama decode layers' worth of the kernels the engine launches, each consuming the
    previous kernel's output."""
    from kvserve.attention.triton.decode import decode_attention
    from kvserve.models import triton_ops

    for norm_w, qkv_w, o_w, gu_w, down_w in weights:
        h, r = triton_ops.rmsnorm(x, norm_w, 1e-5, r)
        qkv = triton_ops.gemv(h, qkv_w)
        triton_ops.rope_qk_(qkv, positions, cos_sin, 8, 2, 64, kv_cache=cache, slot_mapping=slots)
        q = qkv[:, : 8 * 64].view(1, 8, 64)
        attn = torch.empty_like(q)
        decode_attention(q, cache, attn, block_tables, seq_lens, qsl, 1, 0.125, num_splits=3)
        o = triton_ops.gemv(attn.view(1, -1), o_w)
        h, r = triton_ops.rmsnorm(o, norm_w, 1e-5, r)
        act = triton_ops.gemv_silu_mul(h, gu_w)
        x = triton_ops.gemv(act, down_w)
    return x, r


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_graph_of_pdl_kernels_equals_ordinary_launches(dtype, monkeypatch):
    assert pdl.enabled(torch.device("cuda")), "PDL is off: this test would prove nothing"
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(shape, generator=g, device="cuda")).to(dtype)

    # K = 4096 (4 tiles before the wait), 2816 (2, then a partial tile), 512 (1)
    hidden, inter = 4096, 2816
    weights = [
        (1 + rand(hidden, scale=0.1), rand(12 * 64, hidden, scale=0.02), rand(hidden, 8 * 64, scale=0.05),
         rand(2 * inter, hidden, scale=0.02), rand(hidden, inter, scale=0.02))
        for _ in range(3)
    ]
    cos_sin = torch.randn(64, 64, generator=g, device="cuda")
    cache = rand(2, 4, 16, 2, 64)
    block_tables = torch.tensor([[2, 0, 3, 1]], dtype=torch.int32, device="cuda")
    qsl = torch.tensor([0, 1], dtype=torch.int32, device="cuda")
    # Static inputs of the graph; each replay gets new values.
    x, r = rand(1, hidden), rand(1, hidden)
    positions = torch.zeros(1, dtype=torch.int64, device="cuda")
    slots = torch.zeros(1, dtype=torch.int64, device="cuda")
    seq_lens = torch.zeros(1, dtype=torch.int32, device="cuda")

    steps = [(rand(1, hidden), rand(1, hidden)) for _ in range(4)]

    def set_inputs(step: int) -> None:
        x.copy_(steps[step][0])
        r.copy_(steps[step][1])
        positions.fill_(10 + step)
        seq_lens.fill_(11 + step)
        pos = 10 + step
        slots.fill_(int(block_tables[0, pos // 16]) * 16 + pos % 16)

    def run():
        return _layers(x, r, weights, cos_sin, positions, cache, slots, block_tables, seq_lens, qsl)

    # Warm up (compile) both variants, then capture the PDL one.
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_x, out_r = run()
    cache_start = cache.clone()
    got = []
    for step in range(4):
        set_inputs(step)
        graph.replay()
        got.append((out_x.clone(), out_r.clone(), cache.clone()))
    torch.cuda.synchronize()

    monkeypatch.setattr(pdl, "_requested", lambda: False)
    assert not pdl.enabled(torch.device("cuda"))
    cache.copy_(cache_start)
    for step in range(4):
        set_inputs(step)
        ex, er = run()
        gx, gr, gc = got[step]
        assert torch.equal(gx, ex) and torch.equal(gr, er) and torch.equal(gc, cache), f"replay {step}"


def test_invalid_preload_setting_is_a_value_error(monkeypatch):
    from kvserve.models import triton_ops

    monkeypatch.setenv("KVSERVE_PDL_PRELOAD", "8")
    with pytest.raises(ValueError, match="KVSERVE_PDL_PRELOAD"):
        triton_ops._preload_setting()
    monkeypatch.setenv("KVSERVE_PDL_PRELOAD", "2")
    assert triton_ops._preload_setting() == 2
