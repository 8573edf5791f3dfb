"""Fused RMSNorm(+residual), SiLU·mul and RoPE(+q/k norm) kernels against the PyTorch code of
`kvserve.models.layers`, on fresh random inputs, with poisoned outputs where the kernel writes
into a fresh tensor (every element must be written)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from kvserve.models import fused_ops, triton_ops  # noqa: E402
from kvserve.models.layers import RotaryEmbedding  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}



def _rope_ref(x, cos, sin):
    """HF's rotate_half RoPE: x * cos + (-x2, x1) * sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not torch.isnan(a).any()
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _rmsnorm_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1024), (37, 4096), (513, 3000), (4, 576)])
def test_rmsnorm(dtype, shape):
    g = torch.Generator(device="cuda").manual_seed(hash(shape) % 1000)
    x = torch.randn(shape, generator=g, device="cuda").to(dtype)
    r = torch.randn(shape, generator=g, device="cuda").to(dtype)
    w = (1 + 0.1 * torch.randn(shape[1], generator=g, device="cuda")).to(dtype)
    out = fused_ops.rmsnorm(x, w, 1e-6)
    assert _rel(out, _rmsnorm_ref(x, w, 1e-6)) < TOL[dtype]
    out, res = fused_ops.add_rmsnorm(x, r, w, 1e-5)
    assert torch.equal(res, x + r)  # one rounding, as in PyTorch
    assert _rel(out, _rmsnorm_ref(x + r, w, 1e-5)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2 * 8192), (65, 2 * 3072), (300, 2 * 1000)])
def test_silu_and_mul(dtype, shape):
    x = torch.randn(shape, device="cuda").to(dtype)
    gate, up = x.chunk(2, dim=-1)
    assert _rel(fused_ops.silu_and_mul(x), F.silu(gate) * up) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (16, 8, 128), (32, 8, 64), (9, 3, 64), (4, 4, 16)])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_qk(dtype, heads, kv_heads, head_dim, qk_norm):
    t = 77
    rot = RotaryEmbedding(head_dim, 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                          max_positions=40000).cuda()
    rot.reset_parameters()
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, device="cuda").to(dtype)
    pos = torch.randint(0, 40000, (t,), device="cuda")
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.reshape(t, heads, head_dim)
    k = k.reshape(t, kv_heads, head_dim)
    qw = (1 + 0.1 * torch.randn(head_dim, device="cuda")).to(dtype)
    kw = (1 + 0.1 * torch.randn(head_dim, device="cuda")).to(dtype)
    if qk_norm:
        q, k = _rmsnorm_ref(q, qw, 1e-6), _rmsnorm_ref(k, kw, 1e-6)
    cos, sin = rot.cos_sin(pos, dtype)
    rq, rk = _rope_ref(q, cos, sin), _rope_ref(k, cos, sin)
    out = qkv.clone()
    table = fused_ops.build_cos_sin(rot.inv_freq, 40000)
    triton_ops.rope_qk_(out, pos, table, heads, kv_heads, head_dim,
                        qw if qk_norm else None, kw if qk_norm else None, 1e-6)
    oq, ok, ov = out.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    # fp32 tables vs the reference's cos/sin rounded to the dtype: a few ulps in bf16/fp16.
    assert _rel(oq.reshape(t, heads, head_dim), rq) < 2 * TOL[dtype]
    assert _rel(ok.reshape(t, kv_heads, head_dim), rk) < 2 * TOL[dtype]
    assert torch.equal(ov, v)  # v untouched


def _gemv_inputs(shape: tuple[int, int], dtype: torch.dtype, bias: bool, device: str = "cuda"):
    """(weight [N, K], x [1, K], bias [N] or None), seeded by the shape."""
    n, k = shape
    g = torch.Generator(device=device).manual_seed(n + k + bias)
    w = torch.randn(shape, generator=g, device=device).to(dtype)
    x = torch.randn(1, k, generator=g, device=device).to(dtype)
    b = torch.randn(n, generator=g, device=device).to(dtype) if bias else None
    return w, x, b


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4096, 4096), (6144, 4096), (4096, 14336), (151936, 1024), (1000, 576), (3, 100)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv(dtype, shape, bias):
    n, k = shape
    w, x, b = _gemv_inputs(shape, dtype, bias)
    ref = x.double() @ w.double().t() + (b.double() if bias else 0)
    out = triton_ops.gemv(x, w, b)
    assert out.shape == (1, n) and out.dtype == dtype
    assert _rel(out, ref) < TOL[dtype]


def _triton_linear(in_f: int, out_sizes, bias: bool, dtype=torch.bfloat16):
    """A Linear on the CUDA platform's Triton GEMV method, with random weights."""
    from kvserve.models.linear import Linear
    from kvserve.platform.cuda_linear import TritonGemvLinearMethod
    from kvserve.platform.cuda_ops import CudaTritonOps

    method = TritonGemvLinearMethod()
    method.ops = CudaTritonOps()
    with torch.device("cuda"):
        layer = Linear(in_f, out_sizes, bias, method, dtype=dtype)
    layer.weight.data.normal_(0, 0.05)
    if bias:
        layer.bias.data.normal_(0, 0.05)
    return layer


def test_triton_gemv_method_routes_one_row_only():
    torch.manual_seed(0)
    first, second = _triton_linear(512, 768, True), _triton_linear(768, 256, False)
    for rows in (1, 5):
        x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)
        expect = F.linear(F.linear(x, first.weight, first.bias), second.weight)
        assert _rel(second(first(x)), expect) < 1e-2
    x = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(first(x), triton_ops.gemv(x, first.weight, first.bias))  # the GEMV's bits
    # fp32 rows keep cuBLAS
    fp32 = _triton_linear(8, 8, False, torch.float32)
    x32 = torch.randn(1, 8, device="cuda")
    assert torch.equal(fp32(x32), F.linear(x32, fp32.weight))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(28672, 4096), (14336, 4096), (2 * 1536, 576), (2 * 7, 100)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_silu_mul_equals_gemv_then_silu_mul(dtype, shape, bias):
    """The gate/up GEMV with SiLU·mul in its epilogue gives the unfused path's bits."""
    n, _ = shape
    w, x, b = _gemv_inputs(shape, dtype, bias)
    got = triton_ops.gemv_silu_mul(x, w, b)
    assert got.shape == (1, n // 2) and got.dtype == dtype
    assert torch.equal(got, triton_ops.silu_and_mul(triton_ops.gemv(x, w, b)))


def test_triton_gemv_method_fuses_silu_into_gate_up():
    gate_up = _triton_linear(256, [384, 384], False)
    for rows in (1, 3):
        x = torch.randn(rows, 256, device="cuda", dtype=torch.bfloat16)
        h = F.linear(x, gate_up.weight)
        expect = F.silu(h[:, :384]) * h[:, 384:]
        assert _rel(gate_up.silu_and_mul(x), expect) < 1e-2
    x = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(gate_up.silu_and_mul(x), triton_ops.gemv_silu_mul(x, gate_up.weight, None))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads,kv_heads,head_dim,norm", [(32, 8, 128, False), (16, 4, 128, True), (9, 3, 64, False),
                                                          (4, 1, 64, True)])
def test_rope_with_kv_write_equals_rope_then_kv_write(dtype, heads, kv_heads, head_dim, norm):
    """rope_qk_(kv_cache=...) stores exactly what the separate KV-write kernel would store after
    it, skips slot -1 rows, and leaves q, k, v in qkv as rope_qk_ alone does."""
    from kvserve.attention.triton.kv_write import write_kv_cache_triton

    g = torch.Generator(device="cuda").manual_seed(heads * head_dim + norm)
    t, block_size, blocks = 7, 16, 6
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, generator=g, device="cuda").to(dtype)
    positions = torch.tensor([0, 5, 17, 31, 64, 90, 3], device="cuda")
    slots = torch.tensor([3, -1, 40, 41, 17, -1, 90], device="cuda")
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device="cuda").float() / head_dim))
    cos_sin = fused_ops.build_cos_sin(inv_freq, 128)
    wq = torch.randn(head_dim, generator=g, device="cuda").to(dtype) if norm else None
    wk = torch.randn(head_dim, generator=g, device="cuda").to(dtype) if norm else None
    args = (positions, cos_sin, heads, kv_heads, head_dim, wq, wk, 1e-6)
    cache_ref = torch.randn(2, blocks, block_size, kv_heads, head_dim, generator=g, device="cuda").to(dtype)
    cache = cache_ref.clone()
    ref = qkv.clone()
    triton_ops.rope_qk_(ref, *args)
    q_sz, kv_sz = heads * head_dim, kv_heads * head_dim
    write_kv_cache_triton(ref[:, q_sz:q_sz + kv_sz].view(t, kv_heads, head_dim),
                          ref[:, q_sz + kv_sz:].view(t, kv_heads, head_dim), cache_ref, slots)
    got = qkv.clone()
    triton_ops.rope_qk_(got, *args, kv_cache=cache, slot_mapping=slots)
    assert torch.equal(got, ref)
    assert torch.equal(cache, cache_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim,hidden,bias", [(16, 4, 128, 4096, False), (32, 8, 64, 2048, False),
                                                                 (9, 3, 64, 576, True), (4, 1, 128, 1000, False)])
@pytest.mark.parametrize("slot", [37, -1, None])
def test_gemv_rope_equals_gemv_then_rope(dtype, heads, kv_heads, head_dim, hidden, bias, slot):
    """The QKV GEMV with RoPE (and the k/v cache store) in its epilogue gives the bits of the
    plain GEMV followed by rope_qk_ (with the same cache store), for one row; slot -1 stores
    nothing, and without a cache only qkv is written."""
    n = (heads + 2 * kv_heads) * head_dim
    w, x, b = _gemv_inputs((n, hidden), dtype, bias)
    g = torch.Generator(device="cuda").manual_seed(n)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device="cuda").float() / head_dim))
    cos_sin = fused_ops.build_cos_sin(inv_freq, 256)
    positions = torch.tensor([201], device="cuda")
    cache_ref = torch.randn(2, 6, 16, kv_heads, head_dim, generator=g, device="cuda").to(dtype)
    cache = cache_ref.clone()
    kv = {} if slot is None else {"slot_mapping": torch.tensor([slot], device="cuda")}
    ref = triton_ops.gemv(x, w, b)
    triton_ops.rope_qk_(ref, positions, cos_sin, heads, kv_heads, head_dim,
                        kv_cache=cache_ref if kv else None, **kv)
    got = triton_ops.gemv_rope_(x, w, b, positions, cos_sin, heads, kv_heads, head_dim,
                                kv_cache=cache if kv else None, **kv)
    assert got.shape == (1, n) and got.dtype == dtype
    assert torch.equal(got, ref)
    assert torch.equal(cache, cache_ref)
    if slot is not None and slot >= 0:  # the store really happened (not only left alone on both sides)
        k_ref = ref[0, heads * head_dim:(heads + kv_heads) * head_dim].view(kv_heads, head_dim)
        assert torch.equal(cache[0].view(-1, kv_heads, head_dim)[slot], k_ref)


def test_qkv_rope_routes_one_row_only():
    """The Triton GEMV method's GEMV+RoPE hook: one row goes through it (the bits of the
    projection then rope_qk_); other row counts, and the plain dense method, return None so the
    caller runs the two steps."""
    from kvserve.models.linear import DenseLinearMethod, Linear

    proj = _triton_linear(256, [4 * 32, 2 * 32, 2 * 32], False)
    x = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 32, 2, device="cuda").float() / 32))
    cos_sin = fused_ops.build_cos_sin(inv_freq, 64)
    pos = torch.tensor([3], device="cuda")
    args = (pos, cos_sin, 4, 2, 32, None, None)
    got = proj.method.apply_qkv_rope(proj, x, *args)
    ref = proj(x)
    fused_ops.rope_qk_(ref, pos, cos_sin, 4, 2, 32)
    assert got is not None and torch.equal(got, ref)
    for rows in (2, 3, 9):
        many = torch.randn(rows, 256, device="cuda", dtype=torch.bfloat16)
        assert proj.method.apply_qkv_rope(proj, many, torch.arange(rows, device="cuda"), *args[1:]) is None
    with torch.device("cuda"):
        plain = Linear(256, 256, False, DenseLinearMethod(), dtype=torch.bfloat16)
    assert plain.method.apply_qkv_rope(plain, x, *args) is None


@pytest.mark.parametrize("rows,vocab", [(1, 128256), (3, 49152), (64, 151936), (2, 100), (4, 4097)])
def test_argmax_rows_equals_torch(rows: int, vocab: int) -> None:
    """The greedy argmax kernel gives torch.argmax's index exactly: the first of tied maxima,
    the first NaN, an all -inf row, and rows read through a stride (the TP gather's slice)."""
    from kvserve.runner.sampler import greedy_tokens

    gen = torch.Generator(device="cuda").manual_seed(rows)
    wide = torch.randn(rows, vocab + 64, device="cuda", generator=gen)
    x = wide[:, :vocab]  # rows stride past the last column, as gather_vocab's view
    x[0, 5] = x[0, vocab - 1] = 40.0  # a tie across chunks: the first wins
    if rows > 1:
        x[1, vocab // 2] = x[1, vocab - 2] = float("nan")
        x[1, 0] = float("inf")
    if rows > 2:
        x[2] = float("-inf")
    want = x.argmax(dim=-1)
    assert torch.equal(triton_ops.argmax_rows(x), want)
    assert torch.equal(greedy_tokens(x), want)  # the sampler's greedy path takes the kernel
    assert torch.equal(greedy_tokens(x[:1]), want[:1])


def test_embedding_shard_equals_masked_lookup() -> None:
    """The vocabulary-parallel embedding's kernel: this rank's rows, zeros elsewhere, same bits
    as the PyTorch masking it replaces (VocabParallelEmbedding.partial)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    start, per, hidden = 1000, 1000, 4096
    w = torch.randn(per, hidden, device="cuda", generator=gen).to(torch.bfloat16)
    ids = torch.tensor([0, 999, 1000, 1001, 1999, 2000, 5, 1500] * 5, device="cuda")
    local = ids - start
    outside = (local < 0) | (local >= per)
    want = F.embedding(local.masked_fill(outside, 0), w)
    want.masked_fill_(outside[:, None], 0)
    assert torch.equal(triton_ops.embedding_shard(ids, w, start), want)
    assert triton_ops.embedding_shard(ids[:0], w, start).shape == (0, hidden)
