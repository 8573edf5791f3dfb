"""Peers run on the same requests: HF transformers (`generate` on padded batches, and
`generate_batch` where this transformers has it) and llama.cpp (llama-cpp-python, GGUF only).

A peer that fails to load or run is reported as `{"engine": ..., "error": ...}`; it never
stops the benchmark."""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any, Callable

from kvserve.bench.workloads import BenchRequest

if TYPE_CHECKING:
    import torch

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
    import torch  # here, not at import: the llama.cpp peer's memory figure must not carry torch

    if dtype in ("auto", ""):
        return torch.float32
    return getattr(torch, dtype)


def load_hf_model(model: str, dtype: str, device: str = "cpu", load_format: str = "auto"):
    """The same checkpoint as a dense transformers model in `dtype`."""
    import torch
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
        import torch

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
        import torch
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
    """llama.cpp through llama-cpp-python: one request at a time through `Llama.generate`, or
    all together through the low-level `llama_batch` API (`throughput_batched`)."""

    name = "llama.cpp"

    def __init__(self, model: str, n_ctx: int = 4096, n_threads: int | None = None, flash_attn: bool = True) -> None:
        from llama_cpp import Llama  # ImportError -> "not installed"

        from kvserve.loader.resolve import resolve_model

        resolved = resolve_model(model)
        if resolved.kind != "gguf":
            raise ValueError(f"llama.cpp needs a .gguf model (got a {resolved.kind} folder)")
        if n_threads is None:
            # The threads kvserve computes on (set by its engine: the idle cores by default), so
            # both run on the same footing; all cores made llama.cpp's spinning threads collapse
            # on a busy machine (3.8 tok/s in benchmarks/RESULTS.md, issue 22).
            import torch

            n_threads = torch.get_num_threads()
        self.n_threads = n_threads
        self.flash_attn = flash_attn
        self.llm = Llama(str(resolved.path), n_ctx=n_ctx, n_threads=self.n_threads, n_threads_batch=self.n_threads,
                         flash_attn=flash_attn, verbose=False)

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

    def throughput_batched(self, reqs: list[BenchRequest], *, kv_unified: bool = False,
                           n_batch: int = 2048, n_ubatch: int = 512) -> dict[str, Any]:
        """All requests decoded together through llama.cpp's low-level `llama_batch` API: one
        context with a sequence id per request (`n_seq_max` = len(reqs)); the prompts are
        prefilled packed into `n_batch`-token batches (logits only at each prompt's last
        token), then every step is one `llama_decode` carrying one token per live sequence;
        greedy argmax over each sequence's logits; a sequence stops at its own output length
        and its KV cells are freed. `kv_unified`: one KV buffer shared by all sequences
        (attention runs over the whole buffer, masked) or one slice per sequence (the
        default). Timed from the first prefill batch to the last token; the context is built
        before the clock starts and freed after it."""
        import llama_cpp as lc
        import numpy as np

        n = len(reqs)
        if not 1 <= n <= lc.llama_max_parallel_sequences():
            raise ValueError(f"throughput_batched takes 1..{lc.llama_max_parallel_sequences()} requests (got {n})")
        pad = 256  # llama.cpp rounds context sizes up to this
        per_seq = max(len(r.prompt) + r.output_len for r in reqs)
        if kv_unified:
            n_ctx = -(-sum(len(r.prompt) + r.output_len for r in reqs) // pad) * pad + pad
        else:  # each sequence gets n_ctx / n_seq_max cells
            n_ctx = n * (-(-per_seq // pad) * pad)
        params = lc.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = n_ctx, n_batch, min(n_ubatch, n_batch), n
        params.n_threads = params.n_threads_batch = self.n_threads
        params.flash_attn_type = (lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.flash_attn
                                  else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        params.kv_unified = kv_unified
        params.no_perf = True
        model = self.llm.model
        ctx = lc.llama_init_from_model(model, params)
        if not ctx:
            raise RuntimeError(f"llama_init_from_model failed (n_ctx {n_ctx}, n_seq_max {n})")
        n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
        batch = lc.llama_batch_init(max(n_batch, n), 0, 1)
        mem = lc.llama_get_memory(ctx)
        out: list[list[int]] = [[] for _ in reqs]

        def add(token: int, pos: int, seq: int, logits: bool) -> None:
            i = batch.n_tokens
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
            batch.seq_id[i][0] = seq
            batch.n_tokens = i + 1

        def decode() -> None:
            rc = lc.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc} (batch of {batch.n_tokens} tokens)")

        def argmax(i: int) -> int:  # i: the token's index in the batch just decoded
            return int(np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).argmax())

        try:
            t0 = time.perf_counter()
            batch.n_tokens = 0
            last: list[tuple[int, int]] = []  # (sequence, batch index) of prompt ends in this batch
            for s, r in enumerate(reqs):
                for pos, tok in enumerate(r.prompt):
                    if batch.n_tokens == n_batch:
                        decode()
                        for seq, i in last:
                            out[seq].append(argmax(i))
                        last, batch.n_tokens = [], 0
                    end = pos == len(r.prompt) - 1
                    if end:
                        last.append((s, batch.n_tokens))
                    add(tok, pos, s, end)
            decode()
            for seq, i in last:
                out[seq].append(argmax(i))
            live = [s for s in range(n) if len(out[s]) < reqs[s].output_len]
            for s in set(range(n)) - set(live):
                lc.llama_memory_seq_rm(mem, s, -1, -1)
            steps = 0
            while live:
                batch.n_tokens = 0
                for s in live:
                    add(out[s][-1], len(reqs[s].prompt) + len(out[s]) - 1, s, True)
                decode()
                steps += 1
                for j, s in enumerate(live):
                    out[s].append(argmax(j))
                done = [s for s in live if len(out[s]) >= reqs[s].output_len]
                for s in done:
                    lc.llama_memory_seq_rm(mem, s, -1, -1)
                live = [s for s in live if len(out[s]) < reqs[s].output_len]
            dt = time.perf_counter() - t0
        finally:
            lc.llama_batch_free(batch)
            lc.llama_free(ctx)
        tokens = sum(len(o) for o in out)
        self.last_batched_tokens = out
        return {"mode": f"llama_batch, {n} sequences, kv_unified={'on' if kv_unified else 'off'}", "duration_s": dt,
                "output_tokens": tokens, "output_tok_s": tokens / dt, "decode_steps": steps, "n_ctx": n_ctx}

    def prefill_s(self, prompt: list[int]) -> float:
        return self._run(prompt, 1)[0]

    def decode_ms_per_token(self, prompts: list[list[int]], new_tokens: int) -> float:
        if len(prompts) != 1:
            raise ValueError("llama-cpp-python decodes one sequence at a time")
        return self._run(prompts[0], new_tokens)[1] / max(1, new_tokens - 1) * 1e3
