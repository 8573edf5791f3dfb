"""TritonBackend: the GPU implementation of the attention seam.

Per layer call: one launch writes the new K/V into the cache, then
- pure-decode batches: the split-K decode kernel (+ its reduce when the context is split); with
  speculative verify rows grouped by request (`metadata.verify_groups`), the verify kernel
  (`verify.py`: each K/V tile read once for all of a request's rows), except in layers with a
  sliding window or sinks;
- batches with prefill chunks: the varlen prefill kernel; decode rows of a mixed batch go to the
  decode kernel (`route_decodes=True`, the default: it splits long contexts across programs,
  which the prefill kernel cannot) and the prefill kernel skips them. Measured on an H200 with
  Llama-3.1-8B shapes: 2 x 1024-token prefills + 64 decodes at 1k-8k took 746-799 us routed
  against 953-1041 us through the prefill kernel alone; 512-token chunk + 128 decodes at 4k,
  717-782 against 1055.

No host syncs: every launch parameter comes from metadata's host-side ints and lists, and the
per-step plan (split count, scratch buffers) is built once and kept in
`metadata.backend_cache["triton"]`. Pure-decode steps therefore capture into CUDA graphs; the
split count chosen while capturing ignores the context lengths, so replays at other lengths
stay correct.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from kvserve.attention.base import AttentionBackend, AttentionMetadata
from kvserve.attention.triton.decode import alloc_partials, choose_num_splits, decode_attention
from kvserve.attention.triton.kv_write import write_kv_cache_triton
from kvserve.attention.triton.prefill import prefill_attention
from kvserve.attention.triton.verify import verify_decode_attention

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The verify kernel's query tile is (k + 1) x the query heads of a KV head; above this many rows
# (or head_dim above 128) its accumulators would spill (sm_90 compile), so the rows go one by one.
_VERIFY_MAX_QUERY_ROWS = 64


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # only reached under TRITON_INTERPRET on the CPU
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@dataclass
class _StepPlan:
    num_decodes: int  # sequences with query length 1
    num_prefills: int  # sequences with query length > 1
    num_splits: int
    # Verify-row groups (`AttentionMetadata.verify_groups`): splits planned for the groups.
    grouped_splits: int = 0
    # Decode scratch keyed by (num_heads, head_dim, splits): shared by all layers of the step,
    # which run one after another on the stream.
    partials: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(
        default_factory=dict
    )


class TritonBackend(AttentionBackend):
    name = "triton"
    # The model's fused RoPE kernel may store the step's k and v itself (models/triton_ops.py
    # `rope_qk_(kv_cache=...)`) and then call forward(..., kv_written=True).
    fuses_kv_write = True

    def __init__(self, route_decodes: bool = True, decode_waves: float = 2.0) -> None:
        self.route_decodes = route_decodes
        self.decode_waves = decode_waves

    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        out: torch.Tensor | None = None,  # [T, num_heads, head_dim], optional destination
        kv_written: bool = False,  # the caller already stored k and v at the slot mapping
        sinks: torch.Tensor | None = None,  # [num_heads] sink logits (gpt-oss)
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        self._check(q, kv_cache, metadata, sliding_window)
        if not kv_written:
            write_kv_cache_triton(k, v, kv_cache, metadata.slot_mapping)
        if q.stride(2) != 1:
            q = q.contiguous()
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        num_seqs = metadata.num_seqs
        if num_seqs == 0 or q.shape[0] == 0:
            return out
        plan = self._plan(metadata, q, kv_cache)
        if (metadata.is_pure_decode and metadata.verify_groups is not None and plan.grouped_splits
                and sliding_window is None and sinks is None):
            verify_decode_attention(
                q, kv_cache, out, metadata.block_tables, metadata.seq_lens, metadata.query_start_loc,
                metadata.verify_groups, metadata.verify_width, num_seqs, scale, plan.grouped_splits,
                partials=self._partials(plan, q, num_seqs, plan.grouped_splits),
            )
            return out
        use_decode = metadata.is_pure_decode or (self.route_decodes and plan.num_decodes > 0)
        mixed = not metadata.is_pure_decode
        if use_decode:
            decode_attention(
                q, kv_cache, out, metadata.block_tables, metadata.seq_lens,
                metadata.query_start_loc, num_seqs, scale, plan.num_splits,
                sliding_window=sliding_window, mixed=mixed,
                partials=self._partials(plan, q, num_seqs, plan.num_splits), sinks=sinks,
            )
        if not metadata.is_pure_decode and (plan.num_prefills > 0 or not use_decode):
            prefill_attention(
                q, kv_cache, out, metadata.block_tables, metadata.seq_lens,
                metadata.query_start_loc, num_seqs, scale,
                sliding_window=sliding_window, skip_decodes=use_decode, sinks=sinks,
            )
        return out

    def _plan(self, md: AttentionMetadata, q: torch.Tensor, kv_cache: torch.Tensor) -> _StepPlan:
        plan = md.backend_cache.get(self.name)
        if plan is not None:
            return plan
        qsl = md.query_start_loc_cpu
        num_decodes = sum(1 for i in range(md.num_seqs) if qsl[i + 1] - qsl[i] == 1)
        num_prefills = sum(1 for i in range(md.num_seqs) if qsl[i + 1] - qsl[i] > 1)
        # While a CUDA graph is being captured the split count must not depend on this step's
        # context lengths (replays see other lengths); eagerly it may, to skip empty splits.
        capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
        num_splits = choose_num_splits(
            num_decodes if not md.is_pure_decode else md.num_seqs,
            kv_cache.shape[3],
            _num_sms(q.device),
            None if capturing else md.max_seq_len,
            waves=self.decode_waves,
        )
        plan = _StepPlan(num_decodes=num_decodes, num_prefills=num_prefills, num_splits=num_splits)
        group = q.shape[1] // kv_cache.shape[3]
        if (md.is_pure_decode and md.verify_groups is not None and md.verify_width > 1
                and md.verify_width * group <= _VERIFY_MAX_QUERY_ROWS and q.shape[2] <= 128):
            # At most one group per verify_width rows while capturing (each request a full
            # verify step); eagerly the same count, so an eager step matches a replay.
            plan.grouped_splits = choose_num_splits(
                -(-md.num_seqs // md.verify_width), kv_cache.shape[3], _num_sms(q.device),
                None if capturing else md.max_seq_len, waves=self.decode_waves,
            )
        md.backend_cache[self.name] = plan
        return plan

    @staticmethod
    def _partials(
        plan: _StepPlan, q: torch.Tensor, num_seqs: int, num_splits: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        if num_splits == 1:
            return None
        key = (q.shape[1], q.shape[2], num_splits)
        if key not in plan.partials:
            plan.partials[key] = alloc_partials(num_seqs, key[0], num_splits, key[1], q.device)
        return plan.partials[key]

    @staticmethod
    def _check(
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        md: AttentionMetadata,
        sliding_window: int | None,
    ) -> None:
        head_dim = q.shape[2]
        if head_dim < 16 or head_dim & (head_dim - 1):
            raise NotImplementedError(
                f"TritonBackend supports power-of-two head_dim >= 16, got {head_dim}"
            )
        if md.block_size & (md.block_size - 1):
            raise NotImplementedError(
                f"TritonBackend supports power-of-two block sizes, got {md.block_size}"
            )
        if q.dtype not in _SUPPORTED_DTYPES or kv_cache.dtype != q.dtype:
            raise ValueError(
                f"q and kv_cache must share one dtype of {_SUPPORTED_DTYPES}, "
                f"got q {q.dtype}, kv_cache {kv_cache.dtype}"
            )
        if not kv_cache.is_contiguous():
            raise ValueError("kv_cache must be contiguous")
        if q.shape[1] % kv_cache.shape[3]:
            raise ValueError(
                f"num_heads ({q.shape[1]}) must be a multiple of num_kv_heads "
                f"({kv_cache.shape[3]})"
            )
        if md.is_pure_decode and q.shape[0] != md.num_seqs:
            raise ValueError(
                f"a pure-decode batch has one query row per sequence: got {q.shape[0]} rows "
                f"for {md.num_seqs} sequences"
            )
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
