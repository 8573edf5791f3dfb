"""`kvserve generate "prompt"`: stream one completion to the terminal.

A model with a chat template (the built-in SmolLM2-Instruct, most instruct models) gets the
prompt as one user message rendered with that template, as `ollama run` does; `--raw` sends the
text as it is (plain completion), as does a model without a template. Ctrl-C stops the
generation: what was generated is kept, a newline and `--stats` follow, and the exit status is 130.
"""

from __future__ import annotations

import argparse
import sys
import time


def register(sub: argparse._SubParsersAction) -> None:
    from kvserve.entrypoints.cli import add_engine_args

    p = sub.add_parser("generate", help="generate text for a prompt, streaming tokens as they are decoded")
    p.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")
    p.add_argument("--raw", action="store_true",
                   help="send the prompt as plain text (completion); default: a model with a chat "
                        "template gets it as a user message in that template")
    p.add_argument("--system", default=None, help="system prompt (chat-template models; not with --raw)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-sequence token")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--stats", action="store_true", help="print timing to stderr when done")
    add_engine_args(p)
    # One prompt: the KV cache is sized for one sequence.
    p.set_defaults(func=run, max_num_seqs=1)


def run(args: argparse.Namespace) -> int:
    from kvserve.core.sampling_params import SamplingParams
    from kvserve.entrypoints.cli import announce_loading, check_engine_args, engine_kwargs, load_llm

    if args.raw and args.system is not None:
        raise ValueError("--system needs the chat template: leave out --raw")
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos, stop=args.stop,
    )
    announce_loading(args.model)
    check_engine_args(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    llm = load_llm(args.model, engine_kwargs(args))
    tok = llm.get_tokenizer()
    if not args.raw and tok is not None and tok.chat_template:
        msgs = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
        request = llm.chat_prompt(msgs)
    elif args.system is not None:
        raise ValueError(f"--system needs a chat template, and model {args.model!r} has none")
    else:
        request = prompt
    t0 = time.perf_counter()
    first = None
    n_tokens = 0
    interrupted = False
    stream = llm.generate_stream(request, params)
    try:
        for out in stream:
            comp = out.outputs[0]
            if first is None and comp.token_ids:
                first = time.perf_counter()
            n_tokens = len(comp.token_ids)
            if comp.delta_text:
                sys.stdout.write(comp.delta_text)
                sys.stdout.flush()
    except KeyboardInterrupt:
        interrupted = True
        stream.close()  # aborts the request
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.stats:
        t1 = time.perf_counter()
        if first is None:
            print(f"[0 tokens{'; interrupted' if interrupted else ''}]", file=sys.stderr)
        else:
            decode = (n_tokens - 1) / (t1 - first) if n_tokens > 1 and t1 > first else float("nan")
            print(
                f"[{n_tokens} tokens; time to first token {first - t0:.3f}s; decode {decode:.1f} tok/s"
                f"{'; interrupted' if interrupted else ''}]",
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
    return 130 if interrupted else 0
