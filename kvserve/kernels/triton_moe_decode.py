"""The fused MoE decode path (the default, `KVSERVE_MOE_DECODE=fused`; `torch` selects the
routing as torch ops and the `triton_moe` pairs kernels instead): a sparse layer of a decode
step in three Triton launches after the router projection, every one of them a programmatic
dependent launch (`models/pdl.py`), instead of five torch ops for the routing and the two
`triton_moe` pairs kernels launched the ordinary way.

    route:    logits [T, E] -> softmax in fp32, top-k, optional renormalization -> weights [T, k]
              (model dtype), ids [T, k] (int64): one program per token (`route`)
    gate/up:  one program per (pair, BLOCK_N rows of the expert's width): silu(gate) * up, as the
              pairs path's first kernel, its K loop unrolled (K is a compile-time constant)
    down:     one program per (token, BLOCK_N output columns): a [k, BLOCK_N, BLOCK_K] tile of
              all k selected experts per step, the routing weights applied and the k products
              summed in the epilogue (fp32, one rounding), so no [T, k, H] intermediate and no
              separate combine

Ordering (PDL): the router projection, the route kernel and the gate/up kernel each wait for the
kernel before them before reading anything. The gate/up kernel lets the down kernel launch only
*after* its own wait returned (`gdc_wait` then `gdc_launch_dependents`, the reverse of
`pdl.wait`), i.e. once the route kernel has finished: so the down kernel may read the routing
(ids, weights) and request its first `PRE` weight tiles before its wait, while the gate/up kernel
still streams, and waits only before it reads the gate/up output. Without PDL (`KVSERVE_PDL=0`,
pre-Hopper) the same code runs in plain stream order.

`KVSERVE_MOE_DECODE=fused-router` (opt-in: slower than "fused" on an H100, 2026-12-07, Qwen3-30B-A3B
at full depth 3.676 against 2.977 ms/token) goes one step further for
decode batches of up to `NORM_ROUTE_MAX_ROWS` rows without tensor parallelism: the layer's
post-attention add-and-RMSNorm, its router projection and the routing are ONE launch
(`norm_route`) instead of three (`_rmsnorm_kernel`, the router GEMV, `route`):

    norm_route: one program per (token, BLOCK_E router rows), ONE warp (every reduction is warp
              shuffles): the router rows are requested before the PDL wait; each program adds
              the residual and normalizes the row itself (a few KB from L2; program 0 stores the
              normalized row and the new residual), computes its BLOCK_E logits (rounded to the
              model dtype, as the GEMV's output is) and stores them; the LAST program of the row
              to arrive (an int32 counter per row: CTA barrier, then an acq_rel atomic at GPU
              scope, whose SASS is MEMBAR.GPU + ATOMG.STRONG.GPU + CCTL.IVALL) reads the row's
              logits back and routes as `route` does, each pick one max-reduction of an int64 key
              (probability bits above the reversed id: the same picks, ties to the lower id), then
              sends the picked experts' first `PREFETCH_ROWS` gate and up rows to L2 (one
              `cp.async.bulk.prefetch.L2` each, sm_90+: DRAM would otherwise idle until the gate/up
              kernel has waited for this one and loaded the picks) and sets the counter back to 0

Per Qwen3-30B-A3B sparse layer at batch 1 that is norm_route, gate/up, down: 3 launches for what
the default does in 5 (norm, router GEMV, route, gate/up, down), each kernel boundary being a
full PDL wait on the chain. Compiled for sm_90 (Triton 3.9): 214 registers (one warp, 64
programs: no occupancy question), 24 16-byte loads before the wait, ~1,000 instructions for the
norm and dot products and ~400 for the last program's routing (`tests/gpu/moe_sass.py`).

`KVSERVE_MOE_DECODE=fused-chain` (opt-in) also gives the down kernel the next layer's input
add-and-RMSNorm (or the model's final norm): `fused_moe_decode(next_norm=...)`; the row's last
down program to arrive (a second arrival counter, the same ordering) reads the row back, adds
the residual and normalizes, and returns (norm(out + residual), out + residual) for the next
layer, which then skips its own norm kernel (`models/moe.py`): 7 launches a layer. The default
down kernel (NEXT_NORM off) compiles to the same machine code as before (72 registers and 712
instructions with Triton 3.9); with it, 76 and 944.

`KVSERVE_MOE_DECODE_TILES=BN,BK,W/BN,BK,W,PRE` (read when the CUDA ops are built) replaces
`gate_up_config` / `down_config` for A/B runs. From the sm_90 SASS (Triton 3.9, Qwen3-30B-A3B, one
token): gate/up (4, 512, 4) = 1536 programs of 4 warps, 86 registers, 16 weight loads of 16
bytes per thread of which ptxas issues 8 before the first FMA and 8 after (a second DRAM round
trip per program; the lent GPUs' Triton 3.6 issued all 16 first, per the issue-20q notes);
(4, 1024, 8) and (2, 1024, 4) issue all 8 of theirs first at 48 registers. Down (2, 256, 4, 3) =
1024 programs, 72 registers, all 12 weight loads before the PDL wait, but every program also
reads its token's 8 x 768 gate/up outputs from L2 (12 KB, half the bytes of its weights: 12.6 MB
of L2 reads a layer); (4, 256, 8, 3) streams the same 96 weights per thread at 72 registers with
half those reads. `gpu_moe_bench --only sweep-decode` times these.

Results: the same math as `triton_moe.fused_moe`'s pairs path and `SparseMoE`'s torch routing
(softmax in fp32, the k largest probabilities, ties to the lower expert id, renormalized in fp32,
rounded once to the model dtype); sums in a different order, so bf16 outputs can differ by
rounding. `KVSERVE_MOE_DECODE` is read by the CUDA platform's ops when an engine is built
(`platform/cuda_moe.moe_decode_mode`).

Measured (NVIDIA H200, torch 2.11, triton 3.6, 2026-12-07; `benchmarks/gpu_moe_bench.py`): the
routing 1.8-2.0 µs as one launch against 16.8-23.3 µs as torch ops; engine batch-1 decode with
CUDA graphs 0.750 against 1.086 ms/token at Qwen3-30B-A3B shapes (12 of 48 layers; 60.5% against
41.7% of the 0.453 ms floor) and 0.944 against 1.250 at gpt-oss-20b shapes (bf16 experts, 8 of 24
layers; 77.0% against 58.2%). The engine takes these kernels only where the pairs path would run
(`triton_moe.use_pairs`): at 8 and 16 tokens the sorted path is faster (gpt-oss-20b shapes, 8
tokens: 233.2 against 288.9 µs a layer).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvserve.kernels.triton_moe import _silu_mul
from kvserve.models import pdl


# -- routing -----------------------------------------------------------------------------------
@triton.jit
def _route_kernel(
    logits_ptr,  # [T, E]
    wts_ptr,  # [T, TOP_K] out, model dtype
    ids_ptr,  # [T, TOP_K] out, int64
    E,
    stride_l,
    TOP_K: tl.constexpr,
    K_PAD: tl.constexpr,
    E_PAD: tl.constexpr,
    RENORM: tl.constexpr,
    PDL: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, E_PAD)
    ok = experts < E
    slots = tl.arange(0, K_PAD)
    pdl.wait(PDL)
    z = tl.load(logits_ptr + t * stride_l + experts, mask=ok, other=-float("inf")).to(tl.float32)
    p = tl.exp(z - tl.max(z, 0))
    p = p / tl.sum(p, 0)  # torch.softmax(logits, -1, dtype=float)
    p = tl.where(ok, p, -1.0)  # probabilities are >= 0: padding is never picked
    w = tl.zeros([K_PAD], dtype=tl.float32)
    ids = tl.zeros([K_PAD], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        m = tl.max(p, 0)
        i = tl.min(tl.where(p == m, experts, E_PAD), 0)  # ties: the lower expert id
        w = tl.where(slots == j, m, w)
        ids = tl.where(slots == j, i, ids)
        p = tl.where(experts == i, -1.0, p)
    if RENORM:
        w = w / tl.sum(w, 0)  # slots past TOP_K hold 0
    out = t * TOP_K + slots
    tl.store(wts_ptr + out, w.to(wts_ptr.dtype.element_ty), mask=slots < TOP_K)
    tl.store(ids_ptr + out, ids.to(tl.int64), mask=slots < TOP_K)


def route(logits: torch.Tensor, top_k: int, renorm: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] in `dtype`, ids [T, k] int64) of router logits [T, E]: the torch chain of
    `Ops.route_experts` (softmax, topk, renormalize, cast) in one launch."""
    t, e = logits.shape
    if not 1 <= top_k <= e:
        raise ValueError(f"top_k must be in [1, {e}] (got {top_k})")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    wts = torch.empty((t, top_k), dtype=dtype, device=logits.device)
    ids = torch.empty((t, top_k), dtype=torch.long, device=logits.device)
    if t == 0:
        return wts, ids
    e_pad = triton.next_power_of_2(e)
    use_pdl = pdl.enabled(logits.device)
    _route_kernel[(t,)](
        logits, wts, ids, e, logits.stride(0),
        TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), E_PAD=e_pad, RENORM=renorm, PDL=use_pdl,
        num_warps=1 if e_pad <= 256 else 4, launch_pdl=use_pdl,
    )
    return wts, ids


# -- RMSNorm + router projection + routing in one launch (KVSERVE_MOE_DECODE=fused-router) -------
# Rows a `norm_route` call may have (its arrival counters are allocated once, per layer).
NORM_ROUTE_MAX_ROWS = 16


@triton.jit
def _topk_packed(p, experts, slots, TOP_K: tl.constexpr, E_PAD: tl.constexpr):
    """(weights [K_PAD] fp32, ids [K_PAD] int32) of the TOP_K largest of `p` [E_PAD] (padding
    holds -1, real entries >= 0), ties to the lower id: `_route_kernel`'s picks and weights, one
    max-reduction per pick instead of two (the probability's bits above the reversed id in one
    int64 key: non-negative floats order as their bits)."""
    key = (p.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (E_PAD - 1 - experts).to(tl.int64)
    key = tl.where(p >= 0, key, -1)
    w = tl.zeros(slots.shape, dtype=tl.float32)
    ids = tl.zeros(slots.shape, dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(key, 0)
        i = (E_PAD - 1 - (best & 0xFFFFFFFF)).to(tl.int32)
        w = tl.where(slots == j, (best >> 32).to(tl.int32).to(tl.float32, bitcast=True), w)
        ids = tl.where(slots == j, i, ids)
        key = tl.where(experts == i, -1, key)
    return w, ids


@triton.jit
def _norm_route_kernel(
    x_ptr,  # [T, H]: the attention block's output
    res_ptr,  # [T, H]: the residual stream
    nw_ptr,  # [H]: the post-attention RMSNorm weight
    h_ptr,  # [T, H] out: norm(x + res)
    res_out_ptr,  # [T, H] out: x + res
    rw_ptr,  # [E, H]: the router
    logits_ptr,  # [T, E_PAD] scratch (model dtype)
    count_ptr,  # [T] int32 arrival counters, 0 between calls
    wts_ptr,  # [T, TOP_K] out, model dtype
    ids_ptr,  # [T, TOP_K] out, int64
    E,
    stride_x,
    stride_r,
    stride_h,
    stride_ro,
    stride_rw,
    eps,
    H: tl.constexpr,
    H_PAD: tl.constexpr,
    BLOCK_E: tl.constexpr,
    TOP_K: tl.constexpr,
    K_PAD: tl.constexpr,
    E_PAD: tl.constexpr,
    RENORM: tl.constexpr,
    PDL: tl.constexpr,
    w13_ptr=None,  # PREFETCH: [E, 2I, H] the experts' gate/up weights
    stride_we=0,
    up_offset=0,  # PREFETCH: elements from an expert's first gate row to its first up row
    PREFETCH: tl.constexpr = 0,  # bytes of each picked expert's first gate and up rows sent to L2
):
    t = tl.program_id(0).to(tl.int64)
    pb = tl.program_id(1)
    cols = tl.arange(0, H_PAD)
    col_ok = cols < H
    experts = pb * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = experts < E
    # Weights before the wait: no kernel of the step writes them.
    w = tl.load(rw_ptr + tl.where(e_ok, experts, 0).to(tl.int64)[:, None] * stride_rw + cols[None, :],
                mask=col_ok[None, :], other=0.0)
    nw = tl.load(nw_ptr + cols, mask=col_ok, other=0.0)
    pdl.wait(PDL)
    # `_rmsnorm_kernel` with the residual, step for step (every program computes it; program 0 stores it).
    x = tl.load(x_ptr + t * stride_x + cols, mask=col_ok, other=0.0)
    r = tl.load(res_ptr + t * stride_r + cols, mask=col_ok, other=0.0)
    dt = h_ptr.dtype.element_ty
    x = (x.to(tl.float32) + r.to(tl.float32)).to(dt)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, 0) / H
    normed = (xf * (1.0 / tl.sqrt_rn(var + eps))).to(dt)
    hn = (nw.to(tl.float32) * normed.to(tl.float32)).to(dt)
    if pb == 0:
        tl.store(res_out_ptr + t * stride_ro + cols, x, mask=col_ok)
        tl.store(h_ptr + t * stride_h + cols, hn, mask=col_ok)
    # This program's router rows (rounded to the model dtype, as the router GEMV's output is).
    logit = tl.sum(w.to(tl.float32) * hn.to(tl.float32)[None, :], 1).to(dt)
    tl.store(logits_ptr + t * E_PAD + experts, logit, mask=e_ok)
    # The last program of the row to arrive routes it: every thread's store is issued before the
    # barrier, the release-acquire counter orders them before that program's loads.
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr + t, 1, sem="acq_rel", scope="gpu")
    if arrived == tl.num_programs(1) - 1:
        every = tl.arange(0, E_PAD)
        ok = every < E
        slots = tl.arange(0, K_PAD)
        z = tl.load(logits_ptr + t * E_PAD + every, mask=ok, other=-float("inf"), cache_modifier=".cg").to(tl.float32)
        p = tl.exp(z - tl.max(z, 0))
        p = p / tl.sum(p, 0)
        p = tl.where(ok, p, -1.0)
        wk, ids = _topk_packed(p, every, slots, TOP_K, E_PAD)
        if RENORM:
            wk = wk / tl.sum(wk, 0)
        out = t * TOP_K + slots
        tl.store(wts_ptr + out, wk.to(wts_ptr.dtype.element_ty), mask=slots < TOP_K)
        tl.store(ids_ptr + out, ids.to(tl.int64), mask=slots < TOP_K)
        if PREFETCH > 0:
            # The gate/up kernel can read the picks only after this kernel ends and then its own
            # load of them: DRAM idles meanwhile. Send the first rows the gate/up kernel's first
            # programs read (gate and up rows of each picked expert) to L2 now (one bulk prefetch
            # each, no registers, nothing waits for it). Slots past TOP_K repeat slot 0's expert.
            e = tl.where(slots < TOP_K, ids, tl.sum(tl.where(slots == 0, ids, 0), 0)).to(tl.int64)
            half = tl.arange(0, 2)
            base = w13_ptr + e[:, None] * stride_we + half[None, :] * up_offset  # [K_PAD, 2]
            tl.inline_asm_elementwise(
                "cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,r",
                [base, tl.full(base.shape, PREFETCH, tl.int32)], dtype=tl.int32, is_pure=False, pack=1,
            )
        tl.store(count_ptr + t, 0)  # ready for the next call (stream order: the next one waits for this one)


# Rows of each picked expert's gate and of its up half that `norm_route` sends to L2 (96 rows of
# Qwen3-30B-A3B = 384 KB each, 6 MB for 8 experts: ~1.4 µs of DRAM time at 4.4 TB/s, about the
# time from the picks to the gate/up kernel's first weight loads). 0 turns the prefetch off.
PREFETCH_ROWS = 96


def l2_prefetch_bytes(w13: torch.Tensor, x: torch.Tensor) -> int:
    """Bytes per bulk L2 prefetch (`cp.async.bulk.prefetch.L2`: sm_90+, 16-byte multiples and
    alignment) of `norm_route` for the gate/up stack `w13`, or 0 where it does not apply (no
    CUDA, pre-Hopper, a layout it cannot cover with one range per half)."""
    if (PREFETCH_ROWS <= 0 or not x.is_cuda or w13.device != x.device or w13.stride(2) != 1
            or w13.stride(1) != w13.shape[2] or torch.cuda.get_device_capability(x.device)[0] < 9):
        return 0
    size = min(PREFETCH_ROWS, w13.shape[1] // 2) * w13.stride(1) * w13.element_size()
    aligned = (w13.data_ptr() % 16 == 0 and (w13.stride(0) * w13.element_size()) % 16 == 0
               and ((w13.shape[1] // 2) * w13.stride(1) * w13.element_size()) % 16 == 0)
    return size if aligned and size % 16 == 0 and size < 2**31 else 0


def norm_route_config(experts: int, hidden: int) -> tuple[int, int]:
    """(BLOCK_E, num_warps): 2 router rows per program (the GEMV's tile: Qwen3-30B-A3B's 128
    experts are 64 programs) and ONE warp, so that every reduction (the norm, the dot products,
    the last program's softmax and picks) is warp shuffles, without shared memory or barriers
    (4 warps took 2104 sm_90 instructions against 1 warp's ~800); a warp streams the program's
    8 KB of router weights as 16 loads of 16 bytes per thread, all requested before the wait."""
    return 2, 1


def norm_route(
    x: torch.Tensor,  # [T, H]
    residual: torch.Tensor,  # [T, H]
    norm_weight: torch.Tensor,  # [H]
    eps: float,
    router: torch.Tensor,  # [E, H]
    top_k: int,
    renorm: bool,
    counts: torch.Tensor,  # int32 [>= T], zero: the kernel leaves them zero
    w13: torch.Tensor | None = None,  # [E, 2I, H]: the experts the ids index, for the L2 prefetch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual, weights [T, k] in x's dtype, ids [T, k] int64): the
    post-attention add-and-RMSNorm (`_rmsnorm_kernel`'s math), the router projection of its
    output and `route` in ONE launch. Each program recomputes the norm of the row (a few KB from
    L2) and computes BLOCK_E router rows; the last program of a row to finish (an arrival counter
    per row) routes it. The same math as the three kernels it replaces, the router's dot products
    summed in another order (so bf16 logits, and near-tied picks, can differ by rounding)."""
    t, hidden = x.shape
    e = router.shape[0]
    if not 1 <= top_k <= e:
        raise ValueError(f"top_k must be in [1, {e}] (got {top_k})")
    if t > counts.numel():
        raise ValueError(f"norm_route: {t} rows but {counts.numel()} arrival counters")
    if x.stride(1) != 1 or residual.stride(1) != 1 or router.stride(1) != 1:
        raise ValueError("norm_route needs x, residual and the router with contiguous last dimensions")
    h = torch.empty_like(x)
    res_out = torch.empty_like(x)
    wts = torch.empty((t, top_k), dtype=x.dtype, device=x.device)
    ids = torch.empty((t, top_k), dtype=torch.long, device=x.device)
    if t == 0:
        return h, res_out, wts, ids
    e_pad = triton.next_power_of_2(e)
    logits = torch.empty((t, e_pad), dtype=x.dtype, device=x.device)
    block_e, warps = norm_route_config(e, hidden)
    use_pdl = pdl.enabled(x.device)
    prefetch = l2_prefetch_bytes(w13, x) if w13 is not None else 0
    _norm_route_kernel[(t, triton.cdiv(e, block_e))](
        x, residual, norm_weight, h, res_out, router, logits, counts, wts, ids,
        e, x.stride(0), residual.stride(0), h.stride(0), res_out.stride(0), router.stride(0), eps,
        H=hidden, H_PAD=triton.next_power_of_2(hidden), BLOCK_E=block_e, TOP_K=top_k,
        K_PAD=triton.next_power_of_2(top_k), E_PAD=e_pad, RENORM=renorm, PDL=use_pdl,
        w13_ptr=w13 if prefetch else logits, stride_we=w13.stride(0) if prefetch else 0,
        up_offset=(w13.shape[1] // 2) * w13.stride(1) if prefetch else 0, PREFETCH=prefetch,
        num_warps=warps, launch_pdl=use_pdl,
    )
    return h, res_out, wts, ids


# -- experts -----------------------------------------------------------------------------------
@triton.jit
def _gate_up_kernel(
    x_ptr,  # [T, K]
    w_ptr,  # [E, 2N, K]: gate rows 0..N-1, up rows N..2N-1
    ids_ptr,  # [T * TOP_K]
    out_ptr,  # [T * TOP_K, N]: silu(gate) * up of each pair
    stride_x,
    stride_we,
    stride_wn,
    stride_o,
    N: tl.constexpr,
    K: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    pair = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_K)
    if PDL:
        # Wait first, then let the down kernel launch: it reads the routing before its own wait.
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    e = tl.load(ids_ptr + pair).to(tl.int64)
    # x in the weight tile's shape (every row the same address): loaded as 16-byte vectors straight
    # into the tile's layout, no shared-memory conversion (sm_90: 86 instead of 103 registers).
    x_row = x_ptr + (pair // TOP_K).to(tl.int64) * stride_x + (rows * 0)[:, None]
    # Rows past N (a ragged last tile) read row 0 instead: no mask, so every load is a full vector.
    wg = w_ptr + e * stride_we + tl.where(row_ok, rows, 0).to(tl.int64)[:, None] * stride_wn + cols[None, :]
    wu = wg + N * stride_wn
    acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in tl.static_range(0, K, BLOCK_K):  # unrolled: every tile's loads can be in flight
        if k0 + BLOCK_K <= K:
            x = tl.load(x_row + k0 + cols[None, :]).to(tl.float32)
            g = tl.load(wg + k0, eviction_policy="evict_first")
            u = tl.load(wu + k0, eviction_policy="evict_first")
        else:
            k_ok = k0 + cols < K
            x = tl.load(x_row + k0 + cols[None, :], mask=k_ok[None, :], other=0.0).to(tl.float32)
            g = tl.load(wg + k0, mask=k_ok[None, :], other=0.0, eviction_policy="evict_first")
            u = tl.load(wu + k0, mask=k_ok[None, :], other=0.0, eviction_policy="evict_first")
        acc_g += g.to(tl.float32) * x
        acc_u += u.to(tl.float32) * x
    dt = out_ptr.dtype.element_ty
    h = _silu_mul(tl.sum(acc_g, 1), tl.sum(acc_u, 1), dt)
    tl.store(out_ptr + pair.to(tl.int64) * stride_o + rows, h.to(dt), mask=row_ok)


@triton.jit
def _down_tile(w_base, k0: tl.constexpr, cols, slot_ok, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """The [K_PAD, BLOCK_N, BLOCK_K] weight tile at column k0 of the token's k experts."""
    if k0 + BLOCK_K <= K:
        return tl.load(w_base + k0, mask=slot_ok[:, None, None], other=0.0, eviction_policy="evict_first")
    k_ok = k0 + cols < K
    return tl.load(w_base + k0, mask=slot_ok[:, None, None] & k_ok[None, None, :], other=0.0,
                   eviction_policy="evict_first")


@triton.jit
def _down_step(acc, w, h_base, k0: tl.constexpr, cols, slot_ok, K: tl.constexpr, BLOCK_K: tl.constexpr):
    if k0 + BLOCK_K <= K:
        h = tl.load(h_base + k0, mask=slot_ok[:, None, None], other=0.0)
    else:
        h = tl.load(h_base + k0, mask=slot_ok[:, None, None] & (k0 + cols < K)[None, None, :], other=0.0)
    return acc + tl.sum(w.to(tl.float32) * h.to(tl.float32), 2)


@triton.jit
def _down_kernel(
    h_ptr,  # [T * TOP_K, K]
    w_ptr,  # [E, N, K]
    ids_ptr,  # [T * TOP_K]
    wts_ptr,  # [T * TOP_K]
    out_ptr,  # [T, N]
    res_ptr,  # NEXT_NORM: [T, N] the residual stream
    nw_ptr,  # NEXT_NORM: [N] the next RMSNorm's weight
    hn_ptr,  # NEXT_NORM: [T, N] out: norm(out + res)
    res_out_ptr,  # NEXT_NORM: [T, N] out: out + res
    count_ptr,  # NEXT_NORM: [T] int32 arrival counters, zero between calls
    stride_h,
    stride_we,
    stride_wn,
    stride_o,
    stride_r,
    stride_hn,
    stride_ro,
    eps,
    N: tl.constexpr,
    K: tl.constexpr,
    TOP_K: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRE: tl.constexpr,  # weight tiles (0-4) requested before the wait
    PDL: tl.constexpr,
    NEXT_NORM: tl.constexpr = False,  # also the next layer's add-and-RMSNorm (the row's last program)
    N_PAD: tl.constexpr = 1,  # NEXT_NORM: next_power_of_2(N)
):
    tok = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    slots = tl.arange(0, K_PAD)
    slot_ok = slots < TOP_K
    cols = tl.arange(0, BLOCK_K)
    pairs = tok * TOP_K + slots
    # The routing is final here (see the module docstring): read it, and the first weight tiles,
    # while the gate/up kernel still runs.
    e = tl.load(ids_ptr + pairs, mask=slot_ok, other=0).to(tl.int64)
    wt = tl.load(wts_ptr + pairs, mask=slot_ok, other=0.0).to(tl.float32)
    w_base = (w_ptr + e[:, None, None] * stride_we
              + tl.where(row_ok, rows, 0).to(tl.int64)[None, :, None] * stride_wn + cols[None, None, :])
    w0 = tl.zeros([K_PAD, BLOCK_N, BLOCK_K], dtype=w_ptr.dtype.element_ty)  # placeholders: never read
    w1 = w0
    w2 = w0
    w3 = w0
    if PRE > 0:
        w0 = _down_tile(w_base, 0, cols, slot_ok, K, BLOCK_K)
    if PRE > 1:
        w1 = _down_tile(w_base, BLOCK_K, cols, slot_ok, K, BLOCK_K)
    if PRE > 2:
        w2 = _down_tile(w_base, 2 * BLOCK_K, cols, slot_ok, K, BLOCK_K)
    if PRE > 3:
        w3 = _down_tile(w_base, 3 * BLOCK_K, cols, slot_ok, K, BLOCK_K)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    h_base = h_ptr + pairs[:, None, None] * stride_h + cols[None, None, :]
    acc = tl.zeros([K_PAD, BLOCK_N], dtype=tl.float32)
    for k0 in tl.static_range(0, K, BLOCK_K):
        if k0 < PRE * BLOCK_K:  # a preloaded tile (compile-time choice: k0 is a constant)
            if k0 == 0:
                w = w0
            elif k0 == BLOCK_K:
                w = w1
            elif k0 == 2 * BLOCK_K:
                w = w2
            else:
                w = w3
        else:
            w = _down_tile(w_base, k0, cols, slot_ok, K, BLOCK_K)
        acc = _down_step(acc, w, h_base, k0, cols, slot_ok, K, BLOCK_K)
    out = tl.sum(wt[:, None] * acc, 0)  # the routing weights and the top-k sum, in fp32
    tl.store(out_ptr + tok * stride_o + rows, out.to(out_ptr.dtype.element_ty), mask=row_ok)
    if NEXT_NORM:
        # The row's last program to arrive does `_rmsnorm_kernel` with the residual on the whole
        # row (the ordering as in `_norm_route_kernel`).
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + tok, 1, sem="acq_rel", scope="gpu")
        if arrived == tl.num_programs(1) - 1:
            dt = hn_ptr.dtype.element_ty
            c = tl.arange(0, N_PAD)
            ok = c < N
            y = tl.load(out_ptr + tok * stride_o + c, mask=ok, other=0.0, cache_modifier=".cg")
            r = tl.load(res_ptr + tok * stride_r + c, mask=ok, other=0.0)
            nw = tl.load(nw_ptr + c, mask=ok, other=0.0)
            x = (y.to(tl.float32) + r.to(tl.float32)).to(dt)
            tl.store(res_out_ptr + tok * stride_ro + c, x, mask=ok)
            xf = x.to(tl.float32)
            var = tl.sum(xf * xf, 0) / N
            normed = (xf * (1.0 / tl.sqrt_rn(var + eps))).to(dt)
            tl.store(hn_ptr + tok * stride_hn + c, (nw.to(tl.float32) * normed.to(tl.float32)).to(dt), mask=ok)
            tl.store(count_ptr + tok, 0)  # ready for the next call


def gate_up_config(inter: int, hidden: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps): BLOCK_N gate and as many up rows, [BLOCK_N, BLOCK_K] per
    load = 16 bytes per thread per row at 4 warps and BLOCK_K 512 (bf16)."""
    return 4, min(512, triton.next_power_of_2(hidden)), 4


def down_config(hidden: int, inter: int, top_k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, PRE): a [k, 2, BLOCK_K] tile of ~4k weights per step (32 per
    thread at 4 warps: four 16-byte loads), and as many whole tiles requested before the wait as
    keep <= 192 weights per thread in flight (at most 4; `KVSERVE_PDL_PRELOAD` caps it).
    Qwen3-30B-A3B's down (k 8, width 768): 3 tiles of [8, 2, 256], all preloaded; compiled for
    sm_90 (`tests/gpu/moe_sass.py`) that is 96 registers with Triton 3.6 and 72 with 3.9, and
    every weight load issued before the first FMA; BLOCK_N 4 took 199 registers with 3.6 (two
    programs per SM)."""
    from kvserve.models.triton_ops import PRELOAD_TILES

    k_pad = triton.next_power_of_2(top_k)
    block_n, warps = 2, 4
    block_k = max(64, min(512, 2048 // k_pad, triton.next_power_of_2(inter)))
    per_tile = k_pad * block_n * block_k // (32 * warps)
    pre = min(PRELOAD_TILES, triton.cdiv(inter, block_k), max(1, 192 // per_tile))
    return block_n, block_k, warps, pre


def fused_moe_decode(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k]
    configs: tuple[tuple[int, int, int] | None, tuple[int, int, int, int] | None] | None = None,  # (gate/up, down)
    next_norm: tuple[torch.Tensor, torch.Tensor, float, torch.Tensor] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # [T, H]
    """The experts of the decode path: gate/up then down (routing weights and top-k sum inside).
    As `triton_moe.fused_moe(..., path="pairs")`: pairs that share an expert read it once each.
    `next_norm` = (residual [T, H], RMSNorm weight [H], eps, int32 arrival counters [>= T], zero):
    the down kernel's last program of each row also does the next layer's add-and-RMSNorm, and
    the result is (norm(out + residual), out + residual) instead of out (`KVSERVE_MOE_DECODE=fused-chain`)."""
    t, hidden = x.shape
    e, two_i, _ = w13.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    if t == 0:
        empty = x.new_empty((0, hidden))
        return empty if next_norm is None else (empty, x.new_empty((0, hidden)))
    if x.stride(1) != 1 or w13.stride(2) != 1 or w2.stride(2) != 1:
        raise ValueError("fused_moe_decode needs x, w13 and w2 with contiguous last dimensions")
    ids = topk_ids.reshape(-1).contiguous()
    wts = topk_weights.reshape(-1).contiguous()
    n = t * top_k
    h = torch.empty((n, inter), dtype=x.dtype, device=x.device)
    out = torch.empty((t, hidden), dtype=x.dtype, device=x.device)
    gu_cfg, down_cfg = configs or (None, None)  # None: the default of that kernel
    bn, bk, warps = gu_cfg or gate_up_config(inter, hidden)
    dbn, dbk, dwarps, pre = down_cfg or down_config(hidden, inter, top_k)
    pre = min(pre, triton.cdiv(inter, dbk))  # at most the tiles there are
    use_pdl = pdl.enabled(x.device)
    _gate_up_kernel[(n, triton.cdiv(inter, bn))](
        x, w13, ids, h, x.stride(0), w13.stride(0), w13.stride(1), h.stride(0),
        N=inter, K=hidden, TOP_K=top_k, BLOCK_N=bn, BLOCK_K=bk, PDL=use_pdl, num_warps=warps, launch_pdl=use_pdl,
    )
    if next_norm is None:
        res, nw, hn, res_out, counts, eps = out, out, out, out, ids, 0.0
    else:
        res, nw, eps, counts = next_norm
        if t > counts.numel() or res.shape != out.shape or res.stride(1) != 1:
            raise ValueError("fused_moe_decode: next_norm needs a [T, H] residual and >= T arrival counters")
        hn, res_out = torch.empty_like(out), torch.empty_like(out)
    _down_kernel[(t, triton.cdiv(hidden, dbn))](
        h, w2, ids, wts, out, res, nw, hn, res_out, counts,
        h.stride(0), w2.stride(0), w2.stride(1), out.stride(0), res.stride(0), hn.stride(0), res_out.stride(0), eps,
        N=hidden, K=inter, TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), BLOCK_N=dbn, BLOCK_K=dbk,
        PRE=pre, PDL=use_pdl, NEXT_NORM=next_norm is not None, N_PAD=triton.next_power_of_2(hidden),
        num_warps=dwarps, launch_pdl=use_pdl,
    )
    return out if next_norm is None else (hn, res_out)
