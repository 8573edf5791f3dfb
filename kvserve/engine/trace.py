"""Look inside one generation: per step, what one attention layer computes and what the KV
cache holds.

`trace_generation` drives an idle `LLMEngine` one `step()` at a time with a single greedy
request. For the chosen layer it swaps the attention module's `backend` for a
`RecordingBackend` that notes the shapes of Q, K and V at the seam and then calls the real
backend, so the model code is untouched and the numbers are those of the real forward pass.

Shapes are reported in the per-head layout `[batch, heads, tokens, head_dim]` (batch = 1, one
request), although the engine itself works on flat `[tokens, heads, head_dim]` batches.
FLOPs count each matmul as 2·m·n·k (one multiply and one add per term), for the dense shapes
as computed: masked (future) positions of a prefill's QKᵀ are counted too.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from kvserve.attention.base import AttentionBackend, AttentionMetadata
from kvserve.core.config import ModelConfig
from kvserve.core.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_TRACE_REQUEST_ID = "trace"


# -- FLOPs ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionFlops:
    """The five matmuls of one attention layer for one sequence's step.

    With `t` new tokens, context `s` (cached + new), hidden size `h`, `Hq` query heads,
    `Hkv` KV heads and head size `d`:
      q_proj = 2·t·h·(Hq·d)     k_proj = v_proj = 2·t·h·(Hkv·d)
      qk     = 2·Hq·t·s·d   (per query head: [t, d] @ [d, s])
      av     = 2·Hq·t·s·d   (per query head: softmax [t, s] @ V [s, d])
    The output projection (o_proj / c_proj) is not one of the five.
    """

    q_proj: int
    k_proj: int
    v_proj: int
    qk: int
    av: int

    @property
    def projections(self) -> int:
        return self.q_proj + self.k_proj + self.v_proj

    @property
    def scores(self) -> int:
        """QKᵀ + softmax·V: the part that grows with the context."""
        return self.qk + self.av

    @property
    def total(self) -> int:
        return self.projections + self.scores

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def attention_flops(
    hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, num_tokens: int, context_len: int
) -> AttentionFlops:
    t, s = num_tokens, context_len
    kv = 2 * t * hidden_size * num_kv_heads * head_dim
    return AttentionFlops(
        q_proj=2 * t * hidden_size * num_heads * head_dim,
        k_proj=kv,
        v_proj=kv,
        qk=2 * num_heads * t * s * head_dim,
        av=2 * num_heads * t * s * head_dim,
    )


def model_step_flops(cfg: ModelConfig, num_tokens: int, context_len: int, sampled_rows: int = 1) -> dict[str, int]:
    """Matmul FLOPs of a whole forward step of one sequence (all layers): the five attention
    matmuls, the output projection, the MLP and the LM head (only for sampled rows)."""
    t, h = num_tokens, cfg.hidden_size
    attn = attention_flops(h, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, t, context_len)
    o_proj = 2 * t * cfg.num_heads * cfg.head_dim * h
    # Llama, Gemma 3: gate and up ([h -> I] each) then down; GPT-2: fc then proj.
    mlp_mats = 2 if cfg.family == "gpt2" else 3
    mlp = 2 * t * h * cfg.intermediate_size * mlp_mats
    if cfg.family == "gpt_oss":  # each token runs its top-k experts (the router's product is small)
        mlp *= int(cfg.raw.get("num_experts_per_tok", 4))
    n = cfg.num_layers
    out = {
        "qkv_proj": n * attn.projections,
        "qk_av": n * attn.scores,
        "o_proj": n * o_proj,
        "mlp": n * mlp,
        "lm_head": 2 * sampled_rows * h * cfg.vocab_size,
    }
    out["total"] = sum(out.values())
    return out


# -- the recording seam --------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionCall:
    """What one layer's backend saw in one forward pass (flat layout, as the engine has it)."""

    q_shape: tuple[int, ...]  # [T, Hq, D]
    k_shape: tuple[int, ...]  # [T, Hkv, D]
    v_shape: tuple[int, ...]  # [T, Hkv, D]
    query_lens: tuple[int, ...]  # per sequence
    seq_lens: tuple[int, ...]  # per sequence: cached + new


class RecordingBackend(AttentionBackend):
    """Wraps a backend: reports each call's shapes to `on_call`, then runs the real backend."""

    def __init__(self, inner: AttentionBackend, on_call: Callable[[AttentionCall], None]) -> None:
        self.inner = inner
        self.name = inner.name  # backends key their per-step scratch space by name
        self.fuses_kv_write = inner.fuses_kv_write
        self.on_call = on_call

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
        qsl = metadata.query_start_loc_cpu
        self.on_call(AttentionCall(
            tuple(q.shape), tuple(k.shape), tuple(v.shape),
            tuple(qsl[i + 1] - qsl[i] for i in range(metadata.num_seqs)),
            tuple(metadata.seq_lens_cpu),
        ))
        if sinks is None:
            return self.inner.forward(q, k, v, kv_cache, metadata, scale, sliding_window, kv_written=kv_written)
        return self.inner.forward(q, k, v, kv_cache, metadata, scale, sliding_window, kv_written=kv_written, sinks=sinks)


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's attention modules in layer order: those holding an AttentionBackend."""
    return [m for m in model.modules() if isinstance(getattr(m, "backend", None), AttentionBackend)]


# -- the trace -----------------------------------------------------------------------------
@dataclass
class TraceStep:
    step: int
    stage: str  # "prefill" (several tokens, or the first) | "decode" (one token on a cache)
    tokens_computed: int
    first_position: int
    cached_before: int  # K/V already in the cache when the step began
    context_len: int  # cached_before + tokens_computed: keys each query may attend to
    # Per-head layout [batch, heads, tokens, head_dim].
    q: list[int]
    k_new: list[int]  # this step's K, computed from its tokens, then written to the cache
    v_new: list[int]
    k_cache: list[int]  # K that attention reads back from the cache (past + new)
    v_cache: list[int]
    scores: list[int]  # QKᵀ: [batch, query heads, tokens, context]
    flops: AttentionFlops
    kv_tokens: int  # tokens whose K/V the cache holds for this request
    kv_bytes: int  # their K/V bytes, all layers
    kv_blocks: int  # blocks in this request's block table
    kv_allocated_bytes: int  # those blocks' bytes, all layers
    pool_blocks_in_use: int
    pool_blocks_total: int
    step_time_s: float
    token_id: int | None = None  # the token sampled at the end of this step (None mid-prefill)
    token_text: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["flops"] = self.flops.to_dict()
        return d


@dataclass
class Trace:
    model: str
    architecture: str
    layer: int
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    device: str
    block_size: int
    kv_cache: bool
    prompt_token_ids: list[int]
    steps: list[TraceStep] = field(default_factory=list)

    @property
    def generated_token_ids(self) -> list[int]:
        return [s.token_id for s in self.steps if s.token_id is not None]

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "steps"}
        d["flops_note"] = (
            f"FLOPs are those of layer {self.layer}'s five attention matmuls for this step, "
            "2*m*n*k each (dense: a prefill's masked QK^T entries are counted)"
        )
        d["steps"] = [s.to_dict() for s in self.steps]
        return d


class _Tracer:
    """Installs a RecordingBackend on one layer for the duration of a `with` block."""

    def __init__(self, engine: Any, layer: int) -> None:
        mods = attention_modules(engine.runner.model)
        if not isinstance(layer, int) or not 0 <= layer < len(mods):
            raise ValueError(f"layer must be an integer in [0, {len(mods)}) (got {layer!r})")
        self.engine = engine
        self.module = mods[layer]
        self.calls: list[tuple[AttentionCall, list[int], int]] = []  # call, request blocks, pool in use
        self._original: AttentionBackend | None = None

    def __enter__(self) -> _Tracer:
        self._original = self.module.backend
        self.module.backend = RecordingBackend(self._original, self._on_call)
        # One engine step per recorded step: no step launched ahead (CUDA overlap) and no
        # CUDA-graph replays, which would bypass the recording backend.
        self._saved = (self.engine._overlap, self.engine.runner.graphs)
        self.engine._overlap, self.engine.runner.graphs = False, None
        return self

    def __exit__(self, *exc: object) -> None:
        self.module.backend = self._original
        self.engine._overlap, self.engine.runner.graphs = self._saved

    def _on_call(self, call: AttentionCall) -> None:
        # The scheduler allocated this step's blocks before the runner ran: snapshot them now,
        # before a finished request gives them back.
        kv = self.engine.scheduler.kv
        req = self.engine.scheduler.requests.get(_TRACE_REQUEST_ID)
        blocks = list(req.block_ids) if req is not None else []
        self.calls.append((call, blocks, kv.num_blocks - kv.num_free_blocks))


def trace_generation(
    engine: Any, prompt: str | list[int], steps: int = 4, layer: int = 0, warmup: bool = True
) -> Trace:
    """Run `steps` engine steps of one greedy request (EOS ignored) on an idle `LLMEngine` and
    record, per step, what layer `layer`'s attention computed and what the KV cache held.
    `warmup` first runs a throwaway request of the same length (other token ids, so it leaves
    nothing in the prefix cache the trace could hit), keeping one-time start-up costs out of
    the step times."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1 (got {steps!r})")
    if engine.has_unfinished_requests():
        raise ValueError("trace needs an idle engine (it has unfinished requests)")
    cfg: ModelConfig = engine.model_config
    kv_dtype = engine.runner.kv_caches[0].dtype
    elem = torch.empty((), dtype=kv_dtype).element_size()
    kv_bytes_per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * elem
    block_size = engine.cache_config.block_size
    _text, prompt_ids = engine.tokenize_prompt(prompt)
    trace = Trace(
        model=engine.model_name, architecture=cfg.architecture, layer=layer,
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, dtype=str(kv_dtype).removeprefix("torch."),
        device=str(engine.runner.device), block_size=block_size,
        kv_cache=engine.scheduler_config.enable_kv_cache, prompt_token_ids=list(prompt_ids),
    )
    if warmup:
        _warm_up(engine, [(t + 1) % cfg.vocab_size for t in prompt_ids])
    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    with _Tracer(engine, layer) as tracer:
        engine.add_request(_TRACE_REQUEST_ID, {"prompt_token_ids": prompt_ids}, params)
        try:
            for i in range(1, steps + 1):
                tracer.calls.clear()
                t0 = time.perf_counter()
                outs = engine.step()
                dt = time.perf_counter() - t0
                if not tracer.calls:
                    break  # nothing was scheduled: the request is done
                trace.steps.append(_make_step(i, tracer.calls[0], outs, dt, cfg, block_size, kv_bytes_per_token, engine))
                if not engine.has_unfinished_requests():
                    break
        finally:
            engine.abort_request(_TRACE_REQUEST_ID)
    logger.debug("traced %d steps of layer %d", len(trace.steps), layer)
    return trace


def _warm_up(engine: Any, prompt_ids: list[int]) -> None:
    rid = _TRACE_REQUEST_ID + "-warmup"
    engine.add_request(rid, {"prompt_token_ids": prompt_ids}, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    try:
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        engine.abort_request(rid)


def _make_step(
    index: int,
    record: tuple[AttentionCall, list[int], int],
    outs: list[Any],
    dt: float,
    cfg: ModelConfig,
    block_size: int,
    kv_bytes_per_token: int,
    engine: Any,
) -> TraceStep:
    call, blocks, pool_in_use = record
    if len(call.query_lens) != 1:
        raise RuntimeError(f"expected one sequence in the traced step, got {len(call.query_lens)}")
    t, s = call.query_lens[0], call.seq_lens[0]
    _, hq, d = call.q_shape
    _, hkv, _ = call.k_shape
    cached = s - t
    token_id = token_text = None
    for out in outs:
        if out.request_id == _TRACE_REQUEST_ID and out.outputs[0].delta_token_ids:
            token_id = out.outputs[0].delta_token_ids[-1]
            if engine.tokenizer is not None:
                token_text = engine.tokenizer.decode([token_id], skip_special_tokens=False)
    return TraceStep(
        step=index,
        stage="decode" if t == 1 and cached > 0 else "prefill",
        tokens_computed=t,
        first_position=cached,
        cached_before=cached,
        context_len=s,
        q=[1, hq, t, d],
        k_new=[1, hkv, t, d],
        v_new=[1, hkv, t, call.v_shape[2]],
        k_cache=[1, hkv, s, d],
        v_cache=[1, hkv, s, call.v_shape[2]],
        scores=[1, hq, t, s],
        flops=attention_flops(cfg.hidden_size, hq, hkv, d, t, s),
        kv_tokens=s,
        kv_bytes=s * kv_bytes_per_token,
        kv_blocks=len(blocks),
        kv_allocated_bytes=len(blocks) * block_size * kv_bytes_per_token,
        pool_blocks_in_use=pool_in_use,
        pool_blocks_total=engine.scheduler.kv.num_blocks,
        step_time_s=dt,
        token_id=token_id,
        token_text=token_text,
    )
