"""`kvserve generate "prompt"`: stream one completion to the terminal."""

from __future__ import annotations

import argparse
import sys
import time


def register(sub: argparse._SubParsersAction) -> None:
    from kvserve.entrypoints.cli import add_engine_args

    p = sub.add_parser("generate", help="generate text for a prompt, streaming tokens as they are decoded")
    p.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-sequence token")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--stats", action="store_true", help="print timing to stderr when done")
    add_engine_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvserve.core.sampling_params import SamplingParams
    from kvserve.entrypoints.cli import engine_kwargs
    from kvserve.entrypoints.llm import LLM

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos, stop=args.stop,
    )
    llm = LLM(args.model, **engine_kwargs(args))
    t0 = time.perf_counter()
    first = None
    n_tokens = 0
    for out in llm.generate_stream(prompt, params):
        comp = out.outputs[0]
        if first is None and comp.token_ids:
            first = time.perf_counter()
        n_tokens = len(comp.token_ids)
        if comp.delta_text:
            sys.stdout.write(comp.delta_text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats and first is not None:
        t1 = time.perf_counter()
        decode = (n_tokens - 1) / (t1 - first) if n_tokens > 1 and t1 > first else float("nan")
        print(
            f"[{n_tokens} tokens; time to first token {first - t0:.3f}s; decode {decode:.1f} tok/s]",
            file=sys.stderr,
        )
        spec = llm.engine.spec_stats()
        if spec:
            print(
                f"[speculative: {spec['spec_accepted_tokens']} of {spec['spec_draft_tokens']} draft tokens accepted "
                f"({100 * spec['spec_acceptance_rate']:.1f}%); {spec['spec_mean_accepted_length']:.2f} tokens per "
                f"verify step; draft time {1e3 * spec['spec_draft_time_s']:.1f} ms]",
                file=sys.stderr,
            )
    return 0
