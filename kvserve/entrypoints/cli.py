"""`kvserve` command line: one subcommand per module, each exposing `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

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
    g.add_argument("--quantization", "-q", default=None, choices=["none", "q8_0", "q4_0", "int8", "int4", "fp8"],
                   help="weight format: default keeps the checkpoint's (a GGUF's quantized blocks stay "
                        "quantized); none dequantizes them; q8_0 | q4_0 (CPU) and int8 | int4 | fp8 (CUDA) "
                        "quantize an HF checkpoint at load")
    g.add_argument("--max-model-len", type=int, default=None, help="context window (default: the model's, capped by the KV cache)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most requests per step (default: %(default)s)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget per step")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: %(default)s)")
    g.add_argument("--kv-cache-memory-gib", type=float, default=None, help="KV cache size on CPU in GiB (default: 2)")
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


def engine_kwargs(args: argparse.Namespace) -> dict:
    kv = args.kv_cache_memory_gib
    return dict(
        dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size, kv_cache_memory=int(kv * (1 << 30)) if kv else None,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=not args.no_prefix_caching,
        enable_chunked_prefill=not args.no_chunked_prefill,
        attention_backend=args.attention_backend, enforce_eager=args.enforce_eager,
        seed=args.engine_seed, tensor_parallel_size=args.tensor_parallel_size,
        async_scheduling=args.async_scheduling, quantization=args.quantization,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvserve", description="kvserve: an LLM inference engine")
    parser.add_argument("--log-level", default="WARNING", help="logging level (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _SUBCOMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"kvserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
