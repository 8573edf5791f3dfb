"""`kvserve trace "prompt"`: watch prefill and decode step by step — Q/K/V shapes of one layer,
its attention FLOPs, the KV cache filling up, and the time of each step."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the module imports torch: `kvserve --help` must not
    from kvserve.engine.trace import Trace, TraceStep


def register(sub: argparse._SubParsersAction) -> None:
    from kvserve.entrypoints.cli import add_engine_args

    p = sub.add_parser(
        "trace", help="show, step by step, the Q/K/V shapes, attention FLOPs and KV cache of one layer",
        description="Generate greedily for a prompt one engine step at a time and show, for one "
        "layer, the shapes of Q, K and V before and after the KV cache, the FLOPs of its five "
        "attention matmuls, the KV cache in use and the step time.",
    )
    p.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")
    p.add_argument("--steps", type=int, default=4, help="engine steps to run: 1 prefill + decodes (default: %(default)s)")
    p.add_argument("--layer", type=int, default=0, help="the layer to look into (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the trace as JSON")
    p.add_argument(
        "--no-kv-cache", action="store_true",
        help="the ablation: recompute the whole context at every step (each step is a prefill)",
    )
    add_engine_args(p)
    # One request: a small KV pool is enough (and much quicker to allocate than the default).
    p.set_defaults(func=run, max_num_seqs=1)


def run(args: argparse.Namespace) -> int:
    from kvserve.engine.trace import trace_generation
    from kvserve.entrypoints.cli import announce_loading, check_engine_args, engine_kwargs, load_llm

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1 (got {args.steps})")
    if args.tensor_parallel_size != 1:
        # The trace hooks one process's attention layers and switches its CUDA graphs off,
        # which the other ranks would not follow.
        raise ValueError("kvserve trace runs on one rank: --tensor-parallel-size must be 1")
    announce_loading(args.model)
    cfg = check_engine_args(args)
    if not 0 <= args.layer < cfg.num_layers:
        raise ValueError(f"--layer must be in [0, {cfg.num_layers}) for this model (got {args.layer})")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    llm = load_llm(args.model, engine_kwargs(args), enable_kv_cache=not args.no_kv_cache)
    trace = trace_generation(llm.engine, prompt, steps=args.steps, layer=args.layer)
    if args.json:
        print(json.dumps(trace.to_dict(), indent=2))
    else:
        print(format_trace(trace))
    return 0


# -- plain text ----------------------------------------------------------------------------
def _shape(s: list[int]) -> str:
    return "[" + ", ".join(str(x) for x in s) + "]"


def _flops(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _bytes(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def format_trace(trace: Trace) -> str:
    hq, hkv = trace.num_heads, trace.num_kv_heads
    heads = f"{hq} query heads" + (
        f" sharing {hkv} KV heads ({hq // hkv} query heads per KV head, GQA)" if hkv != hq else f" = {hkv} KV heads"
    )
    lines = [
        f"model {trace.model} ({trace.architecture}), {trace.dtype} on {trace.device}; "
        f"KV cache {'ON' if trace.kv_cache else 'OFF (ablation: every step recomputes the whole context)'}",
        f"layer {trace.layer} of {trace.num_layers}: hidden {trace.hidden_size}, {heads}, head_dim {trace.head_dim}",
        f"prompt: {len(trace.prompt_token_ids)} tokens; shapes are [batch, heads, tokens, head_dim]; "
        f"FLOPs = 2*m*n*k per matmul, layer {trace.layer} only",
        "",
    ]
    for s in trace.steps:
        lines.extend(_format_step(s, trace))
        lines.append("")
    total = sum(s.flops.total for s in trace.steps)
    secs = sum(s.step_time_s for s in trace.steps)
    gen = trace.generated_token_ids
    lines.append(
        f"{len(trace.steps)} steps in {secs * 1000:.1f} ms; {len(gen)} tokens generated {gen}; "
        f"layer {trace.layer} attention: {_flops(total)} FLOPs in all"
    )
    return "\n".join(lines)


def _format_step(s: TraceStep, trace: Trace) -> list[str]:
    last = s.first_position + s.tokens_computed - 1
    pos = f"position {last}" if s.tokens_computed == 1 else f"positions {s.first_position}..{last}"
    nxt = "" if s.token_id is None else f" -> next token {s.token_id} {s.token_text!r}"
    f = s.flops
    kv_heads = "KV heads"
    return [
        f"step {s.step}  {s.stage.upper()}  {s.tokens_computed} token{'s' if s.tokens_computed != 1 else ''} "
        f"computed ({pos}), {s.step_time_s * 1000:.1f} ms{nxt}",
        f"  Q              {_shape(s.q):<20} {trace.num_heads} query heads",
        f"  K, V (new)     {_shape(s.k_new):<20} {trace.num_kv_heads} {kv_heads}: this step's tokens, written to the cache",
        f"  K, V (cache)   {_shape(s.k_cache):<20} read by attention: {s.cached_before} cached + {s.tokens_computed} new",
        f"  QK^T scores    {_shape(s.scores):<20} softmax(QK^T)·V -> {_shape(s.q)}",
        f"  FLOPs          Q {_flops(f.q_proj)} + K {_flops(f.k_proj)} + V {_flops(f.v_proj)} (projections)"
        f" + QK^T {_flops(f.qk)} + softmax·V {_flops(f.av)} = {_flops(f.total)}",
        f"  KV cache       {s.kv_tokens} tokens x {trace.num_layers} layers = {_bytes(s.kv_bytes)}; "
        f"{s.kv_blocks} block{'s' if s.kv_blocks != 1 else ''} of {trace.block_size} tokens "
        f"({_bytes(s.kv_allocated_bytes)} allocated); pool: {s.pool_blocks_in_use}/{s.pool_blocks_total} blocks in use",
    ]
