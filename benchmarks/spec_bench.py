"""Speculative decoding on the CPU: batch-1 decode tok/s with n-gram speculation vs without on
an input-grounded workload (fix / rewrite / correct / summarize a given text; prompts in
benchmarks/data/spec_prompts.json), greedy outputs checked identical; and batch-32 throughput
on a workload where nothing is accepted (random-token prompts: the n-gram lookup finds
matches whose continuations the model rejects), to show the back-off.

    PYTHONPATH=. python benchmarks/spec_bench.py [--model smollm2] [--max-tokens 128] [--k 6]
    PYTHONPATH=. python benchmarks/spec_bench.py --k 3,5,7 --fixed --head-ab --skip-batch --no-llama-cpp \
        --prompts benchmarks/data/spec_prompts.json benchmarks/data/spec_prompts_long.json \
        benchmarks/data/spec_prompts_code.json

Batch-1: one plain engine and one n-gram engine per k (`--fixed`: also ones whose draft length
does not adapt; `--cool-every-miss`: also ones whose back-off cools down after every missed
first draft, the rule before the hit-rate threshold; `--lookup-min 1`: also ones with shorter
n-grams; `--head-ab`: plain and n-gram
engines whose LM head takes `kvq_gemm`, the row-count-dependent kernels, for an A/B of the head
in the same run); each prompt runs on every engine in turn (the order rotates), `--reps`
passes. Per prompt set: decode tok/s by wall time and by CPU time of the process
(`time.process_time`, all threads; decode = from the step that gave the first token to the
last), the speedups over plain, acceptance rate, mean accepted length, verify steps per pass,
and whether the greedy ids equal plain's. No prefix caching (see `batch1_section`).

Peer (batch-1 section, when `llama-cpp-python` is installed and the model is a GGUF file, as
the built-in `smollm2` is): llama.cpp on the same GGUF, plain and with its prompt-lookup
decoding (`llama_cpp.llama_speculative.LlamaPromptLookupDecoding`, `num_pred_tokens` = k,
`max_ngram_size` = the n-gram proposer's largest n), fed the same prompt token ids, greedy,
the same thread count; its ids are compared with kvserve's plain ids and with its own plain
run. `--no-llama-cpp` skips it.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

from kvserve import LLM, SamplingParams

DATA = Path(__file__).parent / "data" / "spec_prompts.json"


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def batch1(llm: LLM, prompts: list[str], sp: SamplingParams) -> tuple[float, list[list[int]]]:
    """Decode tok/s of one request at a time (prefill time excluded: first token to last)."""
    toks, secs, outs = 0, 0.0, []
    for p in prompts:
        o = llm.generate([p], sp, use_tqdm=False)[0]
        m = o.metrics
        n = len(o.outputs[0].token_ids)
        toks += n - 1
        secs += m.finished_time - m.first_token_time
        outs.append(o.outputs[0].token_ids)
    return toks / secs, outs


def throughput(llm: LLM, prompts: list[dict], sp: SamplingParams) -> float:
    t = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--k", default="6", help="num_speculative_tokens; a comma list (3,5,7) runs one n-gram engine each")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batch-tokens", type=int, default=64)
    ap.add_argument("--skip-batch", action="store_true")
    ap.add_argument("--skip-batch1", action="store_true")
    ap.add_argument("--reject-all", action="store_true", help="batch section: drafts that are never accepted")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is steadier on a busy machine)")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp peer")
    ap.add_argument("--prompts", type=Path, nargs="+", default=[DATA],
                    help="batch-1 prompt sets (JSON lists of {task, messages}), each reported on its own: "
                    "data/spec_prompts_long.json: ~580-token code files, where a verify step's attention reads a "
                    "long context; data/spec_prompts_code.json: short code-editing requests")
    ap.add_argument("--reps", type=int, default=2, help="batch-1: passes over each prompt set")
    ap.add_argument("--fixed", action="store_true",
                    help="batch-1: also n-gram engines whose draft length does not adapt (always k when proposing)")
    ap.add_argument("--disable-by-batch-size", type=int, default=None,
                    help="batch section: speculative_config.disable_by_batch_size for the n-gram engine")
    ap.add_argument("--cool-every-miss", action="store_true",
                    help="batch-1: also n-gram engines whose back-off cools down after every missed "
                         "first draft (the rule before the first-draft hit rate)")
    ap.add_argument("--lookup-min", type=int, default=None,
                    help="batch-1: also n-gram engines with this prompt_lookup_min (more matches, shorter n-grams)")
    ap.add_argument("--row-cost", type=float, default=0.35,
                    help="batch-1 'model' column: the cost of one draft row in a verify step, in one-row steps "
                    "(~0.35 for SmolLM2 on a 2-core AVX2 machine, results-issue19.md)")
    ap.add_argument("--head-ab", action="store_true",
                    help="batch-1: also plain and n-gram (first k) engines whose LM head takes kvq_gemm (row-count-"
                    "dependent kernels, the head before Linear.rowwise)")
    args = ap.parse_args()
    args.ks = [int(v) for v in str(args.k).split(",")]
    args.k = args.ks[0]
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print(f"cpu: {_cpu_name()}", flush=True)
    if not args.skip_batch1:
        batch1_section(args)
    if not args.skip_batch:
        spec = _spec(args.k)
        if args.disable_by_batch_size:
            spec["disable_by_batch_size"] = args.disable_by_batch_size
        batch_section(args, spec)


def _spec(k: int, n_min: int = 2) -> dict:
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": n_min, "prompt_lookup_max": 5}


class _Timed:
    """Wraps an engine's `step` to time a batch-1 request's decode: from the end of the step
    that gave its first token to the end of its last, wall (perf_counter) and CPU time of the
    process (process_time: every thread, so spinning OpenMP workers count)."""

    def __init__(self, llm: LLM) -> None:
        self.llm, self.step = llm, llm.engine.step
        llm.engine.step = self._step
        self.first: tuple[float, float] | None = None
        self.last = (0.0, 0.0)

    def _step(self):
        outs = self.step()
        now = (time.perf_counter(), time.process_time())
        if self.first is None and (any(o.outputs and o.outputs[0].token_ids for o in outs)
                                   or any(r.num_output_tokens for r in self.llm.engine.scheduler.running)):
            self.first = now
        self.last = now
        return outs

    def run(self, prompt: str, sp: SamplingParams) -> tuple[int, float, float, list[int]]:
        self.first = None
        o = self.llm.generate([prompt], sp, use_tqdm=False)[0]
        ids = list(o.outputs[0].token_ids)
        return len(ids) - 1, self.last[0] - self.first[0], self.last[1] - self.first[1], ids


def _spec_counts(llm: LLM) -> tuple[int, int, int]:
    st = llm.engine.stats()
    return st.get("spec_draft_tokens", 0), st.get("spec_accepted_tokens", 0), st.get("spec_verify_steps", 0)


def batch1_section(args) -> None:
    """Batch-1 decode, plain and n-gram (one engine per k), interleaved prompt by prompt (the
    order rotates), so a busy machine's load falls on every engine alike."""
    import os

    # No prefix caching: a second pass would prefill only the uncached rest of each prompt, and
    # the GGML path's prefill rounds differently by row count, so its outputs could differ from
    # the first pass's (for every engine alike); without it every pass repeats the first.
    # Threads passed to every engine: without them an engine picks its count when it is built
    # (the CPUs not busy then), and the GGML path's outputs depend on the thread count.
    kw = dict(max_model_len=4096, num_kv_blocks=512, enable_prefix_caching=False, threads=args.threads)
    engines: dict[str, LLM] = {"plain": LLM(args.model, **kw)}
    for k in args.ks:
        engines[f"ngram k={k}"] = LLM(args.model, speculative_config=_spec(k), **kw)
        if args.fixed:
            e = engines[f"ngram k={k} fixed"] = LLM(args.model, speculative_config=_spec(k), **kw)
            e.engine.spec.adapt_length = False
        if args.cool_every_miss:
            e = engines[f"ngram k={k} cool every miss"] = LLM(args.model, speculative_config=_spec(k), **kw)
            e.engine.spec.cool_every_miss = True
        if args.lookup_min is not None:
            engines[f"ngram k={k} n>={args.lookup_min}"] = LLM(
                args.model, speculative_config=_spec(k, args.lookup_min), **kw)
    if args.head_ab:
        for name, spec in (("plain kvq_gemm-head", None), (f"ngram k={args.k} kvq_gemm-head", _spec(args.k))):
            e = engines[name] = LLM(args.model, speculative_config=spec, **kw)
            e.engine.runner.model.lm_head.rowwise = False
    timed = {n: _Timed(e) for n, e in engines.items()}
    plain = engines["plain"]
    warm = SamplingParams(temperature=0, max_tokens=8)
    for t in timed.values():
        t.run(plain.chat_prompt([{"role": "user", "content": "Say hi."}]), warm)
    sp = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    for path in args.prompts:
        items = json.loads(path.read_text())
        prompts = [plain.chat_prompt(it["messages"]) for it in items]
        load0 = os.getloadavg()
        acc = {n: [0, 0.0, 0.0] for n in engines}
        ids: dict[str, list[list[int]]] = {n: [] for n in engines}
        c0 = {n: _spec_counts(e) for n, e in engines.items()}
        names = list(engines)
        for rep in range(args.reps):
            for i, p in enumerate(prompts):
                r = (rep * len(prompts) + i) % len(names)
                for n in names[r:] + names[:r]:
                    toks, wall, cpu, out = timed[n].run(p, sp)
                    acc[n][0] += toks
                    acc[n][1] += wall
                    acc[n][2] += cpu
                    if rep == 0:
                        ids[n].append(out)
                    elif out != ids[n][i]:
                        print(f"  {n}: {items[i]['task']} differs between passes (nondeterminism)")
        load1 = os.getloadavg()
        print(f"\n{path.name}: {len(prompts)} prompts x {args.reps} passes, max_tokens {args.max_tokens}, "
              f"threads {args.threads or 'default'}, load average {load0[0]:.2f} -> {load1[0]:.2f}")
        base = acc["plain"]
        out_toks = sum(len(x) for x in ids["plain"])
        per = ", ".join(f"{it['task']} {len(x)}" for it, x in zip(items, ids["plain"]))
        print(f"  plain output: {out_toks} tokens ({per})")
        print(f"  {'engine':26s} {'tok/s wall':>10s} {'tok/s cpu':>10s} {'x wall':>7s} {'x cpu':>7s} "
              f"{'accept':>7s} {'mean len':>8s} {'verify':>6s} {'model':>6s} {'bound':>6s}  ids == plain")
        for n in names:
            t, w, c = acc[n]
            d = [b - a for a, b in zip(c0[n], _spec_counts(engines[n]))]
            rate = f"{d[1] / d[0]:.3f}" if d[0] else "-"
            mlen = f"{(d[1] + d[2]) / d[2]:.2f}" if d[2] else "-"
            # Load-independent estimates from the counts: plain steps = tokens not emitted by
            # verify steps; "model" prices each draft row at --row-cost of a one-row step,
            # "bound" at nothing (what coverage alone allows).
            plain_steps = t - d[1] - d[2]
            model = f"{t / (plain_steps + d[2] + args.row_cost * d[0]):.2f}" if d[2] else "-"
            bound = f"{t / (plain_steps + d[2]):.2f}" if d[2] else "-"
            same = ids[n] == ids["plain"]
            diff = "" if same else " (" + ", ".join(
                f"{it['task']}@{_first_diff(a, b)}" for a, b, it in zip(ids["plain"], ids[n], items) if a != b) + ")"
            print(f"  {n:26s} {t / w:10.2f} {t / c:10.2f} {base[1] / base[0] * t / w:7.2f} "
                  f"{base[2] / base[0] * t / c:7.2f} {rate:>7s} {mlen:>8s} {d[2] // max(args.reps, 1):6d} "
                  f"{model:>6s} {bound:>6s}  {same}{diff}",
                  flush=True)
    if not args.no_llama_cpp:
        items = json.loads(args.prompts[0].read_text())
        prompts = [plain.chat_prompt(it["messages"]) for it in items]
        tps, outs = batch1(plain, prompts, sp)
        llama_cpp_peer(args, plain, prompts, items, outs, tps)


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), min(len(a), len(b)))


def llama_cpp_peer(args, plain: LLM, prompts: list[str], items: list[dict], ours: list[list[int]], ours_tps: float) -> None:
    """llama.cpp plain and with prompt-lookup decoding on the same GGUF and prompt ids."""
    try:
        import llama_cpp
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    except ImportError:
        print("llama.cpp peer: llama-cpp-python is not installed (skipped)")
        return
    from kvserve.loader.resolve import resolve_model

    resolved = resolve_model(args.model)
    if resolved.kind != "gguf":
        print(f"llama.cpp peer: {args.model} is not a GGUF file (skipped)")
        return
    import os

    threads = args.threads or os.cpu_count()
    ids = [plain.generate([p], SamplingParams(max_tokens=1), use_tqdm=False)[0].prompt_token_ids for p in prompts]
    stop = set(plain.engine.eos_token_ids)
    n_ctx = max(len(x) for x in ids) + args.max_tokens + args.k + 16

    def run(llm) -> tuple[float, list[list[int]]]:
        toks, secs, outs = 0, 0.0, []
        for prompt in ids:
            out: list[int] = []
            t_first = None
            for tok in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
                if t_first is None:
                    t_first = time.perf_counter()
                out.append(int(tok))
                if tok in stop or len(out) >= args.max_tokens:
                    break
            toks += len(out) - 1
            secs += time.perf_counter() - t_first
            outs.append(out)
        return toks / secs, outs

    common = dict(n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False, seed=0)
    cpp_plain = llama_cpp.Llama(str(resolved.path), **common)
    cpp_lookup = llama_cpp.Llama(
        str(resolved.path), draft_model=LlamaPromptLookupDecoding(max_ngram_size=5, num_pred_tokens=args.k), **common
    )
    run(cpp_plain)  # warm-up
    res = {}
    for name, llm in (("llama.cpp", cpp_plain), ("llama.cpp lookup", cpp_lookup),
                      ("llama.cpp#2", cpp_plain), ("llama.cpp lookup#2", cpp_lookup)):
        res[name] = run(llm)
        print(f"{name:18s} batch-1 decode {res[name][0]:7.2f} tok/s", flush=True)
    cp = max(res["llama.cpp"][0], res["llama.cpp#2"][0])
    cl = max(res["llama.cpp lookup"][0], res["llama.cpp lookup#2"][0])
    own = res["llama.cpp"][1] == res["llama.cpp lookup"][1]
    print(f"llama.cpp {llama_cpp.__version__}, {threads} threads: plain {cp:.2f} tok/s, prompt lookup (k={args.k}, n<=5) "
          f"{cl:.2f} tok/s, speedup {cl / cp:.2f}x (best of 2); lookup ids equal its plain ids: {own}; "
          f"kvserve plain {ours_tps:.2f} tok/s")
    for a, b, it in zip(ours, res["llama.cpp"][1], items):
        d = _first_diff(a, b)
        same = "identical" if a == b else f"first difference at token {d}"
        print(f"  {it['task']}: llama.cpp plain vs kvserve plain greedy ids: {same} ({len(a)} vs {len(b)} tokens)")


class RejectAll:
    """Test-only proposer whose drafts the model never accepts (token 1, `<|im_start|>`, which
    SmolLM2 does not emit mid-text): the worst case the back-off must bound."""

    def __init__(self, k: int) -> None:
        self.k = k

    def propose(self, requests, max_tokens):
        from kvserve.spec_decode.proposer import Proposal, ProposalBatch

        return ProposalBatch({r.request_id: Proposal([1] * min(k, self.k)) for r, k in zip(requests, max_tokens)})

    def drop(self, request_id):
        pass


def batch_section(args, spec) -> None:
    rng = random.Random(0)
    rand = [{"prompt_token_ids": [rng.randrange(100, 49152) for _ in range(64)]} for _ in range(args.batch)]
    spb = SamplingParams(temperature=0, max_tokens=args.batch_tokens, ignore_eos=True)
    fast_b = LLM(args.model, speculative_config=spec, max_num_seqs=args.batch)
    if args.reject_all:
        fast_b.engine.spec.proposer = RejectAll(args.k)
    plain_b = LLM(args.model, max_num_seqs=args.batch)
    res = {}
    for name, llm in (("plain", plain_b), ("spec", fast_b), ("plain#2", plain_b), ("spec#2", fast_b)):
        res[name] = throughput(llm, rand, spb)
        print(f"{name:8s} batch-{args.batch} {res[name]:7.2f} tok/s", flush=True)
    p, s = max(res["plain"], res["plain#2"]), max(res["spec"], res["spec#2"])
    st = fast_b.engine.stats()
    kind = "reject-all proposer" if args.reject_all else "n-gram"
    print(f"batch-{args.batch} random-token prompts: plain {p:.2f} tok/s, {kind} {s:.2f} tok/s "
          f"({(s / p - 1) * 100:+.1f}%); drafts {st['spec_draft_tokens']}, accepted {st['spec_accepted_tokens']}, "
          f"verify steps {st['spec_verify_steps']}")


if __name__ == "__main__":
    main()
