"""`kvserve chat`: an interactive chat in the terminal, streaming each reply as it is decoded.

The whole conversation is re-rendered with the model's chat template every turn (the prefix
cache keeps the earlier turns' KV blocks, so only the new tokens are computed). Commands:
``/reset`` forgets the conversation (the system prompt stays), ``/exit`` (or EOF, Ctrl-D, Ctrl-C
at the prompt) quits; Ctrl-C during a reply stops that reply. A gpt-oss reply shows its final
answer only (its analysis channel is dropped, as the model's template drops it from history;
`engine/harmony.py`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

_HELP = "commands: /reset (forget the conversation), /exit (quit)"


def register(sub: argparse._SubParsersAction) -> None:
    from kvserve.entrypoints.cli import add_engine_args

    p = sub.add_parser("chat", help="chat with the model in the terminal, streaming replies")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-tokens", type=int, default=512, help="most tokens per reply (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=-1, help="-1 = off (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed, the same for every reply")
    add_engine_args(p)
    # One conversation: the KV cache is sized for one sequence.
    p.set_defaults(func=run, max_num_seqs=1)


def run(args: argparse.Namespace) -> int:
    from kvserve.core.sampling_params import SamplingParams
    from kvserve.entrypoints.cli import announce_loading, check_engine_args, engine_kwargs, load_llm

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed,
    )
    announce_loading(args.model)
    check_engine_args(args)
    llm = load_llm(args.model, engine_kwargs(args))
    tok = llm.get_tokenizer()
    if tok is None or not tok.chat_template:
        raise ValueError(f"model {args.model!r} has no chat template; use `kvserve generate` instead")
    start: list[dict[str, Any]] = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    from kvserve.engine.harmony import is_harmony_model

    harmony = is_harmony_model(tok, llm.engine.model_config.architecture)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"kvserve chat with {llm.engine.model_name}. {_HELP}", file=sys.stderr)
    while True:
        try:
            line = input(">>> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            if interactive:
                print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = list(start)
            print("(conversation cleared)")
            continue
        if text.startswith("/"):
            print(f"unknown command {text!r}; {_HELP}")
            continue
        history.append({"role": "user", "content": line})
        try:
            reply = _stream_reply(llm, history, params, harmony)
        except ValueError as e:  # e.g. the conversation outgrew the context window
            history.pop()
            print(f"error: {e} (/reset starts over)", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": reply})


def _stream_reply(llm: Any, history: list[dict[str, Any]], params: Any, harmony: bool = False) -> str:
    """Print the reply as it is decoded; return its text (partial if interrupted)."""
    from kvserve.engine.harmony import HarmonyParser

    prompt = llm.chat_prompt(history)
    parser = HarmonyParser(llm.get_tokenizer()) if harmony else None
    text = ""
    stream = llm.generate_stream(prompt, params)
    try:
        for out in stream:
            comp = out.outputs[0]
            delta = comp.delta_text
            if parser is not None:
                delta = parser.feed(comp.token_ids, finished=comp.finish_reason is not None)[1]
            if delta:
                sys.stdout.write(delta)
                sys.stdout.flush()
            text = parser.content if parser is not None else comp.text
    except KeyboardInterrupt:
        stream.close()  # aborts the request and frees its blocks
        sys.stdout.write(" [interrupted]")
    sys.stdout.write("\n")
    sys.stdout.flush()
    return text
