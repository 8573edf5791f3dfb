"""The 2..16-row products of a verify step (and of small decode batches) on tensor cores, the
default since its first GPU run (`KVSERVE_VERIFY_GEMM=triton`; `cublas`: `F.linear` then the
epilogue kernels). NVIDIA H100, 2026-12-07, Llama-3.1-8B bf16, context 1024, CUDA graphs
(`benchmarks/spec_gpu_bench.py --only verify`): a 5-row verify step against a one-token step
1.084x with this kernel, 1.182x through cuBLAS; at batch 16 the one-token step (16 rows) 6.851 ->
6.334 ms.

Swap-AB: the weight is the `tl.dot`'s M side, a tile of BLOCK_N weight rows x BLOCK_K, times the
activations transposed, [BLOCK_K, 16] (the rows padded to 16 with zeros), into an fp32
[BLOCK_N, 16] accumulator. So the work per weight byte does not grow with the rows (the removed
FMA "skinny" kernel kept one accumulator per row and lost 2-3x to cuBLAS at 5 rows), and on
sm_90 a 64-row weight tile is one wgmma M block. The K loop is a `tl.range` over STAGES stages:
the compiler turns the weight loads into asynchronous copies, so STAGES tiles per program are in
flight. Where N / BLOCK_N programs would not fill the GPU (o and down projections of an 8B model:
64 tiles), SPLIT programs share a tile's K range: each writes its fp32 partial sums to a
workspace and takes a ticket from a per-tile counter; the last one adds the partials in split
order (the same bits whichever finishes last), runs the epilogue and resets the counter to 0
for the next launch (CUDA-graph replays included).

Epilogues as in the one-row GEMVs of `kvserve/models/triton_ops.py`, with their helpers:
- plain: bias, store;
- SiLU·mul (fused gate/up): a program's rows are BLOCK_N / 2 gate rows then the matching up
  rows, so `silu(gate) * up` is computed in registers (`_silu_mul_rounded`);
- RoPE (fused qkv): a program's rows are BLOCK_N / 2 dims d of one head then the dims d + HALF
  that RoPE pairs with them; q and k are rotated per row position (`_rotate`) and k, v are
  stored in the paged cache at each row's slot (slot -1: no write).
Each row's sum is rounded to the model dtype before the epilogue, as the unfused path rounds
`F.linear`'s output: the results differ from cuBLAS + epilogue only by summation order.

PDL (`kvserve/models/pdl.py`): the first weight tile is loaded before the wait, then the rest of
the kernel runs after it, so the verify chain overlaps kernel boundaries like the one-row chain.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from kvserve.models import pdl
from kvserve.models.triton_ops import _rotate, _silu_mul_rounded

MAX_ROWS = 16  # the padded activation tile: rows 2..16 take this kernel
EPI_PLAIN, EPI_SILU_MUL, EPI_ROPE = 0, 1, 2


@functools.cache
def requested() -> bool:
    """KVSERVE_VERIFY_GEMM=triton (the default) routes 2..16-row 16-bit products here; `cublas`
    sends them to `F.linear`."""
    value = os.environ.get("KVSERVE_VERIFY_GEMM", "triton")
    if value not in ("cublas", "triton"):
        raise ValueError(f"KVSERVE_VERIFY_GEMM must be 'cublas' or 'triton', got {value!r}")
    return value == "triton"


# positions and slots are slices of the step's staging buffer (alignment varies per step).
@triton.jit(do_not_specialize_on_alignment=["pos_ptr", "slot_ptr"])
def _verify_gemm_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K], rows contiguous
    b_ptr,  # [N] or unused
    out_ptr,  # [M, N_OUT]
    part_ptr,  # SPLIT > 1: fp32 [tiles, SPLIT, BLOCK_N, 16]
    count_ptr,  # SPLIT > 1: int32 [>= tiles], zero between launches
    pos_ptr,  # ROPE: [M]
    cos_sin_ptr,  # ROPE: [max_pos, 2 * HALF] fp32: cos ‖ sin
    cache_ptr,  # ROPE + WRITE_KV: [2, blocks, block_size, kv_heads, 2 * HALF]
    slot_ptr,  # ROPE + WRITE_KV: [M] int64, -1 = no write
    M,
    N,  # weight rows
    N_OUT,  # output columns (N, or N / 2 for SiLU·mul)
    K,
    K_SPLIT,  # K elements per split (a multiple of BLOCK_K)
    stride_x,
    stride_w,
    stride_o,
    stride_cs,
    num_q_heads,
    num_heads,  # q heads + k heads: the rotated ones
    stride_plane,
    stride_slot,
    stride_head,
    EPI: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SPLIT: tl.constexpr,
    HALF: tl.constexpr,  # ROPE: head_dim / 2
    TILES_PER_HEAD: tl.constexpr,  # ROPE: HALF / (BLOCK_N / 2) programs per head
    WRITE_KV: tl.constexpr,
    EVEN_K: tl.constexpr,  # K_SPLIT % BLOCK_K == 0 and K % K_SPLIT == 0
    PRE: tl.constexpr,  # 0 or 1: weight tiles loaded before the PDL wait
    STAGES: tl.constexpr,
    PDL: tl.constexpr,
):
    tile = tl.program_id(0)
    split = tl.program_id(1)
    r = tl.arange(0, BLOCK_N)
    P: tl.constexpr = BLOCK_N // 2
    second = r >= P  # the up rows (SiLU·mul) or the d + HALF rows (RoPE)
    if EPI == 1:
        out_cols = tile * P + r % P  # gate row of each
        row_ok = out_cols < N_OUT
        w_rows = tl.where(second, out_cols + N_OUT, out_cols)
        head = 0
        j = r
    elif EPI == 2:
        head = tile // TILES_PER_HEAD
        j = (tile % TILES_PER_HEAD) * P + r % P  # [BLOCK_N]: the dim pair of each row
        w_rows = head * (2 * HALF) + j + tl.where(second, HALF, 0)
        row_ok = w_rows < N
        out_cols = w_rows
    else:
        w_rows = tile * BLOCK_N + r
        row_ok = w_rows < N
        out_cols = w_rows
        head = 0
        j = r
    rows64 = tl.where(row_ok, w_rows, 0).to(tl.int64)
    m = tl.arange(0, BLOCK_M)
    m_ok = m < M
    cols = tl.arange(0, BLOCK_K)
    k_lo = split * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    w_tile = w_ptr + rows64[:, None] * stride_w + cols[None, :]  # [BLOCK_N, BLOCK_K]
    x_tile = x_ptr + m[None, :] * stride_x + cols[:, None]  # [BLOCK_K, BLOCK_M]: x transposed
    if PRE > 0:
        if EVEN_K:
            w0 = tl.load(w_tile + k_lo)
        else:
            w0 = tl.load(w_tile + k_lo, mask=(k_lo + cols < k_hi)[None, :], other=0.0)
    pdl.wait(PDL)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    if PRE > 0:
        xk = tl.load(x_tile + k_lo, mask=m_ok[None, :] & (k_lo + cols < k_hi)[:, None], other=0.0)
        acc = tl.dot(w0, xk, acc)
    for k0 in tl.range(k_lo + PRE * BLOCK_K, k_hi, BLOCK_K, num_stages=STAGES):
        if EVEN_K:
            w = tl.load(w_tile + k0)
            xk = tl.load(x_tile + k0, mask=m_ok[None, :], other=0.0)
        else:
            k_ok = k0 + cols < k_hi
            w = tl.load(w_tile + k0, mask=k_ok[None, :], other=0.0)
            xk = tl.load(x_tile + k0, mask=m_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(w, xk, acc)

    if SPLIT > 1:
        acc_offs = r[:, None] * BLOCK_M + m[None, :]  # [BLOCK_N, BLOCK_M]
        part = part_ptr + tile.to(tl.int64) * (SPLIT * BLOCK_N * BLOCK_M)
        tl.store(part + split * (BLOCK_N * BLOCK_M) + acc_offs, acc)
        tl.debug_barrier()  # every thread's partial is written before the ticket releases them
        ticket = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
        last = ticket == SPLIT - 1
        tl.debug_barrier()
    else:
        last = True
    if last:
        if SPLIT > 1:
            # .cg: from L2, where the other programs' partials are (never a stale L1 line).
            acc = tl.load(part + acc_offs, cache_modifier=".cg")
            for s in tl.static_range(1, SPLIT):
                acc += tl.load(part + s * (BLOCK_N * BLOCK_M) + acc_offs, cache_modifier=".cg")
            tl.store(count_ptr + tile, 0)  # ready for the next launch
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows64, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        dt = out_ptr.dtype.element_ty
        out_m = out_ptr + m[None, :].to(tl.int64) * stride_o
        if EPI == 1:
            g, u = tl.split(tl.permute(tl.reshape(acc, [2, P, BLOCK_M]), (1, 2, 0)))  # [P, BLOCK_M] each
            oc = tile * P + tl.arange(0, P)
            tl.store(out_m + oc[:, None], _silu_mul_rounded(g, u, dt), mask=(oc < N_OUT)[:, None] & m_ok[None, :])
        elif EPI == 2:
            x1, x2 = tl.split(tl.permute(tl.reshape(acc.to(dt).to(tl.float32), [2, P, BLOCK_M]), (1, 2, 0)))
            jj = (tile % TILES_PER_HEAD) * P + tl.arange(0, P)  # [P]
            pos = tl.load(pos_ptr + m, mask=m_ok, other=0).to(tl.int64)  # [BLOCK_M]
            cs = cos_sin_ptr + pos[None, :] * stride_cs + jj[:, None]  # [P, BLOCK_M]
            r1, r2 = _rotate(x1, x2, tl.load(cs), tl.load(cs + HALF))
            rotated = head < num_heads  # q or k
            o1 = tl.where(rotated, r1, x1).to(dt)
            o2 = tl.where(rotated, r2, x2).to(dt)
            ok = m_ok[None, :] & (jj < HALF)[:, None]
            col1 = head * (2 * HALF) + jj
            tl.store(out_m + col1[:, None], o1, mask=ok)
            tl.store(out_m + (col1 + HALF)[:, None], o2, mask=ok)
            if WRITE_KV:
                if head >= num_q_heads:  # k or v
                    slot = tl.load(slot_ptr + m, mask=m_ok, other=-1)  # [BLOCK_M]
                    is_v = head >= num_heads
                    kv_head = tl.where(is_v, head - num_heads, head - num_q_heads).to(tl.int64)
                    dst = (cache_ptr + is_v.to(tl.int64) * stride_plane + slot[None, :] * stride_slot
                           + kv_head * stride_head + jj[:, None])
                    wok = ok & (slot >= 0)[None, :]  # padding rows of a CUDA-graph batch write nothing
                    cdt = cache_ptr.dtype.element_ty
                    tl.store(dst, o1.to(cdt), mask=wok)
                    tl.store(dst + HALF, o2.to(cdt), mask=wok)
        else:
            tl.store(out_m + out_cols[:, None], acc.to(dt), mask=row_ok[:, None] & m_ok[None, :])


def verify_gemm_config(n_tiles: int, k: int, block_k: int = 128) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_K, SPLIT, num_warps, STAGES) for `n_tiles` tiles of 64 weight rows: split K
    until the programs fill two per SM of a 132-SM GPU (about; untimed guess, see
    `benchmarks/spec_gpu_bench.py --only kernels`), keeping >= 4 K tiles per split."""
    split = 1
    while n_tiles * split < 160 and k // (2 * split) >= 4 * block_k and (k // (2 * split)) % block_k == 0:
        split *= 2
    return 64, block_k, split, 4, 4


_COUNTERS: dict[torch.device, torch.Tensor] = {}  # a workspace per device, zero between launches
_COUNTER_LEN = 1 << 14


def _counters(device: torch.device, tiles: int) -> torch.Tensor | None:
    buf = _COUNTERS.get(device)
    if buf is None:
        if torch.cuda.is_available() and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None  # never allocated inside a graph's pool: the caller runs without split-K
        buf = _COUNTERS[device] = torch.zeros(_COUNTER_LEN, dtype=torch.int32, device=device)
    return buf if tiles <= buf.numel() else None


def _launch(x, weight, bias, out, epi, n_out, tiles, config, rope=None, pre: int | None = None) -> None:
    """`pre` overrides the weight tiles loaded before the PDL wait (tests: the preload path
    without PDL, e.g. under the interpreter)."""
    m, k = x.shape
    n = weight.shape[0]
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"verify_gemm: {m} rows, expected 1..{MAX_ROWS}")
    block_n, block_k, split, warps, stages = config or verify_gemm_config(tiles, k)
    counters = _counters(x.device, tiles) if split > 1 else None
    if counters is None:
        split = 1
    k_split = -(-k // split)
    k_split = -(-k_split // block_k) * block_k
    split = -(-k // k_split)
    part = torch.empty((tiles, split, block_n, MAX_ROWS), dtype=torch.float32, device=x.device) if split > 1 else out
    use_pdl = pdl.enabled(x.device)
    even = k % k_split == 0 and k_split % block_k == 0
    if rope is None:
        pos, cos_sin, cache, slots, hq, heads, strides, half, write = x, x, x, x, 0, 0, (0, 0, 0), 1, False
    else:
        pos, cos_sin, cache, slots, hq, heads, half = rope
        write = cache is not None
        strides = (cache.stride(0), cache.stride(2), cache.stride(3)) if write else (0, 0, 0)
        cache = cache if write else x
        slots = slots if write else pos
    _verify_gemm_kernel[(tiles, split)](
        x, weight, bias if bias is not None else weight, out, part, counters if counters is not None else out,
        pos, cos_sin, cache, slots,
        m, n, n_out, k, k_split, x.stride(0), weight.stride(0), out.stride(0),
        cos_sin.stride(0) if rope is not None else 0, hq, heads, *strides,
        EPI=epi, HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_M=MAX_ROWS, SPLIT=split,
        HALF=half, TILES_PER_HEAD=max(1, half // (block_n // 2)), WRITE_KV=write, EVEN_K=even,
        PRE=(1 if use_pdl else 0) if pre is None else pre,
        STAGES=stages, PDL=use_pdl, num_warps=warps, num_stages=stages, launch_pdl=use_pdl,
    )


def verify_gemm(
    x: torch.Tensor,  # [M <= 16, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,
    config: tuple[int, int, int, int, int] | None = None,  # (BLOCK_N, BLOCK_K, SPLIT, num_warps, STAGES)
) -> torch.Tensor:  # [M, N]
    """x @ weight.T + bias for 1..16 rows."""
    n = weight.shape[0]
    out = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    block_n = (config or (64,))[0]
    _launch(x, weight, bias, out, EPI_PLAIN, n, triton.cdiv(n, block_n), config)
    return out


def verify_gemm_silu_mul(
    x: torch.Tensor,  # [M <= 16, K]
    weight: torch.Tensor,  # [2I, K]: gate rows, then up rows
    bias: torch.Tensor | None = None,
    config: tuple[int, int, int, int, int] | None = None,
) -> torch.Tensor:  # [M, I]
    """silu(gate) * up of a fused gate/up projection: the same rounding as
    `silu_and_mul(F.linear(x, weight, bias))`."""
    i = weight.shape[0] // 2
    out = torch.empty((x.shape[0], i), dtype=x.dtype, device=x.device)
    block_n = (config or (64,))[0]
    _launch(x, weight, bias, out, EPI_SILU_MUL, i, triton.cdiv(i, block_n // 2), config)
    return out


def verify_gemm_rope_(
    x: torch.Tensor,  # [M <= 16, K]
    weight: torch.Tensor,  # [(Hq + 2 Hkv) * D, K]
    bias: torch.Tensor | None,
    positions: torch.Tensor,  # [M]
    cos_sin: torch.Tensor,  # [max_pos, D] fp32
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    kv_cache: torch.Tensor | None = None,  # [2, blocks, block_size, kv_heads, D]: also store k, v
    slot_mapping: torch.Tensor | None = None,  # [M] int64, -1 = skip
    config: tuple[int, int, int, int, int] | None = None,
) -> torch.Tensor:  # [M, (Hq + 2 Hkv) * D]
    """`rope_qk_(F.linear(x, weight, bias), ...)` (without q/k norm) in one kernel."""
    n = weight.shape[0]
    heads = num_q_heads + 2 * num_kv_heads
    block_n = (config or (64,))[0]
    half = head_dim // 2
    if n != heads * head_dim or head_dim % 2 or half % (block_n // 2):
        raise ValueError(f"verify_gemm_rope_: weight of {n} rows is not q, k and v heads of size {head_dim} "
                         f"(head_dim / 2 must be a multiple of {block_n // 2})")
    out = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    rope = (positions, cos_sin, kv_cache, slot_mapping, num_q_heads, num_q_heads + num_kv_heads, half)
    _launch(x, weight, bias, out, EPI_ROPE, n, heads * (half // (block_n // 2)), config, rope)
    return out


def supports_rope(head_dim: int, block_n: int = 64) -> bool:
    return head_dim % 2 == 0 and (head_dim // 2) % (block_n // 2) == 0
