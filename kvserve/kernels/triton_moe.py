"""The fused mixture-of-experts MLP on CUDA (Triton): every expert's gated-SiLU MLP of a sparse
layer in two or three launches whose shapes depend only on the token count, so a decode step
stays capturable in a CUDA graph (no host sync: nothing asks which experts got tokens).

    out[t] = sum_j w[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])),   e = ids[t, j]

Weights, stacked per layer (`platform/cuda_moe.py` builds them once after loading):
w13 [E, 2I, H] (each expert's fused gate ‖ up rows, as its gate_up projection stores them) and
w2 [E, H, I]. Only the selected experts' rows are ever read.

Two paths, picked by the number of (token, slot) pairs n = T * top_k (`use_pairs`), and a
variant of the first that the engine runs by default:

- **pairs** (decode: one token, or n <= `PAIRS_MAX` and n <= E / 2): no sorting. One
  program per pair and BLOCK_N rows of the expert's width streams those gate and up rows
  against the token's row (a GEMV, as `triton_ops.gemv`) and writes silu(gate) * up; then one
  program per token and BLOCK_N output columns sums w_j * (inter_j · W_down[e_j] rows) over
  the token's k slots, so the routing weight and the top-k reduction are in the epilogue.
  Pairs that share an expert read it once each (hence the limit).
- **decode** (`fused_decode=True`, which the CUDA ops pass by default, `KVSERVE_MOE_DECODE=fused`:
  where "auto" would take pairs): the same work in the PDL kernels of `triton_moe_decode.py`
  (unrolled K loops; the down kernel takes all k experts per tile and reads the routing and its
  first weight tiles before its PDL wait). Faster than pairs at 1 and 4 tokens (NVIDIA H200,
  gpt-oss-20b shapes, 4 tokens: 167.4 against 236.6 µs a layer), slower than sorted at 8 and 16
  (288.9 against 233.2 µs at 8), where `use_pairs` already picks sorted.
- **sorted** (prefill, larger decode batches): `align_by_expert` (one Triton program for a
  decode batch's pairs, torch ops for prefill) sorts the pairs by expert and
  pads each expert's run to a multiple of BLOCK_M (vLLM's moe_align_block_size idea); a grouped
  GEMM multiplies each BLOCK_M block of pairs by its expert's weight tiles with tensor-core dots
  (gate and up in two accumulators, SiLU·mul in the epilogue), a second one the down
  projection scaled by the routing weight, and a sum over the k slots gives each token's row.
  Launch grids are sized for the worst case (every pair's expert padded), blocks past the
  padded total exit at once.

Rounding: products accumulate in fp32; gate, up and the SiLU output are rounded to the model
dtype where the unfused path (`Ops.silu_and_mul`) rounds them; the down products and the routing
weight stay in fp32 until one rounding per pair (sorted path) and the top-k sum accumulates in
fp32 (the pairs path rounds once per token; the unfused path rounds each expert's output, its
weighted copy and each partial sum), so bf16 results differ from the
reference loop by reduction order and those roundings. fp32 inputs take IEEE dots (the
interpreter tests run in fp32).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Pairs (tokens x top_k) up to which the GEMV-style path runs (KVSERVE_MOE_PAIRS_MAX overrides).
PAIRS_MAX = int(os.environ.get("KVSERVE_MOE_PAIRS_MAX", "32"))


# -- the pairs path (decode) ---------------------------------------------------------------
@triton.jit
def grouped_pid(pid, N, num_blocks, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column tile) of program `pid`: consecutive programs take GROUP_M row blocks
    (mostly one expert's) per column tile, so its weight tile is read from L2 after the first."""
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group = tl.minimum(num_blocks - first_m, GROUP_M)
    return first_m + (pid % in_group) % group, (pid % in_group) // group


@triton.jit
def _pairs_gate_up_kernel(
    x_ptr,  # [T, K]
    w_ptr,  # [E, 2N, K]: gate rows 0..N-1, up rows N..2N-1
    ids_ptr,  # [T * TOP_K] expert of each pair
    out_ptr,  # [T * TOP_K, N]
    N,
    K,
    stride_x,
    stride_we,
    stride_wn,
    stride_o,
    TOP_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pair = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    e = tl.load(ids_ptr + pair).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    x_row = x_ptr + (pair // TOP_K).to(tl.int64) * stride_x
    wg = w_ptr + e * stride_we + rows[:, None].to(tl.int64) * stride_wn + cols[None, :]
    wu = wg + N * stride_wn
    acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_row + k0 + cols).to(tl.float32)
            g = tl.load(wg + k0, mask=row_ok[:, None], other=0.0, eviction_policy="evict_first")
            u = tl.load(wu + k0, mask=row_ok[:, None], other=0.0, eviction_policy="evict_first")
        else:
            k_ok = k0 + cols < K
            x = tl.load(x_row + k0 + cols, mask=k_ok, other=0.0).to(tl.float32)
            m = row_ok[:, None] & k_ok[None, :]
            g = tl.load(wg + k0, mask=m, other=0.0, eviction_policy="evict_first")
            u = tl.load(wu + k0, mask=m, other=0.0, eviction_policy="evict_first")
        acc_g += g.to(tl.float32) * x[None, :]
        acc_u += u.to(tl.float32) * x[None, :]
    dt = out_ptr.dtype.element_ty
    h = _silu_mul(tl.sum(acc_g, 1), tl.sum(acc_u, 1), dt)
    tl.store(out_ptr + pair.to(tl.int64) * stride_o + rows, h.to(dt), mask=row_ok)


@triton.jit
def _pairs_down_kernel(
    h_ptr,  # [T * TOP_K, K]: silu(gate) * up of each pair
    w_ptr,  # [E, N, K]
    ids_ptr,  # [T * TOP_K]
    wts_ptr,  # [T * TOP_K] routing weights
    out_ptr,  # [T, N]
    N,
    K,
    stride_h,
    stride_we,
    stride_wn,
    stride_o,
    TOP_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_K)
    out = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pair = tok * TOP_K + j
        e = tl.load(ids_ptr + pair).to(tl.int64)
        h_row = h_ptr + pair * stride_h
        w = w_ptr + e * stride_we + rows[:, None].to(tl.int64) * stride_wn + cols[None, :]
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                h = tl.load(h_row + k0 + cols).to(tl.float32)
                wv = tl.load(w + k0, mask=row_ok[:, None], other=0.0, eviction_policy="evict_first")
            else:
                k_ok = k0 + cols < K
                h = tl.load(h_row + k0 + cols, mask=k_ok, other=0.0).to(tl.float32)
                wv = tl.load(w + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first")
            acc += wv.to(tl.float32) * h[None, :]
        out += tl.load(wts_ptr + pair).to(tl.float32) * tl.sum(acc, 1)
    tl.store(out_ptr + tok * stride_o + rows, out.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _silu_mul(g, u, dt: tl.constexpr):
    """silu(g) * u from fp32 sums, rounded where `Ops.silu_and_mul` rounds (g, u, silu(g))."""
    g = g.to(dt).to(tl.float32)
    u = u.to(dt).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    return s * u


# -- the sorted path (prefill, larger batches) ------------------------------------------------
@triton.jit
def _grouped_gemm_kernel(
    a_ptr,  # gate/up: x [T, K]; down: h [T * TOP_K, K]
    w_ptr,  # gate/up: [E, 2N, K]; down: [E, N, K]
    out_ptr,  # [T * TOP_K, N]
    sorted_ptr,  # [P] pair ids sorted by expert, padding = num_pairs
    block_expert_ptr,  # [P / BLOCK_M]
    num_post_ptr,  # [1] padded total (P' <= P)
    wts_ptr,  # [T * TOP_K] routing weights (MUL_WEIGHT)
    N,
    K,
    num_pairs,
    num_blocks,
    stride_a,
    stride_we,
    stride_wn,
    stride_o,
    A_ROW_DIV: tl.constexpr,  # a's row of pair p is p // A_ROW_DIV (TOP_K for x, 1 for h)
    GATE_UP: tl.constexpr,  # two accumulators (rows n and N + n), SiLU·mul epilogue
    MUL_WEIGHT: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_pid(tl.program_id(0), N, num_blocks, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_post_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ptr + offs_m)
    m_ok = pairs < num_pairs
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_p = a_ptr + (pairs // A_ROW_DIV).to(tl.int64)[:, None] * stride_a + offs_k[None, :]
    b_p = w_ptr + e * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]  # [BK, BN]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k + k0 < K
        a = tl.load(a_p + k0, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_p + k0, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        if GATE_UP:
            bu = tl.load(b_p + N * stride_wn + k0, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if IEEE:
                acc_u = tl.dot(a, bu, acc_u, input_precision="ieee")
            else:
                acc_u = tl.dot(a, bu, acc_u)
    dt = out_ptr.dtype.element_ty
    if GATE_UP:
        acc = _silu_mul(acc, acc_u, dt)
    if MUL_WEIGHT:
        acc = acc * tl.load(wts_ptr + pairs, mask=m_ok, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + pairs.to(tl.int64)[:, None] * stride_o + offs_n[None, :]
    tl.store(out, acc.to(dt), mask=m_ok[:, None] & n_ok[None, :])


def padded_size(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Worst-case length of the expert-sorted, block-padded pair list: each expert that gets a
    pair (at most min(n, E) of them) pads its run by up to BLOCK_M - 1."""
    p = num_pairs + min(num_pairs, num_experts) * (block_m - 1)
    return triton.cdiv(p, block_m) * block_m


@triton.jit
def _align_kernel(
    ids_ptr,  # [n] expert of each pair
    sorted_ptr,  # [P] out: pair ids by expert, padding = n
    block_expert_ptr,  # [P / BLOCK_M] out
    num_post_ptr,  # [1] out
    n,
    E,
    P,
    BLOCK_M: tl.constexpr,
    E_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """`align_by_expert` in one program (a decode step's few thousand pairs at most): counts per
    expert from one-hot chunks, padded runs by a cumulative sum, then each pair's slot = its
    expert's cursor + the equal ids before it in the chunk (stable, no atomics)."""
    experts = tl.arange(0, E_PAD)
    e_ok = experts < E
    offs = tl.arange(0, CHUNK)
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for c0 in range(0, n, CHUNK):
        e = tl.load(ids_ptr + c0 + offs, mask=c0 + offs < n, other=-1).to(tl.int32)
        counts += tl.sum((e[:, None] == experts[None, :]).to(tl.int32), 0)
    padded = (counts + (BLOCK_M - 1)) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, 0)
    cursor = end - padded
    tl.store(num_post_ptr, tl.sum(padded, 0))
    for b0 in range(0, P // BLOCK_M, CHUNK):
        blocks = b0 + offs
        first = (blocks * BLOCK_M)[:, None]
        owner = tl.sum(((end[None, :] <= first) & e_ok[None, :]).to(tl.int32), 1)
        tl.store(block_expert_ptr + blocks, tl.minimum(owner, E - 1), mask=blocks < P // BLOCK_M)
    for p0 in range(0, P, CHUNK):
        tl.store(sorted_ptr + p0 + offs, tl.zeros([CHUNK], dtype=tl.int64) + n, mask=p0 + offs < P)
    tl.debug_barrier()  # the padding is written before any pair lands on it
    for c0 in range(0, n, CHUNK):
        pair = c0 + offs
        e = tl.load(ids_ptr + pair, mask=pair < n, other=-1).to(tl.int32)
        hot = (e[:, None] == experts[None, :]).to(tl.int32)  # [CHUNK, E_PAD]
        before = tl.cumsum(hot, 0) - hot  # equal ids earlier in the chunk
        dest = tl.sum(hot * (cursor[None, :] + before), 1)
        tl.store(sorted_ptr + dest, pair.to(tl.int64), mask=pair < n)
        cursor += tl.sum(hot, 0)


# Pairs up to which the one-program align kernel runs (decode batches); torch ops above.
# KVSERVE_MOE_ALIGN_KERNEL_MAX=0 sorts with torch ops always (for comparisons).
ALIGN_KERNEL_MAX = int(os.environ.get("KVSERVE_MOE_ALIGN_KERNEL_MAX", "8192"))


def align_by_expert(
    ids: torch.Tensor, num_experts: int, block_m: int, use_kernel: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the (token, slot) pairs of `ids` [T, k] by expert, each expert's run padded to a
    multiple of `block_m`: (sorted pair ids [P] (padding: T * k), expert of each block
    [P / block_m] (blocks past the total: clamped to the last expert, never computed), padded
    total [1]). Fixed shapes for a given T, no host sync: capturable. Pairs of one expert keep
    their order. One Triton program up to `ALIGN_KERNEL_MAX` pairs (the torch ops below cost
    ~20 launches: in a decode graph of 48 layers that is ~1000 tiny kernels a step), torch ops
    (a stable sort) above."""
    flat = ids.reshape(-1).long()
    n = flat.numel()
    dev = flat.device
    size = padded_size(n, num_experts, block_m)
    if use_kernel if use_kernel is not None else n <= ALIGN_KERNEL_MAX:
        flat = flat.contiguous()
        sorted_ids = torch.empty(size, dtype=torch.long, device=dev)
        block_expert = torch.empty(size // block_m, dtype=torch.long, device=dev)
        num_post = torch.empty(1, dtype=torch.long, device=dev)
        e_pad = triton.next_power_of_2(num_experts)
        _align_kernel[(1,)](
            flat, sorted_ids, block_expert, num_post, n, num_experts, size,
            BLOCK_M=block_m, E_PAD=e_pad, CHUNK=max(16, min(64, 8192 // e_pad)), num_warps=8,
        )
        return sorted_ids, block_expert, num_post
    sorted_e, order = torch.sort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + (block_m - 1)) // block_m * block_m
    end = padded.cumsum(0)  # [E] end of each expert's padded run
    first = end - padded  # its start
    before = counts.cumsum(0) - counts  # pairs of lower experts
    dest = first[sorted_e] + torch.arange(n, device=dev) - before[sorted_e]
    sorted_ids = torch.full((size,), n, dtype=torch.long, device=dev).scatter_(0, dest, order)
    starts = torch.arange(0, size, block_m, device=dev)
    block_expert = torch.searchsorted(end, starts, right=True).clamp_(max=num_experts - 1)
    return sorted_ids, block_expert, end[-1:]


# -- configs -----------------------------------------------------------------------------------
def pairs_config(n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) of the GEMV-style kernels: a few whole rows per program with
    long loads, as `triton_ops.gemv_config`."""
    return 4, min(512, triton.next_power_of_2(k)), 4


def sorted_config(num_pairs: int, num_experts: int) -> dict[str, int]:
    """Tile sizes of the grouped GEMM for the mean pairs per expert: a 16-row block (the
    smallest tensor-core tile) while experts get few pairs, larger tiles for prefill."""
    per_expert = num_pairs / num_experts
    if per_expert <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=3)
    if per_expert <= 64:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=4, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def use_pairs(tokens: int, num_experts: int, top_k: int) -> bool:
    """The pairs path while its pairs are few and mostly on distinct experts (a shared expert
    is read once per pair there); one token always (its k experts are distinct)."""
    n = tokens * top_k
    return tokens == 1 or (n <= PAIRS_MAX and 2 * n <= num_experts)


# -- the op --------------------------------------------------------------------------------------
def fused_moe(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k]
    path: str = "auto",  # "auto" | "pairs" | "decode" | "sorted"
    config: dict[str, int] | None = None,  # sorted path tiles (else `sorted_config`)
    pairs_configs: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None,  # (gate/up, down)
    fused_decode: bool = False,  # "auto" takes "decode" where it would take "pairs"
    decode_configs: tuple | None = None,  # the decode path's (gate/up, down) tiles, None = defaults
) -> torch.Tensor:  # [T, H]
    """`path`: "pairs" and "sorted" as the module docstring says; "decode" the pairs path's
    kernels of `triton_moe_decode` (PDL launches, unrolled K loops, all k experts per down tile).
    `fused_decode`: "auto" takes "decode" where it would take "pairs" (the CUDA ops pass it unless
    `KVSERVE_MOE_DECODE=torch`)."""
    if path not in ("auto", "pairs", "decode", "sorted"):
        raise ValueError(f"path must be 'auto', 'pairs', 'decode' or 'sorted' (got {path!r})")
    t, hidden = x.shape
    e, two_i, _ = w13.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    n = t * top_k
    if t == 0:
        return x.new_empty((0, hidden))
    if x.stride(1) != 1 or w13.stride(2) != 1 or w2.stride(2) != 1:
        raise ValueError("fused_moe needs x, w13 and w2 with contiguous last dimensions")
    if path == "decode" or (path == "auto" and fused_decode and use_pairs(t, e, top_k)):
        from kvserve.kernels.triton_moe_decode import fused_moe_decode

        return fused_moe_decode(x, w13, w2, topk_weights, topk_ids, configs=decode_configs)
    ids = topk_ids.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    wts = topk_weights.reshape(-1).contiguous()
    h = torch.empty((n, inter), dtype=x.dtype, device=x.device)
    if path == "pairs" or (path == "auto" and use_pairs(t, e, top_k)):
        gu_cfg, down_cfg = pairs_configs or (pairs_config(inter, hidden), pairs_config(hidden, inter))
        bn, bk, warps = gu_cfg
        _pairs_gate_up_kernel[(n, triton.cdiv(inter, bn))](
            x, w13, ids, h, inter, hidden, x.stride(0), w13.stride(0), w13.stride(1), h.stride(0),
            TOP_K=top_k, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=hidden % bk == 0, num_warps=warps,
        )
        out = torch.empty((t, hidden), dtype=x.dtype, device=x.device)
        bn, bk, warps = down_cfg
        _pairs_down_kernel[(t, triton.cdiv(hidden, bn))](
            h, w2, ids, wts, out, hidden, inter, h.stride(0), w2.stride(0), w2.stride(1), out.stride(0),
            TOP_K=top_k, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=inter % bk == 0, num_warps=warps,
        )
        return out
    cfg = dict(config or sorted_config(n, e))
    bm = cfg["BLOCK_M"]
    sorted_ids, block_expert, num_post = align_by_expert(topk_ids, e, bm)
    blocks = sorted_ids.numel() // bm
    ieee = x.dtype == torch.float32
    # gate/up: two accumulators per program, so half the column tile of the down GEMM
    gu = {**cfg, "BLOCK_N": max(16, cfg["BLOCK_N"] // 2)}
    _grouped_gemm_kernel[(blocks * triton.cdiv(inter, gu["BLOCK_N"]),)](
        x, w13, h, sorted_ids, block_expert, num_post, wts, inter, hidden, n, blocks,
        x.stride(0), w13.stride(0), w13.stride(1), h.stride(0),
        A_ROW_DIV=top_k, GATE_UP=True, MUL_WEIGHT=False, IEEE=ieee, **gu,
    )
    y = torch.empty((n, hidden), dtype=x.dtype, device=x.device)
    _grouped_gemm_kernel[(blocks * triton.cdiv(hidden, cfg["BLOCK_N"]),)](
        h, w2, y, sorted_ids, block_expert, num_post, wts, hidden, inter, n, blocks,
        h.stride(0), w2.stride(0), w2.stride(1), y.stride(0),
        A_ROW_DIV=1, GATE_UP=False, MUL_WEIGHT=True, IEEE=ieee, **cfg,
    )
    return y.view(t, top_k, hidden).sum(1)  # accumulates in fp32, one rounding


def reference_moe(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """The oracle, in fp32: sum_j w_j * down(silu(gate(x)) * up(x)) of each token's experts."""
    xf = x.float()
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    inter = w13.shape[1] // 2
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            gu = w13[e].float() @ xf[t]
            h = torch.nn.functional.silu(gu[:inter]) * gu[inter:]
            out[t] += float(topk_weights[t, j]) * (w2[e].float() @ h)
    return out
