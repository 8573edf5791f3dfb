"""Structured output cost: per-decode-step time with a mid-size JSON schema against the same
batch unconstrained (same process, same engine), grammar compile time per schema, cache hits,
and (--compare) xgrammar vs llguidance mask / compile times on this machine.

    python benchmarks/structured_bench.py                       # CPU, built-in SmolLM2
    python benchmarks/structured_bench.py --device cuda --model /path/to/Llama-3.1-8B-Instruct
    python benchmarks/structured_bench.py --compare             # needs `pip install llguidance`

Per-step numbers are medians over decode steps in which every request of the batch is still
running (a constrained request may finish early: those steps are not counted). "grammar ms" is
the host time spent on the grammar inside those steps (bitmask fill + apply + matcher advance).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

MID_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0},
        "title": {"type": "string"},
        "status": {"enum": ["open", "closed", "pending"]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        "owner": {"type": "object", "properties": {"name": {"type": "string"}, "email": {"type": "string"}},
                  "required": ["name", "email"]},
        "score": {"type": "number", "minimum": 0, "maximum": 100},
        "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 2},
        "notes": {"type": "string"},
    },
    "required": ["id", "title", "status", "tags", "owner", "score", "items", "notes"],
    "$defs": {"item": {"type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
                       "required": ["sku", "qty"]}},
}
PROMPT = "Write a detailed JSON issue record for a software bug tracker, with long notes."
COMPILE_SCHEMAS = {
    "small (2 props)": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                        "required": ["name", "age"]},
    "mid (8 props, $ref)": MID_SCHEMA,
    "large (60 props, patterns)": {"type": "object", "properties": {
        f"f{i}": {"type": "string", "pattern": "^[a-z]{1,%d}[0-9]{2}$" % (i % 7 + 3)} for i in range(60)},
        "required": [f"f{i}" for i in range(60)]},
    "nested arrays": {"type": "array", "items": {"type": "array", "items": {"type": "object", "properties": {
        "x": {"type": "number"}, "y": {"type": "number"}}, "required": ["x", "y"]}}},
}


def step_times(llm, params, batch: int, steps: int):
    """Median wall time of full-batch decode steps, and grammar host time per step."""
    engine = llm.engine
    runner = engine.runner
    grammar_s = [0.0]
    orig_fill = runner._grammar_bitmask

    def timed_fill(*a, **k):
        t0 = time.perf_counter()
        orig_fill(*a, **k)
        grammar_s[0] += time.perf_counter() - t0

    runner._grammar_bitmask = timed_fill
    from kvserve.structured import grammar as g

    orig_apply, orig_accept = g.apply_bitmask, g.RequestGrammar.accept

    def timed_apply(*a, **k):
        t0 = time.perf_counter()
        orig_apply(*a, **k)
        grammar_s[0] += time.perf_counter() - t0

    def timed_accept(self, tok):
        t0 = time.perf_counter()
        r = orig_accept(self, tok)
        grammar_s[0] += time.perf_counter() - t0
        return r

    g.apply_bitmask, g.RequestGrammar.accept = timed_apply, timed_accept
    try:
        for i in range(batch):
            engine.add_request(f"b{batch}-{id(params)}-{i}", PROMPT, params)
        times, gtimes, n = [], [], 0
        while engine.has_unfinished_requests():
            full = engine.scheduler.num_running == batch and not engine.scheduler.waiting
            grammar_s[0] = 0.0
            t0 = time.perf_counter()
            engine.step()
            dt = time.perf_counter() - t0
            n += 1
            if full and n > 2 and len(times) < steps:  # skip prefill + the first decode
                times.append(dt)
                gtimes.append(grammar_s[0])
        return statistics.median(times) * 1e3 if times else float("nan"), \
            statistics.median(gtimes) * 1e3 if gtimes else 0.0, len(times)
    finally:
        runner._grammar_bitmask = orig_fill
        g.apply_bitmask, g.RequestGrammar.accept = orig_apply, orig_accept


def compare_libraries(tokenizer, vocab: int, eos: int) -> None:
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend)
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[eos])
    comp = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    ll_tok = llguidance.hf.from_tokenizer(hf, n_vocab=vocab)
    doc = {"id": 7, "title": "Crash on start", "status": "open", "tags": ["ui", "p1"],
           "owner": {"name": "Bob", "email": "bob@example.com"}, "score": 42.5,
           "items": [{"sku": "A1", "qty": 2}, {"sku": "B2", "qty": 1}], "notes": "Happens on every launch."}
    ids = tokenizer.encode(json.dumps(doc), add_special_tokens=False)
    print(f"\n## xgrammar vs llguidance (mid schema, {len(ids)}-token document, vocab {vocab})")
    t0 = time.perf_counter()
    cg = comp.compile_json_schema(json.dumps(MID_SCHEMA))
    x_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    lg = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(MID_SCHEMA))
    lm = llguidance.LLMatcher(ll_tok, lg)
    l_compile = time.perf_counter() - t0
    xm, xb = xgr.GrammarMatcher(cg), xgr.allocate_token_bitmask(1, vocab)
    lb = lt.allocate_token_bitmask(1, vocab)
    xt, lt_ = [], []
    for tok in ids:
        t0 = time.perf_counter()
        xm.fill_next_token_bitmask(xb)
        xt.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        lt.fill_next_token_bitmask(lm, lb, 0)
        lt_.append(time.perf_counter() - t0)
        assert xm.accept_token(tok) and lm.consume_token(tok)
    print("| library | compile ms | mask us/token (median) | mask us/token (max) |")
    print("|---|---|---|---|")
    print(f"| xgrammar | {x_compile * 1e3:.1f} | {statistics.median(xt) * 1e6:.1f} | {max(xt) * 1e6:.0f} |")
    print(f"| llguidance | {l_compile * 1e3:.1f} | {statistics.median(lt_) * 1e6:.1f} | {max(lt_) * 1e6:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--steps", type=int, default=24, help="full-batch decode steps timed per run")
    ap.add_argument("--rounds", type=int, default=2, help="plain/constrained pairs per batch size (median)")
    ap.add_argument("--compare", action="store_true", help="also time xgrammar against llguidance")
    args = ap.parse_args()

    from kvserve import LLM, SamplingParams
    from kvserve.bench.machine import describe, machine_info
    from kvserve.core.sampling_params import StructuredOutputsParams

    print(describe(machine_info()))
    llm = LLM(args.model, device=args.device, dtype=args.dtype)
    engine = llm.engine
    mgr = engine.structured

    print("\n## Compile time per schema (cold, then cached)")
    print("| schema | cold ms | cached us |")
    print("|---|---|---|")
    for name, schema in COMPILE_SCHEMAS.items():
        spec = StructuredOutputsParams(json=schema)
        t0 = time.perf_counter()
        mgr.get(spec)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        mgr.get(StructuredOutputsParams(json=json.loads(json.dumps(schema))))
        hot = time.perf_counter() - t0
        print(f"| {name} | {cold * 1e3:.1f} | {hot * 1e6:.0f} |")
    print(f"cache: {mgr.hits} hits, {mgr.misses} compilations")

    steps = args.steps + 4
    plain = SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True)
    constrained = SamplingParams(max_tokens=steps, temperature=0,
                                 structured_outputs=StructuredOutputsParams(json=MID_SCHEMA))
    mgr.get(constrained.structured_outputs)
    print(f"\n## Decode step, mid-size schema vs unconstrained ({args.device}, {engine.model_name})")
    print("| batch | plain ms/step | constrained ms/step | overhead | grammar host ms/step | steps timed |")
    print("|---|---|---|---|---|---|")
    for b in (int(x) for x in args.batch_sizes.split(",")):
        p_runs, c_runs, g_runs, counted = [], [], [], []
        for _ in range(args.rounds):  # interleaved, so drift on a shared machine hits both
            p, _, _ = step_times(llm, plain, b, args.steps)
            c, gms, n = step_times(llm, constrained, b, args.steps)
            p_runs.append(p)
            c_runs.append(c)
            g_runs.append(gms)
            counted.append(n)
        p, c = statistics.median(p_runs), statistics.median(c_runs)
        print(f"| {b} | {p:.2f} | {c:.2f} | {100 * (c / p - 1):+.1f}% | {statistics.median(g_runs):.3f} | "
              f"{min(counted)} |")
    if args.compare:
        compare_libraries(engine.tokenizer, engine.model_config.vocab_size, engine.tokenizer.eos_token_id)


if __name__ == "__main__":
    main()
