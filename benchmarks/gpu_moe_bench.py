"""Fused MoE on the GPU: Qwen3-30B-A3B and gpt-oss-20b shapes, random weights, with the floors
measured in the same run.

    python -m benchmarks.gpu_moe_bench                    # everything (--time-limit 185 s: an engine
                                                          # section that would not fit is skipped, said so)
    python -m benchmarks.gpu_moe_bench --only kernel      # kernel-level table only
    python -m benchmarks.gpu_moe_bench --only decode --moe-decode fused,torch   # engines, both paths
    python -m benchmarks.gpu_moe_bench --layers 48,24 --only decode   # full depth (memory!)
    python -m benchmarks.gpu_moe_bench --only sweep-decode --models Qwen3-30B-A3B   # decode kernels' tiles

Both decode paths side by side: `KVSERVE_MOE_DECODE=fused` (the default: the one-launch router
and PDL expert kernels of `kvserve/kernels/triton_moe_decode.py`) and `torch` (routing as torch
ops, the pairs kernels; `default` is its old name): the kernel table has a row per path (experts
alone: pairs / decode / sorted; and routing + experts as a layer runs them, per mode), the engine
section builds one engine per mode (`--moe-decode`, default `fused,torch`; the 256-request run
with the first only) and ends with a table of both.

Measured on an NVIDIA H200 (torch 2.11, triton 3.6, 2026-12-07; `--only decode`, then `--only
kernel`), batch-1 decode with CUDA graphs, torch -> fused: Qwen3-30B-A3B shapes (12 of 48
layers) 1.086 -> 0.750 ms/token (41.7% -> 60.5% of the 0.453 ms floor), gpt-oss-20b shapes (bf16
experts, 8 of 24 layers) 1.250 -> 0.944 (58.2% -> 77.0%); routing 16.8-23.3 µs as torch ops,
1.8-2.0 µs as one launch; gpt-oss-20b shapes at 4 tokens 236.6 µs (pairs) -> 167.4 (decode
kernels); at 8 and 16 tokens the sorted path stays faster than the decode kernels (8 tokens:
233.2 against 288.9 µs), and "auto" takes it there in both modes.

(a) kernel: one sparse layer's experts (`triton_moe.fused_moe`) for 1, 4, 8, 16 and 256 tokens with
    random routing, each captured in a CUDA graph and replayed back to back over 4 layers'
    weights (so no layer's experts sit in L2 from the call before): µs per layer against the
    floor = bytes of the experts actually selected (distinct ids) / the measured bf16 GEMV read
    bandwidth (best of cuBLAS and kvserve's Triton GEMV on large shapes); both paths (pairs,
    sorted) where they apply, and the unfused per-expert loop (the CPU path's algorithm, eager:
    it syncs to find the experts) as the baseline.
(b) decode: the engine (`LLM(load_format="dummy")`, CUDA graphs) at batch 1, 128-token prompt,
    128 new tokens: ms/token against the floor of the bytes one step reads = every weight but
    the unselected experts (top_k of E experts per sparse layer; the untied embedding table
    only for its looked-up row) + the KV cache read, / the same bandwidth.
(c) throughput: 256 requests of the standard workload (gpu_bench (b): random ids, prompt and
    output lengths uniform in [100, 1024], ignore_eos) on the same engine: output tok/s against
    the floor = per step, the weights of the experts expected to be hit by its running requests
    (E * (1 - (1 - k/E)^B) experts of each layer, uniform routing) plus every other weight, plus
    every cached token's K/V read once per decode step.

Shapes: Qwen3-30B-A3B (hidden 2048, 128 experts, top-8, expert width 768, 32 q / 4 kv heads,
head_dim 128, vocab 151936) and gpt-oss-20b (hidden 2880, 32 experts, top-4, expert width
2880, 64 q / 8 kv heads, head_dim 64, vocab 201088). gpt-oss is run as a Qwen3-MoE-architecture
model at its shapes: bf16 experts (its MXFP4 weights are not on the GPU path), gated SiLU
without its clamp and biases, full attention without sinks or sliding windows — the timing is
of the bytes and shapes. The engine sections use fewer layers than the real models (`--layers`,
default 12 and 8) to fit the time limit; the % of floor does not depend on depth much, and the
full-depth ms/token is projected as measured * floor(full depth) / floor(bench depth).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from benchmarks.gpu_bench import events_time, kv_bytes_per_token, kvserve_decode
from kvserve import LLM, SamplingParams

SHAPES = {
    # name: (experts, top_k, hidden, expert width, layers, q heads, kv heads, head_dim, vocab, tied)
    "Qwen3-30B-A3B": (128, 8, 2048, 768, 48, 32, 4, 128, 151936, False),
    "gpt-oss-20b": (32, 4, 2880, 2880, 24, 64, 8, 64, 201088, False),
}
RESULTS: dict[str, object] = {}


def log(msg: str) -> None:
    print(msg, flush=True)


def config(name: str, layers: int) -> dict:
    e, k, h, i, _, hq, hkv, d, vocab, tied = SHAPES[name]
    return dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=h, intermediate_size=4 * h,
                moe_intermediate_size=i, num_experts=e, num_experts_per_tok=k, norm_topk_prob=True,
                num_hidden_layers=layers, num_attention_heads=hq, num_key_value_heads=hkv, head_dim=d,
                vocab_size=vocab, tie_word_embeddings=tied, rope_theta=1000000.0, max_position_embeddings=40960,
                rms_norm_eps=1e-6, torch_dtype="bfloat16", decoder_sparse_step=1, mlp_only_layers=[])


# -- timing helpers --------------------------------------------------------------------------
def graph_time(fn, reps: int = 20) -> float:
    """Median seconds of one replay of fn() captured in a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return events_time(g.replay, reps)


def gemv_bandwidth() -> float:
    """Best read bandwidth (B/s) of large bf16 GEMVs: cuBLAS and kvserve's Triton GEMV."""
    from kvserve.models import triton_ops

    best = {}
    for n, k in ((131072, 4096), (65536, 8192)):
        w = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        i = [0]

        def cublas() -> None:
            i[0] ^= 1
            x @ w[i[0]].t()

        def triton_gemv() -> None:
            i[0] ^= 1
            triton_ops.gemv(x, w[i[0]])
        best[f"cuBLAS {n}x{k}"] = n * k * 2 / events_time(cublas, 50)
        best[f"Triton {n}x{k}"] = n * k * 2 / events_time(triton_gemv, 50)
        del w
    RESULTS["gemv_GBps"] = {k: v / 1e9 for k, v in best.items()}
    return max(best.values())


# -- (a) kernel level ----------------------------------------------------------------------------
def expert_loop(x, w13, w2, wts, ids):
    """The unfused algorithm (moe.py's expert loop on stacked weights): gather, GEMMs, scatter."""
    out = torch.zeros_like(x)
    hit = torch.bincount(ids.flatten(), minlength=w13.shape[0]).nonzero().flatten().tolist()
    for e in hit:
        rows, slot = torch.where(ids == e)
        gu = F.linear(x.index_select(0, rows), w13[e])
        g, u = gu.chunk(2, -1)
        y = F.linear(F.silu(g) * u, w2[e]) * wts[rows, slot, None]
        out.index_add_(0, rows, y)
    return out


def section_kernel(bw: float, peak: float) -> None:
    from kvserve.kernels import triton_moe, triton_moe_decode
    from kvserve.models.ops import Ops

    table = []
    for name, (e, k, hidden, inter, *_rest) in SHAPES.items():
        if name not in models:
            continue
        copies = 4
        w13 = [torch.randn(e, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        w2 = [torch.randn(e, hidden, inter, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        expert_bytes = 3 * hidden * inter * 2
        for t in (1, 4, 8, 16, 256):
            g = torch.Generator(device="cuda").manual_seed(t)
            x = torch.randn(t, hidden, device="cuda", dtype=torch.bfloat16, generator=g)
            logits = torch.randn(t, e, device="cuda", generator=g).to(torch.bfloat16)
            wts, ids = Ops().route_experts(logits, k, True, torch.bfloat16)
            distinct = int(torch.unique(ids).numel())
            floor_mem = distinct * expert_bytes / bw
            floor_flop = 2 * t * k * 3 * hidden * inter / peak
            floor = max(floor_mem, floor_flop)
            ref = triton_moe.reference_moe(x, w13[0], w2[0], wts, ids) if t <= 16 else None
            row = {"tokens": t, "distinct_experts": distinct, "floor_us": floor * 1e6,
                   "floor_mem_us": floor_mem * 1e6, "floor_flop_us": floor_flop * 1e6}
            # "decode": the expert kernels of KVSERVE_MOE_DECODE=fused, the default (triton_moe_decode)
            paths = ["pairs", "decode", "sorted"] if t <= 16 else ["sorted"]
            for path in paths:
                out = triton_moe.fused_moe(x, w13[0], w2[0], wts, ids, path=path)
                if ref is not None:
                    rel = ((out.float() - ref).norm() / ref.norm()).item()
                    assert rel < 2e-2, f"{name} {path} t={t}: rel err {rel}"

                def run(path=path) -> None:
                    for c in range(copies):
                        triton_moe.fused_moe(x, w13[c], w2[c], wts, ids, path=path)
                row[f"{path}_us"] = graph_time(run) / copies * 1e6
                row[f"{path}_pct_floor"] = 100 * floor / row[f"{path}_us"] * 1e6
            # The routing and the experts as a model layer runs them (the router projection,
            # the same in both, left out): torch = torch ops + auto path, fused (the default) =
            # route kernel + auto path with the decode kernels.
            for mode in ("torch", "fused"):
                def layer(mode=mode) -> None:
                    for c in range(copies):
                        if mode == "fused":
                            w_, i_ = triton_moe_decode.route(logits, k, True, torch.bfloat16)
                        else:
                            w_, i_ = Ops().route_experts(logits, k, True, torch.bfloat16)
                        triton_moe.fused_moe(x, w13[c], w2[c], w_, i_, fused_decode=mode == "fused")
                row[f"layer_{mode}_us"] = graph_time(layer) / copies * 1e6
                row[f"layer_{mode}_pct_floor"] = 100 * floor / row[f"layer_{mode}_us"] * 1e6
                def route(mode=mode) -> None:
                    for _ in range(copies):
                        if mode == "fused":
                            triton_moe_decode.route(logits, k, True, torch.bfloat16)
                        else:
                            Ops().route_experts(logits, k, True, torch.bfloat16)
                row[f"route_{mode}_us"] = graph_time(route) / copies * 1e6
            auto = "pairs" if triton_moe.use_pairs(t, e, k) else "sorted"
            row["auto"] = auto
            if "sorted" in paths:  # the expert sort alone: one Triton program vs torch ops
                bm = triton_moe.sorted_config(t * k, e)["BLOCK_M"]
                for kern in (True, False):
                    row[f"align_{'triton' if kern else 'torch'}_us"] = graph_time(
                        lambda kern=kern: triton_moe.align_by_expert(ids, e, bm, kern)) * 1e6
            c = [0]

            def loop() -> None:
                c[0] = (c[0] + 1) % copies
                expert_loop(x, w13[c[0]], w2[c[0]], wts, ids)
            row["loop_us"] = events_time(loop, 20) * 1e6
            RESULTS[f"kernel/{name}/T{t}"] = row
            for path in paths:
                tag = {"pairs": " (auto: torch)", "decode": " (auto: fused, the default)"}.get(path, " (auto)") \
                    if path == auto or (path == "decode" and auto == "pairs") else ""
                table.append((name, t, distinct, floor * 1e6, f"experts: {path}{tag}", row[f"{path}_us"]))
            for mode in ("torch", "fused"):
                label = (f"route {'torch ops' if mode == 'torch' else 'Triton'} + experts "
                         f"({'decode' if mode == 'fused' and auto == 'pairs' else auto}), KVSERVE_MOE_DECODE={mode}")
                table.append((name, t, distinct, floor * 1e6, label, row[f"layer_{mode}_us"]))
                table.append((name, t, distinct, 0.0, f"  of which routing ({mode})", row[f"route_{mode}_us"]))
            table.append((name, t, distinct, floor * 1e6, "expert loop (eager, unfused)", row["loop_us"]))
            log(f"[kernel] {name} T={t} done" + (f" | sort: Triton {row['align_triton_us']:.1f} us, torch "
                                                  f"{row['align_torch_us']:.1f} us" if "sorted" in paths else ""))
        del w13, w2
        torch.cuda.empty_cache()
    log("\n| shape | tokens | experts hit | floor µs | path | µs per layer | % of floor |\n|---|---|---|---|---|---|---|")
    for name, t, distinct, floor_us, label, us in table:
        pct = f"{100 * floor_us / us:.1f}%" if floor_us else ""
        log(f"| {name} | {t} | {distinct} | {floor_us:.1f} | {label} | {us:.1f} | {pct} |")


def section_sweep() -> None:
    """Tile configs of the pairs path (gate/up and down kernels each, the other at its default)
    at 1 and 4 tokens: µs per layer, 4 layers' weights replayed back to back."""
    from kvserve.kernels import triton_moe

    grid = [(bn, bk, w) for bn in (2, 4, 8) for bk in (256, 512, 1024) for w in (4, 8)]
    for name, (e, k, hidden, inter, *_rest) in SHAPES.items():
        if name not in models:
            continue
        copies = 4
        w13 = [torch.randn(e, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        w2 = [torch.randn(e, hidden, inter, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        for t in (1, 4):
            x = torch.randn(t, hidden, device="cuda", dtype=torch.bfloat16)
            wts, ids = torch.topk(torch.softmax(torch.randn(t, e, device="cuda"), -1), k, -1)
            wts = wts.to(torch.bfloat16)
            default = (triton_moe.pairs_config(inter, hidden), triton_moe.pairs_config(hidden, inter))
            res = {}
            for which in (0, 1):
                for cfg in grid:
                    if cfg[1] > triton.next_power_of_2(hidden if which == 0 else inter):
                        continue
                    cfgs = (cfg, default[1]) if which == 0 else (default[0], cfg)

                    def run(cfgs=cfgs) -> None:
                        for c in range(copies):
                            triton_moe.fused_moe(x, w13[c], w2[c], wts, ids, path="pairs", pairs_configs=cfgs)
                    try:
                        res[(which, cfg)] = graph_time(run, 10) / copies * 1e6
                    except Exception as exc:  # noqa: BLE001 (a config that does not compile)
                        log(f"[sweep] {cfg}: {type(exc).__name__}")
            for which, label in ((0, "gate_up"), (1, "down")):
                best = sorted((v, c) for (w, c), v in res.items() if w == which)[:4]
                base = res.get((which, default[which]))
                log(f"[sweep] {name} T={t} {label}: default {default[which]} {base:.1f} us; best "
                    + ", ".join(f"{c} {v:.1f}" for v, c in best))
        del w13, w2
        torch.cuda.empty_cache()


def section_sweep_decode(models: list[str]) -> None:
    """Tile configs of the decode path's expert kernels (`triton_moe_decode`; gate/up (BLOCK_N,
    BLOCK_K, warps) and down (BLOCK_N, BLOCK_K, warps, PRE) each, the other at its default) at 1
    token: µs per layer, 4 layers' weights replayed back to back. A winner goes into
    `gate_up_config` / `down_config`; the engine takes one without a code change through
    `KVSERVE_MOE_DECODE_TILES=BN,BK,W/BN,BK,W,PRE` (e.g. a `gpu_decode_profile` variant)."""
    from kvserve.kernels import triton_moe_decode as tmd

    # Curated from the sm_90 machine code (Triton 3.9, Qwen3-30B-A3B): gate/up (4, 1024, 8) and
    # (2, 1024, 4) issue all their weight loads before the first FMA at 48 registers where the
    # default (4, 512, 4) issues 8 of its 16 later (86 registers); down (4, 256, 8, 3) streams the
    # default's 96 weights per thread at 72 registers with half its L2 reads of h per weight byte.
    gu_grid = [(4, 512, 4), (8, 512, 8), (2, 512, 2), (4, 1024, 8), (2, 1024, 4), (8, 1024, 8), (2, 2048, 8),
               (4, 256, 4), (8, 256, 8)]
    dn_grid = [(2, 256, 4, 4), (4, 256, 8, 4), (2, 256, 8, 4), (4, 128, 4, 4), (8, 128, 8, 4), (2, 128, 4, 4),
               (4, 256, 4, 4), (2, 512, 4, 4), (4, 512, 8, 4)]
    for name, (e, k, hidden, inter, *_rest) in SHAPES.items():
        if name not in models:
            continue
        copies = 4
        w13 = [torch.randn(e, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        w2 = [torch.randn(e, hidden, inter, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        x = torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16)
        wts, ids = torch.topk(torch.softmax(torch.randn(1, e, device="cuda"), -1), k, -1)
        wts = wts.to(torch.bfloat16)
        default = (tmd.gate_up_config(inter, hidden), tmd.down_config(hidden, inter, k))
        for which, grid in ((0, gu_grid), (1, dn_grid)):
            res = {}
            extra = [(*default[1][:3], 0)] if which == 1 else []  # the default down tile without preloading
            for cfg in grid + extra + [default[which]]:
                kk = hidden if which == 0 else inter
                if cfg[1] > triton.next_power_of_2(kk) or kk // cfg[1] > 16:  # (long unrolled loops compile slowly)
                    continue
                if which == 1:  # PRE: at most 4 whole tiles
                    cfg = (*cfg[:3], min(cfg[3], triton.cdiv(inter, cfg[1])))
                cfgs = (cfg, default[1]) if which == 0 else (default[0], cfg)

                def run(cfgs=cfgs) -> None:
                    for c in range(copies):
                        tmd.fused_moe_decode(x, w13[c], w2[c], wts, ids, configs=cfgs)
                try:
                    res[cfg] = graph_time(run, 10) / copies * 1e6
                except Exception as exc:  # noqa: BLE001 (a config that does not compile or fit)
                    log(f"[sweep-decode] {cfg}: {type(exc).__name__}")
            best = sorted((v, c) for c, v in res.items())[:5]
            label = "gate_up" if which == 0 else "down"
            RESULTS[f"sweep_decode/{name}/{label}"] = {str(c): v for c, v in res.items()}
            log(f"[sweep-decode] {name} T=1 {label}: default {default[which]} {res.get(default[which], float('nan')):.1f} "
                f"us (both kernels); best " + ", ".join(f"{c} {v:.1f}" for v, c in best))
        del w13, w2
        torch.cuda.empty_cache()


# -- (b) decode and (c) throughput on the engine -------------------------------------------------
def decode_bytes(model: torch.nn.Module, cfg_e: tuple, active_experts_per_layer: float) -> tuple[int, int]:
    """(bytes read per step with `active_experts_per_layer` experts of each sparse layer,
    bytes of the sparse layers' experts in all)."""
    e = cfg_e[0]
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.embed_tokens.weight
    if model.lm_head.weight is not emb:
        total -= emb.numel() * emb.element_size()
    experts = 0
    for layer in model.layers:
        stacked = getattr(layer.mlp, "stacked_experts", None)
        if stacked is not None:
            experts += sum(w.numel() * w.element_size() for w in stacked)
    return int(total - experts + experts * active_experts_per_layer / e), experts


def workload(n: int = 256, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(10000) for _ in range(rng.randint(100, 1024))] for _ in range(n)]
    outs = [rng.randint(100, 1024) for _ in range(n)]
    return prompts, outs


def section_engine(name: str, layers: int, root: Path, bw: float, throughput: bool, requests: int,
                   mode: str = "fused") -> None:
    """The engine with `KVSERVE_MOE_DECODE=mode` (read when it is built)."""
    e, k, *_rest = SHAPES[name]
    full_layers = SHAPES[name][4]
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config(name, layers)))
    os.environ["KVSERVE_MOE_DECODE"] = mode
    t0 = time.perf_counter()
    llm = LLM(str(folder), load_format="dummy", max_model_len=4096, max_num_seqs=256 if throughput else 8,
              enable_prefix_caching=False, gpu_memory_utilization=0.9)
    startup = time.perf_counter() - t0
    eng = llm.engine
    model, cfg = eng.runner.model, eng.model_config
    stacked = sum(getattr(layer.mlp, "stacked_experts", None) is not None for layer in model.layers)
    assert stacked == layers, f"{stacked} of {layers} layers run the fused MoE"
    assert eng.runner.graphs is not None, "CUDA graphs are off"
    wb, expert_total = decode_bytes(model, SHAPES[name], k)
    kv = kv_bytes_per_token(cfg) * (128 + 64)  # mean context over the timed steps
    floor = (wb + kv) / bw
    s = kvserve_decode(llm, new=128)
    # Projection to full depth: non-layer bytes (embedding row, norm, head) once, layers scaled.
    layer_bytes = sum(p.numel() * p.element_size() for p in model.layers.parameters()) - expert_total * (1 - k / e)
    head_bytes = wb - layer_bytes
    floor_full = (head_bytes + layer_bytes * full_layers / layers + kv * full_layers / layers) / bw
    row = {"mode": mode, "layers": layers, "startup_s": startup, "weights_read_GB": wb / 1e9, "floor_ms": floor * 1e3,
           "ms_per_token": s * 1e3, "pct_floor": 100 * floor / s, "full_depth_layers": full_layers,
           "full_depth_floor_ms": floor_full * 1e3, "full_depth_projected_ms": s * floor_full / floor * 1e3,
           "graph_steps": eng.runner.num_graph_steps}
    RESULTS[f"decode/{name}/{mode}"] = row
    log(f"[decode] {name} ({layers} of {full_layers} layers; KVSERVE_MOE_DECODE={mode}; start-up {startup:.0f}s): "
        f"batch-1 {s * 1e3:.3f} ms/token, "
        f"floor {floor * 1e3:.3f} ms ({wb / 1e9:.2f} GB/step) -> {100 * floor / s:.1f}% of the floor; "
        f"full depth: floor {floor_full * 1e3:.2f} ms, projected {s * floor_full / floor * 1e3:.2f} ms/token")
    if throughput:
        prompts, outs = workload(requests)
        sps = [SamplingParams(max_tokens=o, temperature=0.6, ignore_eos=True) for o in outs]
        batch: list[int] = []
        orig = eng.step

        def counted():
            batch.append(len(eng.scheduler.running))  # requests of the step about to run (approx.)
            return orig()
        eng.step = counted
        t0 = time.perf_counter()
        res = llm.generate([{"prompt_token_ids": p} for p in prompts], sps, use_tqdm=False)
        dt = time.perf_counter() - t0
        eng.step = orig
        n_out = sum(len(r.outputs[0].token_ids) for r in res)
        kvb = kv_bytes_per_token(cfg)
        kv_read = sum(kvb * (len(p) + i) for p, o in zip(prompts, outs) for i in range(1, o))
        non_expert = wb - expert_total * k / e
        w_read = sum(non_expert + expert_total * (1 - (1 - k / e) ** max(b, 1)) for b in batch)
        tfloor = (kv_read + w_read) / bw
        row = {"requests": requests, "s": dt, "out_tok_s": n_out / dt, "steps": len(batch),
               "floor_s": tfloor, "floor_tok_s": n_out / tfloor, "pct_floor": 100 * tfloor / dt,
               "kv_read_GB": kv_read / 1e9, "weights_read_GB": w_read / 1e9,
               "preemptions": eng.stats().get("num_preemptions"), "kv_blocks": eng.cache_config.num_blocks}
        RESULTS[f"throughput/{name}/{mode}"] = row
        log(f"[throughput] {name} ({layers} layers): {requests} requests, {n_out} tokens in {dt:.1f}s = "
            f"{n_out / dt:.0f} out tok/s over {len(batch)} steps; floor {tfloor:.1f}s = {n_out / tfloor:.0f} tok/s "
            f"(weights {w_read / 1e9:.0f} GB + KV {kv_read / 1e9:.0f} GB) -> {100 * tfloor / dt:.1f}% of it")
    del llm, eng, model
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="kernel,decode,throughput")
    ap.add_argument("--layers", default="12,8", help="engine layers for Qwen3-30B-A3B, gpt-oss-20b")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--models", default="Qwen3-30B-A3B,gpt-oss-20b")
    ap.add_argument("--time-limit", type=float, default=185.0,
                    help="seconds: an engine section is skipped when the last one would not fit before it")
    ap.add_argument("--moe-decode", default="fused,torch",
                    help="KVSERVE_MOE_DECODE modes of the engine's decode section, in turn (throughput: the first; "
                         "fused is the default, torch the routing as torch ops and the pairs kernels; fused-router "
                         "and fused-chain the opt-in launch fusions)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()

    props = torch.cuda.get_device_properties(0)
    log(f"card: {props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs); "
        f"torch {torch.__version__}, triton {triton.__version__}")
    t_start = time.perf_counter()
    bw = gemv_bandwidth()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    peak = 2 * 8192**3 / events_time(lambda: a @ a, 20)
    del a
    RESULTS["ceilings"] = {"gemv_GBps": bw / 1e9, "matmul_TFLOPs": peak / 1e12, "card": props.name}
    log(f"ceilings: bf16 GEMV read {bw / 1e9:.0f} GB/s ({RESULTS['gemv_GBps']}), bf16 matmul {peak / 1e12:.0f} TFLOP/s")
    only = set(args.only.split(","))
    models = args.models.split(",")
    layers = dict(zip(SHAPES, (int(n) for n in args.layers.split(","))))
    if "sweep" in only:
        section_sweep()
    if "sweep-decode" in only:  # the --models shapes only
        section_sweep_decode(models)
    if "kernel" in only:
        try:
            section_kernel(bw, peak)
        except Exception:
            traceback.print_exc()
    modes = args.moe_decode.split(",")
    last_engine_s = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            for i, mode in enumerate(modes):
                if "decode" in only or ("throughput" in only and i == 0):
                    elapsed = time.perf_counter() - t_start
                    if elapsed + last_engine_s > args.time_limit:
                        log(f"[engine] {name} KVSERVE_MOE_DECODE={mode}: skipped ({elapsed:.0f}s elapsed, an engine "
                            f"section took up to {last_engine_s:.0f}s, --time-limit {args.time_limit:.0f}s)")
                        continue
                    t_engine = time.perf_counter()
                    try:
                        section_engine(name, layers[name], Path(tmp), bw, "throughput" in only and i == 0,
                                       args.requests, mode)
                    except Exception:
                        traceback.print_exc()
                    gc.collect()
                    torch.cuda.empty_cache()
                    last_engine_s = max(last_engine_s, time.perf_counter() - t_engine)
                Path(args.out, "gpu_moe_bench.json").write_text(json.dumps(RESULTS, indent=1))
    os.environ.pop("KVSERVE_MOE_DECODE", None)
    if "decode" in only:
        log("\n| model | layers | KVSERVE_MOE_DECODE | batch-1 ms/token | floor ms | % of floor | full depth: floor / "
            "projected ms |\n|---|---|---|---|---|---|---|")
        for name in models:
            for mode in modes:
                r = RESULTS.get(f"decode/{name}/{mode}")
                if r:
                    log(f"| {name} | {r['layers']} | {mode} | {r['ms_per_token']:.3f} | {r['floor_ms']:.3f} | "
                        f"{r['pct_floor']:.1f}% | {r['full_depth_floor_ms']:.2f} / {r['full_depth_projected_ms']:.2f} |")
    Path(args.out, "gpu_moe_bench.json").write_text(json.dumps(RESULTS, indent=1))
    log(f"total {time.perf_counter() - t_start:.0f}s")
    log(json.dumps(RESULTS, indent=1))


if __name__ == "__main__":
    main()
