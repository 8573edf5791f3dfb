"""Pure-PyTorch paged attention: runs on any device and is the oracle for the GPU kernels.

Decodes (query length 1) are gathered into one padded batch and run as a single SDPA call;
prefill chunks run one sequence at a time with an explicit causal mask offset by the cached
context. Padding exists only inside this function (for keys); the model never sees it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvserve.attention.base import AttentionBackend, AttentionMetadata, write_kv_cache


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
    ) -> torch.Tensor:
        write_kv_cache(k, v, kv_cache, metadata.slot_mapping, metadata.has_padding)
        plan = _plan(metadata, kv_cache.device, sliding_window is not None)
        out = torch.empty_like(q)
        if plan.decode_rows is not None:
            out[plan.decode_rows] = _decode(
                q[plan.decode_rows], kv_cache, plan, scale, sliding_window
            )
        for row0, row1, ctx_len, seq_idx in plan.prefills:
            out[row0:row1] = _prefill_one(
                q[row0:row1], k[row0:row1], v[row0:row1], kv_cache, metadata,
                seq_idx, ctx_len, scale, sliding_window,
            )
        return out


class _Plan:
    """Per-step index tensors shared by every layer (built on the first layer's call)."""

    __slots__ = (
        "decode_rows", "decode_tables", "decode_len", "decode_mask", "decode_pos",
        "decode_head_idx", "prefills",
    )

    def __init__(self) -> None:
        self.decode_rows: torch.Tensor | None = None  # [B] query rows of the decodes
        self.decode_tables: torch.Tensor | None = None  # [B, nblk] block ids
        self.decode_len = 0  # longest decode context
        # [B, maxL] True = key is valid; None when no key needs masking (a single sequence).
        self.decode_mask: torch.Tensor | None = None
        self.decode_pos: torch.Tensor | None = None  # [B] position of each decode query
        # [B, Hkv, maxL] row of each (sequence, KV head, position) in the cache viewed as
        # [slots * Hkv, D]: one gather yields keys already in [B, Hkv, L, D] order.
        self.decode_head_idx: torch.Tensor | None = None
        self.prefills: list[tuple[int, int, int, int]] = []  # (row0, row1, ctx_len, seq)


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
        plan.decode_tables = md.block_tables[seq_idx, :nblk].long()  # [B, nblk]
        plan.decode_len = max_len
        if len(dec_seqs) > 1 or sliding:
            seq_lens = md.seq_lens.to(device)[seq_idx].long()  # [B]
            pos = torch.arange(max_len, device=device)  # [maxL]
            plan.decode_mask = pos[None, :] < seq_lens[:, None]  # [B, maxL]
            plan.decode_pos = seq_lens - 1
    md.backend_cache["torch_ref"] = plan
    return plan


def _decode(
    q: torch.Tensor,  # [B, Hq, D]
    kv_cache: torch.Tensor,
    plan: _Plan,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    hkv, d = kv_cache.shape[3:]
    b = plan.decode_tables.shape[0]
    mask = plan.decode_mask
    if mask is None:  # one sequence, every key valid: gather whole blocks and trim
        keys = kv_cache[0][plan.decode_tables].view(b, -1, hkv, d)[:, : plan.decode_len]  # [1, L, Hkv, D]
        vals = kv_cache[1][plan.decode_tables].view(b, -1, hkv, d)[:, : plan.decode_len]
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2).to(keys.dtype),  # [1, Hq, 1, D]
            keys.transpose(1, 2), vals.transpose(1, 2),  # [1, Hkv, L, D]
            scale=scale,
            enable_gqa=q.shape[1] != hkv,
        )
        return out.squeeze(2).to(q.dtype)  # [1, Hq, D]
    if sliding_window is not None:
        pos = torch.arange(mask.shape[1], device=mask.device)
        mask = mask & (pos[None, :] > plan.decode_pos[:, None] - sliding_window)
    if plan.decode_head_idx is None:
        bs = kv_cache.shape[2]
        pos = torch.arange(plan.decode_len, device=q.device)
        slots = plan.decode_tables[:, pos // bs] * bs + pos % bs  # [B, L]
        slots = torch.where(plan.decode_mask, slots, 0)
        heads = torch.arange(hkv, device=q.device)
        plan.decode_head_idx = slots[:, None, :] * hkv + heads[None, :, None]  # [B, Hkv, L]
    keys = kv_cache[0].view(-1, d)[plan.decode_head_idx]  # [B, Hkv, L, D]
    vals = kv_cache[1].view(-1, d)[plan.decode_head_idx]
    # Several sequences: CPU SDPA with a padding mask and one query row is many times slower
    # than two batched GEMVs, so do them directly, grouping the query heads of each KV head.
    group = q.shape[1] // hkv
    qg = q.to(keys.dtype).view(b, hkv, group, d)  # [B, Hkv, G, D]
    scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * scale  # [B, Hkv, G, L]
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(vals.dtype)
    out = torch.matmul(probs, vals)  # [B, Hkv, G, D]
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
    gqa = q.shape[1] != k.shape[1]
    if ctx_len == 0 and sliding_window is None:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        qpos = torch.arange(ctx_len, total, device=q.device)[:, None]  # [ql, 1]
        kpos = torch.arange(total, device=q.device)[None, :]  # [1, L]
        mask = kpos <= qpos
        if sliding_window is not None:
            mask = mask & (kpos > qpos - sliding_window)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(0, 1)  # [ql, Hq, D]
