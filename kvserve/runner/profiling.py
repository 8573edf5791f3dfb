"""How much GPU memory the KV cache may take.

After the weights are loaded, one forward pass over the step's full token budget
(`max_num_batched_tokens`, as prefill sequences) measures the peak memory of activations; the
logits and sampling of `max_num_seqs` rows are measured with it. The KV cache then gets

    gpu_memory_utilization * total - (weights + peak activations + non-torch memory + graphs)

where non-torch memory is what the CUDA context, libraries and other processes hold, and
"graphs" estimates the decode CUDA graphs' private pool (captured after the KV cache exists).
"""

from __future__ import annotations

import logging

import torch

from kvserve.attention.base import AttentionMetadata
from kvserve.core.config import ModelConfig
from kvserve.core.sampling_params import SamplingParams
from kvserve.runner.sampler import Sampler, SamplingBatch

logger = logging.getLogger(__name__)

GiB = 1 << 30


@torch.inference_mode()
def profile_peak_activations(
    model: torch.nn.Module,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    num_tokens: int,
    max_model_len: int,
    max_num_seqs: int,
    block_size: int,
) -> int:
    """Peak bytes allocated above the weights by the largest step: a forward of `num_tokens`
    prompt tokens plus logits and sampling of `max_num_seqs` rows."""
    seq_len = max(1, min(num_tokens, max_model_len))
    lens = [seq_len] * (num_tokens // seq_len) + ([num_tokens % seq_len] if num_tokens % seq_len else [])
    blocks = [-(-n // block_size) for n in lens]
    nb = sum(blocks)
    # One layer's worth of cache, shared by every layer: the forward reads and writes it like
    # the real cache, without holding memory the KV cache is about to take.
    cache = torch.zeros(2, nb, block_size, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=device)
    width = max(blocks)
    tables = torch.zeros(len(lens), width, dtype=torch.int32)
    first = 0
    for i, b in enumerate(blocks):
        tables[i, :b] = torch.arange(first, first + b, dtype=torch.int32)
        first += b
    qsl = [0]
    for n in lens:
        qsl.append(qsl[-1] + n)
    positions = torch.cat([torch.arange(n) for n in lens])
    slots = torch.cat([tables[i].long()[torch.arange(n) // block_size] * block_size + torch.arange(n) % block_size
                       for i, n in enumerate(lens)])
    md = AttentionMetadata(
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        block_tables=tables.to(device),
        slot_mapping=slots.to(device),
        max_query_len=max(lens),
        max_seq_len=max(lens),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=list(lens),
        block_size=block_size,
    )
    ids = torch.randint(0, cfg.vocab_size, (num_tokens,), device=device)
    idx = _index(device)
    torch.cuda.synchronize(idx)
    torch.cuda.reset_peak_memory_stats(idx)
    base = torch.cuda.memory_allocated(idx)
    hidden = model(ids, positions.to(device), [cache] * cfg.num_layers, md)  # [T, H]
    rows = min(max_num_seqs, num_tokens)
    logits = model.compute_logits(hidden[:rows])  # [rows, V]
    # Random sampling with top-k/top-p is the sampler's most memory-hungry path.
    params = [SamplingParams(temperature=1.0, top_p=0.95, top_k=50)] * rows
    Sampler(torch.Generator(device=device))(logits, SamplingBatch.from_lists(params, [[0]] * rows, [[]] * rows))
    torch.cuda.synchronize(idx)
    peak = torch.cuda.max_memory_allocated(idx) - base
    del hidden, logits, cache, md
    torch.cuda.empty_cache()
    return peak


def cuda_kv_budget(
    gpu_memory_utilization: float,
    peak_activations: int = 2 * GiB,
    graph_reserve: int = 0,
    device: torch.device | None = None,
) -> int:
    """Bytes left for KV blocks (see the module docstring). Call after weights are loaded."""
    idx = _index(device)
    torch.cuda.synchronize(idx)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(idx)
    weights = torch.cuda.memory_allocated(idx)
    non_torch = max(0, total - free - torch.cuda.memory_reserved(idx))
    budget = int(total * gpu_memory_utilization) - weights - peak_activations - non_torch - graph_reserve
    logger.info(
        "GPU memory: %.2f GiB total x %.2f; weights %.2f GiB, peak activations %.2f GiB, "
        "non-torch %.2f GiB, CUDA graphs (est.) %.2f GiB -> KV cache %.2f GiB",
        total / GiB, gpu_memory_utilization, weights / GiB, peak_activations / GiB,
        non_torch / GiB, graph_reserve / GiB, max(budget, 0) / GiB,
    )
    if budget <= 0:
        raise ValueError(
            f"no GPU memory left for the KV cache: weights {weights / GiB:.1f} GiB + activations "
            f"{peak_activations / GiB:.1f} GiB + other {non_torch / GiB:.1f} GiB of "
            f"{total / GiB:.1f} GiB with gpu_memory_utilization={gpu_memory_utilization}"
        )
    return budget


def _index(device: torch.device | None) -> int:
    if device is None or device.index is None:
        return torch.cuda.current_device()
    return device.index


def graph_pool_estimate(peak_activations: int, num_tokens: int, max_graph_bs: int, vocab_size: int) -> int:
    """Rough size of the decode graphs' shared pool: the activations of the largest graph's
    batch (scaled from the profiled peak) plus its fp32 logits."""
    if max_graph_bs <= 0:
        return 0
    return int(peak_activations * min(1.0, max_graph_bs / max(num_tokens, 1))) + max_graph_bs * vocab_size * 4
