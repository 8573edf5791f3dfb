"""Checks of the qkv GEMV with Qwen3's q/k norm, RoPE and the K/V store in its epilogue
(`kvserve/models/triton_qk_norm.py`) against the two kernels it replaces (`triton_ops.gemv`, then
`triton_ops.rope_qk_` with the norm and the cache store), shared by the GPU test
(`tests/gpu/test_qk_norm_gemv.py`) and a CPU run under TRITON_INTERPRET=1 on small shapes
(`tests/kernels/test_qk_norm_gemv.py`)."""

from __future__ import annotations

import torch

from kvserve.models import triton_ops
from kvserve.models.layers import RotaryEmbedding
from kvserve.models.triton_qk_norm import gemv_qk_norm_rope_


def check(hq: int, hkv: int, d: int, hidden: int, device: str, dtype: torch.dtype, slot: int, tol: float,
          seed: int = 0) -> None:
    g = torch.Generator(device="cpu").manual_seed(seed)
    n = (hq + 2 * hkv) * d
    x = torch.randn(1, hidden, generator=g).to(device, dtype)
    w = (torch.randn(n, hidden, generator=g) / hidden**0.5).to(device, dtype)
    qw = (1 + 0.2 * torch.randn(d, generator=g)).to(device, dtype)
    kw = (1 + 0.2 * torch.randn(d, generator=g)).to(device, dtype)
    inv_freq = RotaryEmbedding(d, 10000.0, None, max_positions=64).inv_freq
    angles = torch.outer(torch.arange(64).float(), inv_freq)
    cos_sin = torch.cat([torch.cos(angles), torch.sin(angles)], -1).to(device)  # [64, D]: cos ‖ sin
    pos = torch.tensor([37], device=device)
    slots = torch.tensor([slot], device=device)
    blocks, bs = 4, 16
    cache_ref = torch.zeros(2, blocks, bs, hkv, d, device=device, dtype=dtype)
    cache = cache_ref.clone()
    ref = (x.float() @ w.float().t()).to(dtype)
    triton_ops.rope_qk_(ref, pos, cos_sin, hq, hkv, d, qw, kw, 1e-6, kv_cache=cache_ref, slot_mapping=slots)
    counts = torch.zeros(hq + hkv, dtype=torch.int32, device=device)
    for _ in range(2):  # the counters are left at zero: a second call agrees
        got = gemv_qk_norm_rope_(x, w, pos, cos_sin, hq, hkv, d, qw, kw, 1e-6, counts, cache, slots)
        torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)
        torch.testing.assert_close(cache.float(), cache_ref.float(), rtol=tol, atol=tol)
        assert int(counts.abs().sum()) == 0, "arrival counters not reset"
    if slot < 0:
        assert not cache.any(), "slot -1 must store nothing"
    nocache = gemv_qk_norm_rope_(x, w, pos, cos_sin, hq, hkv, d, qw, kw, 1e-6, counts)
    torch.testing.assert_close(nocache.float(), ref.float(), rtol=tol, atol=tol)


def run_interpret() -> None:
    for hq, hkv, d, hidden, slot in ((4, 2, 16, 64, 5), (3, 1, 8, 40, -1), (2, 2, 32, 96, 17)):
        check(hq, hkv, d, hidden, "cpu", torch.float32, slot, 1e-5, seed=hq)
    print("interpret checks passed")


if __name__ == "__main__":
    run_interpret()
