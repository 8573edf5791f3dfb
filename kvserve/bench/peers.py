"""Peers run on the same requests: HF transformers (`generate` on padded batches, and
`generate_batch` where this transformers has it) and llama.cpp (llama-cpp-python, GGUF only).

A peer that fails to load or run is reported as `{"engine": ..., "error": ...}`; it never
stops the benchmark."""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import torch

from kvserve.bench.workloads import BenchRequest

logger = logging.getLogger(__name__)


def guarded(engine: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one peer measurement; any failure becomes an error row."""
    try:
        return {"engine": engine, **fn()}
    except ImportError as e:
        logger.warning("peer %s unavailable: %s", engine, e)
        return {"engine": engine, "error": f"not installed: {e}"}
    except Exception as e:  # noqa: BLE001 - a peer's bug must not end our run
        logger.warning("peer %s failed: %s: %s", engine, type(e).__name__, e)
        return {"engine": engine, "error": f"{type(e).__name__}: {e}"}


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype in ("auto", ""):
        return torch.float32
    return getattr(torch, dtype)


def load_hf_model(model: str, dtype: str, device: str = "cpu", load_format: str = "auto"):
    """The same checkpoint as a dense transformers model in `dtype`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kvserve.loader.resolve import resolve_model

    resolved = resolve_model(model)
    tdtype = _torch_dtype(dtype)
    if resolved.kind == "gguf":
        # transformers keeps GGUF weights quantized; for a dense baseline copy the dequantized
        # weights into a plain model of the same config.
        packed = AutoModelForCausalLM.from_pretrained(str(resolved.path.parent), gguf_file=resolved.path.name,
                                                      dtype=torch.float32)
        hf = AutoModelForCausalLM.from_config(packed.config, dtype=tdtype)
        hf.load_state_dict({k: v.to(tdtype) for k, v in packed.state_dict().items()}, strict=False)
        hf.tie_weights()
        del packed
    elif load_format == "dummy":
        hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(resolved.path)), dtype=tdtype)
    else:
        hf = AutoModelForCausalLM.from_pretrained(str(resolved.path), dtype=tdtype)
    dev = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
    return hf.to(dev).eval()


class HFPeer:
    name = "hf-transformers"

    def __init__(self, model: str, dtype: str, device: str = "cpu", load_format: str = "auto") -> None:
        self.model = load_hf_model(model, dtype, device, load_format)
        self.device = next(self.model.parameters()).device

    def _gen(self, batch: list[list[int]], new: int) -> None:
        width = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=self.device)
        with torch.inference_mode():
            self.model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                do_sample=False, pad_token_id=0, eos_token_id=None)

    def throughput(self, reqs: list[BenchRequest], batch_size: int) -> dict[str, Any]:
        """Left-padded `generate` batches (sorted by prompt length); as vLLM's `hf` backend, a
        batch decodes to its longest requested output and is credited only requested tokens."""
        self._gen([reqs[0].prompt[:8]], 2)  # warm-up
        order = sorted(range(len(reqs)), key=lambda i: len(reqs[i].prompt))
        t0 = time.perf_counter()
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            self._gen([reqs[i].prompt for i in idx], max(reqs[i].output_len for i in idx))
        dt = time.perf_counter() - t0
        out = sum(r.output_len for r in reqs)
        return {"mode": f"generate (batch {batch_size})", "duration_s": dt, "output_tokens": out, "output_tok_s": out / dt}

    def throughput_generate_batch(self, reqs: list[BenchRequest]) -> dict[str, Any]:
        """transformers' continuous-batching `generate_batch` (paged attention)."""
        if not hasattr(self.model, "generate_batch"):
            raise RuntimeError("this transformers has no generate_batch")
        from transformers import GenerationConfig

        max_out = max(r.output_len for r in reqs)
        cfg = GenerationConfig(max_new_tokens=max_out, do_sample=False, eos_token_id=-1, pad_token_id=0)
        kw: dict[str, Any] = {}
        try:  # size its paged cache to the workload (its default probes free memory, slowly on CPU)
            import inspect

            from transformers.generation.configuration_utils import ContinuousBatchingConfig

            fields = inspect.signature(ContinuousBatchingConfig).parameters
            page_field = next((f for f in ("page_size", "block_size") if f in fields), None)
            if page_field and "num_blocks" in fields:  # the fields differ between transformers releases
                page = 256
                blocks = sum(-(-(len(r.prompt) + max_out) // page) for r in reqs) + 4
                kw["continuous_batching_config"] = ContinuousBatchingConfig(**{page_field: page, "num_blocks": blocks})
        except ImportError:
            pass
        t0 = time.perf_counter()
        with torch.inference_mode():
            # generate_batch has one max_new_tokens for all: every request decodes max_out
            # tokens, and only the requested ones are credited (the same rule as `generate`).
            self.model.generate_batch([r.prompt for r in reqs], generation_config=cfg, progress_bar=False, **kw)
        dt = time.perf_counter() - t0
        out = sum(r.output_len for r in reqs)
        return {"mode": "generate_batch", "duration_s": dt, "output_tokens": out, "output_tok_s": out / dt}

    def prefill_s(self, prompt: list[int]) -> float:
        self._gen([prompt[:8]], 1)
        t0 = time.perf_counter()
        self._gen([prompt], 1)
        return time.perf_counter() - t0

    def decode_ms_per_token(self, prompts: list[list[int]], new_tokens: int) -> float:
        t0 = time.perf_counter()
        self._gen(prompts, 1)
        t1 = time.perf_counter()
        self._gen(prompts, new_tokens)
        t2 = time.perf_counter()
        return max(0.0, (t2 - t1) - (t1 - t0)) / max(1, new_tokens - 1) * 1e3


class LlamaCppPeer:
    """llama.cpp through llama-cpp-python: one request at a time (no batching in that API)."""

    name = "llama.cpp"

    def __init__(self, model: str, n_ctx: int = 4096) -> None:
        from llama_cpp import Llama  # ImportError -> "not installed"

        from kvserve.loader.resolve import resolve_model

        resolved = resolve_model(model)
        if resolved.kind != "gguf":
            raise ValueError(f"llama.cpp needs a .gguf model (got a {resolved.kind} folder)")
        self.llm = Llama(str(resolved.path), n_ctx=n_ctx, n_threads=os.cpu_count(), flash_attn=True, verbose=False)

    def _run(self, prompt: list[int], new: int) -> tuple[float, float]:
        self.llm.reset()
        t0 = time.perf_counter()
        t_first = t0
        n = 0
        for _ in self.llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            n += 1
            if n == 1:
                t_first = time.perf_counter()
            if n >= new:
                break
        return t_first - t0, time.perf_counter() - t_first

    def throughput(self, reqs: list[BenchRequest]) -> dict[str, Any]:
        t0 = time.perf_counter()
        for r in reqs:
            self._run(r.prompt, r.output_len)
        dt = time.perf_counter() - t0
        out = sum(r.output_len for r in reqs)
        return {"mode": "sequential", "duration_s": dt, "output_tokens": out, "output_tok_s": out / dt}

    def prefill_s(self, prompt: list[int]) -> float:
        return self._run(prompt, 1)[0]

    def decode_ms_per_token(self, prompts: list[list[int]], new_tokens: int) -> float:
        if len(prompts) != 1:
            raise ValueError("llama-cpp-python decodes one sequence at a time")
        return self._run(prompts[0], new_tokens)[1] / max(1, new_tokens - 1) * 1e3
