"""Triton attention kernels on the GPU: decode KV-read bandwidth and prefill TFLOP/s.

    python -m benchmarks.gpu_attention            # tables (from the repository root)
    python -m benchmarks.gpu_attention --sweep    # also try kernel configurations

Decode: the time of one attention call (cache write + split-K decode + reduce) for a batch of
sequences all at the same context length, replayed from a CUDA graph (as the runner runs decode)
and rotated over enough separate KV caches (one per "layer") that the KV never sits in L2.
Achieved GB/s = K and V bytes of every cached token / time, next to a large device-to-device
copy measured in the same run (bytes read + written). Prefill: 8 fresh prompts of 2048 tokens
in one launch, causal TFLOP/s (2 * 2 * L^2/2 * D per head and sequence) against PyTorch SDPA's
FlashAttention backend on the same data (K/V expanded to the query heads).
"""

from __future__ import annotations

import argparse
import math
import statistics
from typing import Callable

import torch
import torch.nn.functional as F

from kvserve.attention.base import AttentionMetadata
from kvserve.attention.triton.backend import TritonBackend
from kvserve.attention.triton.decode import choose_num_splits, decode_attention
from kvserve.attention.triton.prefill import prefill_attention

MODELS = {"Llama-3.1-8B": (32, 8, 128), "Qwen3-0.6B": (16, 8, 128)}  # (q heads, kv heads, dim)
DTYPE = torch.bfloat16
BLOCK = 16
L2_FLUSH_BYTES = 512 << 20  # rotate caches until this many bytes separate two reads of one


def time_graph(fn: Callable[[], None], iters: int = 30) -> float:
    """Median seconds of one replay of a graph that runs `fn` once."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def time_eager(fn: Callable[[], None], iters: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth() -> float:
    src = torch.randn(1 << 30, dtype=DTYPE, device="cuda")  # 2 GiB
    dst = torch.empty_like(src)
    t = time_eager(lambda: dst.copy_(src), iters=10)
    del src, dst
    return 2 * (1 << 30) * 2 / t / 1e9


def build_metadata(
    seqs: list[tuple[int, int]], device: str = "cuda"
) -> tuple[AttentionMetadata, int]:
    """Metadata for (context, query length) sequences with shuffled block ids."""
    lens = [c + q for c, q in seqs]
    nblk = [math.ceil(n / BLOCK) for n in lens]
    perm = torch.randperm(sum(nblk)).tolist()
    bt = torch.zeros(len(seqs), max(nblk), dtype=torch.int32)
    slots: list[int] = []
    at = 0
    for i, ((ctx, ql), nb) in enumerate(zip(seqs, nblk)):
        row = perm[at : at + nb]
        at += nb
        bt[i, :nb] = torch.tensor(row, dtype=torch.int32)
        slots += [row[p // BLOCK] * BLOCK + p % BLOCK for p in range(ctx, ctx + ql)]
    qsl = [0]
    for _, ql in seqs:
        qsl.append(qsl[-1] + ql)
    md = AttentionMetadata(
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        block_tables=bt.to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        max_query_len=max(q for _, q in seqs),
        max_seq_len=max(lens),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=lens,
        block_size=BLOCK,
        is_pure_decode=all(q == 1 for _, q in seqs),
    )
    return md, sum(nblk)


def fresh(md: AttentionMetadata) -> AttentionMetadata:
    """Same step, empty backend cache (so a capture plans as the runner's capture would)."""
    return AttentionMetadata(
        md.query_start_loc, md.seq_lens, md.block_tables, md.slot_mapping, md.max_query_len,
        md.max_seq_len, md.query_start_loc_cpu, md.seq_lens_cpu, md.block_size, md.is_pure_decode,
    )


def decode_case(
    hq: int, hkv: int, d: int, batch: int, ctx: int, config: tuple[int, int, int] | None = None,
    waves: float = 2.0,
) -> tuple[float, float, int]:
    """(seconds per attention call, KV bytes read per call, splits)."""
    md, num_blocks = build_metadata([(ctx - 1, 1)] * batch)
    kv_bytes = batch * ctx * hkv * d * 2 * DTYPE.itemsize
    layers = max(1, min(64, math.ceil(L2_FLUSH_BYTES / kv_bytes)))
    caches = [
        torch.randn(2, num_blocks, BLOCK, hkv, d, device="cuda", dtype=DTYPE)
        for _ in range(layers)
    ]
    q = torch.randn(batch, hq, d, device="cuda", dtype=DTYPE)
    k = torch.randn(batch, hkv, d, device="cuda", dtype=DTYPE)
    v = torch.randn(batch, hkv, d, device="cuda", dtype=DTYPE)
    out = torch.empty_like(q)
    scale = d**-0.5
    if config is None:
        backend = TritonBackend(decode_waves=waves)
        last: list[AttentionMetadata] = []

        def step() -> None:
            # A fresh plan per step: the one built while capturing is the one replayed.
            step_md = fresh(md)
            last.append(step_md)
            for cache in caches:
                backend.forward(q, k, v, cache, step_md, scale, out=out)

        t = time_graph(step)
        splits = last[-1].backend_cache["triton"].num_splits
    else:
        splits = choose_num_splits(batch, hkv, torch.cuda.get_device_properties(0)
                                   .multi_processor_count, None, config[0], waves)

        def step() -> None:
            for cache in caches:
                decode_attention(q, cache, out, md.block_tables, md.seq_lens,
                                 md.query_start_loc, batch, scale, splits, config=config)

        t = time_graph(step)
    del caches
    return t / layers, kv_bytes, splits


def prefill_case(
    hq: int, hkv: int, d: int, nseq: int = 8, seqlen: int = 2048,
    config: tuple[int, int, int, int] | None = None, with_sdpa: bool = True,
) -> dict[str, float]:
    md, num_blocks = build_metadata([(0, seqlen)] * nseq)
    t_tok = nseq * seqlen
    q = torch.randn(t_tok, hq, d, device="cuda", dtype=DTYPE)
    k = torch.randn(t_tok, hkv, d, device="cuda", dtype=DTYPE)
    v = torch.randn(t_tok, hkv, d, device="cuda", dtype=DTYPE)
    cache = torch.randn(2, num_blocks, BLOCK, hkv, d, device="cuda", dtype=DTYPE)
    out = torch.empty_like(q)
    scale = d**-0.5
    backend = TritonBackend()
    backend.forward(q, k, v, cache, md, scale, out=out)  # also fills the cache
    flops = nseq * hq * 2 * 2 * d * seqlen * seqlen / 2
    res: dict[str, float] = {}
    res["kernel"] = flops / time_eager(
        lambda: prefill_attention(q, cache, out, md.block_tables, md.seq_lens,
                                  md.query_start_loc, nseq, scale, config=config), iters=50
    ) / 1e12
    if not with_sdpa:
        return res
    t_backend = time_eager(lambda: backend.forward(q, k, v, cache, md, scale, out=out))
    res["backend"] = flops / t_backend / 1e12
    # SDPA on the same data laid out [B, H, L, D]; flash needs equal head counts.
    qs = q.view(nseq, seqlen, hq, d).transpose(1, 2).contiguous()
    ks = k.view(nseq, seqlen, hkv, d).transpose(1, 2).repeat_interleave(hq // hkv, 1).contiguous()
    vs = v.view(nseq, seqlen, hkv, d).transpose(1, 2).repeat_interleave(hq // hkv, 1).contiguous()
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        ref = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        res["sdpa"] = flops / time_eager(
            lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        ) / 1e12
    backend.forward(q, k, v, cache, md, scale, out=out)
    mine = out.view(nseq, seqlen, hq, d).transpose(1, 2).float()
    res["rel_err"] = float((mine - ref.float()).norm() / ref.float().norm())
    return res


def mixed_case(hq: int, hkv: int, d: int, route: bool, seqs: list[tuple[int, int]]) -> float:
    md, num_blocks = build_metadata(seqs)
    t_tok = md.query_start_loc_cpu[-1]
    q = torch.randn(t_tok, hq, d, device="cuda", dtype=DTYPE)
    k = torch.randn(t_tok, hkv, d, device="cuda", dtype=DTYPE)
    v = torch.randn(t_tok, hkv, d, device="cuda", dtype=DTYPE)
    cache = torch.randn(2, num_blocks, BLOCK, hkv, d, device="cuda", dtype=DTYPE)
    out = torch.empty_like(q)
    backend = TritonBackend(route_decodes=route)
    return time_eager(lambda: backend.forward(q, k, v, cache, fresh(md), d**-0.5, out=out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="also time kernel configurations")
    args = ap.parse_args()
    torch.manual_seed(0)
    import triton

    props = torch.cuda.get_device_properties(0)
    print(f"card: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, "
          f"triton {triton.__version__}")
    bw = copy_bandwidth()
    print(f"device-to-device copy: {bw:.0f} GB/s (read + write)\n")

    if args.sweep:
        print("decode config sweep (Llama-3.1-8B shapes; us per call):")
        cfgs = [(64, 4, 3), (64, 4, 2), (32, 4, 3), (128, 4, 3), (128, 8, 3), (64, 8, 4)]
        for batch, ctx in [(1, 8192), (32, 4096), (128, 8192)]:
            row = []
            for cfg in cfgs:
                t, kvb, _ = decode_case(32, 8, 128, batch, ctx, config=cfg)
                row.append(f"{cfg}:{t * 1e6:.1f}")
            for waves in (1.0, 4.0):
                t, kvb, s = decode_case(32, 8, 128, batch, ctx, waves=waves)
                row.append(f"waves{waves}/s{s}:{t * 1e6:.1f}")
            print(f"  b{batch} ctx{ctx}: " + "  ".join(row))
        print("prefill config sweep (8 x 2048; TFLOP/s, two interleaved rounds):")
        cfgs = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 4, 4), (128, 32, 4, 3),
                (128, 64, 4, 3), (128, 128, 8, 2), (64, 32, 4, 4)]
        for name in MODELS:
            hq, hkv, d = MODELS[name]
            rows: dict[tuple[int, int, int, int], list[str]] = {c: [] for c in cfgs}
            for _ in range(2):
                for cfg in cfgs:
                    r = prefill_case(hq, hkv, d, config=cfg, with_sdpa=False)
                    rows[cfg].append(f"{r['kernel']:.0f}")
            for cfg, vals in rows.items():
                print(f"  {name} {cfg}: " + " / ".join(vals))
        print()

    print(f"decode attention, bf16, block {BLOCK}, CUDA-graph replay ({props.name}):")
    print(f"{'model':<14}{'batch':>6}{'ctx':>6}{'splits':>7}{'us/call':>9}{'KV GB/s':>9}"
          f"{'% copy':>8}")
    for name, (hq, hkv, d) in MODELS.items():
        for batch in (1, 32, 128):
            for ctx in (1024, 4096, 8192):
                t, kvb, s = decode_case(hq, hkv, d, batch, ctx)
                gbs = kvb / t / 1e9
                print(f"{name:<14}{batch:>6}{ctx:>6}{s:>7}{t * 1e6:>9.1f}{gbs:>9.0f}"
                      f"{100 * gbs / bw:>7.0f}%")
    print()

    print(f"prefill 8 x 2048 tokens, causal, bf16 ({props.name}), TFLOP/s:")
    print(f"{'model':<14}{'kernel':>8}{'+kv write':>10}{'SDPA flash':>11}{'rel err':>9}")
    for name, (hq, hkv, d) in MODELS.items():
        r = prefill_case(hq, hkv, d)
        print(f"{name:<14}{r['kernel']:>8.0f}{r['backend']:>10.0f}{r['sdpa']:>11.0f}"
              f"{r['rel_err']:>9.1e}")
    print()

    print(f"mixed batches, Llama-3.1-8B shapes ({props.name}), us per call "
          "(eager: small batches measure host launch overhead too):")
    mixes = {
        "2x1024 prefill + 64 decodes 1k-8k": [(0, 1024), (3072, 1024)]
        + [(1024 + 112 * i, 1) for i in range(64)],
        "1x512 chunk + 128 decodes @4k": [(2048, 512)] + [(4095, 1)] * 128,
        "1x256 chunk + 8 decodes @8k": [(0, 256)] + [(8191, 1)] * 8,
    }
    print(f"{'batch':<38}{'routed':>9}{'prefill-only':>13}")
    for label, seqs in mixes.items():
        a = mixed_case(32, 8, 128, True, seqs)
        b = mixed_case(32, 8, 128, False, seqs)
        print(f"{label:<38}{a * 1e6:>9.1f}{b * 1e6:>13.1f}")


if __name__ == "__main__":
    main()
