"""The KV-cache ablation: the same greedy generation with and without the cache.

With the cache, each decode step computes one new token: its Q/K/V projections and MLP, plus
QKᵀ and softmax·V against every cached key (the part that still grows with the context).
Without it (`enable_kv_cache=False`), every step is a prefill of the whole context: the
projections and MLP of all past tokens are recomputed, and QKᵀ grows with the context squared.

Per step this records the step time (= the latency of the token it samples) and the matmul
FLOPs of the whole model, split into the Q/K/V projections, QKᵀ + softmax·V, the output
projection, the MLP and the LM head; it checks both modes produce identical tokens, prints a
table and saves a PNG plot.

    kvserve bench kv-ablation                       # smollm2, bf16, 32 + 96 tokens
    kvserve bench kv-ablation --dtype float32 --out /tmp/ablation.png
    kvserve bench kv-ablation --threads 1           # on a shared, busy CPU

(`benchmarks/kv_ablation.py` is a thin wrapper around this module; it prints, as the CLI does.)

Step times are the fastest of `--repeats` runs (modes interleaved, after one unmeasured run per
mode that warms up every matmul shape): on a shared machine, other load only ever adds time.

Identical outputs: in float32 both modes give the same tokens. In bf16 they need not: a decode
multiplies a 1-row activation, a recomputation an n-row one, and the matmul kernels round
their bf16 results differently for the two shapes, which can flip a near-tie in greedy
decoding. With a bf16 `--dtype` the script therefore also compares the two modes in float32
(`--no-fp32-check` skips that).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import TYPE_CHECKING

from kvserve.bench.machine import git_commit

if TYPE_CHECKING:  # torch and the engine load only when the ablation runs (the CLI imports this module)
    from kvserve import LLM
    from kvserve.engine.trace import Trace

PROMPT_TEXT = (
    "The key-value cache is the reason large language models can generate text quickly. "
    "When a transformer produces a new token, it attends to every token before it. Without "
    "a cache, the model would recompute the keys and values of the whole prefix at every step."
)


def machine() -> str:
    import torch

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"load average {load:.1f}"
    )


def prompt_ids(llm: LLM, n: int) -> list[int]:
    tok = llm.get_tokenizer()
    ids = tok.encode(PROMPT_TEXT) if tok is not None else []
    while len(ids) < n:
        ids = ids + ids if ids else list(range(3, n + 3))
    return ids[:n]


def run_mode(llms: dict[bool, LLM], ids: list[int], new_tokens: int, repeats: int) -> dict[bool, list[Trace]]:
    """One unmeasured run per mode, then `repeats` runs with the modes interleaved."""
    from kvserve.engine.trace import trace_generation

    runs: dict[bool, list[Trace]] = {True: [], False: []}
    for r in range(repeats + 1):
        for cache, llm in llms.items():
            t0 = time.perf_counter()
            tr = trace_generation(llm.engine, ids, steps=new_tokens, layer=0)
            print(
                f"  {'warm-up' if r == 0 else f'run {r}'}: KV cache {'on ' if cache else 'off'} "
                f"{time.perf_counter() - t0:6.2f} s", file=sys.stderr,
            )
            if r > 0:
                runs[cache].append(tr)
    return runs


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def fp32_identical(model: str, ids: list[int], new_tokens: int, max_len: int) -> bool:
    """The same greedy generation in float32, with and without the cache, on float32 weights
    (GGUF blocks dequantized: the one-row and many-row products of quantized blocks are
    different kernels, which round differently, as llama.cpp's do)."""
    from kvserve import LLM, SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    out = {}
    for cache in (True, False):
        llm = LLM(model, dtype="float32", device="cpu", max_num_seqs=1, max_model_len=max_len, enable_kv_cache=cache,
                  quantization="none")
        out[cache] = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0].outputs[0].token_ids
        del llm
    same = out[True] == out[False]
    detail = "" if same else f" (first difference at token {first_difference(out[True], out[False])})"
    print(f"# outputs identical in float32 with float32 weights: {'yes' if same else 'NO'}{detail} ({len(out[True])} tokens)")
    return same


def summarize(traces: list[Trace], cfg) -> list[dict]:
    """Per step: context length, fastest step time, whole-model matmul FLOPs by part."""
    from kvserve.engine.trace import model_step_flops

    rows = []
    for i, step in enumerate(traces[0].steps):
        f = model_step_flops(cfg, step.tokens_computed, step.context_len)
        rows.append({
            "step": step.step, "context": step.context_len, "tokens_computed": step.tokens_computed,
            "ms": min(t.steps[i].step_time_s for t in traces) * 1000, **f,
        })
    return rows


def print_table(rows: dict[bool, list[dict]], every: int) -> None:
    on, off = rows[True], rows[False]
    print("| step | context | computed (cache / none) | ms (cache) | ms (none) | GFLOP (cache) | GFLOP (none) "
          "| QKᵀ+softmax·V MFLOP (cache / none) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i in range(len(on)):
        if i % every and i != len(on) - 1:
            continue
        a, b = on[i], off[i]
        print(
            f"| {a['step']} | {a['context']} | {a['tokens_computed']} / {b['tokens_computed']} "
            f"| {a['ms']:.1f} | {b['ms']:.1f} | {a['total'] / 1e9:.3f} | {b['total'] / 1e9:.3f} "
            f"| {a['qk_av'] / 1e6:.2f} / {b['qk_av'] / 1e6:.2f} |"
        )


def print_summary(rows: dict[bool, list[dict]]) -> dict:
    def tot(cache: bool, key: str) -> float:
        return sum(r[key] for r in rows[cache])

    s = {}
    for cache in (True, False):
        decode = rows[cache][1:]
        s[cache] = {
            "total_s": tot(cache, "ms") / 1000,
            "decode_ms_mean": statistics.mean(r["ms"] for r in decode) if decode else float("nan"),
            "last_ms": rows[cache][-1]["ms"],
            "gflop": tot(cache, "total") / 1e9,
        }
    on, off = s[True], s[False]
    n = len(rows[True])
    print()
    print(f"KV cache on : {n} tokens in {on['total_s']:.2f} s; after the prefill {on['decode_ms_mean']:.1f} ms/token "
          f"(last {on['last_ms']:.1f}); {on['gflop']:.2f} GFLOP")
    print(f"KV cache off: {n} tokens in {off['total_s']:.2f} s; after the prefill {off['decode_ms_mean']:.1f} ms/token "
          f"(last {off['last_ms']:.1f}); {off['gflop']:.2f} GFLOP")
    print(f"without the cache: {off['total_s'] / on['total_s']:.1f}x the time, {off['gflop'] / on['gflop']:.1f}x the FLOPs")
    for key, what in (("qkv_proj", "Q/K/V projections"), ("mlp", "MLP"), ("o_proj", "output projection"),
                      ("qk_av", "QKᵀ + softmax·V")):
        a, b = tot(True, key) / 1e9, tot(False, key) / 1e9
        print(f"  {what:<20} {a:8.3f} GFLOP with the cache, {b:8.3f} without ({b / a:.1f}x)")
    return {"cache_on": on, "cache_off": off}


def plot(rows: dict[bool, list[dict]], path: str, title: str, repeats: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    style = {True: dict(color="tab:blue", label="with KV cache"), False: dict(color="tab:red", label="no KV cache")}
    for cache in (True, False):
        r = rows[cache][1:]  # decode steps; step 1 is the same prompt prefill in both modes
        x = [row["context"] for row in r]
        axes[0].plot(x, [row["ms"] for row in r], marker=".", ms=3, lw=1, **style[cache])
        c = style[cache]["color"]
        tag = "cache" if cache else "no cache"
        axes[1].plot(x, [row["qkv_proj"] / 1e6 for row in r], color=c, lw=1.6, label=f"Q/K/V projections, {tag}")
        axes[1].plot(x, [row["qk_av"] / 1e6 for row in r], color=c, lw=1.6, ls="--", label=f"QKᵀ + softmax·V, {tag}")
        axes[2].plot(x, [row["total"] / 1e9 for row in r], lw=1.6, **style[cache])
        axes[2].plot(x, [(row["qkv_proj"] + row["o_proj"] + row["mlp"]) / 1e9 for row in r], color=c, lw=1, ls=":",
                     label=f"…of which projections + MLP, {tag}")
    axes[0].set(title="latency of each new token", xlabel="context length (tokens)",
                ylabel=f"step time (ms, fastest of {repeats} runs)")
    axes[1].set(title="attention matmuls per step (all layers)", xlabel="context length (tokens)",
                ylabel="MFLOP (log scale)", yscale="log")
    axes[2].set(title="whole-model matmuls per step", xlabel="context length (tokens)", ylabel="GFLOP")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5)
    axes[0].set_ylim(bottom=0)
    axes[2].set_ylim(bottom=0)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default=None, help="(default: bfloat16 on a GPU, float32 on a CPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=None, help="(default: 96 on a GPU, 48 on a CPU)")
    ap.add_argument("--repeats", type=int, default=None, help="measured runs per mode (default: 3 on a GPU, 2 on a CPU)")
    ap.add_argument("--every", type=int, default=8, help="table row every N steps (default: %(default)s)")
    ap.add_argument("--out", default="docs/kv-ablation.png", help="PNG path ('' = no plot)")
    ap.add_argument("--json", default="", help="also write the per-step numbers here")
    ap.add_argument("--no-fp32-check", action="store_true", help="skip the float32 identity check")
    ap.add_argument("--no-progress", action="store_true", help="(accepted as every bench command does; this one has no bar)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's); on a busy shared machine 1 thread is far steadier")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_args(ap)
    return run(ap.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    import torch

    from kvserve import LLM

    if args.threads:
        torch.set_num_threads(args.threads)
    # Sized for the device: a CPU's default run (bf16 is emulated without AVX512-BF16) must take
    # minutes, not tens of them.
    gpu = str(args.device).startswith("cuda")
    for name, g, c in (("dtype", "bfloat16", "float32"), ("new_tokens", 96, 48), ("repeats", 3, 2)):
        if getattr(args, name) is None:
            setattr(args, name, g if gpu else c)

    max_len = args.prompt_len + args.new_tokens + 16
    llms = {
        cache: LLM(args.model, dtype=args.dtype, device=args.device, max_num_seqs=1,
                   max_model_len=max_len, enable_kv_cache=cache,
                   enable_prefix_caching=False)  # repeated runs must not hit the prompt's blocks
        for cache in (True, False)
    }
    ids = prompt_ids(llms[True], args.prompt_len)
    cfg = llms[True].engine.model_config
    print(f"# KV-cache ablation: {args.model} ({cfg.architecture}, {cfg.num_layers} layers), {args.dtype} "
          f"on {args.device}; {len(ids)}-token prompt + {args.new_tokens} greedy tokens")
    print(f"# {machine()}; commit {git_commit()}")
    runs = run_mode(llms, ids, args.new_tokens, args.repeats)

    tokens = {cache: [tr.generated_token_ids for tr in trs] for cache, trs in runs.items()}
    same = all(t == tokens[True][0] for ts in tokens.values() for t in ts)
    verdict = "yes" if same else f"no, from token {first_difference(tokens[True][0], tokens[False][0])} on"
    print(f"# outputs identical in {args.dtype}: {verdict} ({len(tokens[True][0])} tokens, every run of both modes)")
    exact = same
    if (not same or args.dtype not in ("float32", "fp32")) and not args.no_fp32_check:
        if not same:
            print("# (quantized weights: one-row and many-row products are different kernels that round differently)")
        exact = fp32_identical(args.model, ids, args.new_tokens, max_len)
        verdict += f"; in float32 with float32 weights: {'yes' if exact else 'NO'}"
    tok = llms[True].get_tokenizer()
    if tok is not None:
        print(f"# generated: {tok.decode(tokens[True][0])!r}")
    print()

    rows = {cache: summarize(trs, cfg) for cache, trs in runs.items()}
    print_table(rows, args.every)
    summary = print_summary(rows)
    if args.out:
        plot(rows, args.out, f"KV-cache ablation: {args.model}, {args.dtype} on {args.device}, "
             f"{len(ids)}-token prompt, then {args.new_tokens - 1} decode steps (outputs identical: {verdict})",
             args.repeats)
        print(f"\nplot: {args.out} ({os.path.getsize(args.out) / 1024:.0f} KB)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "commit": git_commit(), "identical": same, "identical_fp32": exact, "summary": summary,
                       "with_cache": rows[True], "without_cache": rows[False]}, f, indent=1)
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
