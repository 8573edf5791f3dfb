"""Compile every Triton kernel variant the engine's steps use, at start-up.

Triton compiles a kernel the first time it meets a new combination of its compile-time
arguments (about a second each on an H100/H200 with an empty cache). The kernels mark their
per-step integers and staging-buffer pointers as unspecialized (see `attention/triton/`), so
what remains is a short, fixed list of variants: prefill with and without decode rows routed
elsewhere, decode in mixed and pure-decode batches, each with one split or several (and the
split-merging reduce), plus the fused norm / RoPE / SiLU kernels. A few tiny eager forwards
over dummy metadata reach all of them; without this the first real workload paid for each
compile inside its own steps (a 256-request run took 25 s instead of 7.6 s on a fresh machine).

The dummy steps write nothing into the KV cache (every slot is -1) and their outputs are
discarded; they read block 0 of the cache, whatever it holds.
"""

from __future__ import annotations

import logging
import time

import torch

from kvserve.attention.base import AttentionMetadata

logger = logging.getLogger(__name__)


def _metadata(
    q_lens: list[int], seq_lens: list[int], block_size: int, device: torch.device, pure_decode: bool
) -> tuple[AttentionMetadata, int]:
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    num_tokens = qsl[-1]
    width = max(-(-s // block_size) for s in seq_lens)
    md = AttentionMetadata(
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.zeros(len(q_lens), width, dtype=torch.int32, device=device),
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=device),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=list(seq_lens),
        block_size=block_size,
        is_pure_decode=pure_decode,
        has_padding=True,  # slot -1 everywhere: nothing is written to the cache
    )
    return md, num_tokens


def warm_up_steps(block_size: int, max_model_len: int) -> list[tuple[list[int], list[int], bool]]:
    """(query lengths, sequence lengths, pure decode) of the dummy steps. Split counts follow
    from `choose_num_splits`: a context of <= 64 tokens (one key tile) always gets one split, a
    few sequences with a longer one get several."""
    long_ctx = max(2, min(300, max_model_len))
    short = max(2, min(48, max_model_len))
    chunk = max(2, min(2 * block_size + 3, max_model_len))
    return [
        ([chunk, short], [chunk, min(max_model_len, short + block_size)], False),  # prefills only
        ([short, 1, 1], [short, long_ctx, long_ctx], False),  # mixed, split decodes
        ([short, 1], [short, short], False),  # mixed, one-split decode
        ([1, 1], [long_ctx, long_ctx], True),  # eager pure decode, split
        ([1, 1], [short, short], True),  # eager pure decode, one split
        ([1], [long_ctx], True),  # one row: the GEMV path of the linears (platform/cuda_linear.py)
    ]


@torch.inference_mode()
def warm_up_kernels(
    model: torch.nn.Module,
    kv_caches: list[torch.Tensor],
    block_size: int,
    max_model_len: int,
    device: torch.device,
) -> float:
    """Run the dummy steps; returns the seconds taken (mostly Triton compiles on a cold cache)."""
    t0 = time.perf_counter()
    for q_lens, seq_lens, pure in warm_up_steps(block_size, max_model_len):
        md, num_tokens = _metadata(q_lens, seq_lens, block_size, device, pure)
        ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
        positions = torch.cat([
            torch.arange(s - q, s, dtype=torch.int64, device=device) for q, s in zip(q_lens, seq_lens)
        ])
        hidden = model(ids, positions, kv_caches, md)  # [T, hidden]
        model.compute_logits(hidden[md.query_start_loc[1:].long() - 1])
    torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    logger.info("warmed up the GPU kernels in %.1fs", dt)
    return dt
