"""`kvserve bench throughput | latency | serve | prefix | kv-ablation | perplexity`.

Every command prints its settings and the machine, then a table; `--json-out` appends one JSON
line per result row, `--report-dir` writes report.md + PNG plots (needs matplotlib)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

COMMANDS = ("throughput", "latency", "serve", "prefix", "kv-ablation", "perplexity")


def register(sub: argparse._SubParsersAction) -> None:
    from kvserve.bench import kv_ablation
    from kvserve.entrypoints.cli import add_engine_args

    # The command bodies (and asyncio, httpx, ...) are imported only when a bench command runs.
    run_throughput, run_latency, run_serve, run_prefix, run_kv_ablation, run_perplexity = (
        _lazy(name) for name in ("run_throughput", "run_latency", "run_serve", "run_prefix",
                                 "run_kv_ablation", "run_perplexity")
    )

    p = sub.add_parser("bench", help="benchmarks: " + " | ".join(COMMANDS))
    bsub = p.add_subparsers(dest="bench_command", required=True)

    def common(q: argparse.ArgumentParser, engine: bool = True) -> None:
        q.add_argument("--seed", type=int, default=0, help="workload seed (default: %(default)s)")
        q.add_argument("--json-out", default=None, help="append one JSON line per result row to this file")
        q.add_argument("--report-dir", default=None, help="write report.md and PNG plots here (needs matplotlib)")
        q.add_argument("--no-progress", action="store_true", help="no progress bar")
        if engine:
            q.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                           help="dummy = random weights from config.json (default: %(default)s)")
            q.add_argument("--peers", default=None,
                           help="comma list of hf, llamacpp; '' for none (default: hf,llamacpp on a GPU, "
                                "llamacpp on a CPU, where HF's GGUF load and generate alone take minutes)")
            add_engine_args(q)

    q = bsub.add_parser("throughput", help="offline throughput: N random-token requests, lengths uniform in [100, 1024]")
    q.add_argument("--num-requests", type=int, default=None, help="requests (default: 256 on a GPU, 8 on a CPU)")
    q.add_argument("--scale", type=float, default=None,
                   help="shrink the [100, 1024] lengths by this factor (default: 1 on a GPU, 0.125 on a CPU)")
    q.add_argument("--input-len", type=int, default=None, help="fixed prompt length instead (e.g. 1024)")
    q.add_argument("--output-len", type=int, default=None, help="fixed output length instead (e.g. 128)")
    q.add_argument("--hf-batch-size", type=int, default=32, help="HF generate batch size (default: %(default)s)")
    common(q)
    q.set_defaults(func=run_throughput)

    q = bsub.add_parser("latency", help="batch-1 / small-batch decode ms/token, prefill time, bandwidth floor")
    q.add_argument("--prompt-len", type=int, default=None, help="prefill prompt length (default: 512 on a GPU, 128 on a CPU)")
    q.add_argument("--decode-tokens", type=int, default=None, help="tokens per decode run (default: 128 on a GPU, 32 on a CPU)")
    q.add_argument("--batch-sizes", default="1,4", help="decode batch sizes (default: %(default)s)")
    q.add_argument("--floor-mib", type=int, default=None,
                   help="matrix size for the bandwidth probe (default: 256 on a GPU, 64 on a CPU)")
    q.add_argument("--repeats", type=int, default=None,
                   help="report the best of N runs of each measurement (default: 3 on a GPU, 2 on a CPU)")
    common(q)
    q.set_defaults(func=run_latency)

    q = bsub.add_parser("serve", help="streaming clients against a running OpenAI-compatible server")
    q.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    q.add_argument("--model-name", default=None, help="'model' field (default: the server's first /v1/models entry)")
    q.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY)")
    q.add_argument("--concurrency", default=None,
                   help="comma-separated levels (default: 1,4,16 with a local GPU, 1,4 without)")
    q.add_argument("--request-rate", default=None, help="comma-separated Poisson rates (req/s) instead of concurrency")
    q.add_argument("--num-prompts", type=int, default=None,
                   help="requests per level (default: 64 with a local GPU, 8 without)")
    q.add_argument("--dataset", default="random", choices=["random", "chat"],
                   help="random: fixed lengths; chat: log-normal lengths, mean ~200 in / ~180 out")
    q.add_argument("--input-len", type=int, default=None, help="(default: 1024 with a local GPU, 256 without)")
    q.add_argument("--output-len", type=int, default=None, help="(default: 128 with a local GPU, 32 without)")
    q.add_argument("--scale", type=float, default=1.0, help="shrink lengths by this factor")
    q.add_argument("--vocab", type=int, default=10000, help="random ids are drawn below this (default: %(default)s)")
    q.add_argument("--slo-ttft-ms", type=float, default=2000.0, help="goodput SLO on TTFT (default: %(default)s)")
    q.add_argument("--slo-tpot-ms", type=float, default=200.0, help="goodput SLO on TPOT (default: %(default)s)")
    common(q, engine=False)
    q.set_defaults(func=run_serve)

    q = bsub.add_parser("prefix", help="requests sharing a long system prompt, with vs without prefix caching")
    q.add_argument("--num-requests", type=int, default=None, help="(default: 32 on a GPU, 8 on a CPU)")
    q.add_argument("--prefix-len", type=int, default=None,
                   help="shared system prompt tokens (default: 1024 on a GPU, 512 on a CPU)")
    q.add_argument("--suffix-len", type=int, default=32, help="per-request question tokens (default: %(default)s)")
    q.add_argument("--output-len", type=int, default=32)
    common(q)
    q.set_defaults(func=run_prefix, peers="")

    q = bsub.add_parser("kv-ablation", help="the same generation with and without the KV cache")
    kv_ablation.add_args(q)
    q.add_argument("--json-out", default=None, help="append the result as one JSON line to this file")
    q.add_argument("--report-dir", default=None, help="write report.md and the PNG here")
    q.set_defaults(func=run_kv_ablation, out="")

    q = bsub.add_parser("perplexity", help="sliding-window perplexity on a bundled public-domain text (or --text)")
    q.add_argument("--context", type=int, default=512, help="tokens per window (default: %(default)s)")
    q.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: context/2)")
    q.add_argument("--max-tokens-scored", type=int, default=None,
                   help="stop after scoring this many tokens (default: the whole text on a GPU, 2048 on a CPU)")
    q.add_argument("--text", default=None, metavar="FILE",
                   help="UTF-8 text file to score (default: the bundled US Constitution)")
    q.add_argument("--peer", default=None, choices=["llama.cpp", "llamacpp"],
                   help="also score the same token ids with llama.cpp on the same GGUF file")
    q.add_argument("--json", action="store_true", help="print the result rows as JSON instead of a table")
    q.add_argument("--json-out", default=None, help="append one JSON line per result row to this file")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="dummy = random weights from config.json (default: %(default)s)")
    add_engine_args(q)
    q.set_defaults(func=run_perplexity, report_dir=None)


def _lazy(name: str):
    def run(args: argparse.Namespace) -> int:
        from kvserve.entrypoints import cli_bench_cmds

        return getattr(cli_bench_cmds, name)(args)

    run.__name__ = name
    return run


# -- sizing: every default run finishes in minutes on the device it runs on ----------------------
# (GPU default, CPU default) per option left unset. The CPU defaults aim at runs of under 3
# minutes on 2 cores, peers included (benchmarks/RESULTS.md, issue 22, for what was measured).
_SIZES: dict[str, dict[str, tuple[Any, Any]]] = {
    "throughput": {"num_requests": (256, 8), "scale": (1.0, 0.125), "peers": ("hf,llamacpp", "llamacpp")},
    "latency": {"peers": ("hf,llamacpp", "llamacpp"), "prompt_len": (512, 128), "decode_tokens": (128, 32), "repeats": (3, 2), "floor_mib": (256, 64)},
    "serve": {"num_prompts": (64, 8), "input_len": (1024, 256), "output_len": (128, 32), "concurrency": ("1,4,16", "1,4")},
    "prefix": {"num_requests": (32, 8), "prefix_len": (1024, 512)},
    "perplexity": {"max_tokens_scored": (None, 2048)},
}


def on_gpu(device: str | None) -> bool:
    """Whether a run on `device` ('auto' | 'cpu' | 'cuda[:N]'; None: the local machine) uses a GPU."""
    if device and device != "auto":
        return device.startswith("cuda")
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def size_defaults(args: argparse.Namespace, command: str) -> None:
    """Fill the options left unset with the device's defaults (`_SIZES`)."""
    gpu = on_gpu(getattr(args, "device", None))
    for name, (g, c) in _SIZES.get(command, {}).items():
        if getattr(args, name, None) is None:
            setattr(args, name, g if gpu else c)


# -- helpers -------------------------------------------------------------------------------------
def _start(args: argparse.Namespace, command: str, settings: dict) -> dict:
    from kvserve.bench.machine import describe, machine_info

    if args.report_dir:
        from kvserve.bench.report import require_matplotlib

        require_matplotlib()
    m = machine_info()
    print(f"# kvserve bench {command}")
    print(f"# machine: {describe(m)}")
    print(f"# settings: {json.dumps(settings)}")
    return m


def load_warning(monitor: Any, threads: int | None = None) -> str | None:
    """The warning printed (to stdout, with the results) when the load average during the run
    exceeded the threads computing: other processes took CPU time, and the timings and ratios
    above are not the machine's. None when the run had the CPU to itself."""
    import torch

    threads = threads or torch.get_num_threads()
    peak = monitor.stop()
    if peak is None or peak <= threads + 0.5:
        return None
    msg = (f"# WARNING: the load average reached {peak:.1f} during this run, above the {threads} thread"
           f"{'s' if threads != 1 else ''} in use: other processes competed for the CPU, so these timings "
           f"(and any ratios) are lower than this machine gives when idle. Rerun on a quiet machine"
           f"{', or with fewer --threads' if threads > 1 else ''}.")
    print(msg)
    return msg


def _settings(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("func",) and not callable(v)}


def _bar(args: argparse.Namespace, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, disable=args.no_progress, file=sys.stderr)


def _emit(args: argparse.Namespace, command: str, machine: dict, rows: list[dict]) -> None:
    if not args.json_out:
        return
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.json_out, "a") as f:
        for r in rows:
            rec = {"command": command, "time": time.time(), **{k: v for k, v in r.items() if k != "samples"},
                   "machine": machine}
            f.write(json.dumps(rec, default=str) + "\n")


def print_table(rows: list[dict], cols: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c, ""))) for r in rows)) for c in cols]
    print()
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        if "error" in r:
            print(f"{r['engine'].ljust(widths[0])}  error: {r['error']}")
            continue
        print("  ".join(_fmt(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)))


def _fmt(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def _ratios(rows: list[dict], key: str, higher_is_better: bool = True) -> None:
    """Add `vs_kvserve` (= kvserve's advantage: >1 means kvserve is better) to each peer row."""
    ours = next((r for r in rows if r["engine"] == "kvserve" and key in r), None)
    for r in rows:
        if ours and key in r and r is not ours and r[key]:
            r["kvserve_x"] = ours[key] / r[key] if higher_is_better else r[key] / ours[key]


def _kvserve(args: argparse.Namespace, **overrides: Any):
    from kvserve.bench.offline import KvserveRunner
    from kvserve.entrypoints.cli import check_engine_args, engine_kwargs

    check_engine_args(args)
    return KvserveRunner(args.model, load_format=args.load_format, **{**engine_kwargs(args), **overrides})


def _peer_names(args: argparse.Namespace) -> list[str]:
    names = [p.strip() for p in (args.peers or "").split(",") if p.strip()]
    bad = [n for n in names if n not in ("hf", "llamacpp")]
    if bad:
        raise ValueError(f"--peers: unknown peer(s) {bad}; allowed: hf, llamacpp")
    return names
