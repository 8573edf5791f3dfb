"""gpt-oss-20b shapes on one GPU (random weights, MXFP4 experts kept 4-bit): checks, then batch-1
decode ms/token against the floor of the bytes a decode step must read.

    python -m benchmarks.gpt_oss_gpu_bench                 # checks + decode, eager and CUDA graphs
    python -m benchmarks.gpt_oss_gpu_bench --layers 4      # a shorter model (quick look)
    python -m benchmarks.gpt_oss_gpu_bench --throughput 256   # + the 256-request workload
    python -m benchmarks.gpt_oss_gpu_bench --kernels-only     # the MoE kernels alone (legacy vs packed)
    python -m benchmarks.gpt_oss_gpu_bench --compare-legacy   # + decode on the non-default MoE kernels (legacy)
    python -m benchmarks.gpt_oss_gpu_bench --down-split       # the split down GEMV vs the sequential one (~1 min)
    python -m benchmarks.gpt_oss_gpu_bench --gemv-f16         # the fp16x2 GEMVs (DECODE 2 / 3) vs the defaults (~2 min)
    python -m benchmarks.gpt_oss_gpu_bench --no-kernels --no-eager --profile   # decode + where a step's time goes

MoE kernels (`kernel_table`, run by default): one gpt-oss-20b MoE layer (32 experts, top 4,
2880 x 2880, random MXFP4 bytes) at 1 / 4 / 16 / 256 tokens, the legacy kernel
(`KVSERVE_MXFP4_MOE=legacy`: 17-byte blocks) against the packed one (`KVSERVE_MXFP4_MOE=packed`,
the default: aligned layout, GEMV path up to a few tokens, grouped above), each replayed from a
CUDA graph over 4 layers' weights (so the experts come from HBM, not L2) with fresh routing per
call; the floor is the distinct selected experts' bytes at the GEMV read bandwidth. Also a sweep of the GEMV kernels' (BLOCK_N, BLOCK_G, warps, DECODE) at 1 token
(KVSERVE_MXFP4_GEMV_GU / KVSERVE_MXFP4_GEMV_DOWN select one in the engine), then the split down
GEMV's configs (`DOWN_SPLIT_CANDIDATES`, the config's fifth value SPLIT >= 1) beside the default
sequential down kernel timed again, and which of them wins. `--gemv-f16` alone: the packed-half-math
GEMVs (DECODE 2 / 3, `GEMV_F16_CANDIDATES`: fp16x2 math, the next K-step prefetched, PDL launches)
checked at gpt-oss-20b widths, then each (gate/up, down) config against the defaults at 1 and 4
tokens, and the winner with the KVSERVE_MXFP4_GEMV_GU / _DOWN values that select it.

Checks: the Triton attention kernels with sinks against the PyTorch backend
(`tests/gpu/sink_checks.py`, bf16 and fp32), MXFP4 dequantization on the GPU equal to the CPU's,
the grouped MXFP4 MoE kernel against the expert loop (`tests/gpu/mxfp4_moe_checks.py`), and one
MoE layer of the engine's model against the layer computed densely from the dequantized weights.

Floor per decode token (batch 1): every bf16 attention weight and bias, the router, the 4
selected experts' MXFP4 bytes (4.25 bits a weight) and biases, the norms, the LM head, one
embedding row and the KV cache read, divided by the read bandwidth of a large bf16 GEMV
measured in the same run. Prints a table and writes JSON (`--json`).

Decode modes: `eager` and `cuda-graphs` on the MoE kernels `KVSERVE_MXFP4_MOE` selects (`packed`
unless set), and with `--compare-legacy` one more engine with CUDA graphs on the other kernels
(`legacy-graphs`; `packed-graphs` if the variable says legacy), so both stand side by side.
Measured on an NVIDIA H200 (torch 2.11, triton 3.6, 2026-12-07, `--compare-legacy`): MoE layer
legacy -> packed 308.8 -> 91.2 µs at 1 token (3.39x), 550.6 -> 145.9 at 4 (3.77x), 979.8 ->
703.2 at 16 (1.39x), 2776.2 -> 1306.3 at 256 (2.13x), rel diff 4.5e-3; batch-1 decode (24
layers, CUDA graphs) 8.683 -> 3.456 ms/token (11.6% -> 29.2% of the 1.008 ms floor).

`--throughput N`: N requests (random ids in [0, 10000), prompt and output lengths uniform in
[100, 1024], ignore_eos, temperature 0.6; the standard workload of `gpu_bench`), output tok/s
against the ceiling of reading every weight once per step with `max_num_seqs` requests decoding
(at 256 rows every expert is hit each step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

GPT_OSS_20B = dict(
    architectures=["GptOssForCausalLM"], model_type="gpt_oss", hidden_size=2880, intermediate_size=2880,
    num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
    num_experts_per_tok=4, vocab_size=201088, sliding_window=128, max_position_embeddings=131072,
    rms_norm_eps=1e-5, attention_bias=True, swiglu_limit=7.0, tie_word_embeddings=False, torch_dtype="bfloat16",
    rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                     "original_max_position_embeddings": 4096, "rope_theta": 150000.0},
    quantization_config={"quant_method": "mxfp4"}, eos_token_id=200002,
)


def log(msg: str) -> None:
    print(msg, flush=True)


def gemv_read_bw(n: int = 16384, k: int = 16384, reps: int = 50) -> float:
    """B/s of a bf16 [1, k] x [n, k]^T product (cuBLAS), two weights alternated."""
    w = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    for i in range(3):
        x @ w[i % 2].t()
    torch.cuda.synchronize()
    times = []
    for r in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        x @ w[r % 2].t()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return n * k * 2 / statistics.median(times)


def floor_bytes(cfg: dict, context: int) -> dict[str, float]:
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hq, hkv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    e, k, vocab = cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["vocab_size"]
    attn = ((hq + 2 * hkv) * d * (h + 1) + h * (hq * d + 1) + hq) * 2  # qkv, o (+ biases), sinks
    router = e * (h + 1) * 2
    expert = (2 * inter * h + h * inter) * 4.25 / 8 + (2 * inter + h) * 2
    norms = 2 * h * 2
    window = cfg["sliding_window"]
    kv = sum(min(context, window) if i % 2 == 0 else context for i in range(layers)) * 2 * hkv * d * 2
    out = {
        "attention": layers * attn, "router": layers * router, "experts": layers * k * expert,
        "norms": layers * norms + h * 2, "lm_head": vocab * h * 2, "embedding_row": h * 2, "kv_cache": kv,
    }
    out["total"] = sum(out.values())
    return out


def checks() -> None:
    from kvserve.kernels import mxfp4
    from tests.gpu import sink_checks

    t0 = time.perf_counter()
    sink_checks.run("cuda")
    for dtype in (torch.bfloat16, torch.float32):
        for window in (None, 128):
            sink_checks.check_case(sink_checks.MIXED, window, "cuda", dtype, heads=(64, 8), head_dim=64, seed=11)
    log(f"check: Triton attention with sinks == PyTorch reference (bf16, fp32)   ok ({time.perf_counter() - t0:.1f}s)")
    w = torch.randn(512, 2880) * 0.05
    data = mxfp4.quantize(w)
    assert torch.equal(mxfp4.dequantize(data.cuda(), 2880, torch.bfloat16).cpu(), mxfp4.dequantize(data, 2880, torch.bfloat16))
    log("check: MXFP4 dequantization on the GPU == the CPU's   ok")
    from tests.gpu import mxfp4_moe_checks

    mxfp4_moe_checks.run("cuda")
    log("check: grouped MXFP4 MoE kernel == the expert loop (fp32, bf16 at 2880 x 2880)   ok")


def _moe_weights(layers: int, e: int = 32, h: int = 2880, inter: int = 2880, scale: int = 121):
    """`layers` copies of one MoE layer's experts as random GGML-layout MXFP4 bytes on the GPU."""
    out = []
    for _ in range(layers):
        gu = torch.randint(0, 256, (e, 2 * inter, h // 32 * 17), dtype=torch.uint8, device="cuda")
        dn = torch.randint(0, 256, (e, h, inter // 32 * 17), dtype=torch.uint8, device="cuda")
        gu.view(e, 2 * inter, h // 32, 17)[..., 0] = scale
        dn.view(e, h, inter // 32, 17)[..., 0] = scale
        bgu = torch.randn(e, 2 * inter, device="cuda", dtype=torch.bfloat16) * 0.1
        bdn = torch.randn(e, h, device="cuda", dtype=torch.bfloat16) * 0.1
        out.append((gu, bgu, dn, bdn))
    return out


def _graph_us(fn, calls: int) -> float:
    """Mean µs per call of `fn(i)` for i in range(calls), replayed from one CUDA graph."""
    for i in range(calls):  # warm-up / compile
        fn(i)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):
            for i in range(calls):
                fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(times)


def kernel_table(bw: float) -> dict[str, object]:
    """Per-layer µs of the legacy and the packed (default) MXFP4 MoE kernels at 1/4/16/256 tokens
    (JSON keys `legacy_us` and `new_us`, the packed one's)."""
    from kvserve.kernels import mxfp4
    from kvserve.kernels import triton_mxfp4_moe as tm

    e, k, h, inter, alpha, limit = 32, 4, 2880, 2880, 1.702, 7.0
    layers = 4
    raw = _moe_weights(layers, e, h, inter)
    packed = [tm.pack_experts(gu, bgu, dn, bdn, h, inter) for gu, bgu, dn, bdn in raw]

    def act(gu: torch.Tensor) -> torch.Tensor:
        gate, up = gu[:, :inter].clamp(max=limit), gu[:, inter:].clamp(-limit, limit)
        return (up + 1) * gate * torch.sigmoid(gate * alpha)

    expert_bytes = (2 * inter * mxfp4.row_bytes(h) + h * mxfp4.row_bytes(inter)) + (2 * inter + h) * 2
    rows: dict[str, object] = {}
    gen = torch.Generator(device="cuda").manual_seed(0)
    log(f"MoE layer kernels, gpt-oss-20b shapes (E={e}, top-{k}, {h} x {inter}), µs per layer (CUDA graph, "
        f"{layers} layers' weights alternated)")
    log(f"{'tokens':>7}{'path':>9}{'legacy µs':>11}{'packed µs':>11}{'speed-up':>10}{'floor µs':>10}"
        f"{'packed % floor':>16}{'rel diff':>10}")
    for t in (1, 4, 16, 256):
        calls = 8
        xs = [torch.randn(t, h, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(calls)]
        idss = [torch.stack([torch.randperm(e, device="cuda", generator=gen)[:k] for _ in range(t)]) for _ in range(calls)]
        wtss = [torch.softmax(torch.randn(t, k, device="cuda", generator=gen), -1).to(torch.bfloat16) for _ in range(calls)]
        distinct = statistics.mean(len(torch.unique(ids)) for ids in idss)
        floor_us = distinct * expert_bytes / bw * 1e6
        old = _graph_us(lambda i: tm.moe_mxfp4(xs[i], idss[i], wtss[i], *raw[i % layers], act), calls)
        new = _graph_us(lambda i: tm.fused_moe_mxfp4(xs[i], idss[i], wtss[i], packed[i % layers], alpha, limit), calls)
        a = tm.moe_mxfp4(xs[0], idss[0], wtss[0], *raw[0], act).float()
        b = tm.fused_moe_mxfp4(xs[0], idss[0], wtss[0], packed[0], alpha, limit).float()
        rel = ((a - b).norm() / a.norm()).item()
        path = "gemv" if tm.use_gemv(t, e, k) else "grouped"
        log(f"{t:>7}{path:>9}{old:>11.1f}{new:>11.1f}{old / new:>9.2f}x{floor_us:>10.1f}{floor_us / new * 100:>15.1f}%"
            f"{rel:>10.1e}")
        rows[str(t)] = {"path": path, "legacy_us": old, "new_us": new, "floor_us": floor_us, "rel_diff": rel}
    # the GEMV kernels' tiles at 1 token (KVSERVE_MXFP4_GEMV_GU / _DOWN pick them in the engine)
    x1 = [torch.randn(1, h, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(8)]
    ids1 = [torch.randperm(e, device="cuda", generator=gen)[:k][None] for _ in range(8)]
    w1 = [torch.full((1, k), 1 / k, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
    floor1 = k * expert_bytes / bw * 1e6
    sweep = {}
    gu0, dn0 = tm.gemv_configs()

    def layer_us(cfg) -> float:
        return _graph_us(lambda i: tm.fused_moe_mxfp4(x1[i], ids1[i], w1[i], packed[i % layers], alpha, limit,
                                                      path="gemv", gemv_cfg=cfg), 8)

    tiles = [(bn, bg, w, d) for d in (1, 0) for bn, bg, w in
             ((32, 8, 4), (16, 8, 4), (16, 8, 2), (8, 8, 2), (64, 8, 4), (32, 16, 4), (32, 4, 4), (64, 8, 8))]
    for which, cfgs in (("gate/up", [(c, dn0) for c in tiles]), ("down", [(gu0, c) for c in tiles if c != dn0[:4]])):
        for cfg in cfgs:
            bn, bg, warps, dec = cfg[0] if which == "gate/up" else cfg[1][:4]
            try:
                us = layer_us(cfg)
            except Exception as exc:  # noqa: BLE001 - a config that does not compile
                log(f"  {which} {bn},{bg},{warps},{dec}: failed {type(exc).__name__}: {str(exc)[:100]}")
                continue
            sweep[f"{which} {bn},{bg},{warps},{dec}"] = us
            log(f"  {which:<8} BLOCK_N={bn:>2} BLOCK_G={bg:>2} warps={warps} DECODE={dec} (other kernel at its default): "
                f"{us:7.1f} µs/layer at 1 token ({floor1 / us * 100:.0f}% of {floor1:.1f} µs)")
    rows["down_split_winner"] = down_split_sweep(layer_us, gu0, dn0, floor1, sweep)
    rows["gemv_sweep_1_token"] = sweep
    del raw, packed
    torch.cuda.empty_cache()
    return rows


def down_split_sweep(layer_us, gu0, dn0, floor_us: float, sweep: dict[str, float], tokens: int = 1) -> dict[str, object]:
    """The split down GEMV (SPLIT >= 1: per (pair, K split) partials + a fixed-order reduce, one
    launch more) at `tm.DOWN_SPLIT_CANDIDATES` side by side with the sequential default, timed
    again right before them (`layer_us(gemv_cfg)`: µs per MoE layer); logs and returns the winner."""
    from kvserve.kernels import triton_mxfp4_moe as tm

    base_cfg = dn0[:4] + (0,)
    base = layer_us((gu0, base_cfg))
    sweep[f"down default {','.join(map(str, base_cfg))} T={tokens}"] = base
    log(f"  down split vs sequential at {tokens} token(s), gate/up at its default; sequential "
        f"{','.join(map(str, base_cfg))}: {base:7.1f} µs/layer ({floor_us / base * 100:.0f}% of the {floor_us:.1f} µs floor)")
    best = (base, base_cfg)
    for dcfg in tm.DOWN_SPLIT_CANDIDATES:
        try:
            us = layer_us((gu0, dcfg))
        except Exception as exc:  # noqa: BLE001 - a config that does not compile
            log(f"  down split {dcfg}: failed {type(exc).__name__}: {str(exc)[:100]}")
            continue
        sweep[f"down split {','.join(map(str, dcfg))} T={tokens}"] = us
        log(f"  down     BLOCK_N={dcfg[0]:>2} BLOCK_G={dcfg[1]:>2} warps={dcfg[2]} DECODE={dcfg[3]} SPLIT={dcfg[4]}: "
            f"{us:7.1f} µs/layer ({floor_us / us * 100:.0f}% of the {floor_us:.1f} µs floor; {base / us:.2f}x the "
            "sequential)")
        best = min(best, (us, dcfg))
    name = ",".join(map(str, best[1]))
    if best[1][4]:
        log(f"  -> split down wins at {tokens} token(s): {name} {best[0]:.1f} against {base:.1f} µs/layer "
            f"({(1 - best[0] / base) * 100:.1f}% less, {floor_us / best[0] * 100:.0f}% of the floor; "
            f"KVSERVE_MXFP4_GEMV_DOWN={name})")
    else:
        log(f"  -> the sequential down wins at {tokens} token(s) ({name}, {base:.1f} µs/layer, "
            f"{floor_us / base * 100:.0f}% of the floor) against every split config")
    return {"tokens": tokens, "config": list(best[1]), "us": best[0], "sequential_us": base}


def down_split_only(bw: float) -> dict[str, object]:
    """`--down-split`: the split down GEMV's checks at gpt-oss-20b widths, then it against the
    sequential default at 1 and 4 tokens (whole MoE layer, CUDA graph over 4 layers' weights)."""
    from kvserve.kernels import mxfp4
    from kvserve.kernels import triton_mxfp4_moe as tm
    from tests.gpu import mxfp4_moe_checks as mc

    t0 = time.perf_counter()
    mc.check_split_down(1, "cuda", (32, 8, 4, 1), (32, 16, 4, 1), (1, 2, 3), hidden=2880, inter=2880, experts=32, k=4,
                        seed=11)
    mc.check_split_down(3, "cuda", (32, 8, 4, 1), (32, 8, 4, 1), (1, 4), hidden=2880, inter=2880, experts=32, k=4,
                        seed=12)
    mc.check_split_down(1, "cuda", (32, 8, 4, 1), (16, 16, 4, 1), (1, 2), torch.bfloat16, hidden=2880, inter=2880,
                        experts=32, k=4, seed=13)
    log(f"check: split down GEMV == reference and == the sequential kernel up to fp32 order   ok "
        f"({time.perf_counter() - t0:.1f}s)")
    e, k, h, inter, alpha, limit, layers = 32, 4, 2880, 2880, 1.702, 7.0, 4
    packed = [tm.pack_experts(gu, bgu, dn, bdn, h, inter) for gu, bgu, dn, bdn in _moe_weights(layers, e, h, inter)]
    expert_bytes = (2 * inter * mxfp4.row_bytes(h) + h * mxfp4.row_bytes(inter)) + (2 * inter + h) * 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    gu0, dn0 = tm.gemv_configs()
    sweep: dict[str, float] = {}
    out: dict[str, object] = {"sweep": sweep}
    for t in (1, 4):
        xs = [torch.randn(t, h, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(8)]
        idss = [torch.stack([torch.randperm(e, device="cuda", generator=gen)[:k] for _ in range(t)]) for _ in range(8)]
        wtss = [torch.softmax(torch.randn(t, k, device="cuda", generator=gen), -1).to(torch.bfloat16) for _ in range(8)]
        floor_us = statistics.mean(len(torch.unique(ids)) for ids in idss) * expert_bytes / bw * 1e6

        def layer_us(cfg, xs=xs, idss=idss, wtss=wtss) -> float:
            return _graph_us(lambda i: tm.fused_moe_mxfp4(xs[i], idss[i], wtss[i], packed[i % layers], alpha, limit,
                                                          path="gemv", gemv_cfg=cfg), 8)

        out[f"winner_{t}"] = down_split_sweep(layer_us, gu0, dn0, floor_us, sweep, tokens=t)
    return out


def gemv_f16_only(bw: float) -> dict[str, object]:
    """`--gemv-f16`: the packed-half-math GEMVs (DECODE 2 / 3, `tm.GEMV_F16_CANDIDATES`) checked at
    gpt-oss-20b widths, then each (gate/up, down) config against the defaults (`gemv_configs`) at
    1 and 4 tokens (whole MoE layer, CUDA graph over 4 layers' weights, fresh routing per call),
    the defaults timed first and again last; logs the winner per token count with the variables
    that select it."""
    from kvserve.kernels import mxfp4
    from kvserve.kernels import triton_mxfp4_moe as tm
    from tests.gpu import mxfp4_moe_checks as mc

    t0 = time.perf_counter()
    out: dict[str, object] = {}
    try:
        mc.check_f16(1, "cuda", tm.GEMV_F16_CANDIDATES, hidden=2880, inter=2880, experts=32, k=4, seed=16, swap=False)
        mc.check_f16(4, "cuda", tm.GEMV_F16_CANDIDATES[3:5], torch.bfloat16, hidden=2880, inter=2880, experts=32, k=4,
                     seed=17)  # (and DECODE 3 against 2 there: the same bits)
        log(f"check: fp16x2 GEMVs (DECODE 2 / 3) == reference within {mc.F16_TOL} (fp32) / 2e-2 (bf16), prefetch "
            f"bit-identical   ok ({time.perf_counter() - t0:.1f}s)")
        out["check"] = "ok"
    except AssertionError as exc:  # still time them (each row's rel diff below), but say so loudly
        log(f"CHECK FAILED: fp16x2 GEMVs: {str(exc)[:300]}")
        out["check"] = f"failed: {str(exc)[:300]}"
    e, k, h, inter, alpha, limit, layers = 32, 4, 2880, 2880, 1.702, 7.0, 4
    packed = [tm.pack_experts(gu, bgu, dn, bdn, h, inter) for gu, bgu, dn, bdn in _moe_weights(layers, e, h, inter)]
    expert_bytes = (2 * inter * mxfp4.row_bytes(h) + h * mxfp4.row_bytes(inter)) + (2 * inter + h) * 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    default = tm.gemv_configs()

    def name(cfg) -> str:
        return f"KVSERVE_MXFP4_GEMV_GU={','.join(map(str, cfg[0]))} KVSERVE_MXFP4_GEMV_DOWN={','.join(map(str, cfg[1]))}"

    for t in (1, 4):
        xs = [torch.randn(t, h, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(8)]
        idss = [torch.stack([torch.randperm(e, device="cuda", generator=gen)[:k] for _ in range(t)]) for _ in range(8)]
        wtss = [torch.softmax(torch.randn(t, k, device="cuda", generator=gen), -1).to(torch.bfloat16) for _ in range(8)]
        floor_us = statistics.mean(len(torch.unique(ids)) for ids in idss) * expert_bytes / bw * 1e6
        ref = tm.fused_moe_mxfp4(xs[0], idss[0], wtss[0], packed[0], alpha, limit, path="gemv", gemv_cfg=default).float()

        def layer_us(cfg) -> float:
            return _graph_us(lambda i: tm.fused_moe_mxfp4(xs[i], idss[i], wtss[i], packed[i % layers], alpha, limit,
                                                          path="gemv", gemv_cfg=cfg), 8)

        base = layer_us(default)
        log(f"MoE layer on the GEMV path at {t} token(s), gpt-oss-20b shapes, floor {floor_us:.1f} µs; default "
            f"{name(default)}: {base:7.1f} µs ({floor_us / base * 100:.0f}% of the floor)")
        rows = {"default": {"config": [list(c) for c in default], "us": base}, "floor_us": floor_us}
        best = (base, default)
        for cfg in tm.GEMV_F16_CANDIDATES:
            try:
                us = layer_us(cfg)
                got = tm.fused_moe_mxfp4(xs[0], idss[0], wtss[0], packed[0], alpha, limit, path="gemv",
                                         gemv_cfg=cfg).float()
            except Exception as exc:  # noqa: BLE001 - a config that does not compile
                log(f"  {name(cfg)}: failed {type(exc).__name__}: {str(exc)[:100]}")
                continue
            rel = ((got - ref).norm() / ref.norm()).item()
            rows[name(cfg)] = {"us": us, "rel_diff_vs_default": rel}
            log(f"  {name(cfg):<72} {us:7.1f} µs ({floor_us / us * 100:3.0f}% of the floor, {base / us:.2f}x the "
                f"default; rel diff {rel:.1e})")
            best = min(best, (us, cfg))
        again = layer_us(default)
        rows["default_again_us"] = again
        log(f"  default again: {again:7.1f} µs")
        log(f"  -> at {t} token(s): {name(best[1])} {best[0]:.1f} µs ({floor_us / best[0] * 100:.0f}% of the floor, "
            f"{min(base, again) / best[0]:.2f}x the default)")
        rows["winner"] = {"config": [list(c) for c in best[1]], "us": best[0]}
        out[f"tokens_{t}"] = rows
    return out


def moe_layer_check(model) -> None:
    """One MoE layer (the engine's path) against the dense computation on its dequantized weights."""
    moe = model.layers[0].mlp
    torch.manual_seed(0)
    x = torch.randn(7, moe.router.in_features, device="cuda", dtype=torch.bfloat16)
    got = moe(x).float()
    logits = moe.router(x)
    top, ids = torch.topk(logits, moe.top_k, dim=-1)
    wts = torch.softmax(top.float(), dim=-1)
    ref = torch.zeros_like(got)
    from kvserve.kernels.triton_mxfp4_moe import dequantize_packed

    pk = moe.packed  # the default path released the per-expert blocks: the reference reads the packed ones
    for t in range(x.shape[0]):
        for j in range(moe.top_k):
            e = int(ids[t, j])
            ex = moe.experts[e]
            if pk:
                wgu, wdn = dequantize_packed(pk.gu_codes[e], pk.gu_scales[e]), dequantize_packed(pk.dn_codes[e], pk.dn_scales[e])
            else:
                wgu = ex.gate_up_proj.method.weight(ex.gate_up_proj, torch.float32)
                wdn = ex.down_proj.method.weight(ex.down_proj, torch.float32)
            gu = torch.nn.functional.linear(x[t : t + 1].float(), wgu, ex.gate_up_proj.bias.float())
            gate, up = gu[:, : ex.inter].clamp(max=ex.limit), gu[:, ex.inter :].clamp(-ex.limit, ex.limit)
            hdn = (up + 1) * gate * torch.sigmoid(gate * ex.alpha)
            y = torch.nn.functional.linear(hdn, wdn, ex.down_proj.bias.float())
            ref[t] += wts[t, j] * y[0]
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 3e-2, f"MoE layer relative error {rel:.3e}"
    log(f"check: MoE layer (engine path) vs dense fp32 on the dequantized experts: rel err {rel:.2e}   ok")


def decode_ms(llm, prompt_len: int, new_tokens: int, runs: int = 3) -> tuple[float, float]:
    """(ms per decode token, time to first token in ms), medians."""
    from kvserve import SamplingParams

    prompt = {"prompt_token_ids": list(range(1000, 1000 + prompt_len))}
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    many = SamplingParams(max_tokens=new_tokens + 1, temperature=0, ignore_eos=True)
    llm.generate(prompt, many, use_tqdm=False)  # warm-up
    firsts, totals = [], []
    for _ in range(runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        llm.generate(prompt, one, use_tqdm=False)
        firsts.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        llm.generate(prompt, many, use_tqdm=False)
        totals.append(time.perf_counter() - t0)
    first, total = statistics.median(firsts), statistics.median(totals)
    return (total - first) / new_tokens * 1e3, first * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--no-graphs", action="store_true", help="eager only")
    ap.add_argument("--no-eager", action="store_true", help="CUDA graphs only (skips the eager run and its MoE layer check)")
    ap.add_argument("--throughput", type=int, default=0, help="also run this many requests (0: skip)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--kernels-only", action="store_true", help="only the MoE kernel table (legacy vs packed)")
    ap.add_argument("--no-kernels", action="store_true", help="skip the MoE kernel table")
    ap.add_argument("--down-split", action="store_true",
                    help="only the split down GEMV: its checks, then against the sequential default at 1 and 4 tokens")
    ap.add_argument("--gemv-f16", action="store_true",
                    help="only the packed-half-math GEMVs (DECODE 2 / 3): their checks, then each candidate config "
                         "against the defaults at 1 and 4 tokens")
    ap.add_argument("--profile", action="store_true",
                    help="with CUDA graphs: the kernels of one batch-1 decode step (eager and replayed), as "
                         "gpu_decode_profile prints them for other models")
    ap.add_argument("--compare-legacy", action="store_true",
                    help="also decode with CUDA graphs on the non-default MXFP4 MoE kernels (legacy, or packed "
                         "if KVSERVE_MXFP4_MOE=legacy)")
    args = ap.parse_args()
    from kvserve import LLM

    dev = torch.cuda.get_device_name()
    log(f"device: {dev}; torch {torch.__version__}")
    from kvserve.kernels import triton_mxfp4_moe as tm

    bw = gemv_read_bw()
    results: dict[str, object] = {"device": dev, "layers": args.layers, "gemv_read_GBps": bw / 1e9}
    if args.down_split or args.kernels_only or args.gemv_f16:
        if args.gemv_f16:
            results["moe_kernels"] = gemv_f16_only(bw)
        else:
            results["moe_kernels"] = down_split_only(bw) if args.down_split else kernel_table(bw)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return
    checks()
    if not args.no_kernels:
        try:
            results["moe_kernels"] = kernel_table(bw)
        except Exception as exc:  # noqa: BLE001 - the engine numbers below still count
            log(f"MoE kernel table failed: {type(exc).__name__}: {str(exc)[:300]}")
    cfg = dict(GPT_OSS_20B, num_hidden_layers=args.layers)
    cfg["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(args.layers)]
    fl = floor_bytes(cfg, args.prompt + args.tokens // 2)
    floor_ms = fl["total"] / bw * 1e3
    results.update(floor_bytes=fl, floor_ms=floor_ms)
    default_impl = tm.MOE_IMPL
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(cfg))
        modes = ([] if args.no_eager else [("eager", True)]) + ([] if args.no_graphs else [("cuda-graphs", False)])
        other = "packed" if default_impl == "legacy" else "legacy"
        if args.compare_legacy and not args.no_graphs:
            modes += [(f"{other}-graphs", False)]
        for name, eager in modes:
            tm.MOE_IMPL = other if name == f"{other}-graphs" else default_impl
            t0 = time.perf_counter()
            try:
                llm = LLM(tmp, load_format="dummy", dtype="bfloat16", device="cuda", max_model_len=4096,
                          max_num_seqs=8, enforce_eager=eager, gpu_memory_utilization=0.45)
            except Exception as exc:  # noqa: BLE001 - report and go on to the next mode
                log(f"{name}: engine failed to start: {type(exc).__name__}: {str(exc)[:300]}")
                results[name] = {"error": str(exc)[:300]}
                continue
            start = time.perf_counter() - t0
            model = llm.engine.runner.model
            if name == "eager":
                moe_layer_check(model)
            ms, ttft = decode_ms(llm, args.prompt, args.tokens)
            results[name] = {"ms_per_token": ms, "ttft_ms": ttft, "startup_s": start,
                             "pct_of_floor": floor_ms / ms * 100}
            if args.profile and not eager:
                from benchmarks.gpu_decode_profile import log_step_profile, step_profile

                replay, eager_rows, graph_rows = step_profile(llm, vocab=cfg["vocab_size"])
                log(f"{name}: graph replay {replay * 1e3:.3f} ms/token ({floor_ms / (replay * 1e3) * 100:.1f}% of floor)")
                log_step_profile(replay, eager_rows, graph_rows, args.layers)
                results[name].update(replay_ms=replay * 1e3, eager_kernels=eager_rows, graph_kernels=graph_rows)
            log(f"{name}: start-up {start:.1f}s")
            llm.engine.shutdown() if hasattr(llm.engine, "shutdown") else None
            del llm, model
            torch.cuda.empty_cache()
    log("")
    log(f"gpt-oss-20b shapes ({args.layers} layers), batch-1 decode, {args.prompt}-token prompt, {dev}")
    log(f"floor: {fl['total'] / 1e9:.3f} GB/token (experts {fl['experts'] / 1e9:.3f}, attention {fl['attention'] / 1e9:.3f}, "
        f"LM head {fl['lm_head'] / 1e9:.3f}, KV {fl['kv_cache'] / 1e6:.1f} MB) at {bw / 1e9:.0f} GB/s "
        f"(bf16 GEMV read) = {floor_ms:.3f} ms/token")
    log(f"{'mode':<14}{'ms/token':>10}{'% of floor':>12}{'TTFT ms':>10}")
    log(f"(MoE kernels: {default_impl}{f'; {other}-graphs: KVSERVE_MXFP4_MOE={other}' if args.compare_legacy else ''})")
    for name in ("eager", "cuda-graphs", f"{other}-graphs"):
        r = results.get(name)
        if isinstance(r, dict) and "ms_per_token" in r:
            log(f"{name:<14}{r['ms_per_token']:>10.3f}{r['pct_of_floor']:>11.1f}%{r['ttft_ms']:>10.1f}")
        elif isinstance(r, dict):
            log(f"{name:<14}  failed: {r['error'][:80]}")
    if args.throughput:
        try:
            results["throughput"] = throughput(cfg, args.throughput, bw)
        except Exception as exc:  # noqa: BLE001 - the decode numbers above still count
            log(f"throughput failed: {type(exc).__name__}: {str(exc)[:300]}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def total_weight_bytes(cfg: dict) -> float:
    f = floor_bytes(cfg, 0)
    k, e = cfg["num_experts_per_tok"], cfg["num_local_experts"]
    return f["total"] - f["kv_cache"] + f["experts"] * (e / k - 1)  # every expert, once


def throughput(cfg: dict, n: int, bw: float, max_num_seqs: int = 256) -> dict[str, float]:
    import random

    from kvserve import LLM, SamplingParams

    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(10000) for _ in range(rng.randint(100, 1024))]} for _ in range(n)]
    params = [SamplingParams(max_tokens=rng.randint(100, 1024), temperature=0.6, ignore_eos=True) for _ in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(cfg))
        llm = LLM(tmp, load_format="dummy", dtype="bfloat16", device="cuda", max_model_len=4096,
                  max_num_seqs=max_num_seqs, gpu_memory_utilization=0.85)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    step_s = total_weight_bytes(cfg) / bw
    r = {"requests": n, "seconds": dt, "output_tok_s": tokens / dt, "ceiling_tok_s": max_num_seqs / step_s}
    log(f"throughput: {n} requests, {tokens} output tokens in {dt:.1f}s = {r['output_tok_s']:.0f} tok/s; ceiling "
        f"{r['ceiling_tok_s']:.0f} tok/s ({max_num_seqs} rows per step, every weight read once per step: "
        f"{total_weight_bytes(cfg) / 1e9:.2f} GB at {bw / 1e9:.0f} GB/s)")
    return r


if __name__ == "__main__":
    main()
