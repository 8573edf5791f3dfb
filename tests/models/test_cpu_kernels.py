"""The C decode-attention kernel (kvserve/csrc/decode_attn_bf16.c) against fp32 math, and the
torch_ref backend using it (bf16 cache on CPU) against the backend's PyTorch path."""

from __future__ import annotations

import random

import pytest
import torch

from kvserve.attention.torch_ref import TorchRefBackend
from kvserve.models import cpu_kernels
from tests.models.decode_metadata import decode_metadata

pytestmark = pytest.mark.skipif(
    not cpu_kernels.attention_available(), reason="no AVX512-BF16 CPU or C compiler"
)


def _reference(q, kv_cache, tables, lens, scale, window):
    """fp32 attention of each query row over its sequence's cached keys (the last `window`)."""
    _, _, bs, hkv, d = kv_cache.shape
    outs = []
    for i, n in enumerate(lens.tolist()):
        blocks = tables[i, : (n + bs - 1) // bs].long()
        k = kv_cache[0, blocks].reshape(-1, hkv, d)[:n].float()
        v = kv_cache[1, blocks].reshape(-1, hkv, d)[:n].float()
        if window:
            k, v = k[max(0, n - window):], v[max(0, n - window):]
        g = q.shape[1] // hkv
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # [L, Hq, D]
        s = torch.einsum("hd,lhd->hl", q[i].float(), k) * scale
        outs.append(torch.einsum("hl,lhd->hd", torch.softmax(s, -1), v))
    return torch.stack(outs)


@pytest.mark.parametrize("d", [64, 128, 80])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (12, 3), (16, 2)])
@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("window", [0, 40])
def test_decode_attention_matches_fp32(d, hq, hkv, bs, window):
    rng = random.Random(d * 1000 + hq * 10 + bs + window)
    torch.manual_seed(rng.randrange(1 << 30))
    num_blocks = 64
    kv_cache = torch.randn(2, num_blocks, bs, hkv, d).to(torch.bfloat16)
    lens = [1, 2, bs, bs + 1, rng.randint(3, 300), rng.randint(3, 300)]
    nblk = max((n + bs - 1) // bs for n in lens)
    tables = torch.zeros(len(lens), nblk + 2, dtype=torch.int32)  # padded past the last block
    for i, n in enumerate(lens):
        k = (n + bs - 1) // bs
        tables[i, :k] = torch.randint(0, num_blocks, (k,), dtype=torch.int32)  # any blocks, any order
    lens_t = torch.tensor(lens, dtype=torch.int32)
    qkv = torch.randn(len(lens), hq + 2 * hkv, d).to(torch.bfloat16)
    q = qkv[:, :hq]  # strided rows, as the model passes them
    scale = d**-0.5
    got = cpu_kernels.decode_attention(q, kv_cache, tables, lens_t, scale, window or None)
    want = _reference(q, kv_cache, tables, lens_t, scale, window)
    assert got.dtype == torch.bfloat16 and got.shape == (len(lens), hq, d)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("num_seqs", [1, 5])
def test_backend_uses_kernel_and_agrees_with_torch_path(num_seqs, monkeypatch):
    torch.manual_seed(num_seqs)
    bs, hq, hkv, d, num_blocks = 16, 9, 3, 64, 40
    kv_cache = torch.randn(2, num_blocks, bs, hkv, d).to(torch.bfloat16)
    lens = [17, 70, 5, 33, 48][:num_seqs]
    nblk = max((n + bs - 1) // bs for n in lens)
    tables = torch.arange(num_seqs * nblk, dtype=torch.int32).view(num_seqs, nblk)
    slots = torch.tensor([tables[i, (n - 1) // bs].item() * bs + (n - 1) % bs for i, n in enumerate(lens)])

    def metadata():
        return decode_metadata(tables, lens, slots, bs)

    q = torch.randn(num_seqs, hq, d).to(torch.bfloat16)
    k = torch.randn(num_seqs, hkv, d).to(torch.bfloat16)
    v = torch.randn(num_seqs, hkv, d).to(torch.bfloat16)
    calls = []
    real = cpu_kernels.decode_attention
    monkeypatch.setattr(cpu_kernels, "decode_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    fast_cache, slow_cache = kv_cache.clone(), kv_cache.clone()
    fast = TorchRefBackend().forward(q, k, v, fast_cache, metadata(), d**-0.5)
    assert calls
    monkeypatch.setattr(cpu_kernels, "attention_available", lambda: False)
    slow = TorchRefBackend().forward(q, k, v, slow_cache, metadata(), d**-0.5)
    assert torch.equal(fast_cache, slow_cache)  # the kernel wrote the new K/V to their slots
    assert not torch.equal(fast_cache, kv_cache)
    torch.testing.assert_close(fast.float(), slow.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("hidden,inter", [(576, 1536), (96, 40), (100, 37)])
def test_gemv_silu_mul_matches_unfused(rows, hidden, inter):
    torch.manual_seed(rows + hidden)
    w = (torch.randn(2 * inter, hidden) / hidden**0.5).to(torch.bfloat16)
    x = torch.randn(rows, hidden).to(torch.bfloat16)
    gate_up = (x.float() @ w.float().T).to(torch.bfloat16).float()  # the unfused linear's bf16 output
    want = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    got = cpu_kernels.gemv_silu_mul(w, x)
    assert got.shape == (rows, inter) and got.dtype == torch.bfloat16
    # gate/up may round differently by one ulp (fp32 summation order), then silu * up rounds once
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("n", [576, 64, 37])
def test_add_rmsnorm_matches_unfused(rows, n):
    torch.manual_seed(rows * n)
    x, res = torch.randn(rows, n).to(torch.bfloat16), torch.randn(rows, n).to(torch.bfloat16)
    w = torch.randn(n).to(torch.bfloat16)
    x0, res0 = x.clone(), res.clone()
    out, total = cpu_kernels.add_rmsnorm(x, res, w, 1e-5)
    assert torch.equal(x, x0) and torch.equal(res, res0)  # inputs untouched
    assert torch.equal(total, x + res)  # the bf16 add, exactly
    t = total.float()
    want = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5) * w.float()
    torch.testing.assert_close(out.float(), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("n", [576, 37])
def test_rmsnorm_matches_fp32_and_the_residual_kernel(rows, n):
    torch.manual_seed(rows + n)
    x, w = torch.randn(rows, n).to(torch.bfloat16), torch.randn(n).to(torch.bfloat16)
    got = cpu_kernels.rmsnorm(x, w, 1e-5)
    xf = x.float()
    want = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * w.float()
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
    # F.rms_norm's formula rounded once: at most one bf16 ulp from it (sum order may differ)
    ref = torch.nn.functional.rms_norm(x, (n,), w, 1e-5)
    assert ((got.view(torch.int16) - ref.view(torch.int16)).abs() <= 1).all()
    # The same sum of squares as add_rmsnorm: with a zero residual the two are equal bit for bit
    assert torch.equal(got, cpu_kernels.add_rmsnorm(x, torch.zeros_like(x), w, 1e-5)[0])


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("heads,d", [(12, 64), (3, 128), (2, 80)])
def test_rope_kernel_bit_identical_to_torch_ops(rows, heads, d):
    from kvserve.models.layers import RotaryEmbedding

    torch.manual_seed(heads * d)
    rot = RotaryEmbedding(d, 10000.0, None)
    step = rot.for_step(torch.tensor([5, 1000][:rows]), torch.bfloat16)
    qkv = torch.randn(rows, (heads + 3) * d).to(torch.bfloat16)
    x = qkv[:, : heads * d].view(rows, heads, d)  # strided rows, as the model passes them
    want = x * step.cos + torch.roll(x, d // 2, dims=-1) * step.sin_signed
    assert torch.equal(cpu_kernels.rope(x, step.cos, step.sin_signed), want)


@pytest.mark.parametrize("d,theta,scaling", [
    (64, 100000.0, None),
    (128, 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    (80, 10000.0, None),
])
def test_rope_factors_match_torch_within_one_ulp(d, theta, scaling):
    """One C call against RotaryEmbedding's PyTorch ops (libm vs vectorized sin/cos: the bf16
    factors may differ by one ulp, rarely)."""
    from kvserve.models.layers import RotaryEmbedding

    rot = RotaryEmbedding(d, theta, scaling)
    pos = torch.arange(0, 32768, 7)
    cos, sin = rot.cos_sin(pos, torch.bfloat16)
    sin_signed = torch.cat((-sin[..., : d // 2], sin[..., d // 2 :]), dim=-1)
    got_cos, got_sin = cpu_kernels.rope_factors(pos, rot.inv_freq)
    assert got_cos.shape == got_sin.shape == (len(pos), 1, d) and got_cos.dtype == torch.bfloat16
    for got, want in ((got_cos, cos), (got_sin, sin_signed)):
        ulps = (got.view(torch.int16).int() - want.view(torch.int16).int()).abs()
        assert ulps.max() <= 1 and (ulps > 0).float().mean() < 1e-3


def test_model_layers_take_the_kernels_for_decode_rows(monkeypatch):
    """With the CPU platform's bf16-kernel ops and linear method, RMSNorm (with and without
    residual), RoPE (factors and rotation) and the fused gate/up route a decode row to the C
    kernels."""
    from kvserve.models.layers import RMSNorm, RotaryEmbedding
    from kvserve.models.linear import Linear
    from kvserve.platform.cpu_linear import PackedBf16LinearMethod
    from kvserve.platform.cpu_ops import CpuBf16KernelOps

    ops = CpuBf16KernelOps()

    used = []
    for name in ("rmsnorm", "rope_factors", "rope", "add_rmsnorm", "gemv_silu_mul"):
        real = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *a, _r=real, _n=name: used.append(_n) or _r(*a))
    x = torch.randn(1, 64).to(torch.bfloat16)
    norm = RMSNorm(64, 1e-5, ops).to(torch.bfloat16)
    norm(x)
    norm.forward_with_residual(x, x)
    step = RotaryEmbedding(32, 10000.0, None, ops=ops).for_step(torch.tensor([7]), torch.bfloat16)
    ops.rotate(torch.randn(1, 6, 32).to(torch.bfloat16), step)
    method = PackedBf16LinearMethod(use_gemv=True)
    method.ops = ops
    gate_up = Linear(64, [48, 48], False, method, dtype=torch.bfloat16)
    gate_up.weight.data.copy_(torch.randn(96, 64))
    method.finish(gate_up)
    assert gate_up.silu_and_mul(x).shape == (1, 48)
    assert used == ["rmsnorm", "add_rmsnorm", "rope_factors", "rope", "gemv_silu_mul"]


@pytest.mark.parametrize("use_kernel", [True, False], ids=["c-kernel", "torch"])
def test_backend_kv_written_reads_the_cache_as_is(use_kernel, monkeypatch):
    """forward(kv_written=True): the caller stored k/v already, so the backend writes nothing
    and attends over the cache as given (both the C-kernel and the PyTorch decode path)."""
    torch.manual_seed(3)
    bs, hq, hkv, d, num_blocks = 16, 6, 2, 64, 12
    kv_cache = torch.randn(2, num_blocks, bs, hkv, d).to(torch.bfloat16)
    lens = [17, 40]
    tables = torch.arange(2 * 3, dtype=torch.int32).view(2, 3)
    slots = torch.tensor([tables[i, (n - 1) // bs].item() * bs + (n - 1) % bs for i, n in enumerate(lens)])
    q = torch.randn(2, hq, d).to(torch.bfloat16)
    k = torch.randn(2, hkv, d).to(torch.bfloat16)
    v = torch.randn(2, hkv, d).to(torch.bfloat16)
    if not use_kernel:
        monkeypatch.setattr(cpu_kernels, "attention_available", lambda: False)
    written = kv_cache.clone()
    want = TorchRefBackend().forward(q, k, v, written, decode_metadata(tables, lens, slots, bs), d**-0.5)
    cache = written.clone()
    # Other k/v than the ones in the cache: ignored, and the cache is left untouched.
    got = TorchRefBackend().forward(
        q, torch.zeros_like(k), torch.zeros_like(v), cache, decode_metadata(tables, lens, slots, bs), d**-0.5,
        kv_written=True,
    )
    assert torch.equal(cache, written)
    assert torch.equal(got, want)
