"""Quantized weights on the GPU (issue 17): kernels, engine decode / prefill / throughput, and
gpt-fast's int8 / int4 weight-only modes at the same shapes, all in one process and run.

    python -m benchmarks.gpu_quant_bench                          # every section
    python -m benchmarks.gpu_quant_bench --only kernels,decode    # sections: kernels, decode, throughput, peer
    python -m benchmarks.gpu_quant_bench --only peer --peer-dir peer   # gpt-fast, see below

kernels: Llama-3.1-8B projection shapes; one row: the bf16 Triton GEMV and the quantized GEMVs
    (GB/s of the bytes each reads; weights rotated over > 200 MB so L2 holds none); a few GEMV
    configs per format; several rows: the dequantizing Triton GEMM, dequantize + cuBLAS, FP8
    _scaled_mm, bf16 cuBLAS.
gemv1: the one-row GEMVs at their defaults (int8, int4, Q4_0) and the 4-bit and int8 GEMVs a code
    at a time vs int32 words (KVSERVE_INT4_GEMV / KVSERVE_INT8_GEMV=codes / words) per projection
    as the engine calls it (qkv + RoPE, gate_up + SiLU), % of floor, and the word kernels' tile sweeps.
gemv8: the same for the int8 formats only (HF int8 per channel, GGUF Q8_0 in groups of 32).
decode1: batch-1 decode ms/token and % of floor only, one engine per --decode1 variant
    (default int4:codes,int4:words).
decode: Llama-3.1-8B shapes, random weights, one engine per format (bf16, int8, int4, fp8):
    batch-1 decode ms/token (128-token prompt, 256 new) against the floor = bytes one step
    reads (quantized weights + KV) / the best large bf16 GEMV's read bandwidth in this run;
    batch-16 decode ms/step; prefill 8 x 2048 tokens in one step.
prefill: Llama-3.1-8B shapes, random weights, prefill 8 x 2048 tokens in one step only, one engine
    per --prefill-schemes entry, each against bf16's in this run.
throughput: the 256-request workload of benchmarks/gpu_bench.py (Qwen3-0.6B shapes), one run
    per format.

A scheme may carry engine switches after '+': `fp8+fused` is fp8 with KVSERVE_FP8_FUSED_ACT=1 (the
norm and SiLU·mul kernels also write the FP8 activations), so

    python -m benchmarks.gpu_quant_bench --only prefill --prefill-schemes bf16,fp8,fp8+fused
    python -m benchmarks.gpu_quant_bench --only throughput --tp-schemes bf16,fp8,fp8+fused

time the option on and off beside bf16 in one process.
peer: gpt-fast (pytorch-labs/gpt-fast: its model.py, quantize.py, tokenizer.py copied into
    --peer-dir; not part of kvserve) Llama-3.1-8B shapes, random weights, batch-1 decode under
    torch.compile(mode="reduce-overhead"), int8 and int4 (group 128, inner_k_tiles 8).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import gpu_bench as gb
from kvserve import LLM, SamplingParams
from tests.gpu.quant_checks import env

RESULTS: dict[str, object] = {}
SHAPES_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336), "head": (128256, 4096)}


def log(msg: str) -> None:
    print(msg, flush=True)


def _copies(make, nbytes: int, total: int = 256 << 20) -> list:
    return [make() for _ in range(max(2, -(-total // nbytes)))]


def rotate_time(fn, items: list, reps: int = 60) -> float:
    """Median seconds of fn(item), cycling over `items` (weights past the L2), graph-captured."""
    i = [0]

    def step():
        fn(items[i[0] % len(items)])
        i[0] += 1
    for _ in range(len(items)):
        step()
    torch.cuda.synchronize()
    # One graph of len(items) calls: no launch gaps, every weight read once per replay.
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for it in items:
            fn(it)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(max(3, reps // len(items))):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / len(items))
    return statistics.median(times)


def triton_next_pow2(m: int) -> int:
    import triton

    return triton.next_power_of_2(m)


def section_kernels(sweep: bool = True) -> None:
    from kvserve.kernels import triton_quant as tq
    from kvserve.models import triton_ops
    from kvserve.platform.cuda_quant import quantize

    rows = {}
    x1 = torch.randn(1, 14336, device="cuda", dtype=torch.bfloat16)
    for name, (n, k) in SHAPES_8B.items():
        x = x1[:, :k].contiguous()
        bf = _copies(lambda: torch.randn(n, k, device="cuda", dtype=torch.bfloat16), n * k * 2)
        row = {"bf16_us": rotate_time(lambda w: triton_ops.gemv(x, w), bf) * 1e6}
        row["bf16_GBps"] = n * k * 2 / row["bf16_us"] / 1e3
        base = bf[0]
        del bf
        for scheme in ("int8", "int4", "fp8"):
            qw0 = quantize(base, scheme)
            qs = _copies(lambda: quantize(torch.randn(n, k, device="cuda", dtype=torch.bfloat16), scheme), qw0.nbytes)
            configs = [None] + ([] if not sweep else [(2, 512, 4), (4, 512, 4), (8, 512, 4), (4, 1024, 8), (8, 1024, 8), (2, 1024, 4), (4, 2048, 8)] if name in ("gate_up", "down") else [])
            best = None
            for cfg in configs:
                try:
                    t = rotate_time(lambda w: tq.qgemv(x, w, config=cfg, words=False), qs)
                except Exception as e:  # a config that does not compile
                    log(f"[kernels] {name} {scheme} {cfg}: {type(e).__name__}")
                    continue
                if cfg is None:
                    row[f"{scheme}_us"] = t * 1e6
                    row[f"{scheme}_GBps"] = qw0.nbytes / t / 1e9
                if best is None or t < best[0]:
                    best = (t, cfg)
                if cfg is not None:
                    row[f"{scheme}_{cfg}_us"] = t * 1e6
            row[f"{scheme}_best"] = (best[0] * 1e6, best[1])
            del qs
        rows[name] = row
        log(f"[kernels] 1 row {name} {n}x{k}: bf16 {row['bf16_us']:.1f} us ({row['bf16_GBps']:.0f} GB/s); "
            + "; ".join(f"{s} {row[s + '_us']:.1f} us ({row[s + '_GBps']:.0f} GB/s, best {row[s + '_best'][0]:.1f} at {row[s + '_best'][1]})"
                        for s in ("int8", "int4", "fp8")))
        torch.cuda.empty_cache()
    RESULTS["kernels/1row"] = rows
    if not sweep:
        return
    # Several rows: the crossover between the Triton GEMM and dequantize + cuBLAS / _scaled_mm.
    many = {}
    for name in ("gate_up", "down", "o"):
        n, k = SHAPES_8B[name]
        ws = _copies(lambda: torch.randn(n, k, device="cuda", dtype=torch.bfloat16), n * k * 2)
        qws = {s: [quantize(w, s) for w in ws[: len(_copies(lambda: 0, quantize(ws[0], s).nbytes))]]
               for s in ("int8", "int4", "fp8")}
        for m in (2, 4, 16, 32, 64, 128, 256, 1024, 16384):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            r = {"bf16_cublas_us": rotate_time(lambda ww: F.linear(x, ww), ws) * 1e6}
            for s, qw in qws.items():
                r[f"{s}_qmm_us"] = rotate_time(lambda q: tq.qmm(x, q), qw) * 1e6 if m <= 1024 else float("nan")
                if s == "fp8":
                    def fp8(q):
                        xq, xs = tq.act_quant_fp8(x)
                        return torch._scaled_mm(xq, q.q.t(), scale_a=xs, scale_b=q.scale.view(1, -1), out_dtype=x.dtype)
                    r["fp8_scaled_mm_us"] = rotate_time(fp8, qw) * 1e6
                else:
                    r[f"{s}_deq_cublas_us"] = rotate_time(lambda q: F.linear(x, tq.dequantize(q, x.dtype)), qw) * 1e6
            if m in (4, 16, 64):  # GEMM tile sweep at decode sizes
                for cfg in ((16, 16, 256, 4, 4), (16, 32, 256, 4, 4), (16, 64, 128, 4, 4), (16, 32, 128, 4, 3), (16, 16, 512, 4, 4)):
                    cfg = (max(cfg[0], min(64, triton_next_pow2(m))),) + cfg[1:]
                    try:
                        r[f"int4_qmm_{cfg}_us"] = rotate_time(lambda q: tq.qmm(x, q, config=cfg), qws["int4"]) * 1e6
                    except Exception as e:
                        log(f"[kernels] qmm {cfg}: {type(e).__name__}")
            many[f"{name} m={m}"] = r
            log(f"[kernels] {name} m={m}: " + ", ".join(f"{k_} {v:.1f}" for k_, v in r.items()))
        del ws, qws
        torch.cuda.empty_cache()
    RESULTS["kernels/rows"] = many


def section_gemv(quick: bool = False, int8_only: bool = False) -> None:
    """The one-row quantized GEMVs next to the bf16 GEMV, every format at the Llama-3.1-8B
    shapes, a tile sweep (`quick`: none), and each result's difference from x times the
    dequantized weight (fp32). `int8_only`: the int8 formats (HF int8 per channel, Q8_0), a code
    at a time vs int32 words (KVSERVE_INT8_GEMV), with the word kernel's tile sweep."""
    from kvserve.kernels import triton_quant as tq
    from kvserve.models import triton_ops
    from kvserve.platform.cuda_quant import quantize
    from tests.gpu.quant_checks import formats

    sweep = [(2, 1024, 4), (4, 1024, 4), (4, 512, 2), (8, 512, 4), (8, 1024, 4), (16, 512, 4), (8, 1024, 8)]
    rows = {}
    w4_rows = {}
    w8_rows = {}
    x1 = torch.randn(1, 14336, device="cuda", dtype=torch.bfloat16)
    log("| projection | format | MB | bf16 GEMV us (GB/s) | qgemv us (GB/s) | best config us (GB/s) | rel diff vs dequantized |")
    log("|---|---|---|---|---|---|---|")
    for name, (n, k) in SHAPES_8B.items():
        x = x1[:, :k].contiguous()
        bf = _copies(lambda: torch.randn(n, k, device="cuda", dtype=torch.bfloat16), n * k * 2)
        bf_us = rotate_time(lambda w: triton_ops.gemv(x, w), bf) * 1e6
        del bf
        makers = {
            "int8": lambda: quantize(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05, "int8"),
            "int4-g128": lambda: quantize(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05, "int4"),
        }
        if int8_only:
            del makers["int4-g128"]
        for fmt in () if name == "head" else ("Q8_0",) if int8_only else ("Q4_0",) if quick else \
                ("Q4_0", "Q4_1", "Q8_0", "Q4_K"):
            makers[fmt] = (lambda f: lambda: formats(n, k, "cuda", seed=int(torch.randint(1 << 20, ())), only=f)[f])(fmt)
        for fmt, make in makers.items():
            try:
                qw0 = make()
                qs = [qw0] + _copies(make, qw0.nbytes)[1:]
                ref = x.float() @ tq.dequantize(qw0, torch.float32).T
                got = tq.qgemv(x, qw0, words=False).float()
                diff = ((got - ref).norm() / ref.norm()).item()
                res = {"qgemv": rotate_time(lambda w: tq.qgemv(x, w, words=False), qs) * 1e6}
                best = (res["qgemv"], "default")
                if not quick and name in ("gate_up", "down") and fmt in ("int8", "int4-g128", "Q4_0", "Q8_0"):
                    for cfg in sweep:
                        try:
                            t = rotate_time(lambda w: tq.qgemv(x, w, config=cfg, words=False), qs) * 1e6
                        except Exception as e:
                            log(f"[gemv] {name} {fmt} {cfg}: {type(e).__name__}: {str(e)[:120]}")
                            continue
                        res[str(cfg)] = t
                        if t < best[0]:
                            best = (t, cfg)
                nb = qw0.nbytes
                gbs = lambda us: f"{us:.1f} ({nb / us / 1e3:,.0f})"
                log(f"| {name} {n}x{k} | {fmt} | {nb / 1e6:.1f} | {bf_us:.1f} ({n * k * 2 / bf_us / 1e3:,.0f}) | "
                    f"{gbs(res['qgemv'])} | {gbs(best[0])} {best[1]} | {diff:.1e} |")
                rows[f"{name}/{fmt}"] = {"bytes": nb, "bf16_us": bf_us, **res, "best": best, "diff": diff}
                if qw0.kind == "int4" and name != "head":
                    w4_rows[(name, fmt)] = _words_rows(name, n, k, x, qs, fmt == "int4-g128" or not quick)
                if qw0.kind == "int8" and name != "head":
                    w8_rows[(name, fmt)] = _words_rows(name, n, k, x, qs, fmt == "int8" or not quick, bits=8)
                del qs, qw0
            except Exception:
                traceback.print_exc()
            torch.cuda.empty_cache()
    RESULTS["gemv"] = rows
    _words_summary(rows, w4_rows)
    _words_summary(rows, w8_rows, bits=8)


def _words_rows(name: str, n: int, k: int, x: torch.Tensor, qs: list, sweep: bool, bits: int = 4) -> dict:
    """The 4-bit (`bits` 8: int8) GEMV as the engine calls it for projection `name` (qkv: + RoPE and
    the K/V store, gate_up: + SiLU·mul, others plain), a code at a time (KVSERVE_INT4_GEMV /
    KVSERVE_INT8_GEMV=codes, the default) and int32 words (=words) at its default tiles and, with
    `sweep`, at each of INT4_WORDS_SWEEP / INT8_WORDS_SWEEP (qkv: a few RoPE tiles). us per call,
    each result checked against the code-at-a-time one."""
    from kvserve.kernels import triton_quant as tq

    if name == "qkv":
        hq, hkv, d = 32, 8, 128
        half = d // 2
        ang = torch.arange(256, device="cuda", dtype=torch.float32)[:, None] / (
            10000 ** (torch.arange(half, device="cuda", dtype=torch.float32) / half))[None, :]
        cos_sin = torch.cat([ang.cos(), ang.sin()], dim=1)
        pos = torch.tensor([100], device="cuda")
        slot = torch.tensor([37], device="cuda")
        cache = torch.zeros(2, 8, 16, hkv, d, device="cuda", dtype=x.dtype)

        def call(w, words, cfg=None):
            return tq.qgemv_rope_(x, w, None, pos, cos_sin, hq, hkv, d, cache, slot, words=words, config=cfg)
        cfgs = [(1, 1024, 4, False), (4, 1024, 2, False), (8, 1024, 2, False), (8, 1024, 2, True), (8, 2048, 4, False),
                (8, 2048, 4, True), (16, 1024, 4, False)]
        if bits == 8:  # row pairs: 4 over [8, 128, 4] or 8 over [16, 64, 4] is 8 rows a thread
            cfgs = [(4, 2048, 4, False), (4, 2048, 4, True), (8, 1024, 4, False), (2, 2048, 2, False),
                    (4, 1024, 2, False), (8, 2048, 8, False)]
    else:
        silu = name == "gate_up"

        def call(w, words, cfg=None):
            return tq.qgemv(x, w, silu=silu, words=words, config=cfg)
        cfgs = list(tq.INT4_WORDS_SWEEP if bits == 4 else tq.INT8_WORDS_SWEEP)
    ref = call(qs[0], False).float()
    res = {"codes": rotate_time(lambda w: call(w, False), qs) * 1e6,
           "words": rotate_time(lambda w: call(w, True), qs) * 1e6}
    res["words_diff"] = ((call(qs[0], True).float() - ref).norm() / ref.norm()).item()
    for cfg in cfgs if sweep else []:
        try:
            res[str(cfg)] = rotate_time(lambda w: call(w, True, cfg), qs) * 1e6
            res[f"{cfg}_diff"] = ((call(qs[0], True, cfg).float() - ref).norm() / ref.norm()).item()
        except Exception as e:  # a config that does not compile or run
            log(f"[gemv] {name} words {cfg}: {type(e).__name__}: {str(e)[:160]}")
    return res


def _words_summary(rows: dict, w4_rows: dict, bits: int = 4) -> None:
    """One table: the 4-bit (`bits` 8: int8) GEMV of each Llama-3.1-8B projection (as the engine calls
    it) a code at a time vs int32 words (default tiles, best sweep tile), with % of the floor = the
    weight's bytes / the best bf16 GEMV read bandwidth of this run; and a layer's four projections
    together."""
    if not w4_rows:
        return
    bf_bw = max(SHAPES_8B[key.split("/")[0]][0] * SHAPES_8B[key.split("/")[0]][1] * 2 / r["bf16_us"] / 1e3
                for key, r in rows.items())  # GB/s
    log(f"int{bits} GEMV, a code at a time (KVSERVE_INT{bits}_GEMV=codes) vs int32 words (=words); floor: bytes / {bf_bw:,.0f} GB/s "
        "(the best bf16 GEMV read of this run)")
    log("| projection | format | MB | floor us | codes us (% floor) | words default us (% floor) | best words tile us (% floor) | words rel diff |")
    log("|---|---|---|---|---|---|---|---|")
    layer: dict[str, list[float]] = {}
    for (name, fmt), r in w4_rows.items():
        nb = rows[f"{name}/{fmt}"]["bytes"]
        floor = nb / bf_bw / 1e3  # us
        tiles = {k_: v for k_, v in r.items() if k_.startswith("(") and not k_.endswith("_diff")}
        best = min(tiles.items(), key=lambda kv: kv[1]) if tiles else ("default", r["words"])
        if best[1] > r["words"]:
            best = ("default", r["words"])
        pct = lambda us: f"{us:.1f} ({100 * floor / us:.0f}%)"
        log(f"| {name} | {fmt} | {nb / 1e6:.1f} | {floor:.1f} | {pct(r['codes'])} | {pct(r['words'])} | "
            f"{pct(best[1])} {best[0]} | {r['words_diff']:.1e} |")
        if tiles:
            log(f"|   {name} {fmt} tiles | " + "; ".join(f"{k_} {v:.1f}" for k_, v in tiles.items()) + " | | | | | | |")
        if name != "head":
            acc = layer.setdefault(fmt, [0.0, 0.0, 0.0, 0.0])
            acc[0] += floor
            acc[1] += r["codes"]
            acc[2] += r["words"]
            acc[3] += best[1]
    for fmt, (floor, codes, words, best) in layer.items():
        log(f"| layer (qkv+o+gate_up+down) | {fmt} | | {floor:.1f} | {codes:.1f} ({100 * floor / codes:.0f}%) | "
            f"{words:.1f} ({100 * floor / words:.0f}%) | {best:.1f} ({100 * floor / best:.0f}%) | |")
    RESULTS[f"int{bits}_words"] = {f"{n_}/{f_}": r for (n_, f_), r in w4_rows.items()}
    RESULTS[f"int{bits}_words_floor_GBps"] = bf_bw


def _rope_call(x: torch.Tensor, w, words):
    """Llama-3.1-8B's qkv + RoPE + K/V store on weight `w`; `words` None: the half-math variant
    (the kind's switch set to "half" for the call), False: a code at a time."""
    from kvserve.kernels import triton_quant as tq

    hq, hkv, d = 32, 8, 128
    key = ("rope", x.dtype)
    if key not in _ROPE_ARGS:
        half = d // 2
        ang = torch.arange(256, device="cuda", dtype=torch.float32)[:, None] / (
            10000 ** (torch.arange(half, device="cuda", dtype=torch.float32) / half))[None, :]
        _ROPE_ARGS[key] = (torch.cat([ang.cos(), ang.sin()], dim=1), torch.tensor([100], device="cuda"),
                           torch.tensor([37], device="cuda"), torch.zeros(2, 8, 16, hkv, d, device="cuda", dtype=x.dtype))
    cos_sin, pos, slot, cache = _ROPE_ARGS[key]
    var = "KVSERVE_INT8_GEMV" if w.kind == "int8" else "KVSERVE_INT4_GEMV"
    with env(**{var: "half" if words is None else "codes"}):
        return tq.qgemv_rope_(x, w, None, pos, cos_sin, hq, hkv, d, cache, slot, words=words)


_ROPE_ARGS: dict = {}


def section_gemvh(fmts: tuple[str, ...] = ("int4-g128", "int8", "Q4_0", "Q8_0")) -> None:
    """The half-math GEMVs (`triton_qgemv_half`, KVSERVE_INT4_GEMV / KVSERVE_INT8_GEMV=half) against
    the code-at-a-time ones (the default), each Llama-3.1-8B projection as the engine calls it
    (gate_up with SiLU·mul; qkv plain, which the engine runs through the RoPE variant), bf16
    activations, weights rotated past the L2: the default tile and (HF int4 / int8) every
    HALF_SWEEP tile, the activation kernel alone, % of the
    floor = the weight's bytes / the best bf16 GEMV read bandwidth of this run, rel. diff against
    x times the dequantized weight (fp32)."""
    from kvserve.kernels import triton_qgemv_half as h4
    from kvserve.kernels import triton_quant as tq
    from kvserve.models import triton_ops
    from kvserve.platform.cuda_quant import quantize
    from tests.gpu.quant_checks import formats

    x1 = torch.randn(1, 14336, device="cuda", dtype=torch.bfloat16)
    rows = {}
    bf_bw = 0.0
    for name, (n, k) in SHAPES_8B.items():
        if name == "head":
            continue
        x = x1[:, :k].contiguous()
        bf = _copies(lambda: torch.randn(n, k, device="cuda", dtype=torch.bfloat16), n * k * 2)
        bf_bw = max(bf_bw, n * k * 2 / rotate_time(lambda w: triton_ops.gemv(x, w), bf) / 1e9)
        del bf
        xs = [x1[:, :k].contiguous() for _ in range(4)]
        rows[f"act_pairs/{k}"] = rotate_time(lambda t: h4.act_pairs(t), xs) * 1e6
        for fmt in fmts:
            if fmt in ("int4-g128", "int8"):
                make = (lambda sc: lambda: quantize(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05,
                                                    sc))(fmt.split("-")[0])
            else:
                make = (lambda f: lambda: formats(n, k, "cuda", seed=int(torch.randint(1 << 20, ())), only=f)[f])(fmt)
            try:
                qw0 = make()
                qs = [qw0] + _copies(make, qw0.nbytes)[1:]
                silu = name == "gate_up"
                y = x.float() @ tq.dequantize(qw0, torch.float32).T
                ref = torch.nn.functional.silu(y[:, : n // 2]) * y[:, n // 2:] if silu else y
                res = {"bytes": qw0.nbytes, "codes": rotate_time(lambda w: tq.qgemv(x, w, silu=silu, words=False), qs) * 1e6}
                got = h4.qgemv_half(x, qw0, silu=silu).float()
                res["diff_half"] = ((got - ref).norm() / ref.norm()).item()
                res["diff_codes"] = ((tq.qgemv(x, qw0, silu=silu, words=False).float() - ref).norm() / ref.norm()).item()
                for cfg in [None] + (h4.HALF_SWEEP if fmt in ("int4-g128", "int8") else []):
                    try:
                        res[str(cfg)] = rotate_time(lambda w: h4.qgemv_half(x, w, silu=silu, config=cfg), qs) * 1e6
                    except Exception as e:
                        log(f"[gemvh] {name} {fmt} {cfg}: {type(e).__name__}: {str(e)[:160]}")
                if name == "qkv":  # as the engine calls it: + RoPE and the K/V store (`qgemv_rope_`)
                    res["rope_codes"] = rotate_time(lambda w: _rope_call(x, w, False), qs) * 1e6
                    res["rope_half"] = rotate_time(lambda w: _rope_call(x, w, None), qs) * 1e6
                rows[f"{name}/{fmt}"] = res
                del qs, qw0
            except Exception:
                traceback.print_exc()
            torch.cuda.empty_cache()
    log(f"4-bit / int8 one-row GEMVs, half math (KVSERVE_INT4_GEMV / KVSERVE_INT8_GEMV=half) vs a code at a time (default); floor: bytes / "
        f"{bf_bw:,.0f} GB/s (the best bf16 GEMV read of this run); us (% of floor)")
    log("| projection | format | MB | floor us | codes | half default | best half tile | rel diff half / codes |")
    log("|---|---|---|---|---|---|---|---|")
    layer: dict[str, list[float]] = {}
    for key, r in rows.items():
        if key.startswith("act_pairs"):
            continue
        name, fmt = key.split("/")
        floor = r["bytes"] / bf_bw / 1e3
        tiles = {k_: v for k_, v in r.items() if k_.startswith("(")}
        best = min(tiles.items(), key=lambda kv: kv[1]) if tiles else ("-", float("nan"))
        pct = lambda us: f"{us:.1f} ({100 * floor / us:.0f}%)"
        log(f"| {name} | {fmt} | {r['bytes'] / 1e6:.1f} | {floor:.1f} | {pct(r['codes'])} | {pct(r.get('None', float('nan')))} | "
            f"{pct(best[1])} {best[0]} | {r['diff_half']:.1e} / {r['diff_codes']:.1e} |")
        log("|   tiles | " + "; ".join(f"{k_} {v:.1f}" for k_, v in tiles.items()) + " |")
        if "rope_codes" in r:
            log(f"| {name} + RoPE + K/V store | {fmt} | | {floor:.1f} | {pct(r['rope_codes'])} | {pct(r['rope_half'])} | | |")
        acc = layer.setdefault(fmt, [0.0, 0.0, 0.0, 0.0])
        for i, v in enumerate((floor, r["codes"], r.get("None", float("nan")), best[1])):
            acc[i] += v
    for fmt, (floor, codes, half, best) in layer.items():
        log(f"| layer (qkv+o+gate_up+down) | {fmt} | | {floor:.1f} | {codes:.1f} ({100 * floor / codes:.0f}%) | "
            f"{half:.1f} ({100 * floor / half:.0f}%) | {best:.1f} ({100 * floor / best:.0f}%) | |")
    log("act_pairs alone, us: " + "; ".join(f"K={k_.split('/')[1]} {v:.1f}" for k_, v in rows.items()
                                            if k_.startswith("act_pairs")))
    RESULTS["gemvh"] = rows
    RESULTS["gemvh_floor_GBps"] = bf_bw


QWEN_06B = {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)}
QMM_ROWS = (2, 4, 8, 16, 32, 64, 256)
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K) of the 4-bit word GEMM, timed at 16 rows
# (BLOCK_M 16) and 256 rows (BLOCK_M 64 / 128) on each Llama-3.1-8B projection.
# A seventh value 1: the dequantized tile through shared memory (`triton_qmm4.qmm4_config`).
QMM4_SWEEP_16 = [(16, 32, 128, 4, 4, 1), (16, 64, 128, 4, 4, 1), (16, 128, 128, 4, 4, 1), (16, 128, 128, 8, 4, 1),
                 (16, 256, 128, 8, 3, 1), (16, 64, 128, 4, 6, 1), (16, 64, 128, 4, 4, 2), (16, 64, 128, 4, 4, 4),
                 (16, 32, 128, 4, 4, 4), (16, 128, 128, 4, 4, 2), (16, 64, 64, 4, 6, 2), (16, 64, 128, 2, 4, 2),
                 (16, 128, 128, 4, 4, 1, 1), (16, 64, 128, 4, 4, 2, 1), (16, 64, 128, 4, 4, 4, 1), (16, 128, 128, 8, 4, 1, 1)]
QMM4_SWEEP_256 = [(64, 64, 128, 4, 4, 1), (64, 128, 128, 4, 3, 1), (128, 64, 128, 8, 3, 1), (128, 128, 128, 8, 3, 1),
                  (128, 128, 64, 8, 4, 1), (64, 256, 64, 8, 3, 1), (128, 128, 128, 8, 3, 1, 1)]


def section_qmm(sweep: bool = True, names: tuple[str, ...] = ("qkv", "o", "gate_up", "down"), table: bool = True,
                extras: bool = True) -> None:
    """Several rows. Llama-3.1-8B projections, 4-bit (HF int4 in groups of 128, GGUF Q4_0 in
    groups of 32): bf16 cuBLAS, the code-at-a-time GEMM ("old"), the word GEMM (`_qmm4_kernel`:
    "words", "raw", "auto"), dequantize + cuBLAS, at 2 to 256 rows; each GEMM's difference from
    the fp32 product of the dequantized weight; a tile sweep of the word GEMM at 16 and 256 rows
    (`sweep`). Then (`extras`) int8 / Q8_0 (the default GEMM, at 16 and 256 rows), and
    Qwen3-0.6B projections at 64 to 4,096 rows (the 256-request workload's decode steps and a
    prefill chunk): bf16, int4 (dequantize + cuBLAS, the old routing above 64 rows; the word
    GEMM, raw runs as words from 64-row tiles) and FP8 (act_quant + _scaled_mm; the
    weight-only FP8 GEMM, scales per weight or after the sums). `table` False: only the sweep.
    Every new tile is a Triton compile (~1-2 s): `--qmm-proj` narrows the projections."""
    from kvserve.kernels import triton_qmm4
    from kvserve.kernels import triton_quant as tq
    from kvserve.platform.cuda_quant import quantize
    from tests.gpu.quant_checks import formats

    rows = {}
    us = lambda fn, items: rotate_time(fn, items) * 1e6  # noqa: E731

    def diff(got: torch.Tensor, ref: torch.Tensor) -> float:
        return ((got.float() - ref).norm() / ref.norm()).item()

    if table:
        log("| projection | format | rows | bf16 cuBLAS us | old qmm us | words us | raw us | auto us | "
            "dequantize + cuBLAS us | bf16 / best 4-bit | rel diff old / words / raw |")
        log("|---|---|---|---|---|---|---|---|---|---|---|")
    t0 = time.perf_counter()
    for name in names:
        n, k = SHAPES_8B[name]
        ws = _copies(lambda: torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05, n * k * 2)
        makers = {
            "int4-g128": lambda: quantize(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05, "int4"),
            "Q4_0": lambda: formats(n, k, "cuda", seed=int(torch.randint(1 << 20, ())), only="Q4_0")["Q4_0"],
        }
        if not table:
            del makers["Q4_0"]
        for fmt, make in makers.items():
            try:
                qw0 = make()
                qs = [qw0] + _copies(make, qw0.nbytes)[1:]
                wref = qw0.dequantize(torch.float32)  # fp32 products (no TF32): reference for bf16 outputs
                for m in (QMM_ROWS if fmt == "int4-g128" else (2, 16, 64, 256)) if table else (16, 256):
                    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                    if table:
                        ref = x.float() @ wref.T
                        r = {"bf16": us(lambda ww: F.linear(x, ww), ws)}
                        d = {}
                        for mode in ("codes", "words", "raw", "auto"):
                            key = "old" if mode == "codes" else mode
                            if m > 64 and mode == "codes":  # (the old routing: dequantize + cuBLAS above 64 rows)
                                r[key], d[key] = float("nan"), float("nan")
                                continue
                            r[key] = us(lambda q: tq.qmm(x, q, mode=mode), qs)
                            d[key] = diff(tq.qmm(x, qw0, mode=mode), ref)
                        r["deq"] = us(lambda q: F.linear(x, tq.dequantize(q, x.dtype)), qs)
                        best = min(v for key, v in r.items() if key != "bf16" and v == v)
                        log(f"| {name} {n}x{k} | {fmt} | {m} | {r['bf16']:.1f} | {r['old']:.1f} | {r['words']:.1f} | "
                            f"{r['raw']:.1f} | {r['auto']:.1f} | {r['deq']:.1f} | {r['bf16'] / best:.2f}x | "
                            f"{d['old']:.1e} / {d['words']:.1e} / {d['raw']:.1e} |")
                        rows[f"{name}/{fmt}/{m}"] = {**r, "diff": d}
                    if sweep and fmt == "int4-g128" and m in (16, 256):
                        for mode in ("words", "raw") if m == 16 else ("words",):  # (raw: words from 64-row tiles)
                            res = []
                            for cfg in QMM4_SWEEP_16 if m == 16 else QMM4_SWEEP_256:
                                try:
                                    res.append((us(lambda q: tq.qmm(x, q, config=cfg, mode=mode), qs), cfg))
                                except Exception as e:  # a config that does not compile or fit
                                    log(f"[qmm] {name} {mode} {cfg}: {type(e).__name__}: {str(e)[:100]}")
                            res.sort()
                            rows[f"{name}/{fmt}/{m}/sweep/{mode}"] = res
                            log(f"[qmm sweep] {name} {mode} m={m} default {triton_qmm4.qmm4_config(m, n, 128)}: "
                                + "; ".join(f"{t:.1f} {c}" for t, c in res))
                del qs, qw0, wref
            except Exception:
                traceback.print_exc()
            torch.cuda.empty_cache()
        del ws
        log(f"[qmm] {name} done at {time.perf_counter() - t0:.0f} s")
    if not extras:
        log(f"[qmm] all done at {time.perf_counter() - t0:.0f} s")
        RESULTS["qmm"] = rows
        return
    # int8 / Q8_0 (the default word GEMM), for reference
    for name in ("gate_up", "o"):
        n, k = SHAPES_8B[name]
        for fmt, make in {
            "int8": lambda: quantize(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05, "int8"),
            "Q8_0": lambda: formats(n, k, "cuda", seed=int(torch.randint(1 << 20, ())), only="Q8_0")["Q8_0"],
        }.items():
            try:
                qw0 = make()
                qs = [qw0] + _copies(make, qw0.nbytes)[1:]
                for m in (16, 256):
                    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                    r = {"qmm": us(lambda q: tq.qmm(x, q), qs),
                         "deq": us(lambda q: F.linear(x, tq.dequantize(q, x.dtype)), qs)}
                    log(f"[qmm] {name} {fmt} m={m}: qmm {r['qmm']:.1f} us, dequantize + cuBLAS {r['deq']:.1f} us")
                    rows[f"{name}/{fmt}/{m}"] = r
                del qs, qw0
            except Exception:
                traceback.print_exc()
            torch.cuda.empty_cache()
    # Qwen3-0.6B shapes at the 256-request workload's decode sizes
    log("| Qwen3-0.6B projection | rows | bf16 cuBLAS us | int4 deq + cuBLAS | int4 words | "
        "fp8 act_quant + _scaled_mm | fp8 weight-only qmm | the same, scales after the sums |")
    log("|---|---|---|---|---|---|---|---|")
    for name, (n, k) in QWEN_06B.items():
        try:
            ws = _copies(lambda: torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05, n * k * 2)
            q4 = [quantize(w, "int4") for w in ws]
            q8 = [quantize(w, "fp8") for w in ws]
            for m in (64, 128, 256, 512, 1024, 4096):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)

                def fp8(q):
                    xq, xs = tq.act_quant_fp8(x)
                    return torch._scaled_mm(xq, q.q.t(), scale_a=xs, scale_b=q.scale.view(1, -1), out_dtype=x.dtype)
                r = {"bf16": us(lambda ww: F.linear(x, ww), ws),
                     "int4_deq": us(lambda q: F.linear(x, tq.dequantize(q, x.dtype)), q4),
                     "int4_words": us(lambda q: tq.qmm(x, q, mode="words"), q4),
                     "fp8_scaled_mm": us(fp8, q8),
                     "fp8_qmm": us(lambda q: tq.qmm(x, q, fp8_scale_after=False), q8),
                     "fp8_qmm_scale_after": us(lambda q: tq.qmm(x, q, fp8_scale_after=True), q8)}
                log(f"| {name} {n}x{k} | {m} | " + " | ".join(f"{v:.1f}" for v in r.values()) + " |")
                rows[f"qwen0.6b/{name}/{m}"] = r
            del ws, q4, q8
        except Exception:
            traceback.print_exc()
        torch.cuda.empty_cache()
    log(f"[qmm] all done at {time.perf_counter() - t0:.0f} s")
    RESULTS["qmm"] = rows


# Engine switches a scheme may name after '+' (see the module doc).
VARIANT_ENV = {"fused": {"KVSERVE_FP8_FUSED_ACT": "1"}}


def build_llm(folder: str, scheme: str, **kwargs) -> LLM:
    """An engine for `scheme` ('bf16', 'int8', 'fp8', or one with '+switch': see VARIANT_ENV),
    the switches' environment set while it is built (the platform reads them then)."""
    base, *switches = scheme.split("+")
    values = {}
    for sw in switches:
        if sw not in VARIANT_ENV:
            raise ValueError(f"scheme {scheme!r}: unknown switch {sw!r} (known: {', '.join(VARIANT_ENV)})")
        values.update(VARIANT_ENV[sw])
    with env(**values):
        return LLM(folder, load_format="dummy", quantization=None if base == "bf16" else base, **kwargs)


def read_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step reads: parameters and quantized buffers, less an untied embedding."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "qweight_" in n)
    emb = model.embed_tokens.weight
    if model.lm_head.weight is not emb:
        total -= emb.numel() * emb.element_size()
    return total


def batch_decode(llm: LLM, batch: int = 16, prompt_len: int = 128, new: int = 128) -> float:
    """Seconds per decode step with `batch` requests decoding together (after their prefill)."""
    eng = llm.engine
    rng = random.Random(3)
    sp = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    out = []
    for rep in range(2):
        for i in range(batch):
            eng.add_request(f"b{rep}-{i}", [rng.randrange(10000) for _ in range(prompt_len)], sp)
        eng.step()  # every prompt in one step
        eng.step()
        t0, steps = time.perf_counter(), 0
        while eng.has_unfinished_requests():
            eng.step()
            steps += 1
        out.append((time.perf_counter() - t0) / steps)
    return min(out)


def section_decode(root: Path, bw: float, flops: float, schemes: list[str]) -> None:
    name = "Llama-3.1-8B"
    for scheme in schemes:
        llm = build_llm(gb.model_folder(name, root), scheme, max_model_len=4096, max_num_seqs=16,
                        max_num_batched_tokens=16384, enable_prefix_caching=False, gpu_memory_utilization=0.6)
        model = llm.engine.runner.model
        cfg = llm.engine.model_config
        wbytes = read_bytes(model)
        kv = gb.kv_bytes_per_token(cfg) * (128 + 128)
        floor = (wbytes + kv) / bw
        s = gb.kvserve_decode(llm)
        b16 = batch_decode(llm)
        row = {"weight_GB": wbytes / 1e9, "floor_ms": floor * 1e3, "decode_ms": s * 1e3, "pct_floor": 100 * floor / s,
               "batch16_step_ms": b16 * 1e3}
        gb.RESULTS.clear()
        gb.section_prefill(llm, flops)
        row["prefill"] = gb.RESULTS.get("prefill/Llama-3.1-8B")
        RESULTS[f"decode/{name}/{scheme}"] = row
        log(f"[decode] {name} {scheme}: weights read {wbytes / 1e9:.2f} GB; batch-1 {s * 1e3:.3f} ms/tok, floor "
            f"{floor * 1e3:.3f} ms -> {100 * floor / s:.1f}% of floor; batch-16 {b16 * 1e3:.3f} ms/step; "
            f"prefill 8x2048 {row['prefill']['s'] * 1e3:.1f} ms")
        del llm, model
        gc.collect()
        torch.cuda.empty_cache()


def section_prefill(root: Path, flops: float, schemes: list[str], profile: bool = False) -> None:
    """Prefill 8 x 2048 tokens in one step (Llama-3.1-8B shapes) per scheme, and each against the
    first scheme's (bf16's) time in this run. No decode: one engine start and four steps each.
    `profile`: then one more step under torch.profiler, its CUDA kernels grouped by name (where
    FP8 prefill's time goes against bf16's)."""
    name = "Llama-3.1-8B"
    base = None
    for scheme in schemes:
        llm = build_llm(gb.model_folder(name, root), scheme, max_model_len=4096, max_num_seqs=16,
                        max_num_batched_tokens=16384, enable_prefix_caching=False, gpu_memory_utilization=0.6,
                        enforce_eager=True)  # prefill runs eagerly anyway: no graph capture to wait for
        gb.RESULTS.clear()
        gb.section_prefill(llm, flops)
        row = dict(gb.RESULTS["prefill/Llama-3.1-8B"])
        base = base or row["s"]
        row["speedup_vs_first"] = base / row["s"]
        RESULTS[f"prefill/{name}/{scheme}"] = row
        log(f"[prefill] {name} {scheme}: 8x2048 {row['s'] * 1e3:.1f} ms = {base / row['s']:.2f}x {schemes[0]}")
        if profile:
            _profile_prefill(llm, f"{name} {scheme}")
        del llm
        gc.collect()
        torch.cuda.empty_cache()


def _profile_prefill(llm: LLM, label: str, n: int = 8, length: int = 2048) -> None:
    """One 8 x 2048-token prefill step under torch.profiler: its CUDA kernels grouped by name."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.gpu_decode_profile import cuda_kernels, format_table, kernel_rows

    eng = llm.engine
    rng = random.Random(2)
    sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for i in range(n):
        eng.add_request(f"prof-{i}", [rng.randrange(10000) for _ in range(length)], sp)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        eng.step()
        torch.cuda.synchronize()
    rows = kernel_rows(cuda_kernels(prof))
    RESULTS[f"prefill_profile/{label}"] = rows[:25]
    log(format_table(rows[:20], f"[prefill] {label}: one step's kernels ({sum(r['count'] for r in rows):.0f} "
                                f"launches, {sum(r['exclusive_us'] for r in rows) / 1e3:.1f} ms busy):"))


def section_decode1(root: Path, bw: float, variants: list[str]) -> None:
    """Batch-1 decode only (Llama-3.1-8B shapes, as `section_decode`), per variant: a scheme, with
    `:words` / `:codes` / `:half` the one-row GEMV's decode for that engine (KVSERVE_INT8_GEMV for
    int8, KVSERVE_INT4_GEMV otherwise; `:half` sets both, so an int4 model's int8 LM head takes it
    too)."""
    name = "Llama-3.1-8B"
    for variant in variants:
        scheme, _, mode = variant.partition(":")
        # ":half" sets both switches: an int4 model's LM head is int8
        names = ("KVSERVE_INT4_GEMV", "KVSERVE_INT8_GEMV") if mode == "half" else \
            ("KVSERVE_INT8_GEMV" if scheme == "int8" else "KVSERVE_INT4_GEMV",)
        with env(**({v: mode for v in names} if mode else {})):
            llm = LLM(gb.model_folder(name, root), load_format="dummy", max_model_len=4096, max_num_seqs=16,
                      max_num_batched_tokens=16384, enable_prefix_caching=False, gpu_memory_utilization=0.6,
                      quantization=None if scheme == "bf16" else scheme)
            wbytes = read_bytes(llm.engine.runner.model)
            floor = (wbytes + gb.kv_bytes_per_token(llm.engine.model_config) * (128 + 128)) / bw
            t = gb.kvserve_decode(llm)
            RESULTS[f"decode1/{name}/{variant}"] = {"weight_GB": wbytes / 1e9, "floor_ms": floor * 1e3,
                                                    "decode_ms": t * 1e3, "pct_floor": 100 * floor / t}
            log(f"[decode1] {name} {variant}: weights read {wbytes / 1e9:.2f} GB; batch-1 {t * 1e3:.3f} ms/tok, floor "
                f"{floor * 1e3:.3f} ms -> {100 * floor / t:.1f}% of floor")
            del llm
        gc.collect()
        torch.cuda.empty_cache()


def section_throughput(root: Path, schemes: list[str]) -> None:
    name = "Qwen3-0.6B"
    folder = gb.model_folder(name, root)
    prompts, outs = gb.workload()
    base = None
    for scheme in schemes:
        t0 = time.perf_counter()
        llm = build_llm(folder, scheme, max_model_len=4096, gpu_memory_utilization=0.9)
        startup = time.perf_counter() - t0
        dt, n_out, steps = gb.run_workload(llm, prompts, outs)
        base = base or n_out / dt
        RESULTS[f"throughput/{name}/{scheme}"] = {"startup_s": startup, "s": dt, "out_tok_s": n_out / dt, "steps": steps,
                                                  "vs_first": n_out / dt / base}
        log(f"[throughput] {name} {scheme}: startup {startup:.1f}s; {n_out} tokens in {dt:.2f}s = {n_out / dt:.0f} out tok/s "
            f"({steps} steps) = {n_out / dt / base:.2f}x {schemes[0]}")
        del llm
        gc.collect()
        torch.cuda.empty_cache()


def section_peer(peer_dir: Path, bw: float, modes: list[str], prompt_len: int = 128, new: int = 256) -> None:
    """gpt-fast's own model and weight-only quantizers, random weights, batch-1 decode."""
    sys.path.insert(0, str(peer_dir.resolve()))
    import model as gf_model  # noqa: PLC0415 - gpt-fast's model.py
    import quantize as gf_quant  # noqa: PLC0415

    for mode in modes:
        torch.manual_seed(0)
        with torch.device("cuda"):
            m = gf_model.Transformer.from_name("llama-3.1-8b")
        m = m.to(dtype=torch.bfloat16)
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.02)
        if mode == "int8":
            for mod_name, mod in list(m.named_modules()):
                for cname, child in list(mod.named_children()):
                    if isinstance(child, torch.nn.Linear):
                        q, s, _ = gf_quant.dynamically_quantize_per_channel(child.weight.float(), -128, 127, torch.int8)
                        new_l = gf_quant.WeightOnlyInt8Linear(child.in_features, child.out_features, bias=False)
                        new_l.weight = q
                        new_l.scales = s.to(torch.bfloat16)
                        setattr(mod, cname, new_l)
        elif mode == "int4":
            for mod_name, mod in list(m.named_modules()):
                for cname, child in list(mod.named_children()):
                    if isinstance(child, torch.nn.Linear):
                        w32, sz = gf_quant.group_quantize_tensor(child.weight.to(torch.bfloat16), n_bit=4, groupsize=128)
                        # torch >= 2.5 takes the codes packed two per byte (gpt-fast passed int32).
                        w8 = (w32[:, ::2] << 4 | w32[:, 1::2]).to(torch.uint8)
                        packed = torch.ops.aten._convert_weight_to_int4pack(w8, 8)
                        new_l = gf_quant.WeightOnlyInt4Linear(child.in_features, child.out_features, bias=False,
                                                              groupsize=128, inner_k_tiles=8, padding=False)
                        new_l.weight = packed
                        new_l.scales_and_zeros = sz
                        setattr(mod, cname, new_l)
        m = m.cuda()
        nbytes = sum(t.numel() * t.element_size() for n_, t in list(m.named_parameters()) + list(m.named_buffers())
                     if "tok_embeddings" not in n_ and "cache" not in n_ and "freqs" not in n_ and "mask" not in n_)
        with torch.device("cuda"):
            m.setup_caches(max_batch_size=1, max_seq_length=1024)

        def one(tok, pos):
            return m(tok, pos).argmax(-1)
        step = torch.compile(one, mode="reduce-overhead", fullgraph=True)
        t0 = time.perf_counter()
        tok = torch.tensor([[1]], device="cuda")
        with torch.inference_mode():
            for p in range(3):
                step(tok, torch.tensor([p], device="cuda")).clone()
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            for p in range(prompt_len):
                tok = step(tok.view(1, 1), torch.tensor([p], device="cuda")).clone()
            positions = [torch.tensor([p], device="cuda") for p in range(prompt_len, prompt_len + new)]
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for p in positions:
                tok = step(tok.view(1, 1), p).clone()
            torch.cuda.synchronize()
        s = (time.perf_counter() - t0) / new
        floor = nbytes / bw
        RESULTS[f"peer/gpt-fast/{mode}"] = {"decode_ms": s * 1e3, "weight_GB": nbytes / 1e9, "compile_s": compile_s,
                                            "pct_floor": 100 * floor / s}
        log(f"[peer] gpt-fast {mode}: {s * 1e3:.3f} ms/tok (weights {nbytes / 1e9:.2f} GB, {100 * floor / s:.1f}% of "
            f"its floor), compile {compile_s:.0f}s")
        del m, step
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="kernels,decode,throughput,peer", help="kernels, kernels1 (one-row GEMVs only), gemv (quantized GEMVs vs bf16, every format, tile sweep), gemv1 (the same, int8 / int4 / Q4_0, no sweep of the code-at-a-time kernel; the int32-word int4 and int8 GEMVs vs a code at a time, with their tile sweeps), gemv8 (int8 and Q8_0 only: the int32-word int8 GEMV vs a code at a time, its tile sweep), gemvh (4-bit / int8: the half-math GEMVs vs a code at a time, tile sweep), qmm (several rows: GEMMs vs dequantize + cuBLAS, 4-bit word GEMM tile sweep; Qwen3-0.6B at 64-4096 rows), qmm1 (the Llama table only: no sweep, no int8 / Qwen3-0.6B), qmm4sweep (the 4-bit word GEMM tile sweep only), qmmqwen (Qwen3-0.6B shapes at 64-4096 rows, int8 reference), decode, decode1 (batch-1 decode only, --decode1 variants), prefill (8 x 2048 only, --prefill-schemes), throughput, peer")
    ap.add_argument("--schemes", default="bf16,int8,int4,fp8")
    ap.add_argument("--qmm-proj", default="qkv,o,gate_up,down", help="Llama-3.1-8B projections of --only qmm / qmm1")
    ap.add_argument("--tp-schemes", default="bf16,int4,fp8", help="throughput: schemes (fp8+fused: KVSERVE_FP8_FUSED_ACT=1)")
    ap.add_argument("--prefill-schemes", default="bf16,fp8,fp8+fused", help="prefill: schemes, the first the reference")
    ap.add_argument("--prefill-profile", action="store_true",
                    help="prefill: also one step per scheme under torch.profiler, kernels grouped by name")
    ap.add_argument("--decode1", default="int4:codes,int4:words",
                    help="decode1 (batch-1 decode only): schemes, ':words' / ':codes' the one-row GEMV's decode "
                         "(int8: KVSERVE_INT8_GEMV, else KVSERVE_INT4_GEMV), e.g. int8:codes,int8:words")
    ap.add_argument("--peer-dir", default="peer")
    ap.add_argument("--peer-modes", default="int8,int4")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    only = set(args.only.split(","))
    props = torch.cuda.get_device_properties(0)
    import triton

    log(f"device {props.name}, torch {torch.__version__}, triton {triton.__version__}")
    RESULTS["device"] = props.name
    root = Path(tempfile.mkdtemp())
    bw = flops = None
    if only & {"decode", "decode1", "peer", "prefill"}:
        bw, flops = gb.ceilings()
        RESULTS["ceiling_GBps"], RESULTS["matmul_TFLOPs"] = bw / 1e9, flops / 1e12
        log(f"[ceilings] best large GEMV {bw / 1e9:.0f} GB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s")
    sections = [
        ("kernels", lambda: section_kernels()),
        ("kernels1", lambda: section_kernels(sweep=False)),  # one-row GEMVs at their defaults only
        ("gemv", section_gemv),  # one-row quantized GEMVs vs the bf16 GEMV, every format, tile sweep
        ("gemv1", lambda: section_gemv(quick=True)),  # the same for int8, int4 and Q4_0, no tile sweep
        ("gemv8", lambda: section_gemv(quick=True, int8_only=True)),  # int8 / Q8_0: codes vs words, word tile sweep
        ("gemvh", section_gemvh),  # 4-bit / int8: the half-math GEMVs vs a code at a time, their tile sweep
        ("qmm", lambda: section_qmm(names=tuple(args.qmm_proj.split(",")))),  # several rows: the GEMMs vs cuBLAS
        ("qmm1", lambda: section_qmm(sweep=False, names=tuple(args.qmm_proj.split(",")), extras=False)),  # table only
        ("qmm4sweep", lambda: section_qmm(names=tuple(args.qmm_proj.split(",")), table=False, extras=False)),
        ("qmmqwen", lambda: section_qmm(sweep=False, names=(), extras=True)),  # Qwen3-0.6B shapes (+ int8) only
        ("decode", lambda: section_decode(root, bw, flops, args.schemes.split(","))),
        ("decode1", lambda: section_decode1(root, bw, args.decode1.split(","))),
        ("prefill", lambda: section_prefill(root, flops, args.prefill_schemes.split(","), args.prefill_profile)),
        ("throughput", lambda: section_throughput(root, args.tp_schemes.split(","))),
        ("peer", lambda: section_peer(Path(args.peer_dir), bw, args.peer_modes.split(","))),
    ]
    for name, fn in sections:
        if name in only:
            try:
                fn()
            except Exception:
                traceback.print_exc()
            Path(args.out, "gpu_quant_bench.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    log(json.dumps({k: v for k, v in RESULTS.items() if not k.startswith("kernels")}, indent=1, default=str))


if __name__ == "__main__":
    main()
