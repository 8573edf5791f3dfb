"""User-facing engine options, shared by `LLM(...)`, the CLI and the server."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from kvserve.core.config import normalize_dtype
from kvserve.loader.resolve import DEFAULT_MODEL

GiB = 1 << 30


@dataclass
class EngineArgs:
    """model: built-in name ('smollm2'), a local HF folder, a .gguf file, or an HF Hub id.
    dtype: 'auto' | 'float32' | 'bfloat16' | 'float16' (and short forms).
    device: 'auto' (CUDA when present) | 'cpu' | 'cuda' | 'cuda:N'.
    max_model_len: context window (prompt + output); default: the model's, capped by what the
        KV cache holds.
    max_num_seqs: most requests decoded together in one step.
    max_num_batched_tokens: token budget of one step (chunked prefill splits longer prompts).
    block_size: tokens per KV-cache block.
    kv_cache_memory: bytes of KV cache on CPU. Default: what `max_num_seqs` requests of
        `max_model_len` tokens can use, bounded by a fraction of the RAM available at start-up
        (`runner/cpu_memory.py`); its pages become resident only as blocks are first used.
    gpu_memory_utilization: fraction of GPU memory for weights + activations + KV cache.
    num_kv_blocks: fixed number of KV blocks (overrides the memory-based sizing; tests).
    enable_prefix_caching: share KV blocks of identical prompt prefixes.
    enable_chunked_prefill: split long prompts across steps, mixed with decodes.
    seed: seed of the shared generator used by unseeded random requests.
    attention_backend: 'auto' | 'torch' | 'triton'.
    enforce_eager: never capture CUDA graphs.
    load_format: 'auto' (read the checkpoint) | 'dummy' (random weights at the config's shapes).
    quantization: None (default): on the CPU a GGUF file's quantized blocks stay quantized; on
        CUDA they are dequantized to `dtype` (the bf16 kernels are still faster above batch 1).
        'gguf' keeps them quantized on CUDA too (Q8_0 / Q4_0 / Q4_1 / Q4_K repacked exactly into
        the GPU's int8 / int4 layouts); 'none' dequantizes them everywhere (the reference path);
        'q8_0' | 'q4_0' (CPU) quantize an HF checkpoint's projection weights into that GGML block
        format at load; 'int8' (per channel) | 'int4' (group 128, asymmetric) | 'fp8' (e4m3, per
        channel, compute capability 8.9+) do the same on CUDA (docs/gpu-quantization.md).
    tensor_parallel_size: split the model across this many ranks (one process per rank; NCCL on
        GPUs, one GPU per rank; gloo on CPU). Started by the engine on one machine, or by
        torchrun across machines (then WORLD_SIZE must equal it). See docs/architecture.md.
    enable_kv_cache: False recomputes every request's whole context at every step (the
        KV-cache ablation; identical outputs, for teaching and measurement). Implies no
        prefix caching.
    threads: CPU threads for PyTorch and kvserve's C kernels. Default: the cores not already
        busy at start-up (from the load average; at least 1), or `OMP_NUM_THREADS` when set;
        see `runner/cpu_threads.py`.
    async_scheduling: plan and launch the next decode step before the current step's sampled
        tokens are back on the host (its inputs come from the device), so the host's
        scheduling and input building overlap the GPU. None (default): on for CUDA, off on CPU
        (a CPU forward is synchronous: nothing to overlap). Falls back to waiting whenever a
        request needs it (new prompts, penalties, min_tokens, a request about to end by length).
    max_waiting_requests: server only (AsyncLLMEngine). While this many requests wait for
        admission, new ones are refused (HTTP 429 + Retry-After). None (default): no limit.
    max_queue_time: server only. A request not admitted within this many seconds is refused
        (HTTP 429 + Retry-After). None (default): no limit.
    step_time_budget: server only. Seconds one engine step should take at most: the token
        budget of a step is capped from measured step times, so long prompts prefill in chunks
        and aborts and new requests wait at most about one step. None (default): 0.5 on CPU,
        off on CUDA; 0: off.
    speculative_config: None, or a dict / JSON string in vLLM's shape, e.g.
        {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2,
        "prompt_lookup_max": 5} or {"method": "draft_model", "model": "<name>",
        "num_speculative_tokens": 4} (kvserve.spec_decode.SpeculativeConfig; docs/speculative.md).
    """

    model: str = DEFAULT_MODEL
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    seed: int = 0
    attention_backend: str = "auto"
    enforce_eager: bool = False
    tokenizer: str | None = None
    served_model_name: str | None = None
    load_format: str = "auto"
    enable_kv_cache: bool = True
    tensor_parallel_size: int = 1
    async_scheduling: bool | None = None
    quantization: str | None = None
    max_waiting_requests: int | None = None
    max_queue_time: float | None = None
    step_time_budget: float | None = None
    speculative_config: Any = None
    threads: int | None = None

    def __post_init__(self) -> None:
        normalize_dtype(self.dtype)
        for name in ("max_num_seqs", "block_size", "tensor_parallel_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1 (got {v!r})")
        for name in ("max_model_len", "max_num_batched_tokens", "kv_cache_memory", "num_kv_blocks", "threads"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None (got {v!r})")
        if self.max_waiting_requests is not None and (
            not isinstance(self.max_waiting_requests, int) or self.max_waiting_requests < 1
        ):
            raise ValueError(f"max_waiting_requests must be an integer >= 1 or None (got {self.max_waiting_requests!r})")
        for name in ("max_queue_time", "step_time_budget"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or v < 0 or (v == 0 and name == "max_queue_time")):
                low = "> 0" if name == "max_queue_time" else ">= 0"
                raise ValueError(f"{name} must be a finite number of seconds {low}, or None (got {v!r})")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two (got {self.block_size})")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1] (got {self.gpu_memory_utilization})")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy' (got {self.load_format!r})")
        if self.async_scheduling not in (None, True, False):
            raise ValueError(f"async_scheduling must be True, False or None (got {self.async_scheduling!r})")
        if self.quantization not in (None, "none", "gguf", "q8_0", "q4_0", "int8", "int4", "fp8"):
            raise ValueError(
                f"quantization must be None, 'none', 'gguf', 'q8_0', 'q4_0' (CPU), 'int8', 'int4' or 'fp8' (CUDA) "
                f"(got {self.quantization!r})"
            )
        from kvserve.spec_decode.config import SpeculativeConfig

        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention_backend must be 'auto', 'torch' or 'triton' (got {self.attention_backend!r})")

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> EngineArgs:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown}; known: {sorted(known)}")
        return cls(model=model, **kwargs)
