"""Speculative decoding on the CPU: batch-1 decode tok/s with n-gram speculation vs without on
an input-grounded workload (fix / rewrite / correct / summarize a given text; prompts in
benchmarks/data/spec_prompts.json), greedy outputs checked identical; and batch-32 throughput
on a workload where nothing is accepted (random-token prompts: the n-gram lookup finds
matches whose continuations the model rejects), to show the back-off.

    PYTHONPATH=. python benchmarks/spec_bench.py [--model smollm2] [--max-tokens 128] [--k 6]

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
    ap.add_argument("--k", type=int, default=6, help="num_speculative_tokens")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batch-tokens", type=int, default=64)
    ap.add_argument("--skip-batch", action="store_true")
    ap.add_argument("--skip-batch1", action="store_true")
    ap.add_argument("--reject-all", action="store_true", help="batch section: drafts that are never accepted")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is steadier on a busy machine)")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp peer")
    ap.add_argument("--prompts", type=Path, default=DATA,
                    help="batch-1 prompts (JSON list of {task, messages}); data/spec_prompts_long.json: "
                    "~580-token code files, where a verify step's attention reads a long context")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    spec = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_min": 2, "prompt_lookup_max": 5}
    print(f"cpu: {_cpu_name()}", flush=True)
    if not args.skip_batch1:
        batch1_section(args, spec)
    if not args.skip_batch:
        batch_section(args, spec)


def batch1_section(args, spec) -> None:
    plain = LLM(args.model)
    fast = LLM(args.model, speculative_config=spec)
    items = json.loads(args.prompts.read_text())
    prompts = [plain.chat_prompt(it["messages"]) if hasattr(plain, "chat_prompt") else it["messages"][0]["content"] for it in items]
    sp = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    batch1(plain, prompts[:1], SamplingParams(temperature=0, max_tokens=8))  # warm-up
    batch1(fast, prompts[:1], SamplingParams(temperature=0, max_tokens=8))
    rows = {}
    for name, llm in (("plain", plain), ("ngram", fast), ("plain#2", plain), ("ngram#2", fast)):
        rows[name] = batch1(llm, prompts, sp)
        print(f"{name:8s} batch-1 decode {rows[name][0]:7.2f} tok/s", flush=True)
    same = rows["plain"][1] == rows["ngram"][1]
    p = max(rows["plain"][0], rows["plain#2"][0])
    s = max(rows["ngram"][0], rows["ngram#2"][0])
    st = fast.engine.stats()
    print(f"batch-1: plain {p:.2f} tok/s, n-gram k={args.k} {s:.2f} tok/s, speedup {s / p:.2f}x "
          f"(best of 2), greedy outputs identical: {same}")
    print(f"acceptance rate {st['spec_acceptance_rate']:.3f}, mean accepted length {st['spec_mean_accepted_length']:.2f}, "
          f"draft time {st['spec_draft_time_s'] * 1e3:.1f} ms")
    if not same:
        for a, b, it in zip(rows["plain"][1], rows["ngram"][1], items):
            if a != b:
                print(f"  {it['task']}: first difference at output token {_first_diff(a, b)} of {len(a)}")
    if not args.no_llama_cpp:
        llama_cpp_peer(args, plain, prompts, items, rows["plain"][1], p)


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
