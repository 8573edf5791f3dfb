"""Speculative decoding on one GPU, Llama-3.1-8B shapes (bf16, random weights):

    python -m benchmarks.spec_gpu_bench            # all sections, < 4 minutes on an H100
    python -m benchmarks.spec_gpu_bench --only verify,e2e --k 4

(a) verify: the cost of one verify step of k + 1 rows per request against a one-token decode
    step, at batch 1 and batch 16 (1 vs k + 1 rows, 16 vs 16(k + 1) rows; context 1024), both
    as CUDA-graph replays (forward + logits) of the decode graphs the engine uses. Target:
    <= 1.15x at batch 1. Each variant of `verifyprof_variants` in turn (the default first:
    verify rows attended by request, then `KVSERVE_VERIFY_ATTN=rows`).
(b) e2e: decode tok/s (first token to last) with a proposer forced to acceptance rate a
    (`kvserve.spec_decode.oracle.OracleProposer`: draft j is the target's own greedy token
    with probability a, else a wrong one; the references come from a plain run on the same
    engine) against plain decoding, at batch 1 and batch 16; greedy ids compared with plain.
    In bf16 a (k + 1)-row step and a 1-row step round differently, so at a near-tie of the
    random-weight model the speculative ids can part from plain's; from there the references
    are wrong and the measured acceptance falls below a: read the speedup against the
    measured tokens per verify step (printed next to it), not against a alone.
(c) backoff: batch-32 output tok/s with speculation on and nothing ever accepted (a = 0,
    back-off on) against plain; the issue's bound is a drop of at most 5%.
(p) verifyprof (`--only verifyprof`, < 2 minutes on an H100): where a batch-1 verify step's
    extra time goes. One eager step and one CUDA-graph replay of 1 row and of k + 1 rows
    (context 1024) under torch.profiler: per kernel name the launches, total and exclusive µs
    (`gpu_decode_profile.kernel_rows`: exclusive = what a kernel adds to the busy timeline, as
    PDL kernels overlap), the graph's idle gaps, then the difference tables (k + 1 rows - 1 row,
    `gpu_decode_profile.diff_rows`). Each variant of `verifyprof_variants` (the engine's default
    first) is profiled in turn, so opt-out switches compare in one run.
(k) kernels (runs before the engine starts; `--only kernels,verify` for the GEMV work): per
    Llama-3.1-8B projection, µs of the one-row Triton GEMV and cuBLAS (`F.linear`) at M = 2, 5,
    8 rows, each inside a CUDA graph over enough weight copies (>= 256 MiB) that no call is
    served from L2; and the fused variants the model runs (gate/up + SiLU·mul, qkv + RoPE + K/V
    store): one row through the GEMV with the epilogue, 5 and 8 rows through cuBLAS then the
    epilogue kernel. Next to them the Triton verify GEMM (`kernels/triton_verify_gemm.py`, the
    engine's default for 2..16 rows, `KVSERVE_VERIFY_GEMM=triton`) at M = 2, 5, 8, 16 with its
    default config and its fused variants at 5 and 8 rows (`--vgemm-sweep`: also its neighbouring
    configs at M = 5, the best per projection printed). The verify and verifyprof sections add a
    variant with the other product path (`gemm=cublas` by default: the default attention, the
    products of 2..16 rows through cuBLAS then the epilogue kernels).

Everything runs on one engine: plain runs set `engine.spec = None`. The first run of each
configuration is a warm-up (not timed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.gpu_bench import events_time, model_folder
from benchmarks.gpu_gemv import graph_time
from kvserve import LLM, SamplingParams
from kvserve.runner.cuda_graphs import DecodeGraphs, verify_attn_grouped, verify_groups
from kvserve.spec_decode.config import SpeculativeConfig
from kvserve.spec_decode.decoder import SpecDecoder
from kvserve.spec_decode.oracle import OracleProposer

MODEL = "Llama-3.1-8B"
RESULTS: dict[str, object] = {}


def log(msg: str) -> None:
    print(msg, flush=True)


def replay_time(g: DecodeGraphs, bs: int, reps: int = 30, verify: bool = False) -> float:
    """Median seconds of one replay of the graph of `bs` rows (groups of 10, CUDA events);
    `verify`: the graph a verify step replays."""
    for _ in range(2):
        g.replay(bs, verify)
    return events_time(lambda: g.replay(bs, verify), reps)


def fill_static(g: DecodeGraphs, batch: int, width: int, ctx: int, block_size: int) -> int:
    """Static inputs of `batch` requests x `width` rows at positions ctx .. ctx + width - 1
    (verify rows: one block table per request, context lengths ctx + 1, ctx + 2, ...)."""
    m = g.max_bs
    blocks_per_req = -(-(ctx + width) // block_size)
    rows = batch * width
    ids, pos, slots, lens = [], [], [], []
    for r in range(batch):
        for j in range(width):
            p = ctx + j
            ids.append(random.randrange(1000, 100000))
            pos.append(p)
            slots.append((r * blocks_per_req + p // block_size) * block_size + p % block_size)
            lens.append(p + 1)
    dev = g.static.device
    g.i64[:rows] = torch.tensor(ids, device=dev)
    g.i64[m : m + rows] = torch.tensor(pos, device=dev)
    g.i64[2 * m : 2 * m + rows] = torch.tensor(slots, device=dev)
    g.seq_lens[:rows] = torch.tensor(lens, dtype=torch.int32, device=dev)
    grouped = width > 1 and g.grouped(rows, verify=True)
    groups = verify_groups(np.repeat(np.arange(batch), width), width) if grouped else np.ones(rows)
    g.groups[:rows] = torch.tensor(groups, dtype=torch.int32, device=dev)
    table = torch.arange(batch * blocks_per_req, dtype=torch.int32, device=dev).view(batch, blocks_per_req)
    g.block_tables[:rows, :blocks_per_req] = table.repeat_interleave(width, dim=0)
    return rows


# Llama-3.1-8B projections (N, K).
KERNEL_SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
                 "lm_head": (128256, 4096)}
KERNEL_ROWS = (2, 5, 8)
VGEMM_ROWS = (2, 5, 8, 16)


def _vgemm_configs(tiles: int, k: int) -> list[tuple[int, int, int, int, int]]:
    """The verify GEMM's default config first, then a few neighbours (split, stages, BLOCK_K)."""
    from kvserve.kernels.triton_verify_gemm import verify_gemm_config

    d = verify_gemm_config(tiles, k)
    bn, bk, split, warps, stages = d
    cands = [d, (bn, bk, split, warps, 6), (bn, bk, split, warps, 3), (bn, 256, split, warps, 3),
             (bn, bk, split * 2, warps, stages), (bn, bk, max(1, split // 2), warps, stages), (128, bk, split, 8, 3)]
    out = []
    for c in cands:
        if c not in out and k // c[2] >= 2 * c[1]:
            out.append(c)
    return out


def _copies(n: int, k: int) -> list[torch.Tensor]:
    count = max(2, -(-(256 << 20) // (n * k * 2)))
    return [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(count)]


def _try_time(label: str, fn, ws, reps: int = 5) -> float:
    """graph_time, or NaN (logged) where the kernel fails: the cuBLAS / GEMV columns still print."""
    try:
        return graph_time(fn, ws, reps=reps)
    except Exception as e:
        log(f"[kernels] {label}: {type(e).__name__}: {str(e)[:300]}")
        torch.cuda.synchronize()
        return float("nan")


def section_kernels(vgemm_sweep: bool = False) -> None:
    import torch.nn.functional as F

    from kvserve.kernels import triton_verify_gemm as vg
    from kvserve.models import fused_ops, triton_ops

    table, fused = [], []
    for name, (n, k) in KERNEL_SHAPES.items():
        ws = _copies(n, k)
        xs = {m: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for m in (1, *KERNEL_ROWS, *VGEMM_ROWS)}
        row = {"shape": f"{n}x{k}", "MB": n * k * 2 / 1e6,
               "gemv_1": graph_time(lambda w: triton_ops.gemv(xs[1], w), ws)}
        for m in KERNEL_ROWS:
            x = xs[m]
            row[f"cublas_{m}"] = graph_time(lambda w: F.linear(x, w), ws)
        # Fewer replays for the verify GEMM's columns (each replay reads >= 256 MiB): the section
        # stays near a minute.
        row["cublas_16"] = graph_time(lambda w: F.linear(xs[16], w), ws, reps=5)
        for m in VGEMM_ROWS:
            x = xs[m]
            row[f"vgemm_{m}"] = _try_time(f"{name} verify GEMM M={m}", lambda w: vg.verify_gemm(x, w), ws)
        sweep = {str(vg.verify_gemm_config(-(-n // 64), k)): row["vgemm_5"]}
        for cfg in _vgemm_configs(-(-n // 64), k)[1:] if vgemm_sweep else []:
            sweep[str(cfg)] = _try_time(f"{name} verify GEMM config {cfg}",
                                        lambda w, cfg=cfg: vg.verify_gemm(xs[5], w, None, cfg), ws)
        timed = {c: t for c, t in sweep.items() if t == t}
        best = min(timed, key=timed.get) if timed else "none"
        row["vgemm_5_best"], row["vgemm_5_best_config"] = timed.get(best, float("nan")), best
        log(f"[kernels] {name} verify GEMM M=5 sweep (BLOCK_N, BLOCK_K, SPLIT, warps, stages) -> µs: "
            + ", ".join(f"{c} {t:.1f}" for c, t in sweep.items()))
        table.append((name, row))
        RESULTS[f"kernels/{name}"] = row
        log(f"[kernels] {name}: " + ", ".join(f"{key} {v:.1f}" for key, v in row.items() if isinstance(v, float)))
        if name in ("gate_up", "qkv"):
            fused.append((name, _fused_times(name, n, k, ws, xs, triton_ops, fused_ops)))
        del ws
        torch.cuda.empty_cache()
    log(f"\n[kernels] {MODEL} bf16 projections, µs per call inside a CUDA graph, weights rotated past L2")
    log("| projection | N x K | MB | GEMV 1 row | GEMV GB/s | cuBLAS M=2 | cuBLAS M=5 | cuBLAS M=8 | cuBLAS M=16 | "
        "vGEMM M=2 | vGEMM M=5 | vGEMM M=8 | vGEMM M=16 | vGEMM M=5 best (config) |")
    log("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in table:
        log(f"| {name} | {r['shape']} | {r['MB']:.0f} | {r['gemv_1']:.1f} | {r['MB'] * 1e3 / r['gemv_1']:.0f} | "
            f"{r['cublas_2']:.1f} | {r['cublas_5']:.1f} | {r['cublas_8']:.1f} | {r['cublas_16']:.1f} | "
            f"{r['vgemm_2']:.1f} | {r['vgemm_5']:.1f} | {r['vgemm_8']:.1f} | {r['vgemm_16']:.1f} | "
            f"{r['vgemm_5_best']:.1f} {r['vgemm_5_best_config']} |")
    keys = ("gemv_1", "cublas_5", "vgemm_5", "vgemm_5_best")
    total = {key: sum(r[key] * (1 if name == "lm_head" else 32) for name, r in table) for key in keys}
    log(f"per step (32 layers + LM head, products only): GEMV 1 row {total['gemv_1'] / 1e3:.3f} ms, "
        f"cuBLAS 5 rows {total['cublas_5'] / 1e3:.3f} ms ({total['cublas_5'] / total['gemv_1']:.3f}x), "
        f"verify GEMM 5 rows {total['vgemm_5'] / 1e3:.3f} ms ({total['vgemm_5'] / total['gemv_1']:.3f}x; "
        f"best configs {total['vgemm_5_best'] / 1e3:.3f} ms)")
    RESULTS["kernels/per_step_us"] = total
    log("\n| fused projection | 1 row (GEMV + epilogue) | M=5 (cuBLAS + kernel) | M=8 (cuBLAS + kernel) | "
        "M=5 verify GEMM fused | M=8 verify GEMM fused |")
    log("|---|---|---|---|---|---|")
    for name, r in fused:
        RESULTS[f"kernels/fused_{name}"] = r
        log(f"| {name} | {r['one']:.1f} | {r['unfused_5']:.1f} | {r['unfused_8']:.1f} | {r['vgemm_5']:.1f} | "
            f"{r['vgemm_8']:.1f} |")


def _fused_times(name, n, k, ws, xs, triton_ops, fused_ops) -> dict[str, float]:
    """µs of the fused projections the model runs: gate/up + SiLU·mul, qkv + RoPE + K/V store."""
    import torch.nn.functional as F

    from kvserve.kernels import triton_verify_gemm as vg

    out: dict[str, float] = {}
    if name == "gate_up":
        out["one"] = graph_time(lambda w: triton_ops.gemv_silu_mul(xs[1], w), ws)
        for m in (5, 8):
            x = xs[m]
            out[f"unfused_{m}"] = graph_time(lambda w: triton_ops.silu_and_mul(F.linear(x, w)), ws)
            out[f"vgemm_{m}"] = _try_time(f"gate_up verify GEMM + SiLU·mul M={m}",
                                          lambda w: vg.verify_gemm_silu_mul(x, w), ws)
        return out
    hq, hkv, d = 32, 8, 128
    cos_sin = fused_ops.build_cos_sin(1.0 / (500000 ** (torch.arange(0, d, 2, device="cuda").float() / d)), 4096)
    cache = torch.zeros(2, 512, 16, hkv, d, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(1024, 1032, device="cuda")
    slots = torch.arange(1024, 1032, device="cuda")
    out["one"] = graph_time(lambda w: triton_ops.gemv_rope_(xs[1], w, None, pos[:1], cos_sin, hq, hkv, d, cache,
                                                            slots[:1]), ws)
    for m in (5, 8):
        x = xs[m]

        def unfused(w, x=x, m=m):
            qkv = F.linear(x, w)
            triton_ops.rope_qk_(qkv, pos[:m], cos_sin, hq, hkv, d, kv_cache=cache, slot_mapping=slots[:m])

        out[f"unfused_{m}"] = graph_time(unfused, ws)
        out[f"vgemm_{m}"] = _try_time(f"qkv verify GEMM + RoPE M={m}",
                                      lambda w, x=x, m=m: vg.verify_gemm_rope_(x, w, None, pos[:m], cos_sin, hq, hkv, d,
                                                                               cache, slots[:m]), ws)
    return out


def section_verify(llm: LLM, k: int, ctx: int = 1024) -> None:
    runner = llm.engine.runner
    need = 16 * -(-(ctx + k + 1) // runner.block_size)
    if llm.engine.cache_config.num_blocks < need:
        raise RuntimeError(f"KV cache too small for the verify section ({llm.engine.cache_config.num_blocks} < {need} blocks)")
    rows = []
    for i, (label, kw, gemm) in enumerate(verify_variants()):
        # The graphs of exactly these row counts (the engine's ladder pads 80 rows to its largest size).
        g = DecodeGraphs(runner, 16, split=False, verify_width=k + 1, max_rows=16 * (k + 1), **kw)
        t0 = time.perf_counter()
        g.sizes = [1, k + 1, 16, 16 * (k + 1)]
        try:
            with verify_gemm_mode(gemm):
                g.capture()
        except Exception:  # an opt-in variant that fails is reported; the others' rows still print
            import traceback

            traceback.print_exc()
            log(f"[verify] {label}: capture failed")
            del g
            torch.cuda.empty_cache()
            continue
        log(f"[verify] {label}: captured graphs of {g.sizes} rows in {time.perf_counter() - t0:.1f}s")
        for batch in (1, 16):
            fill_static(g, batch, 1, ctx, runner.block_size)
            t1 = replay_time(g, batch)
            n = fill_static(g, batch, k + 1, ctx, runner.block_size)
            tk = replay_time(g, n, verify=True)
            rows.append((label, batch, t1, tk))
            key = f"verify/batch{batch}" if i == 0 else f"verify/{label}/batch{batch}"
            RESULTS[key] = {"variant": label, "one_token_ms": t1 * 1e3, f"verify_{k + 1}_ms": tk * 1e3, "ratio": tk / t1}
        g.release()
        del g
        torch.cuda.empty_cache()
    log(f"\n[verify] {MODEL} bf16, context {ctx}, CUDA-graph replay of forward + logits (first variant: the default)")
    log(f"| variant | batch | 1-token step ms | verify step ({k + 1} rows/request) ms | ratio | target |")
    log("|---|---|---|---|---|---|")
    for label, batch, t1, tk in rows:
        tgt = "<= 1.15x" if batch == 1 else "-"
        log(f"| {label} | {batch} | {t1 * 1e3:.3f} | {tk * 1e3:.3f} | {tk / t1:.3f}x | {tgt} |")


def _profile_step(fn) -> tuple[list[dict], dict]:
    """Kernel rows (`gpu_decode_profile.kernel_rows`) of one call of fn() under torch.profiler
    (after one unprofiled call), and its timeline: span, busy and idle µs (`tp_bench.split_timeline`)."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.gpu_decode_profile import cuda_kernels, kernel_rows, short_name
    from benchmarks.tp_bench import split_timeline

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    ks = cuda_kernels(prof)
    line = split_timeline([(a, b, short_name(n)) for a, b, n in ks])
    span = (max(b for _, b, _ in ks) - min(a for a, _, _ in ks)) if ks else 0.0
    return kernel_rows(ks), {"kernels": len(ks), "span_us": span, "busy_us": line["busy"], "idle_us": line["idle"],
                             "idle_gaps": line["idle_gaps"]}


# Kernel name fragments -> the part of a decode step they are (first match wins).
KERNEL_GROUPS = [
    ("attention", ("_decode", "_verify_decode", "_prefill")),
    ("epilogue (rope / kv store, silu*mul)", ("_rope_qk", "_silu_mul", "_kv_write", "write_kv")),
    ("norm", ("_rmsnorm",)),
    ("triton gemv (+ fused epilogue)", ("_gemv",)),
    ("triton verify gemm (+ fused epilogue)", ("_verify_gemm",)),
    ("cublas gemm (+ split-k reduce)", ("gemm", "xmma", "cutlass", "nvjet", "splitk", "splitK", "Kernel2", "ampere", "sm90")),
    ("argmax / sampling", ("argmax", "reduce_kernel", "softmax")),
]


def kernel_group(name: str) -> str:
    for label, frags in KERNEL_GROUPS:
        if any(f in name for f in frags):
            return label
    return "other (" + name[:40] + ")"


def group_rows(rows: list[dict]) -> list[dict]:
    """`kernel_rows` summed per `kernel_group` (same keys, the group as the kernel name)."""
    out: dict[str, dict] = {}
    for r in rows:
        g = out.setdefault(kernel_group(r["kernel"]), {"kernel": kernel_group(r["kernel"]), "count": 0, "total_us": 0.0,
                                                       "mean_us": 0.0, "exclusive_us": 0.0})
        for key in ("count", "total_us", "exclusive_us"):
            g[key] += r[key]
    for g in out.values():
        g["mean_us"] = g["total_us"] / max(g["count"], 1)
    return sorted(out.values(), key=lambda r: -r["exclusive_us"])


def verifyprof_variants() -> list[tuple[str, dict]]:
    """(label, DecodeGraphs keyword arguments) of the verify-step variants the verify and
    verifyprof sections compare (the first is the engine's default, from the environment):
    verify rows attended by request or row by row (`KVSERVE_VERIFY_ATTN`)."""
    grouped = verify_attn_grouped()
    mode = "grouped" if grouped else "rows"
    other = "rows" if grouped else "grouped"
    return [(f"attn={mode}", {}), (f"attn={other}", {"group_verify": not grouped})]


def verify_variants() -> list[tuple[str, dict, str | None]]:
    """`verifyprof_variants` with the products' mode (None: as the environment says), then the
    default attention with the 2..16-row products through the other product path: cuBLAS
    (`KVSERVE_VERIFY_GEMM=cublas`) where the Triton verify GEMM is in use (the default), else the
    Triton one."""
    from kvserve.kernels.triton_verify_gemm import requested

    out: list[tuple[str, dict, str | None]] = [(label, kw, None) for label, kw in verifyprof_variants()]
    other = "cublas" if requested() else "triton"
    out.append((f"{out[0][0]} gemm={other}", {}, other))
    return out


@contextlib.contextmanager
def verify_gemm_mode(mode: str | None):
    """KVSERVE_VERIFY_GEMM=mode while graphs are captured (the routing is read at trace time)."""
    from kvserve.kernels.triton_verify_gemm import requested

    if mode is None:
        yield
        return
    old = os.environ.get("KVSERVE_VERIFY_GEMM")
    os.environ["KVSERVE_VERIFY_GEMM"] = mode
    requested.cache_clear()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("KVSERVE_VERIFY_GEMM", None)
        else:
            os.environ["KVSERVE_VERIFY_GEMM"] = old
        requested.cache_clear()


def section_verifyprof(llm: LLM, k: int, ctx: int = 1024) -> None:
    """Where a batch-1 verify step's extra time goes: one eager step and one graph replay of 1
    row and of k + 1 rows (batch 1, context `ctx`) under torch.profiler, per kernel name
    (count, total and exclusive µs), and the difference tables (k + 1 rows - 1 row)."""
    from benchmarks.gpu_decode_profile import diff_rows, format_diff, format_table

    runner = llm.engine.runner
    width = k + 1
    out: dict[str, object] = {}
    for label, kw, gemm in verify_variants():
        g = DecodeGraphs(runner, 1, split=False, verify_width=width, max_rows=width, **kw)
        g.sizes = [1, width]
        t0 = time.perf_counter()
        with verify_gemm_mode(gemm):
            g.capture()
        log(f"\n[verifyprof] variant {label} {kw}: captured graphs of {g.sizes} rows in {time.perf_counter() - t0:.1f}s")
        per: dict[int, dict] = {}
        for rows in (1, width):
            n = fill_static(g, 1, rows, ctx, runner.block_size)
            verify = rows > 1
            replay_ms = replay_time(g, n, verify=verify) * 1e3
            with torch.inference_mode(), verify_gemm_mode(gemm):
                eager, eager_line = _profile_step(lambda: g._step(n, g.grouped(n, verify)))
            graph, graph_line = _profile_step(lambda: g.replay(n, verify))
            per[rows] = {"replay_ms": replay_ms, "eager": eager, "eager_line": eager_line, "graph": graph,
                         "graph_line": graph_line}
            log(f"[verifyprof] {label}, {rows} row(s): replay {replay_ms:.3f} ms; graph replay profiled: "
                f"{graph_line['kernels']} kernels, span {graph_line['span_us']:.1f} us, busy {graph_line['busy_us']:.1f}, "
                f"idle {sum(graph_line['idle_us'].values()):.1f} us in {sum(graph_line['idle_gaps'].values())} gaps "
                f"{ {key: round(v, 1) for key, v in graph_line['idle_us'].items()} }; eager step: "
                f"{eager_line['kernels']} kernels, busy {eager_line['busy_us']:.1f} us")
            log(format_table(graph, f"[verifyprof] {label}: one graph replay, batch 1, {rows} row(s), context {ctx}"))
        g.release()
        del g
        torch.cuda.empty_cache()
        one, many = per[1], per[width]
        gd = diff_rows(one["graph"], many["graph"])
        ed = diff_rows(one["eager"], many["eager"])
        log(format_diff(gd, "1", str(width), f"\n[verifyprof] {label}: graph replay, {width} rows - 1 row "
                        f"(replay {one['replay_ms']:.3f} -> {many['replay_ms']:.3f} ms, "
                        f"{many['replay_ms'] / one['replay_ms']:.3f}x)"))
        gg = diff_rows(group_rows(one["graph"]), group_rows(many["graph"]))
        idle1, idlek = (sum(per[r]["graph_line"]["idle_us"].values()) for r in (1, width))
        log(format_diff(gg, "1", str(width), f"\n[verifyprof] {label}: graph replay by part of the step, {width} rows "
                        f"- 1 row (idle between kernels: {idle1:.1f} -> {idlek:.1f} us)"))
        log(format_diff(ed, "1", str(width), f"\n[verifyprof] {label}: eager step, {width} rows - 1 row "
                        "(kernels launched one by one: exclusive times include launch waits)"))
        out[label] = {"kwargs": {key: str(v) for key, v in kw.items()}, "rows": {str(r): v for r, v in per.items()},
                      "graph_diff": gd, "graph_group_diff": gg, "eager_diff": ed}
    RESULTS["verifyprof"] = out


def _prompts(n: int, length: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(1000, 100000) for _ in range(length)]} for _ in range(n)]


def _decode_run(llm: LLM, prompts: list[dict], sp: SamplingParams) -> tuple[float, list[list[int]]]:
    """(output tok/s of the decode phase: tokens after the first / first to last token of the
    batch, all requests together; the ids)."""
    outs = llm.generate(prompts, sp, use_tqdm=False)
    first = min(o.metrics.first_token_time for o in outs)
    last = max(o.metrics.finished_time for o in outs)
    n = sum(len(o.outputs[0].token_ids) - 1 for o in outs)
    return n / (last - first), [o.outputs[0].token_ids for o in outs]


def _use_oracle(llm: LLM, prompts, refs, a: float, k: int, backoff: bool, seed: int = 0) -> None:
    table = {tuple(p["prompt_token_ids"]): r for p, r in zip(prompts, refs)}
    prop = OracleProposer(table, a, llm.engine.model_config.vocab_size, seed=seed)
    llm.engine.spec = SpecDecoder(SpeculativeConfig(num_speculative_tokens=k, backoff=backoff), prop)


def _reset_spec_counters(llm: LLM) -> None:
    s = llm.engine.scheduler
    s.num_spec_verifies = s.num_draft_tokens = s.num_accepted_tokens = 0


def section_e2e(llm: LLM, k: int, rates: list[float], new_tokens: int) -> None:
    sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    table = []
    for batch in (1, 16):
        prompts = _prompts(batch, 128, seed=batch)
        llm.engine.spec = None
        _decode_run(llm, prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))  # warm-up
        plain, refs = _decode_run(llm, prompts, sp)
        plain2, refs2 = _decode_run(llm, prompts, sp)
        plain = max(plain, plain2)
        log(f"[e2e] batch {batch}: plain {plain:.1f} tok/s (plain runs identical: {refs == refs2})")
        for a in rates:
            _use_oracle(llm, prompts, refs, a, k, backoff=True, seed=7)
            _decode_run(llm, prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))  # warm-up
            _reset_spec_counters(llm)
            tps, ids = _decode_run(llm, prompts, sp)
            st = llm.engine.stats()
            same = sum(x == y for x, y in zip(ids, refs))
            row = {"batch": batch, "a": a, "plain_tok_s": plain, "spec_tok_s": tps, "speedup": tps / plain,
                   "measured_acceptance": st["spec_acceptance_rate"],
                   "mean_accepted_len": st["spec_mean_accepted_length"], "identical": f"{same}/{batch}"}
            table.append(row)
            RESULTS[f"e2e/batch{batch}/a{a}"] = row
            log(f"[e2e] batch {batch} a={a}: {tps:.1f} tok/s ({tps / plain:.2f}x), acceptance "
                f"{st['spec_acceptance_rate']:.2f}, tokens/verify {st['spec_mean_accepted_length']:.2f}, identical {same}/{batch}")
        llm.engine.spec = None
    log(f"\n[e2e] {MODEL} {llm.engine.loaded.dtype}, 128-token prompts, {new_tokens} new tokens, k={k}, back-off on, oracle proposer "
        "(acceptance measured = accepted / drafted: (a + ... + a^k) / k at k drafts; lower where the ids part from plain's)")
    log("| batch | a (forced) | plain tok/s | spec tok/s | speedup | acceptance measured | tokens/verify | greedy identical |")
    log("|---|---|---|---|---|---|---|---|")
    for r in table:
        log(f"| {r['batch']} | {r['a']} | {r['plain_tok_s']:.1f} | {r['spec_tok_s']:.1f} | {r['speedup']:.2f}x | "
            f"{r['measured_acceptance']:.2f} | {r['mean_accepted_len']:.2f} | {r['identical']} |")


def section_backoff(llm: LLM, k: int, new_tokens: int, batch: int = 32) -> None:
    prompts = _prompts(batch, 128, seed=99)
    sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    warm = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)

    def through(spec_on: bool) -> float:
        if spec_on:
            _use_oracle(llm, prompts, refs, 0.0, k, backoff=True)
        else:
            llm.engine.spec = None
        t = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)

    llm.engine.spec = None
    llm.generate(prompts, warm, use_tqdm=False)
    refs = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    _use_oracle(llm, prompts, refs, 0.0, k, backoff=True)
    llm.generate(prompts, warm, use_tqdm=False)
    res = {"plain": [], "spec": []}
    for _ in range(3):  # alternate
        res["plain"].append(through(False))
        _reset_spec_counters(llm)
        res["spec"].append(through(True))
    st = llm.engine.stats()
    p, s = statistics.median(res["plain"]), statistics.median(res["spec"])
    RESULTS["backoff"] = {"plain_tok_s": res["plain"], "spec_tok_s": res["spec"], "change_pct": (s / p - 1) * 100,
                          "drafts": st["spec_draft_tokens"], "accepted": st["spec_accepted_tokens"],
                          "ahead_steps": llm.engine.num_ahead_steps}
    log(f"\n[backoff] batch {batch}, 128-token prompts, {new_tokens} new tokens, every draft rejected (a = 0), k={k}")
    log("| run | plain tok/s | spec on tok/s |")
    log("|---|---|---|")
    for i, (a, b) in enumerate(zip(res["plain"], res["spec"])):
        log(f"| {i + 1} | {a:.0f} | {b:.0f} |")
    log(f"median: plain {p:.0f}, spec {s:.0f} tok/s: {(s / p - 1) * 100:+.1f}% (bound: -5%); last spec run: "
        f"{st['spec_draft_tokens']} drafts, {st['spec_accepted_tokens']} accepted, "
        f"{st['spec_verify_steps']} verify steps")
    llm.engine.spec = None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="verify,e2e,backoff")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--vgemm-sweep", action="store_true",
                    help="kernels: also time the verify GEMM's neighbouring configs at M = 5 (~1 more minute)")
    ap.add_argument("--rates", default="0,0.5,0.7,0.9,1.0")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--dtype", default="bfloat16",
                    help="model dtype; float32 for the e2e section: in bf16 a random-weight model's near-tied "
                         "logits make the speculative ids part from the plain references at once")
    args = ap.parse_args()
    only = set(args.only.split(","))
    t_start = time.perf_counter()
    log(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if "kernels" in only:  # before the engine takes the GPU memory
        t = time.perf_counter()
        try:
            section_kernels(args.vgemm_sweep)
        except Exception:
            import traceback

            traceback.print_exc()
            RESULTS["kernels"] = "failed"
        torch.cuda.empty_cache()
        log(f"[kernels] {time.perf_counter() - t:.1f}s")
        if not only - {"kernels"}:
            log(f"total {time.perf_counter() - t_start:.1f}s")
            if args.json:
                Path(args.json).write_text(json.dumps(RESULTS, indent=1))
            return
    root = Path(tempfile.mkdtemp())
    spec = {"method": "ngram", "num_speculative_tokens": args.k}
    t0 = time.perf_counter()
    # The verify sections capture their own graphs: without e2e / backoff the engine's are not needed.
    eager = not only & {"e2e", "backoff"}
    llm = LLM(model_folder(MODEL, root), load_format="dummy", dtype=args.dtype, max_model_len=4096, max_num_seqs=32,
              enable_prefix_caching=False, gpu_memory_utilization=0.85, speculative_config=spec, enforce_eager=eager)
    g = llm.engine.runner.graphs
    log(f"engine start-up {time.perf_counter() - t0:.1f}s; graphs of {g.sizes if g else None} rows; "
        f"async scheduling {llm.engine.async_scheduling}")
    sections = [
        ("verify", lambda: section_verify(llm, args.k)),
        ("verifyprof", lambda: section_verifyprof(llm, args.k)),
        ("e2e", lambda: section_e2e(llm, args.k, [float(x) for x in args.rates.split(",")], args.new_tokens)),
        ("backoff", lambda: section_backoff(llm, args.k, args.new_tokens)),
    ]
    for name, fn in sections:
        if name not in only:
            continue
        t = time.perf_counter()
        try:
            fn()
        except Exception:
            import traceback

            traceback.print_exc()
            RESULTS[name] = "failed"
        log(f"[{name}] {time.perf_counter() - t:.1f}s")
    log(f"total {time.perf_counter() - t_start:.1f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(RESULTS, indent=1))


if __name__ == "__main__":
    main()
