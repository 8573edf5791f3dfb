"""`kvserve` command line: one subcommand per module, each exposing `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from typing import Any

# Subcommand modules; each defines register(subparsers) and sets `func` on its parser.
_SUBCOMMANDS = [
    "kvserve.entrypoints.cli_generate",
    "kvserve.entrypoints.cli_chat",
    "kvserve.entrypoints.cli_serve",
    "kvserve.entrypoints.cli_trace",
    "kvserve.entrypoints.cli_bench",
]


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Engine options shared by every subcommand that loads a model."""
    from kvserve.loader.resolve import DEFAULT_MODEL

    g = p.add_argument_group("engine")
    g.add_argument("--model", "-m", default=DEFAULT_MODEL, help="built-in name, HF folder, .gguf file or HF Hub id (default: %(default)s)")
    g.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (default: %(default)s)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: %(default)s)")
    g.add_argument("--quantization", "-q", default=None, choices=["none", "gguf", "q8_0", "q4_0", "int8", "int4", "fp8"],
                   help="weight format. Default: on CPU a GGUF's quantized blocks stay quantized, on CUDA they "
                        "are dequantized to --dtype; gguf keeps them quantized on CUDA too; none dequantizes them; "
                        "q8_0 | q4_0 (CPU) and int8 | int4 | fp8 (CUDA) quantize an HF checkpoint at load")
    g.add_argument("--max-model-len", type=int, default=None, help="context window (default: the model's, capped by the KV cache)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most requests per step (default: %(default)s)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget per step")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: %(default)s)")
    g.add_argument("--kv-cache-memory-gib", type=float, default=None,
                   help="KV cache size on CPU in GiB (default: what --max-num-seqs requests of --max-model-len "
                        "tokens can use, at most 40%% of the available RAM)")
    g.add_argument("--threads", "-t", type=int, default=None,
                   help="CPU threads for PyTorch and the C kernels (default: the cores not already busy, "
                        "now (runnable tasks in /proc/stat); $OMP_NUM_THREADS when set)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="GPU memory fraction (default: %(default)s)")
    g.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    g.add_argument("--no-chunked-prefill", action="store_true", help="disable chunked prefill")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"])
    g.add_argument("--enforce-eager", action="store_true", help="never capture CUDA graphs")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="launch the next decode step before this step's tokens are back "
                        "(default: on with CUDA, off on CPU)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                   help="split the model across N ranks: N GPUs of this machine (NCCL) or N CPU processes (gloo); "
                        "under torchrun, N = WORLD_SIZE across machines (default: %(default)s)")
    g.add_argument("--engine-seed", type=int, default=0, help="seed for unseeded sampling (default: %(default)s)")
    g.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\' '
                        "(see docs/speculative.md)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    kv = args.kv_cache_memory_gib
    return dict(
        dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size, kv_cache_memory=None if kv is None else max(1, int(kv * (1 << 30))),
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=not args.no_prefix_caching,
        enable_chunked_prefill=not args.no_chunked_prefill,
        attention_backend=args.attention_backend, enforce_eager=args.enforce_eager,
        seed=args.engine_seed, tensor_parallel_size=args.tensor_parallel_size,
        async_scheduling=args.async_scheduling, quantization=args.quantization,
        speculative_config=getattr(args, "speculative_config", None),
        threads=args.threads,
    )


_open_line = False  # a progress line without its newline is on the terminal (stderr)


def announce_loading(model: str) -> None:
    """The one-line progress message on a terminal, printed first thing (importing PyTorch
    alone takes seconds), replaced by `load_llm`'s result line. Not when stderr is a file or a
    pipe: there only the result line is written."""
    global _open_line
    if sys.stderr.isatty():
        _open_line = True
        print(f"kvserve: loading {model} ...", end="", file=sys.stderr, flush=True)


def load_llm(model: str, kwargs: dict, **extra: Any) -> Any:
    """`LLM(model, **kwargs, **extra)`, then the result of `announce_loading`'s message (the
    loader adds a progress bar when loading takes over ~2 s)."""
    import time

    from kvserve.entrypoints.llm import LLM

    global _open_line
    t0 = time.perf_counter()
    llm = LLM(model, **kwargs, **extra)
    print(("\r\033[K" if _open_line else "") + f"kvserve: {describe_engine(llm.engine)}; loaded in "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    _open_line = False
    return llm


def describe_engine(engine: Any) -> str:
    """'smollm2 on cpu (float32, 2 threads), context 8192 tokens' for the messages above."""
    dev = engine.loaded.device
    what = str(engine.loaded.dtype).removeprefix("torch.")
    if dev.type == "cpu":
        import torch

        n = torch.get_num_threads()
        what += f", {n} thread{'s' if n != 1 else ''}"
    return f"{engine.model_name} on {dev} ({what}), context {engine.max_model_len} tokens"


# EngineArgs field -> the CLI option that sets it (for error messages).
_OPTION_OF = {
    "max_model_len": "--max-model-len", "max_num_seqs": "--max-num-seqs",
    "max_num_batched_tokens": "--max-num-batched-tokens", "block_size": "--block-size",
    "kv_cache_memory": "--kv-cache-memory-gib", "gpu_memory_utilization": "--gpu-memory-utilization",
    "tensor_parallel_size": "--tensor-parallel-size", "attention_backend": "--attention-backend",
    "quantization": "--quantization", "threads": "--threads", "dtype": "--dtype", "device": "--device",
}


def check_engine_args(args: argparse.Namespace) -> Any:
    """Check every engine option, and the model's own limits, before anything heavy is loaded;
    return the model's `ModelConfig` (read from its config.json or GGUF header, not its weights).
    Errors are ValueError / FileNotFoundError naming the CLI option."""
    kv = args.kv_cache_memory_gib
    if kv is not None and not kv > 0:
        raise ValueError(f"--kv-cache-memory-gib must be > 0 (got {kv:g}); leave it out for the default size")
    try:
        from kvserve.engine.arg_utils import EngineArgs

        ea = EngineArgs.from_kwargs(args.model, **engine_kwargs(args))
        from kvserve.platform import resolve_device

        resolve_device(ea.device)  # e.g. 'cuda' without CUDA
    except ValueError as e:
        raise ValueError(_cli_names(str(e))) from None
    from kvserve.loader.model_loader import read_model_config
    from kvserve.loader.resolve import resolve_model

    cfg = read_model_config(resolve_model(args.model))
    if ea.max_model_len is not None and ea.max_model_len > cfg.max_position_embeddings:
        raise ValueError(
            f"--max-model-len {ea.max_model_len} exceeds the model's context window "
            f"({cfg.max_position_embeddings} positions)"
        )
    if ea.tensor_parallel_size > 1:
        from kvserve.distributed.parallel_state import check_divisible

        try:
            check_divisible(
                num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                intermediate_size=cfg.intermediate_size, family=cfg.family, tp_size=ea.tensor_parallel_size,
            )
        except ValueError as e:
            raise ValueError(_cli_names(str(e))) from None
    return cfg


def _cli_names(msg: str) -> str:
    """'max_num_seqs must be ...' -> '--max-num-seqs must be ...'."""
    for field, option in _OPTION_OF.items():
        if msg.startswith(field):
            return option + msg[len(field):]
    return msg


def _add_global_options(p: argparse.ArgumentParser, suppress: bool) -> None:
    p.add_argument(
        "--log-level", type=_log_level, default=argparse.SUPPRESS if suppress else "WARNING",
        help="DEBUG | INFO | WARNING | ERROR; DEBUG also prints the traceback of an error (default: WARNING)",
    )


def _log_level(text: str) -> str:
    level = text.upper()
    if not isinstance(logging.getLevelName(level), int):
        raise argparse.ArgumentTypeError(f"must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL (got {text!r})")
    return level


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield child
                yield from _subparsers(child)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvserve", description="kvserve: an LLM inference engine")
    _add_global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _SUBCOMMANDS:
        importlib.import_module(name).register(sub)
    # Global options are accepted after the subcommand too (`kvserve generate ... --log-level DEBUG`).
    for child in _subparsers(parser):
        _add_global_options(child, suppress=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.log_level == "DEBUG"
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        globals()["_open_line"] = False
        return 130
    except (ValueError, FileNotFoundError) as e:
        # The user's input: the message says what to change.
        _print_error(str(e), _hint(e), e if debug else None)
        return 2
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - the one handler for everything unexpected
        first = (str(e).strip().splitlines() or [""])[0]
        msg = f"{type(e).__name__}: {first}" if first else type(e).__name__
        _print_error(msg, _hint(e), e if debug else None, more=not debug)
        return 1


def _print_error(msg: str, hint: str | None, exc: BaseException | None, more: bool = False) -> None:
    global _open_line
    if _open_line:
        print(file=sys.stderr)
        _open_line = False
    if exc is not None:
        traceback.print_exception(exc, file=sys.stderr)
    print(f"kvserve: error: {msg}", file=sys.stderr)
    if hint:
        print(f"kvserve: hint: {hint}", file=sys.stderr)
    if more:
        print("kvserve: run with --log-level DEBUG for the traceback", file=sys.stderr)


# (exception type name or None, text in the message) -> what to do about it.
_HINTS: list[tuple[tuple[str, ...], str, str]] = [
    (("OSError",), "address already in use", "another process holds that port: pick another with --port"),
    (("RuntimeError", "MemoryError", "OutOfMemoryError"), "out of memory",
     "lower --max-num-seqs, --max-model-len or --kv-cache-memory-gib (CUDA: --gpu-memory-utilization)"),
    (("RuntimeError", "MemoryError"), "can't allocate memory",
     "lower --max-num-seqs, --max-model-len or --kv-cache-memory-gib"),
    (("MemoryError",), "", "lower --max-num-seqs, --max-model-len or --kv-cache-memory-gib"),
    (("RuntimeError",), "no c compiler", "install a C compiler (gcc) or set KVSERVE_CPU_KERNELS=0 for the slower PyTorch path"),
    (("ModuleNotFoundError", "ImportError"), "", "a package this command needs is missing: pip install it (see README)"),
    (("FileNotFoundError",), "not a local folder, a .gguf file",
     "pass a local HF folder, a .gguf file, an HF Hub id, or leave --model out for the built-in 'smollm2'"),
    (("RuntimeError", "AssertionError"), "cuda", "check `nvidia-smi`, or run on the CPU with --device cpu"),
    (("ConnectionError", "ConnectError", "LocalEntryNotFoundError", "OfflineModeIsEnabled"), "",
     "the model is not local and the Hugging Face Hub could not be reached: pass a local folder or .gguf file"),
]


def _hint(e: BaseException) -> str | None:
    names = {c.__name__ for c in type(e).__mro__}
    text = str(e).lower()
    for types, needle, hint in _HINTS:
        if names & set(types) and needle in text:
            return hint
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
