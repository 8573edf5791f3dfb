"""Pure-PyTorch paged attention: runs on any device and is the oracle for the GPU kernels.

Decodes (query length 1) run together: with a bf16 cache on a CPU that has AVX512-BF16, one
call of the C kernel in `kvserve/csrc/decode_attn_bf16.c` reads keys and values in place
through the block tables; otherwise the sequences' blocks are gathered whole and attention
runs as one SDPA call (a single sequence) or batched matmuls with a padding mask. Prefill
chunks run one sequence at a time with an explicit causal mask offset by the cached context.
Padding exists only inside this module (for keys); the model never sees it.

Attention sinks (gpt-oss: one logit per query head added to each row's softmax denominator)
take the explicit-matmul paths: decodes through the grouped batched matmuls, prefill chunks
through `_attend_sinks` (query rows in slices of 256, so the fp32 scores stay bounded); SDPA and
the C kernel have no sink term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvserve.attention.base import AttentionBackend, AttentionMetadata, write_kv_cache
from kvserve.models import cpu_kernels


class TorchRefBackend(AttentionBackend):
    name = "torch"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        kv_written: bool = False,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        plan = _plan(metadata, kv_cache.device, sliding_window is not None)
        if plan.all_decode and sinks is None and _use_kernel(q, kv_cache, plan):
            # CPU bf16 decode: K/V write and attention in one C call
            return cpu_kernels.decode_attention(
                q, kv_cache, plan.decode_tables_i32, plan.decode_lens_i32, scale, sliding_window,
                new_kv=None if kv_written else (k, v, metadata.slot_mapping),
            )
        if not kv_written:
            write_kv_cache(k, v, kv_cache, metadata.slot_mapping, metadata.has_padding)
        if plan.all_decode:  # every row is a decode, in order: no row scatter needed
            return _decode(q, kv_cache, plan, scale, sliding_window, sinks)
        out = torch.empty_like(q)
        if plan.decode_rows is not None:
            out[plan.decode_rows] = _decode(
                q[plan.decode_rows], kv_cache, plan, scale, sliding_window, sinks
            )
        for row0, row1, ctx_len, seq_idx in plan.prefills:
            out[row0:row1] = _prefill_one(
                q[row0:row1], k[row0:row1], v[row0:row1], kv_cache, metadata,
                seq_idx, ctx_len, scale, sliding_window, sinks,
            )
        return out


class _Plan:
    """Per-step index tensors shared by every layer (built on the first layer's call)."""

    __slots__ = (
        "decode_rows", "decode_tables", "decode_len", "decode_mask", "decode_pos",
        "prefills", "all_decode", "decode_tables_i32", "decode_lens_i32", "decode_seq_lens",
    )

    def __init__(self) -> None:
        self.decode_rows: torch.Tensor | None = None  # [B] query rows of the decodes
        self.decode_tables: torch.Tensor | None = None  # [B * nblk] block ids, row-major
        self.decode_len = 0  # longest decode context
        # [B, maxL] True = key is valid; None when no key needs masking (a single sequence).
        self.decode_mask: torch.Tensor | None = None
        self.decode_pos: torch.Tensor | None = None  # [B] position of each decode query
        self.prefills: list[tuple[int, int, int, int]] = []  # (row0, row1, ctx_len, seq)
        self.all_decode = False  # the step's rows are exactly the decodes, in order
        # For the C kernel (bf16 cache on CPU): [B, nblk] int32 block tables, [B] int32 lengths.
        self.decode_tables_i32: torch.Tensor | None = None
        self.decode_lens_i32: torch.Tensor | None = None
        self.decode_seq_lens: torch.Tensor | None = None  # [B] their context lengths


def _plan(md: AttentionMetadata, device: torch.device, sliding: bool) -> _Plan:
    cached = md.backend_cache.get("torch_ref")
    if cached is not None:
        return cached
    plan = _Plan()
    qsl, lens, bs = md.query_start_loc_cpu, md.seq_lens_cpu, md.block_size
    dec_rows: list[int] = []
    dec_seqs: list[int] = []
    for i in range(md.num_seqs):
        ql = qsl[i + 1] - qsl[i]
        if ql == 1 and lens[i] > 1:
            dec_rows.append(qsl[i])
            dec_seqs.append(i)
        elif ql > 0:
            plan.prefills.append((qsl[i], qsl[i + 1], lens[i] - ql, i))
    if dec_rows:
        max_len = max(lens[i] for i in dec_seqs)
        nblk = (max_len + bs - 1) // bs
        seq_idx = torch.tensor(dec_seqs, device=device)
        plan.decode_rows = torch.tensor(dec_rows, device=device)
        plan.decode_tables = md.block_tables[seq_idx, :nblk].long().reshape(-1)  # [B * nblk]
        plan.all_decode = not plan.prefills and dec_rows == list(range(qsl[-1]))
        if device.type == "cpu":
            plan.decode_tables_i32 = md.block_tables[seq_idx, :nblk].to(torch.int32).contiguous()
            plan.decode_lens_i32 = torch.tensor([lens[i] for i in dec_seqs], dtype=torch.int32)
        plan.decode_len = max_len
        plan.decode_seq_lens = md.seq_lens.to(device)[seq_idx].long()  # [B]
        if len(dec_seqs) > 1 or sliding:
            plan.decode_mask = _decode_mask(plan)
    md.backend_cache["torch_ref"] = plan
    return plan


def _decode_mask(plan: _Plan) -> torch.Tensor:
    """[B, maxL] True where a decode's key is inside its sequence; sets `decode_pos`."""
    seq_lens = plan.decode_seq_lens
    pos = torch.arange(plan.decode_len, device=seq_lens.device)  # [maxL]
    plan.decode_pos = seq_lens - 1
    return pos[None, :] < seq_lens[:, None]


def _use_kernel(q: torch.Tensor, kv_cache: torch.Tensor, plan: _Plan) -> bool:
    """The C decode kernel applies: bf16 cache and queries on a CPU with AVX512-BF16."""
    return (
        plan.decode_tables_i32 is not None
        and kv_cache.dtype == torch.bfloat16
        and q.dtype == torch.bfloat16
        and kv_cache.shape[-1] <= 128
        and kv_cache.is_contiguous()
        and cpu_kernels.attention_available()
    )


def _decode(
    q: torch.Tensor,  # [B, Hq, D]
    kv_cache: torch.Tensor,
    plan: _Plan,
    scale: float,
    sliding_window: int | None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query row per sequence. The sequences' blocks are gathered whole (one contiguous
    block_size * Hkv * D copy each, for K and V at once), then attention runs as batched
    matmuls; keys past a sequence's length are masked."""
    hkv, d = kv_cache.shape[3:]
    b = q.shape[0]
    if sinks is None and _use_kernel(q, kv_cache, plan):
        return cpu_kernels.decode_attention(
            q, kv_cache, plan.decode_tables_i32, plan.decode_lens_i32, scale, sliding_window
        )
    # [2, B * nblk, bs, Hkv, D] -> [2, B, nblk * bs, Hkv, D], trimmed to the longest context
    kv = kv_cache.index_select(1, plan.decode_tables).view(2, b, -1, hkv, d)[:, :, : plan.decode_len]
    mask = plan.decode_mask
    if mask is None and (sinks is not None or sliding_window is not None and sliding_window < plan.decode_len):
        # One sequence whose plan was built by a layer without a window (Gemma 3 interleaves
        # global and sliding layers): this layer still masks the keys before its window.
        mask = _decode_mask(plan)
    if mask is None:  # one sequence, every key valid
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2).to(kv.dtype),  # [1, Hq, 1, D]
            kv[0].transpose(1, 2), kv[1].transpose(1, 2),  # [1, Hkv, L, D]
            scale=scale,
            enable_gqa=q.shape[1] != hkv,
        )
        return out.squeeze(2).to(q.dtype)  # [1, Hq, D]
    if sliding_window is not None:
        pos = torch.arange(mask.shape[1], device=mask.device)
        mask = mask & (pos[None, :] > plan.decode_pos[:, None] - sliding_window)
    kv = kv.transpose(2, 3).contiguous()  # [2, B, Hkv, L, D]
    # Several sequences: CPU SDPA with a padding mask and one query row is many times slower
    # than two batched GEMVs, so do them directly, grouping the query heads of each KV head.
    group = q.shape[1] // hkv
    qg = q.to(kv.dtype).view(b, hkv, group, d)  # [B, Hkv, G, D]
    scores = torch.matmul(qg, kv[0].transpose(-1, -2)).float() * scale  # [B, Hkv, G, L]
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    if sinks is None:
        probs = torch.softmax(scores, dim=-1).to(kv.dtype)
    else:
        probs = _softmax_with_sink(scores, sinks.view(1, hkv, group, 1)).to(kv.dtype)
    out = torch.matmul(probs, kv[1])  # [B, Hkv, G, D]
    return out.reshape(b, hkv * group, d).to(q.dtype)  # [B, Hq, D]


def _prefill_one(
    q: torch.Tensor,  # [ql, Hq, D]
    k: torch.Tensor,  # [ql, Hkv, D]
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    md: AttentionMetadata,
    seq: int,
    ctx_len: int,
    scale: float,
    sliding_window: int | None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    ql = q.shape[0]
    total = ctx_len + ql
    if ctx_len == 0:
        keys, vals = k, v  # nothing cached before this chunk: use the fresh K/V directly
    else:
        bs = md.block_size
        nblk = (total + bs - 1) // bs
        blocks = md.block_tables[seq, :nblk].long()
        keys = kv_cache[0, blocks].reshape(-1, *kv_cache.shape[3:])[:total]  # [L, Hkv, D]
        vals = kv_cache[1, blocks].reshape(-1, *kv_cache.shape[3:])[:total]
    qh = q.transpose(0, 1)  # [Hq, ql, D]
    kh = keys.transpose(0, 1).to(q.dtype)  # [Hkv, L, D]
    vh = vals.transpose(0, 1).to(q.dtype)
    if sinks is not None:
        return _attend_sinks(qh, kh, vh, ctx_len, scale, sliding_window, sinks)
    gqa = q.shape[1] != k.shape[1]
    # 4-D inputs (a batch of one): on CPU, SDPA with 3-D inputs and enable_gqa takes the math
    # path (scores materialized, 2-3x slower at 512 tokens); 4-D takes the flash kernel, as HF's
    # SDPA attention does.
    qh, kh, vh = qh[None], kh[None], vh[None]
    if ctx_len == 0 and sliding_window is None:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        qpos = torch.arange(ctx_len, total, device=q.device)[:, None]  # [ql, 1]
        kpos = torch.arange(total, device=q.device)[None, :]  # [1, L]
        mask = kpos <= qpos
        if sliding_window is not None:
            mask = mask & (kpos > qpos - sliding_window)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out[0].transpose(0, 1)  # [ql, Hq, D]


def _softmax_with_sink(scores: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """softmax over [scores, sink] along the last dim, the sink's column dropped (fp32)."""
    combined = torch.cat([scores, sink.float().expand(*scores.shape[:-1], 1)], dim=-1)
    combined = combined - combined.amax(dim=-1, keepdim=True)
    return torch.softmax(combined, dim=-1)[..., :-1]


def _attend_sinks(
    qh: torch.Tensor,  # [Hq, ql, D]
    kh: torch.Tensor,  # [Hkv, L, D]
    vh: torch.Tensor,  # [Hkv, L, D]
    ctx_len: int,
    scale: float,
    sliding_window: int | None,
    sinks: torch.Tensor,  # [Hq]
    rows_per_slice: int = 256,
) -> torch.Tensor:  # [ql, Hq, D]
    """Causal attention of one chunk with a sink logit per head: explicit grouped matmuls, the
    query rows in slices so the [Hq, rows, L] fp32 scores stay small."""
    hq, ql, d = qh.shape
    hkv, total = kh.shape[0], kh.shape[1]
    group = hq // hkv
    out = torch.empty(ql, hq, d, dtype=qh.dtype, device=qh.device)
    kpos = torch.arange(total, device=qh.device)[None, :]  # [1, L]
    sink = sinks.view(hkv, group, 1, 1)
    for r0 in range(0, ql, rows_per_slice):
        r1 = min(r0 + rows_per_slice, ql)
        qg = qh[:, r0:r1].reshape(hkv, group, r1 - r0, d)  # [Hkv, G, rows, D]
        scores = torch.matmul(qg, kh[:, None].transpose(-1, -2)).float() * scale  # [Hkv, G, rows, L]
        qpos = torch.arange(ctx_len + r0, ctx_len + r1, device=qh.device)[:, None]  # [rows, 1]
        mask = kpos <= qpos
        if sliding_window is not None:
            mask = mask & (kpos > qpos - sliding_window)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = _softmax_with_sink(scores, sink).to(vh.dtype)
        o = torch.matmul(probs, vh[:, None])  # [Hkv, G, rows, D]
        out[r0:r1] = o.reshape(hq, r1 - r0, d).transpose(0, 1).to(qh.dtype)
    return out
