"""Where a batch-1 decode step's time goes (random weights).

    python -m benchmarks.gpu_decode_profile [--models Llama-3.1-8B]
    python -m benchmarks.gpu_decode_profile --models Qwen3-30B-A3B --layers 4 --moe-decode fused,torch
    python -m benchmarks.gpu_decode_profile --models Qwen3-30B-A3B --layers 4 \
        --moe-decode fused,fused-router+KVSERVE_QK_NORM_GEMV=1      # the opt-in launch fusions vs the default

Dense models (Llama-3.2-1B / Llama-3.1-8B shapes): end-to-end ms/token through the engine; the
captured decode graph replayed back to back (GPU time of one step, no host turn); the per-kernel
durations of one step from torch.profiler (grouped by kernel name); and the read bandwidth cuBLAS
reaches on each of the model's weight shapes alone (several copies rotated so they are not served
from L2), against the large-GEMV ceiling the decode floor uses.

Mixture-of-experts shapes (the names of `gpu_moe_bench.SHAPES`: Qwen3-30B-A3B, gpt-oss-20b, run as
Qwen3-MoE models with `--layers` of their layers, bf16 experts), once per `--moe-decode` mode
(`KVSERVE_MOE_DECODE`, set before each engine is built; by default `fused`, the engine's default,
then `torch`, the routing as torch ops and the pairs kernels; a mode may carry other settings,
`MODE+KVSERVE_NAME=VALUE`, restored after its engine): the graph replay and end-to-end
ms/token against the floor of the bytes one step reads (active experts only, as
`gpu_moe_bench`), then ONE batch-1 decode step run eagerly under torch.profiler: every CUDA
kernel (name shortened), launches per step, total and mean µs, and its exclusive µs (the part
no earlier kernel covers: kernels launched with PDL start early and wait, so their own durations
overlap), with the sums; the same summary for one graph replay; then a table of the modes side by
side. < 2 minutes on an H100 at the defaults; without CUDA it prints a message and exits.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import random
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from benchmarks.gpu_bench import (
    ceilings,
    events_time,
    kv_bytes_per_token,
    kvserve_decode,
    log,
    model_folder,
    weight_read_bytes,
)
from kvserve import LLM, SamplingParams


def gemv_bw(n: int, k: int) -> float:
    """bf16 [1, k] @ [n, k]^T read bandwidth (B/s), rotating >= 256 MiB of weight copies."""
    copies = max(2, -(-(256 << 20) // (n * k * 2)))
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    i = [0]

    def f() -> None:
        i[0] = (i[0] + 1) % copies
        x @ ws[i[0]].t()
    t = events_time(f, 200)
    return n * k * 2 / t


def kernel_table(prof, steps: int) -> list[tuple[str, int, float]]:
    """(kernel name, launches per step, µs per step) for the profiled region."""
    agg: dict[str, list[float]] = collections.defaultdict(list)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            agg[e.name].append(e.time_range.elapsed_us())
    rows = [(name[:90], len(v) // steps, sum(v) / steps) for name, v in agg.items()]
    rows.sort(key=lambda r: -r[2])
    return rows


# -- mixture-of-experts shapes: one step's kernels --------------------------------------------
_GENERIC = {"BinaryFunctor", "UnaryFunctor", "AUnaryFunctor", "BUnaryFunctor", "ReduceOp"}


def short_name(name: str, width: int = 64) -> str:
    """A CUDA kernel name without `void`, namespaces, template arguments and parameters; a functor
    or op named in the template arguments is kept in brackets (torch's elementwise kernels all
    share one name): `void at::native::vectorized_elementwise_kernel<4, at::native::BinaryFunctor<
    float, float, float, at::native::binary_internal::DivFunctor<float> >, ...>(int, ...)` ->
    `vectorized_elementwise_kernel[DivFunctor]`."""
    name = name.strip().replace("(anonymous namespace)::", "")
    if name.startswith(("Memcpy", "Memset")):
        return name[:width]
    if name.startswith("void "):
        name = name[5:]
    depth, base_end = 0, len(name)
    for i, c in enumerate(name):  # the end of the base name: the first '<' or '(' at depth 0
        if c in "<(" and depth == 0:
            base_end = i
            break
    base = name[:base_end].split("::")[-1] or name[:base_end]
    rest = name[base_end:]
    if rest.startswith("<"):
        found = [f for f in re.findall(r"(\w+(?:Functor|functor|_kernel_cuda|Op|_kernel|Kernel))\b", rest)
                 if f != base and f not in _GENERIC]
        functors = [f for f in found if f.lower().endswith("functor")]
        if functors or found:
            base += f"[{functors[-1] if functors else found[0]}]"
    return base if len(base) <= width else base[: width - 3] + "..."


def kernel_rows(kernels: list[tuple[float, float, str]], steps: int = 1) -> list[dict]:
    """Kernels (start µs, end µs, full name) of `steps` steps -> one row per shortened name:
    launches, total and mean µs, exclusive µs (`tp_bench.split_timeline`), per step; by
    exclusive time, largest first."""
    from benchmarks.tp_bench import split_timeline

    short = [(a, b, short_name(n)) for a, b, n in kernels]
    split = split_timeline(short)
    counts = collections.Counter(n for _, _, n in short)
    rows = [{"kernel": n, "count": counts[n] / steps, "total_us": split["total"][n] / steps,
             "mean_us": split["total"][n] / counts[n], "exclusive_us": split["exclusive"][n] / steps}
            for n in counts]
    rows.sort(key=lambda r: (-r["exclusive_us"], r["kernel"]))
    return rows


def format_table(rows: list[dict], title: str = "") -> str:
    """The rows of `kernel_rows` as a fixed-width table with a sum line."""
    width = max([len(r["kernel"]) for r in rows] + [6])
    lines = [title] if title else []
    lines.append(f"{'kernel':{width}s} {'n/step':>7s} {'total us':>9s} {'mean us':>8s} {'excl. us':>9s}")
    for r in rows:
        count = f"{r['count']:.0f}" if float(r["count"]).is_integer() else f"{r['count']:.1f}"
        lines.append(f"{r['kernel']:{width}s} {count:>7s} {r['total_us']:9.1f} {r['mean_us']:8.2f} "
                     f"{r['exclusive_us']:9.1f}")
    n = sum(r["count"] for r in rows)
    lines.append(f"{'sum':{width}s} {n:7.0f} {sum(r['total_us'] for r in rows):9.1f} {'':8s} "
                 f"{sum(r['exclusive_us'] for r in rows):9.1f}")
    return "\n".join(lines)


def diff_rows(base: list[dict], other: list[dict]) -> list[dict]:
    """Two `kernel_rows` tables (one step each) -> per kernel name its count, total and
    exclusive µs in both and the differences (other - base); largest exclusive change first."""
    a, b = {r["kernel"]: r for r in base}, {r["kernel"]: r for r in other}
    zero = {"count": 0, "total_us": 0.0, "exclusive_us": 0.0}
    rows = []
    for name in {*a, *b}:
        x, y = a.get(name, zero), b.get(name, zero)
        rows.append({"kernel": name, "count_base": x["count"], "count_other": y["count"],
                     "total_base_us": x["total_us"], "total_other_us": y["total_us"],
                     "excl_base_us": x["exclusive_us"], "excl_other_us": y["exclusive_us"],
                     "d_excl_us": y["exclusive_us"] - x["exclusive_us"], "d_total_us": y["total_us"] - x["total_us"]})
    rows.sort(key=lambda r: (-abs(r["d_excl_us"]), r["kernel"]))
    return rows


def format_diff(rows: list[dict], base: str = "base", other: str = "other", title: str = "") -> str:
    """The rows of `diff_rows` as a fixed-width table with a sum line."""
    width = max([len(r["kernel"]) for r in rows] + [6])
    lines = [title] if title else []
    lines.append(f"{'kernel':{width}s} {'n ' + base:>9s} {'n ' + other:>9s} {'excl ' + base:>11s} "
                 f"{'excl ' + other:>11s} {'d excl us':>10s} {'d total us':>10s}")

    def num(v: float) -> str:
        return f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}"
    for r in rows:
        lines.append(f"{r['kernel']:{width}s} {num(r['count_base']):>9s} {num(r['count_other']):>9s} "
                     f"{r['excl_base_us']:11.1f} {r['excl_other_us']:11.1f} {r['d_excl_us']:+10.1f} "
                     f"{r['d_total_us']:+10.1f}")
    s = {k: sum(r[k] for r in rows) for k in ("count_base", "count_other", "excl_base_us", "excl_other_us",
                                               "d_excl_us", "d_total_us")}
    lines.append(f"{'sum':{width}s} {num(s['count_base']):>9s} {num(s['count_other']):>9s} {s['excl_base_us']:11.1f} "
                 f"{s['excl_other_us']:11.1f} {s['d_excl_us']:+10.1f} {s['d_total_us']:+10.1f}")
    return "\n".join(lines)


def cuda_kernels(prof) -> list[tuple[float, float, str]]:
    """(start µs, end µs, name) of every CUDA activity (kernels, copies) torch.profiler saw."""
    return [(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA]


def parse_variant(variant: str) -> tuple[str, dict[str, str]]:
    """`MODE[+NAME=VALUE...]` -> (KVSERVE_MOE_DECODE mode, other environment settings):
    `fused-router+KVSERVE_QK_NORM_GEMV=1` is mode fused-router with KVSERVE_QK_NORM_GEMV=1."""
    mode, *extra = variant.split("+")
    env = {}
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("KVSERVE_"):
            raise ValueError(f"--moe-decode: {item!r} in {variant!r} is not KVSERVE_NAME=VALUE")
        env[key] = value
    return mode, env


def profile_moe(name: str, layers: int, variant: str, root: Path, bw: float, results: dict) -> None:
    """One engine at MoE shapes with `KVSERVE_MOE_DECODE=mode` (and the variant's other settings,
    `parse_variant`): ms/token (graph replay and end to end) against the floor, then one eager
    decode step's kernels and one graph replay's."""
    from benchmarks.gpu_moe_bench import SHAPES, config

    k = SHAPES[name][1]
    folder = root / f"{name}-{layers}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config(name, layers)))
    mode, env = parse_variant(variant)
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    os.environ["KVSERVE_MOE_DECODE"] = mode
    try:
        _profile_moe(name, layers, variant, folder, bw, results, k)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _profile_moe(name: str, layers: int, mode: str, folder: Path, bw: float, results: dict, k: int) -> None:
    from benchmarks.gpu_moe_bench import SHAPES, decode_bytes

    t0 = time.perf_counter()
    # Qwen3-30B-A3B at its full 48 layers holds 57 GiB of bf16 weights: on an 80 GB card the KV
    # cache needs more than half of the memory (at 0.5 the engine refuses to start).
    llm = LLM(str(folder), load_format="dummy", max_model_len=2048, max_num_seqs=8, enable_prefix_caching=False,
              gpu_memory_utilization=0.5 if layers <= 24 else 0.93)
    startup = time.perf_counter() - t0
    eng, runner = llm.engine, llm.engine.runner
    assert runner.graphs is not None, "CUDA graphs are off"
    wb, _ = decode_bytes(runner.model, SHAPES[name], k)
    kv = kv_bytes_per_token(eng.model_config) * 192
    floor = (wb + kv) / bw
    e2e = kvserve_decode(llm, new=64, reps=2)  # also the warm-up
    # A sanity check across variants (the same dummy weights: seeded): one greedy request's tokens.
    check = llm.generate([{"prompt_token_ids": list(range(100, 164))}],
                         SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True), use_tqdm=False)
    tokens = list(check[0].outputs[0].token_ids)
    replay, eager_rows, graph_rows = step_profile(llm)
    label = f"{name}, {layers} of {SHAPES[name][4]} layers, variant {mode}"
    log(f"\n== {label} (start-up {startup:.0f}s): weights read {wb / 1e9:.3f} GB/step, floor {floor * 1e3:.3f} ms "
        f"at {bw / 1e9:.0f} GB/s")
    log(f"graph replay {replay * 1e3:.3f} ms/token ({100 * floor / replay:.1f}% of the floor); "
        f"end to end {e2e * 1e3:.3f} ms/token ({100 * floor / e2e:.1f}%)")
    log_step_profile(replay, eager_rows, graph_rows, layers)
    results[f"{name}/{mode}"] = {"layers": layers, "startup_s": startup, "floor_ms": floor * 1e3,
                                 "graph_kernels_per_step": sum(r["count"] for r in graph_rows), "greedy_tokens": tokens,
                                 "replay_ms": replay * 1e3, "e2e_ms": e2e * 1e3, "pct_floor_replay": 100 * floor / replay,
                                 "pct_floor_e2e": 100 * floor / e2e, "eager_kernels": eager_rows,
                                 "graph_kernels": graph_rows}


def step_profile(llm: LLM, vocab: int = 10000) -> tuple[float, list[dict], list[dict]]:
    """A request left mid-decode at context ~192 (the static graph inputs hold a real step), then:
    the batch-1 graph replayed back to back (seconds a step), the kernels of one eager step and of
    one replay (`kernel_rows`). The request is finished before returning."""
    from torch.profiler import ProfilerActivity, profile

    eng, graphs = llm.engine, llm.engine.runner.graphs
    assert graphs is not None, "CUDA graphs are off"
    rng = random.Random(5)
    eng.add_request("p", [rng.randrange(vocab) for _ in range(128)],
                    SamplingParams(max_tokens=66, temperature=0.0, ignore_eos=True))
    for _ in range(64):
        eng.step()
    replay = events_time(lambda: graphs.replay(1), 50)
    with torch.inference_mode():
        graphs._step(1)  # eager warm-up (nothing new to compile: the graphs' warm-up ran it)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            graphs._step(1)
            torch.cuda.synchronize()
    eager_rows = kernel_rows(cuda_kernels(prof))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graphs.replay(1)
        torch.cuda.synchronize()
    graph_rows = kernel_rows(cuda_kernels(prof))
    while eng.has_unfinished_requests():
        eng.step()
    return replay, eager_rows, graph_rows


def log_step_profile(replay: float, eager_rows: list[dict], graph_rows: list[dict], layers: int) -> None:
    log(format_table(eager_rows, f"one eager decode step (batch 1), {sum(r['count'] for r in eager_rows):.0f} "
                                 f"kernels, {layers} layers:"))
    g_busy = sum(r["exclusive_us"] for r in graph_rows)
    log(f"one graph replay: {sum(r['count'] for r in graph_rows):.0f} kernels, {g_busy:.1f} us busy "
        f"(replay timed {replay * 1e6:.1f} us: {replay * 1e6 - g_busy:.1f} us idle between kernels)")
    for r in graph_rows[:12]:
        log(f"  {r['kernel']:64s} {r['count']:5.0f} {r['exclusive_us']:9.1f} us exclusive")


def host_phases(llm: LLM, new: int = 128) -> dict[str, float]:
    """Host µs per step of each engine phase of a batch-1 decode (timers wrapped around them)."""
    from kvserve.runner import model_runner

    eng = llm.engine
    acc: dict[str, float] = collections.defaultdict(float)
    undo = []

    def wrap(obj, attr: str, label: str) -> None:
        orig = getattr(obj, attr)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                acc[label] += time.perf_counter() - t
        setattr(obj, attr, timed)
        undo.append((obj, attr, orig))
    wrap(eng.scheduler, "schedule", "schedule")
    wrap(eng.scheduler, "update_from_output", "update_from_output")
    wrap(eng.runner, "execute_async", "execute_async (inputs, replay launch, sampling launch)")
    wrap(eng.runner.graphs, "replay", "  of which graph replay launch")
    wrap(eng.runner.graphs, "load_inputs", "  of which load_inputs")
    wrap(eng.runner, "_sample", "  of which _sample")
    wrap(eng, "_outputs", "_outputs (overlapped with the GPU)")
    wrap(model_runner.PendingStep, "result", "PendingStep.result (waits for the GPU)")
    rng = random.Random(9)
    eng.add_request("h", [rng.randrange(10000) for _ in range(128)],
                    SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True))
    eng.step()
    acc.clear()
    t0 = time.perf_counter()
    steps = 0
    while eng.has_unfinished_requests():
        eng.step()
        steps += 1
    acc["total step() wall"] = time.perf_counter() - t0
    for obj, attr, orig in reversed(undo):
        if obj is model_runner.PendingStep:
            setattr(obj, attr, orig)
        else:
            delattr(obj, attr) if attr in vars(obj) else setattr(obj, attr, orig)
    return {k: v / steps * 1e6 for k, v in acc.items()}


def launch_host_time(graphs) -> tuple[float, float]:
    """(host µs of one replay() call with the GPU idle, µs from that call to the GPU finishing)."""
    host, wall = [], []
    for _ in range(20):
        torch.cuda.synchronize()
        t = time.perf_counter()
        graphs.replay(1)
        host.append(time.perf_counter() - t)
        torch.cuda.synchronize()
        wall.append(time.perf_counter() - t)
    host.sort()
    wall.sort()
    return host[10] * 1e6, wall[10] * 1e6


def profile_model(name: str, root: Path, bw: float, results: dict) -> None:
    llm = LLM(model_folder(name, root), load_format="dummy", max_model_len=4096, max_num_seqs=8,
              enable_prefix_caching=False, gpu_memory_utilization=0.6)
    eng, runner = llm.engine, llm.engine.runner
    cfg = eng.model_config
    wbytes = weight_read_bytes(runner.model)
    floor = (wbytes + kv_bytes_per_token(cfg) * 256) / bw
    e2e = kvserve_decode(llm)
    # Leave a request mid-decode at context ~256 so the static graph inputs hold a real step.
    rng = random.Random(5)
    eng.add_request("p", [rng.randrange(10000) for _ in range(128)],
                    SamplingParams(max_tokens=129, temperature=0.0, ignore_eos=True))
    for _ in range(128):
        eng.step()
    graphs = runner.graphs
    replay = events_time(lambda: graphs.replay(1), 100)
    launch_host, launch_wall = launch_host_time(graphs)
    out1 = graphs.outputs[1]

    def replay_sample() -> None:
        graphs.replay(1)
        out1.argmax(-1)
    replay_arg = events_time(replay_sample, 100)
    with torch.inference_mode():
        eager = events_time(lambda: graphs._step(1), 20)
    while eng.has_unfinished_requests():
        eng.step()
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            graphs.replay(1)
        torch.cuda.synchronize()
    table = kernel_table(prof, 5)
    kern_sum = sum(r[2] for r in table)
    n_kern = sum(r[1] for r in table)
    log(f"\n== {name}: weights {wbytes / 1e9:.2f} GB, floor {floor * 1e3:.3f} ms at {bw / 1e9:.0f} GB/s")
    log(f"e2e {e2e * 1e3:.3f} ms/tok ({100 * floor / e2e:.1f}%); graph replay {replay * 1e3:.3f} ms "
        f"({100 * floor / replay:.1f}%); replay+argmax {replay_arg * 1e3:.3f} ms; eager step {eager * 1e3:.3f} ms")
    log(f"replay() from idle: host {launch_host:.0f} us, until the GPU is done {launch_wall:.0f} us "
        f"({len(getattr(graphs.graphs[1], 'parts', [1]))} graphs per step)")
    phases = host_phases(llm)
    for k, v in phases.items():
        log(f"  host per step: {k:60s} {v:8.1f} us")
    # The same with one graph per step (no split), for comparison.
    from kvserve.runner.cuda_graphs import DecodeGraphs

    cur_split = runner_split(llm)
    runner.graphs = None
    graphs = None  # noqa: F841 (frees the old graphs' pool; closures above hold the name)
    gc.collect()
    runner.graphs = DecodeGraphs(runner, 8, split=not cur_split)
    runner.graphs.capture()
    e2e_alt = kvserve_decode(llm)
    lh_alt, lw_alt = launch_host_time(runner.graphs)
    log(f"with split={runner.graphs.split}: e2e {e2e_alt * 1e3:.3f} ms/tok ({100 * floor / e2e_alt:.1f}%); replay() "
        f"from idle: host {lh_alt:.0f} us, until done {lw_alt:.0f} us")
    log(f"profiled graph step: {n_kern} kernels, {kern_sum / 1e3:.3f} ms of kernel time; gaps "
        f"{replay * 1e3 - kern_sum / 1e3:.3f} ms")
    log(f"{'kernel':90s} {'n/step':>6s} {'us/step':>8s} {'us each':>8s}")
    for k, n, us in table[:25]:
        log(f"{k:90s} {n:6d} {us:8.1f} {us / max(n, 1):8.2f}")
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    shapes = {"qkv": (qkv, h), "o_proj": (h, cfg.num_heads * cfg.head_dim), "gate_up": (2 * i, h),
              "down": (h, i), "lm_head": (v, h)}
    gemv = {}
    for sname, (n, k) in shapes.items():
        b = gemv_bw(n, k)
        gemv[sname] = b / 1e9
        log(f"cuBLAS GEMV {sname:8s} [{n} x {k}]: {b / 1e9:.0f} GB/s ({100 * b / bw:.1f}% of the ceiling), "
            f"{n * k * 2 / b * 1e6:.1f} us")
    results[name] = {"e2e_other_split_ms": e2e_alt * 1e3, "launch_host_us": launch_host,
                     "launch_wall_us": launch_wall, "host_phases_us": phases,
                     "floor_ms": floor * 1e3, "e2e_ms": e2e * 1e3, "replay_ms": replay * 1e3,
                     "replay_argmax_ms": replay_arg * 1e3, "eager_ms": eager * 1e3,
                     "kernel_ms": kern_sum / 1e3, "kernels": n_kern, "table": table, "gemv_GBps": gemv}
    del llm, eng, runner
    gc.collect()
    torch.cuda.empty_cache()


def runner_split(llm: LLM) -> bool:
    return bool(getattr(llm.engine.runner.graphs, "split", False))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="Llama-3.2-1B,Llama-3.1-8B",
                    help="dense (gpu_bench) or MoE (gpu_moe_bench.SHAPES) model names, comma-separated")
    ap.add_argument("--layers", type=int, default=4, help="layers of an MoE model (its own depth is larger)")
    ap.add_argument("--moe-decode", default="fused,torch",
                    help="KVSERVE_MOE_DECODE modes to profile, in turn (fused: the default; torch: routing as torch "
                         "ops; fused-router: norm, router and routing in one launch), each optionally with "
                         "+KVSERVE_NAME=VALUE settings, e.g. fused,fused-router+KVSERVE_QK_NORM_GEMV=1")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_decode_profile: no CUDA device, nothing to profile (skipped)")
        sys.exit(0)
    from benchmarks.gpu_moe_bench import SHAPES

    log(f"card: {torch.cuda.get_device_name(0)}")
    names = args.models.split(",")
    results: dict = {"card": torch.cuda.get_device_name(0)}
    if all(n in SHAPES for n in names):  # MoE only: the quick bandwidth measure of gpu_moe_bench
        from benchmarks.gpu_moe_bench import gemv_bandwidth

        bw = gemv_bandwidth()
        log(f"bf16 GEMV read ceiling {bw / 1e9:.0f} GB/s (best of cuBLAS and Triton on two large shapes)")
    else:
        bw, _ = ceilings()
        from benchmarks.gpu_bench import RESULTS

        log(f"GEMV ceiling {bw / 1e9:.0f} GB/s (best of {RESULTS['ceiling_gemvs_GBps']})")
    results["gemv_ceiling_GBps"] = bw / 1e9
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            if name in SHAPES:
                for mode in args.moe_decode.split(","):
                    try:  # a variant that fails is reported; the others still run
                        profile_moe(name, args.layers, mode, Path(tmp), bw, results)
                    except Exception:
                        log(f"\n== {name} variant {mode} FAILED:\n{traceback.format_exc()}")
                    gc.collect()  # the engine of this mode goes before the next one is built
                    torch.cuda.empty_cache()
                    Path(args.out, "decode_profile.json").write_text(json.dumps(results, indent=1))
                os.environ.pop("KVSERVE_MOE_DECODE", None)
                log(f"\n== {name}, {args.layers} layers: variants side by side (same run, same card)")
                log(f"{'variant':48s} {'replay ms':>9s} {'% floor':>8s} {'e2e ms':>8s} {'% floor':>8s} {'kernels':>8s} "
                    f"{'greedy tokens = first variant':>30s}")
                first = None
                for mode in args.moe_decode.split(","):
                    r = results.get(f"{name}/{mode}")
                    if r:
                        first = first or r["greedy_tokens"]
                        same = sum(a == b for a, b in zip(first, r["greedy_tokens"]))
                        lead = next((i for i, (a, b) in enumerate(zip(first, r["greedy_tokens"])) if a != b),
                                    len(first))
                        log(f"{mode:48s} {r['replay_ms']:9.3f} {r['pct_floor_replay']:7.1f}% {r['e2e_ms']:8.3f} "
                            f"{r['pct_floor_e2e']:7.1f}% {r['graph_kernels_per_step']:8.0f} "
                            f"{f'{same}/{len(first)} (first {lead} in a row)':>30s}")
                continue
            profile_model(name, Path(tmp), bw, results)
            Path(args.out, "decode_profile.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
