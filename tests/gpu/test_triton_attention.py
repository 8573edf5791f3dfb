"""Triton attention kernels against the PyTorch reference backend (the oracle).

Every case draws fresh random inputs, builds metadata whose block tables hold shuffled,
non-contiguous block ids, poisons the output (and every cache slot the step may not read) with
NaN, and compares per token with TorchRefBackend run in float32 on the same values.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from kvserve.attention.base import AttentionMetadata, write_kv_cache  # noqa: E402
from kvserve.attention.torch_ref import TorchRefBackend  # noqa: E402

# Max over tokens of |out - ref| / |ref| (norms over heads x head_dim).
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-3}


def make_batch(
    seqs: list[tuple[int, int]],  # (cached context length, query length) per sequence
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: str = "cuda",
    seed: int = 0,
    share_prefix: bool = False,
    spare_blocks: int = 7,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Random q/k/v, two caches (one NaN-poisoned for the kernel, one clean float32 copy for the
    oracle) and metadata. `share_prefix`: sequence 1 reuses sequence 0's full context blocks,
    as after a prefix-cache hit."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    seq_lens = [c + q for c, q in seqs]
    blocks_per_seq = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    tables: list[list[int]] = []
    for nb in blocks_per_seq:
        tables.append([ids.pop() for _ in range(nb)])
    if share_prefix and len(seqs) > 1:
        shared = min(seqs[0][0], seqs[1][0]) // block_size
        tables[1][:shared] = tables[0][:shared]
    max_blocks = max(blocks_per_seq) + 2  # extra padding columns, as a runner may leave
    bt = torch.zeros(len(seqs), max_blocks, dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, : len(t)] = torch.tensor(t, dtype=torch.int32)

    slots: list[int] = []
    ctx_slots: list[int] = []
    for (ctx, ql), t in zip(seqs, tables):
        slots += [t[p // block_size] * block_size + p % block_size for p in range(ctx, ctx + ql)]
        ctx_slots += [t[p // block_size] * block_size + p % block_size for p in range(ctx)]
    num_tokens = len(slots)

    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    cache = torch.randn(shape, generator=gen).to(dtype)
    # Only the cached prefixes are meaningful; every other slot is NaN for the kernel (it must
    # neither read them nor leave this step's slots unwritten) and 0 for the oracle.
    keep = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    keep[torch.tensor(ctx_slots, dtype=torch.long)] = True
    keep = keep.view(1, num_blocks, block_size, 1, 1)
    cache_kernel = torch.where(keep, cache, torch.full_like(cache, float("nan")))
    cache_ref = torch.where(keep, cache, torch.zeros_like(cache)).float()

    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    qsl = [0]
    for _, ql in seqs:
        qsl.append(qsl[-1] + ql)
    md = AttentionMetadata(
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=bt.to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        max_query_len=max(ql for _, ql in seqs),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens,
        block_size=block_size,
        is_pure_decode=all(ql == 1 for _, ql in seqs),
    )
    return (
        q.to(device), k.to(device), v.to(device),
        cache_kernel.to(device), cache_ref.to(device), md,
    )


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_ref: torch.Tensor,
    md: AttentionMetadata, scale: float, sliding_window: int | None = None,
) -> torch.Tensor:
    md_ref = AttentionMetadata(
        md.query_start_loc, md.seq_lens, md.block_tables, md.slot_mapping, md.max_query_len,
        md.max_seq_len, md.query_start_loc_cpu, md.seq_lens_cpu, md.block_size,
        md.is_pure_decode,
    )
    return TorchRefBackend().forward(
        q.float(), k.float(), v.float(), cache_ref, md_ref, scale, sliding_window
    )


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert not out.isnan().any(), f"{int(out.isnan().sum())} output elements unwritten or NaN"
    diff = (out.float() - ref).flatten(1).norm(dim=1)  # [T]
    rel = diff / ref.flatten(1).norm(dim=1).clamp_min(1e-6)
    worst = int(rel.argmax())
    assert float(rel.max()) < TOL[dtype], f"token {worst}: relative error {float(rel.max()):.3e}"


def run_backend_case(
    seqs: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cuda",
    seed: int = 0,
    sliding_window: int | None = None,
    route_decodes: bool = True,
    share_prefix: bool = False,
) -> None:
    from kvserve.attention.triton.backend import TritonBackend

    q, k, v, cache, cache_ref, md = make_batch(
        seqs, num_heads, num_kv_heads, head_dim, block_size, dtype, device, seed,
        share_prefix=share_prefix,
    )
    scale = head_dim**-0.5
    ref = reference(q, k, v, cache_ref, md, scale, sliding_window)
    out = torch.full_like(q, float("nan"))
    TritonBackend(route_decodes=route_decodes).forward(
        q, k, v, cache, md, scale, sliding_window, out=out
    )
    assert_close(out, ref, dtype)
    # The step's K/V landed in the cache exactly.
    flat = cache.view(2, -1, num_kv_heads, head_dim)
    assert torch.equal(flat[0, md.slot_mapping], k)
    assert torch.equal(flat[1, md.slot_mapping], v)


# Contexts from 1 to 8192 tokens: fresh prompts, chunks with a cached prefix, and decodes.
MIXED = [
    (0, 300), (517, 200), (1000, 1), (4095, 1), (31, 1), (0, 1), (8191, 1), (2048, 64), (5, 17)
]
SHAPES = [(4, 4), (8, 2), (16, 2)]  # (num_heads, num_kv_heads): GQA ratios 1, 4, 8


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads", SHAPES, ids=["g1", "g4", "g8"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_mixed_batch(head_dim: int, heads: tuple[int, int], block_size: int) -> None:
    seed = head_dim * 100 + heads[0] * 10 + block_size
    run_backend_case(MIXED, *heads, head_dim, block_size, seed=seed)


@pytest.mark.parametrize("heads", SHAPES, ids=["g1", "g4", "g8"])
def test_mixed_batch_prefill_kernel_only(heads: tuple[int, int]) -> None:
    run_backend_case(MIXED, *heads, 128, 16, seed=heads[0], route_decodes=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_dtypes(dtype: torch.dtype, head_dim: int) -> None:
    run_backend_case(MIXED, 8, 2, head_dim, 16, dtype=dtype, seed=7)


@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("heads", SHAPES, ids=["g1", "g4", "g8"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_pure_decode(head_dim: int, heads: tuple[int, int], block_size: int) -> None:
    lens = [1, 2, 15, 16, 17, 1000, 4096, 8192, 333]
    run_backend_case([(n - 1, 1) for n in lens], *heads, head_dim, block_size, seed=block_size)


@pytest.mark.parametrize("num_splits", [1, 3, 16, 64])
def test_decode_split_counts(num_splits: int) -> None:
    """Any split count, including ones larger than the number of key tiles, gives one answer."""
    from kvserve.attention.triton.decode import decode_attention

    lens = [1, 64, 65, 700, 8192]
    q, k, v, cache, cache_ref, md = make_batch(
        [(n - 1, 1) for n in lens], 32, 8, 128, 16, torch.bfloat16, seed=num_splits
    )
    scale = 128**-0.5
    ref = reference(q, k, v, cache_ref, md, scale)
    write_kv_cache(k, v, cache, md.slot_mapping)
    out = torch.full_like(q, float("nan"))
    decode_attention(
        q, cache, out, md.block_tables, md.seq_lens, md.query_start_loc, md.num_seqs, scale,
        num_splits,
    )
    assert_close(out, ref, torch.bfloat16)


@pytest.mark.parametrize("window", [None, 100], ids=["full", "window100"])
def test_decode_spare_splits_same_bits(window: int | None) -> None:
    """A split count above a context's key tiles (a graph captured for any length) gives the same
    bits as the count capped at its tiles (an eager step): the spare splits do nothing. A length-0
    padding row reads as zeros."""
    from kvserve.attention.triton.decode import decode_attention

    lens = [1, 64, 65, 200, 700, 1500]
    q, k, v, cache, _, md = make_batch(
        [(n - 1, 1) for n in lens], 32, 8, 128, 16, torch.bfloat16, seed=5
    )
    scale = 128**-0.5
    write_kv_cache(k, v, cache, md.slot_mapping)
    out = torch.full_like(q, float("nan"))
    decode_attention(
        q, cache, out, md.block_tables, md.seq_lens, md.query_start_loc, md.num_seqs, scale, 64,
        sliding_window=window,
    )
    one = torch.tensor([0, 1], dtype=torch.int32, device="cuda")
    for i, n in enumerate(lens):
        tiles = -(-n // 64) - (max(n - window, 0) // 64 if window else 0)
        alone = torch.full_like(q[i : i + 1], float("nan"))
        decode_attention(
            q[i : i + 1], cache, alone, md.block_tables[i : i + 1], md.seq_lens[i : i + 1], one, 1,
            scale, min(64, tiles), sliding_window=window,
        )
        assert torch.equal(out[i : i + 1], alone), f"context {n}"
    zero = torch.zeros(1, dtype=torch.int32, device="cuda")
    pad = torch.full_like(q[:1], float("nan"))
    decode_attention(q[:1], cache, pad, md.block_tables[:1], zero, one, 1, scale, 64)
    assert torch.equal(pad, torch.zeros_like(pad))


def test_prefill_long_and_prefix_sharing() -> None:
    seqs = [(4096, 512), (4096, 1024), (0, 2048), (7000, 1192)]
    run_backend_case(seqs, 32, 8, 128, 16, seed=3, share_prefix=True)


@pytest.mark.parametrize("window", [1, 100, 1000])
def test_sliding_window(window: int) -> None:
    run_backend_case(MIXED, 8, 2, 128, 16, seed=window, sliding_window=window)


def test_kv_write_skips_padding_slots() -> None:
    from kvserve.attention.triton.kv_write import write_kv_cache_triton

    gen = torch.Generator(device="cuda").manual_seed(0)
    num_blocks, block_size, hkv, d, t = 64, 16, 3, 128, 200  # 3 heads: not a power of two
    cache = torch.randn(2, num_blocks, block_size, hkv, d, device="cuda", generator=gen)
    cache = cache.to(torch.bfloat16)
    qkv = torch.randn(t, (8 + 2 * hkv) * d, device="cuda", generator=gen).to(torch.bfloat16)
    # k and v as strided views into a fused projection, as the models produce them.
    k = qkv[:, 8 * d : (8 + hkv) * d].view(t, hkv, d)
    v = qkv[:, (8 + hkv) * d :].view(t, hkv, d)
    slots = torch.randperm(num_blocks * block_size, device="cuda", generator=gen)[:t]
    slots[::3] = -1
    expected = cache.clone()
    write_kv_cache(k, v, expected, slots)
    write_kv_cache_triton(k, v, cache, slots)
    # Equal to the PyTorch scatter, which drops slot -1 (so nothing wrapped to the last slot).
    assert torch.equal(cache, expected)


def test_decode_cuda_graph_replay_at_new_lengths() -> None:
    """A pure-decode step captured once replays correctly after the lengths, block tables and
    inputs change in place (no host syncs, split count independent of the lengths)."""
    from kvserve.attention.triton.backend import TritonBackend

    hq, hkv, d, bs = 32, 8, 128, 16
    lens_a = [5, 100, 2000, 17]
    lens_b = [3000, 1, 64, 8000]
    max_blocks = 8192 // bs + 4
    q, k, v, cache, cache_ref, md = make_batch(
        [(n - 1, 1) for n in lens_b], hq, hkv, d, bs, torch.bfloat16, seed=11
    )
    scale = d**-0.5
    ref = reference(q, k, v, cache_ref, md, scale)

    # Static buffers holding step A's values at capture time.
    s_q, s_k, s_v = torch.randn_like(q), torch.randn_like(k), torch.randn_like(v)
    s_bt = torch.zeros(len(lens_a), max_blocks, dtype=torch.int32, device="cuda")
    s_bt[:, : md.block_tables.shape[1]] = md.block_tables
    s_lens = torch.tensor(lens_a, dtype=torch.int32, device="cuda")
    s_slots = torch.full((len(lens_a),), -1, dtype=torch.int64, device="cuda")
    s_qsl = torch.arange(len(lens_a) + 1, dtype=torch.int32, device="cuda")
    s_out = torch.empty_like(q)
    backend = TritonBackend()

    qsl_cpu = list(range(len(lens_a) + 1))

    def step() -> None:
        md_a = AttentionMetadata(
            s_qsl, s_lens, s_bt, s_slots, 1, max(lens_a), qsl_cpu, lens_a, bs, True
        )
        backend.forward(s_q, s_k, s_v, cache, md_a, scale, out=s_out)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    s_q.copy_(q)
    s_k.copy_(k)
    s_v.copy_(v)
    s_lens.copy_(md.seq_lens)
    s_slots.copy_(md.slot_mapping)
    s_out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(s_out, ref, torch.bfloat16)


def test_rejects_unsupported_head_dim() -> None:
    from kvserve.attention.triton.backend import TritonBackend

    q, k, v, cache, _, md = make_batch([(0, 4)], 2, 1, 16, 16, torch.float16)
    with pytest.raises(NotImplementedError, match="head_dim"):
        TritonBackend().forward(q[..., :12], k[..., :12], v[..., :12], cache[..., :12], md, 1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_attention_sinks(dtype: torch.dtype) -> None:
    """gpt-oss's sinks in the decode (direct and split) and prefill kernels; also run on the CPU
    under TRITON_INTERPRET=1 (`tests/gpu/sink_checks.py`)."""
    from tests.gpu import sink_checks

    if dtype == torch.float32:
        sink_checks.run("cuda")
    for window in (None, 128):
        sink_checks.check_case(MIXED, window, "cuda", dtype, heads=(64, 8), head_dim=64, seed=11)
