"""One-row products (batch-1 decode linears): cuBLAS against the Triton GEMV of
`kvserve/models/triton_ops.py` over its block configurations, at Llama-3.2-1B / 3.1-8B shapes.

    python -m benchmarks.gpu_gemv            # every shape
    python -m benchmarks.gpu_gemv 8B/2 lm    # only the shapes whose name contains one of these

Each shape is checked against a float64 reference on fresh random data (output poisoned first)
and timed inside a CUDA graph over enough weight copies (>= 256 MiB) that no run is served from L2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from kvserve.models import triton_ops

SHAPES = {  # name: (N, K)
    "8B o_proj": (4096, 4096), "8B qkv": (6144, 4096), "8B down": (4096, 14336), "8B gate_up": (28672, 4096),
    "1B o_proj": (2048, 2048), "1B qkv": (3072, 2048), "1B down": (2048, 8192), "1B gate_up": (16384, 2048),
    # One rank's shards at tensor_parallel_size 2, and the vocabulary-parallel LM heads.
    "8B/2 o_proj": (4096, 2048), "8B/2 qkv": (3072, 4096), "8B/2 down": (4096, 7168), "8B/2 gate_up": (14336, 4096),
    "8B lm_head": (128256, 4096), "8B/2 lm_head": (64128, 4096),
}
CONFIGS = [(2, 1024, 4), (4, 512, 4), (4, 1024, 4), (4, 2048, 8), (8, 512, 4), (8, 1024, 8), (8, 256, 4),
           (16, 256, 4), (16, 512, 8), (2, 2048, 4), (4, 1024, 8), (8, 1024, 4), (1, 4096, 4), (2, 4096, 8),
           (16, 1024, 8), (1, 2048, 2)]


def graph_time(fn, ws: list[torch.Tensor], reps: int = 20) -> float:
    """Median µs per call of fn(w) over every weight copy, captured in one CUDA graph (the
    host's launch cost on these machines exceeds a small GEMV's run time, so launches one by
    one would time the host)."""
    fn(ws[0])
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for w in ws:
            fn(w)
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / len(ws))
    ts.sort()
    return ts[len(ts) // 2]


def main() -> None:
    out_dir = os.environ.get("OUT", ".")
    print(f"card: {torch.cuda.get_device_name(0)}", flush=True)
    results = {}
    wanted = sys.argv[1:]
    for name, (n, k) in SHAPES.items():
        if wanted and not any(w in name for w in wanted):
            continue
        copies = max(2, -(-(256 << 20) // (n * k * 2)))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = (x.double() @ ws[0].double().t()).float()
        cub = graph_time(lambda w: F.linear(x, w), ws)
        row = {"cublas_us": cub, "GBps_cublas": n * k * 2 / cub / 1e3, "triton": {}}
        for cfg in CONFIGS:
            if cfg[1] > max(k, 256) * 2:
                continue
            got = triton_ops.gemv(x, ws[0], config=cfg).float()
            err = ((got - ref).norm() / ref.norm()).item()
            if not err < 1e-2:
                row["triton"][str(cfg)] = {"error": err}
                continue
            t = graph_time(lambda w: triton_ops.gemv(x, w, config=cfg), ws)
            row["triton"][str(cfg)] = {"us": t, "err": err}
        best = min((v["us"], c) for c, v in row["triton"].items() if "us" in v)
        row["best"] = {"config": best[1], "us": best[0], "GBps": n * k * 2 / best[0] / 1e3}
        results[name] = row
        print(f"{name:12s} [{n} x {k}]: cuBLAS {cub:6.1f} us ({row['GBps_cublas']:5.0f} GB/s); Triton best "
              f"{best[1]} {best[0]:6.1f} us ({row['best']['GBps']:5.0f} GB/s); all: "
              + " ".join(f"{c}:{v.get('us', float('nan')):.1f}" for c, v in row["triton"].items()), flush=True)
        del ws
        Path(out_dir, "gemv.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
