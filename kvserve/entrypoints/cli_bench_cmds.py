"""The bodies of `kvserve bench` subcommands (argument parsing lives in cli_bench.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

from kvserve.bench.machine import LoadMonitor
from kvserve.entrypoints.cli_bench import (
    _bar, _emit, _kvserve, _peer_names, _ratios, _settings, _start, load_warning, print_table, size_defaults,
)


def _dtype_name(runner) -> str:
    return str(runner.engine.loaded.dtype).removeprefix("torch.")


def _warm(runner, vocab: int) -> None:
    from kvserve.bench.workloads import random_requests

    runner.run(random_requests(2, seed=-1, vocab=vocab, input_len=16, output_len=4))
    runner.reset_prefix_cache()


# -- throughput ----------------------------------------------------------------------------------
def run_throughput(args: argparse.Namespace) -> int:
    from kvserve.bench.peers import HFPeer, LlamaCppPeer, guarded
    from kvserve.bench.workloads import random_requests, totals

    size_defaults(args, "throughput")
    peers = _peer_names(args)
    machine = _start(args, "throughput", _settings(args))
    monitor = LoadMonitor()
    runner = _kvserve(args)
    reqs = random_requests(args.num_requests, args.seed, runner.vocab_size, input_len=args.input_len,
                           output_len=args.output_len, scale=args.scale)
    print(f"# workload: {json.dumps(totals(reqs))}, random ids, greedy, ignore_eos")
    _warm(runner, runner.vocab_size)
    dtype = _dtype_name(runner)
    with _bar(args, len(reqs), "kvserve") as bar:
        r = runner.run(reqs, record=True, progress=bar)
    rows = [{"engine": "kvserve", "mode": "LLM engine", "dtype": dtype, "duration_s": r["duration_s"],
             "output_tokens": r["output_tokens"], "output_tok_s": r["output_tok_s"], "total_tok_s": r["total_tok_s"]}]
    ttft = [x * 1e3 for x in r["ttft_s"]]
    if "hf" in peers:
        print("# running peer: HF transformers", file=sys.stderr)
        hf: dict = {}

        def load() -> dict:
            hf["peer"] = HFPeer(args.model, dtype, args.device, args.load_format)
            return {}

        loaded = guarded("hf-transformers", load)
        if "error" in loaded:
            rows.append({**loaded, "mode": "generate", "dtype": dtype})
        else:
            rows.append({**guarded("hf-transformers", lambda: hf["peer"].throughput(reqs, args.hf_batch_size)), "dtype": dtype})
            rows.append({"mode": "generate_batch", **guarded("hf-transformers",
                         lambda: hf["peer"].throughput_generate_batch(reqs)), "dtype": dtype})
        hf.clear()
    if "llamacpp" in peers:
        rows.append({"mode": "sequential", "dtype": "gguf",
                     **guarded("llama.cpp", lambda: LlamaCppPeer(args.model).throughput(reqs))})
    _ratios(rows, "output_tok_s")
    cols = ["engine", "mode", "dtype", "output_tok_s", "duration_s", "kvserve_x"]
    print_table(rows, cols)
    print("# kvserve_x = kvserve output tok/s / peer output tok/s")
    load_warning(monitor)
    _emit(args, "throughput", machine, rows)
    if args.report_dir:
        from kvserve.bench import report

        d = Path(args.report_dir)
        d.mkdir(parents=True, exist_ok=True)
        report.plot_engines(rows, "output_tok_s", "output tok/s", d / "throughput.png")
        report.plot_timeline(runner.timeline, d / "kv_timeline.png", "kvserve: KV cache and requests per engine step")
        tpot = [(e - f) / (q.output_len - 1) * 1e3 for e, f, q in zip(r["e2e_s"], r["ttft_s"], reqs) if q.output_len > 1]
        report.plot_distributions([{"label": "kvserve offline", "samples": {"ttft_ms": ttft, "tpot_ms": tpot}}],
                                  d / "ttft.png")
        path = report.write_report(d, "throughput", machine, _settings(args), rows, cols,
                                   {"Output throughput by engine": "throughput.png",
                                    "KV-cache usage and running/waiting requests over time": "kv_timeline.png",
                                    "TTFT and TPOT (offline, all requests queued at t=0)": "ttft.png"})
        print(f"# report: {path}")
    return 0


# -- latency -------------------------------------------------------------------------------------
def run_latency(args: argparse.Namespace) -> int:
    from kvserve.bench.offline import bandwidth_floor
    from kvserve.bench.peers import HFPeer, LlamaCppPeer, guarded
    from kvserve.bench.workloads import random_requests

    size_defaults(args, "latency")
    peers = _peer_names(args)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"--batch-sizes must be integers >= 1 (got {args.batch_sizes!r})")
    for name in ("prompt_len", "decode_tokens", "repeats", "floor_mib"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    machine = _start(args, "latency", _settings(args))
    monitor = LoadMonitor()
    runner = _kvserve(args)
    _warm(runner, runner.vocab_size)
    dtype = _dtype_name(runner)
    prompt = random_requests(1, args.seed, runner.vocab_size, input_len=args.prompt_len, output_len=1)[0].prompt
    short = [r.prompt for r in random_requests(max(batch_sizes), args.seed + 1, runner.vocab_size, input_len=32, output_len=1)]
    bw = bandwidth_floor(args.device, dtype if dtype in ("float32", "bfloat16", "float16") else "float32", args.floor_mib)
    wbytes = runner.weight_bytes()
    floor_ms = wbytes / (bw["gb_per_s"] * 1e9) * 1e3
    print(f"# bandwidth: {bw['gb_per_s']:.1f} GB/s ({bw['dtype']} matrix-vector read on {bw['device']}); "
          f"weights {wbytes / 1e6:.1f} MB -> batch-1 decode floor {floor_ms:.3f} ms/token")

    # One progress step per measurement (prefill, then each batch size; --repeats times each).
    per_engine = args.repeats * (1 + len(batch_sizes))

    def measure(engine: object, bar, name: str) -> dict:
        # best of --repeats: on a shared machine other load only ever adds time
        bar.set_description(f"{name} prefill")
        times = []
        for _ in range(args.repeats):
            times.append(engine.prefill_s(prompt))
            bar.update(1)
        out = {"prefill_ms": min(times) * 1e3}
        out["prefill_tok_s"] = len(prompt) / out["prefill_ms"] * 1e3
        for b in batch_sizes:
            if b > 1 and isinstance(engine, LlamaCppPeer):
                bar.update(args.repeats)
                continue
            bar.set_description(f"{name} decode b={b}")
            ms = []
            for _ in range(args.repeats):
                ms.append(engine.decode_ms_per_token(short[:b], args.decode_tokens))
                bar.update(1)
            out[f"decode_ms_b{b}"] = min(ms)
        return out

    with _bar(args, per_engine * (1 + len(peers)), "kvserve") as bar:
        rows = [{"engine": "kvserve", "dtype": dtype, **measure(runner, bar, "kvserve")}]
        del runner
        if "hf" in peers:
            bar.set_description("hf: loading")
            rows.append({"dtype": dtype, **guarded("hf-transformers",
                         lambda: measure(HFPeer(args.model, dtype, args.device, args.load_format), bar, "hf"))})
        if "llamacpp" in peers:
            bar.set_description("llama.cpp: loading")
            rows.append({"dtype": "gguf", **guarded("llama.cpp", lambda: measure(LlamaCppPeer(args.model), bar, "llama.cpp"))})
        bar.n = bar.total  # a failed peer skipped its steps
        bar.refresh()
    rows.append({"engine": "bandwidth floor", "dtype": dtype, "decode_ms_b1": floor_ms, "gb_per_s": bw["gb_per_s"],
                 "weight_bytes": wbytes})
    for r in rows:
        if "decode_ms_b1" in r and r["engine"] != "bandwidth floor":
            r["floor_frac"] = floor_ms / r["decode_ms_b1"] if r["decode_ms_b1"] else 0.0
    _ratios(rows[:-1], "decode_ms_b1", higher_is_better=False)
    cols = ["engine", "dtype", "prefill_ms", "prefill_tok_s", *[f"decode_ms_b{b}" for b in batch_sizes], "floor_frac", "kvserve_x"]
    print_table(rows, cols)
    print("# floor_frac = bandwidth floor / measured batch-1 ms (1.0 = at the floor); "
          "kvserve_x = peer batch-1 ms / kvserve batch-1 ms")
    load_warning(monitor)
    _emit(args, "latency", machine, rows)
    if args.report_dir:
        from kvserve.bench import report

        d = Path(args.report_dir)
        d.mkdir(parents=True, exist_ok=True)
        report.plot_engines(rows, "decode_ms_b1", "batch-1 decode ms/token", d / "decode_b1.png")
        report.plot_engines(rows, "prefill_ms", f"prefill ms ({len(prompt)} tokens)", d / "prefill.png")
        path = report.write_report(d, "latency", machine, _settings(args), rows, cols,
                                   {"Batch-1 decode (with the bandwidth floor)": "decode_b1.png", "Prefill": "prefill.png"},
                                   [f"bandwidth {bw['gb_per_s']:.1f} GB/s; floor {floor_ms:.3f} ms/token"])
        print(f"# report: {path}")
    return 0


# -- serve ---------------------------------------------------------------------------------------
def run_serve(args: argparse.Namespace) -> int:
    import httpx

    from kvserve.bench.serve import run_load, summarize, wait_healthy
    from kvserve.bench.workloads import chat_requests, random_requests

    size_defaults(args, "serve")
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    base = args.url.rstrip("/")
    wait_healthy(base)
    if args.model_name is None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        data = httpx.get(base + "/v1/models", headers=headers, timeout=10).json().get("data") or [{}]
        args.model_name = data[0].get("id", "default")
    if args.request_rate:
        loads = [("rate", float(x)) for x in args.request_rate.split(",") if x.strip()]
    else:
        loads = [("concurrency", int(x)) for x in args.concurrency.split(",") if x.strip()]
    machine = _start(args, "serve", _settings(args))
    monitor = LoadMonitor()

    def request_set(i: int):  # a fresh set per level: no level hits another's prefix cache
        if args.dataset == "chat":
            return chat_requests(args.num_prompts, args.seed + 1000 * i, args.vocab, scale=args.scale)
        return random_requests(args.num_prompts, args.seed + 1000 * i, args.vocab,
                               input_len=max(1, round(args.input_len * args.scale)),
                               output_len=max(1, round(args.output_len * args.scale)))

    asyncio.run(run_load(base, args.model_name, request_set(-1)[:2], concurrency=2, api_key=api_key))  # warm-up
    rows, timelines = [], []
    for i, (kind, value) in enumerate(loads):
        label = f"c={value}" if kind == "concurrency" else f"{value:g} req/s"
        with _bar(args, args.num_prompts, label) as bar:
            results, duration, timeline = asyncio.run(run_load(
                base, args.model_name, request_set(i), api_key=api_key, progress=bar, seed=args.seed,
                concurrency=value if kind == "concurrency" else None,
                request_rate=value if kind == "rate" else None))
        s = summarize(results, duration, args.slo_ttft_ms, args.slo_tpot_ms)
        rows.append({"engine": args.model_name, "label": label, kind: value, **s})
        timelines.append((label, timeline))
    flat = []
    for r in rows:
        f = {k: v for k, v in r.items() if not isinstance(v, dict)}
        for m in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            for stat, v in r.get(m, {}).items():
                f[f"{m[:-3]}_{stat}"] = v
        flat.append(f)
    cols = ["label", "requests", "failed", "output_tok_s", "goodput_req_s", "ttft_mean", "ttft_p50", "ttft_p90",
            "ttft_p99", "tpot_mean", "tpot_p50", "tpot_p90", "tpot_p99", "itl_mean", "itl_p50", "itl_p90", "itl_p99",
            "e2e_p50", "e2e_p99"]
    print_table([{"engine": r["label"], **r} for r in flat], cols)
    print(f"# latencies in ms; goodput = requests/s meeting TTFT <= {args.slo_ttft_ms:g} ms and TPOT <= {args.slo_tpot_ms:g} ms")
    for r in flat:
        if r.get("failed"):
            print(f"# {r['label']}: {r['failed']} failed; first error: {r.get('first_error')}")
    from kvserve.runner.cpu_threads import usable_cpus

    load_warning(monitor, usable_cpus())  # the server's threads are not known here: all CPUs
    _emit(args, "serve", machine, flat)
    if args.report_dir:
        from kvserve.bench import report

        d = Path(args.report_dir)
        d.mkdir(parents=True, exist_ok=True)
        report.plot_serve(rows, d / "throughput_vs_load.png", d / "ttft_tpot.png")
        plots = {"Output throughput vs load": "throughput_vs_load.png", "TTFT and TPOT distributions": "ttft_tpot.png"}
        label, tl = max(timelines, key=lambda x: len(x[1]))
        if tl:  # only kvserve servers expose the engine gauges
            report.plot_timeline(tl, d / "kv_timeline.png", f"server /metrics during {label}")
            plots["KV-cache usage and running/waiting requests over time"] = "kv_timeline.png"
        path = report.write_report(d, "serve", machine, _settings(args), flat, cols, plots)
        print(f"# report: {path}")
    return 0


# -- prefix --------------------------------------------------------------------------------------
def run_prefix(args: argparse.Namespace) -> int:
    import gc

    from kvserve.bench.offline import percentiles
    from kvserve.bench.workloads import shared_prefix_requests

    size_defaults(args, "prefix")
    machine = _start(args, "prefix", _settings(args))
    monitor = LoadMonitor()
    rows, timeline = [], []
    for caching in (True, False):
        runner = _kvserve(args, enable_prefix_caching=caching)
        reqs = shared_prefix_requests(args.num_requests, args.seed, runner.vocab_size, prefix_len=args.prefix_len,
                                      suffix_len=args.suffix_len, output_len=args.output_len)
        _warm(runner, runner.vocab_size)
        before = runner.engine.stats()
        mode = "prefix caching on" if caching else "prefix caching off"
        with _bar(args, len(reqs), mode) as bar:
            r = runner.run(reqs, record=caching, progress=bar)
        after = runner.engine.stats()
        q = after["prefix_queries"] - before["prefix_queries"]
        hits = after["prefix_hits"] - before["prefix_hits"]
        rows.append({"engine": "kvserve", "mode": mode, "duration_s": r["duration_s"], "output_tok_s": r["output_tok_s"],
                     "ttft_mean_ms": percentiles([x * 1e3 for x in r["ttft_s"]])["mean"],
                     "prefix_hit_rate": hits / q if q else 0.0, "prompt_tokens": r["prompt_tokens"]})
        if caching:
            timeline = runner.timeline
        del runner
        gc.collect()
    rows[0]["speedup"] = rows[1]["duration_s"] / rows[0]["duration_s"]
    cols = ["mode", "duration_s", "output_tok_s", "ttft_mean_ms", "prefix_hit_rate", "speedup"]
    print_table([{**r, "engine": r["mode"]} for r in rows], cols)
    load_warning(monitor)
    _emit(args, "prefix", machine, rows)
    if args.report_dir:
        from kvserve.bench import report

        d = Path(args.report_dir)
        d.mkdir(parents=True, exist_ok=True)
        report.plot_prefix(rows, d / "prefix.png")
        report.plot_timeline(timeline, d / "kv_timeline.png", "prefix caching on: KV cache and requests per step")
        path = report.write_report(d, "prefix", machine, _settings(args), rows, cols,
                                   {"Prefix caching: time and hit rate": "prefix.png",
                                    "KV-cache usage over time (caching on)": "kv_timeline.png"})
        print(f"# report: {path}")
    return 0


# -- kv-ablation ---------------------------------------------------------------------------------
def run_kv_ablation(args: argparse.Namespace) -> int:
    from kvserve.bench import kv_ablation
    from kvserve.bench.machine import machine_info

    if args.report_dir:
        from kvserve.bench.report import require_matplotlib, write_report

        require_matplotlib()
        Path(args.report_dir).mkdir(parents=True, exist_ok=True)
        args.out = str(Path(args.report_dir) / "kv-ablation.png")
    tmp = None
    if args.json_out and not args.json:
        fd, tmp = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        args.json = tmp
    rc = kv_ablation.run(args)
    machine = machine_info()
    if args.json:
        data = json.loads(Path(args.json).read_text())
        if args.json_out:
            with open(args.json_out, "a") as f:
                f.write(json.dumps({"command": "kv-ablation", **data["summary"], "identical": data["identical"],
                                    "identical_fp32": data["identical_fp32"], "machine": machine}) + "\n")
        if tmp:
            os.unlink(tmp)
    if args.report_dir:
        settings = {k: v for k, v in vars(args).items() if k != "func"}
        path = write_report(args.report_dir, "kv-ablation", machine, settings, [], [],
                            {"Per-token latency and FLOPs with and without the KV cache": "kv-ablation.png"})
        print(f"# report: {path}")
    return rc


# -- perplexity ----------------------------------------------------------------------------------
def run_perplexity(args: argparse.Namespace) -> int:
    from kvserve.bench.peers import guarded
    from kvserve.bench.perplexity import check_window, llamacpp_perplexity, perplexity, plan_windows, read_text
    from kvserve.entrypoints.cli import check_engine_args, engine_kwargs
    from kvserve.entrypoints.llm import LLM
    from kvserve.loader.resolve import resolve_model

    size_defaults(args, "perplexity")
    stride = check_window(args.context, args.stride)
    check_engine_args(args)
    label, text = read_text(args.text)
    settings = {**_settings(args), "stride": stride, "text": label}
    if args.json:
        from kvserve.bench.machine import machine_info

        machine = machine_info()
    else:
        machine = _start(args, "perplexity", settings)
    monitor = LoadMonitor()
    llm = LLM(args.model, load_format=args.load_format, **engine_kwargs(args))
    tok = llm.get_tokenizer()
    if tok is None:
        raise ValueError("perplexity needs the model's tokenizer (this model has none)")
    # One tokenization, fed as ids to every engine; no BOS or other special tokens added.
    ids = tok.encode(text, add_special_tokens=False)
    windows = plan_windows(len(ids), args.context, stride, args.max_tokens_scored)
    if not args.json:
        print(f"# text: {label}, {len(text)} characters, {len(ids)} tokens; {len(windows)} windows of "
              f"<= {args.context} tokens, stride {stride}")
    dtype = str(llm.engine.loaded.dtype).removeprefix("torch.")
    r = perplexity(llm, ids, args.context, stride, args.max_tokens_scored, use_tqdm=not args.no_progress)
    rows = [{"engine": "kvserve", "dtype": dtype, **r.row()}]
    if args.peer:
        del llm
        if not args.json:
            print("# running peer: llama.cpp", file=sys.stderr)

        def peer() -> dict:
            resolved = resolve_model(args.model)
            if resolved.kind != "gguf":
                raise ValueError(f"llama.cpp needs a .gguf model (got a {resolved.kind} folder)")
            return llamacpp_perplexity(resolved.path, ids, args.context, stride, args.max_tokens_scored).row()

        rows.append({"dtype": "gguf", **guarded("llama.cpp", peer)})
    for row in rows:
        row["text"] = label
    if args.json:
        print(json.dumps({"command": "perplexity", "settings": settings, "rows": rows}, default=str))
    else:
        shown = [{**r, "perplexity": f"{r['perplexity']:.4f}"} if "perplexity" in r else r for r in rows]
        print_table(shown, ["engine", "dtype", "tokens_scored", "perplexity", "seconds"])
        load_warning(monitor)
    _emit(args, "perplexity", machine, rows)
    return 0
