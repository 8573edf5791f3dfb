"""Where `cpu_quant.dequant_min_rows` should lie: per layer and row count, the int8 path (one
`gemm_int8` per part) against the path `GGMLLinearMethod.apply` takes from the threshold on (the
parts dequantized into one fp32 matrix, one sgemm), median µs, interleaved. Weights are cycled
through ~48 MB of copies (a prefill step reads each layer's weights once, from memory).

    OMP_NUM_THREADS=1 python benchmarks/cpu_dequant_threshold.py --threads 1
    OMP_NUM_THREADS=2 python benchmarks/cpu_dequant_threshold.py --threads 2 --gemma --m 48 64 128 256
    KVSERVE_CPU_ISA=avx2 python benchmarks/cpu_dequant_threshold.py ...     # another build
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvserve.kernels import cpu_quant as cq

# (name, format, output rows of each part, K): SmolLM2-135M Q4_1 and Gemma 3 270M's Q5_0 layers
SMOL = [("qkv 960x576", "Q4_1", [576, 192, 192], 576), ("o 576x576", "Q4_1", [576], 576),
        ("gate_up 2x1536x576", "Q4_1", [1536, 1536], 576), ("down 576x1536", "Q4_1", [576], 1536)]
GEMMA = [("g q 1024x640", "Q5_0", [1024], 640), ("g gate_up 2x2048x640", "Q5_0", [2048, 2048], 640),
         ("g down 640x2048", "Q4_K", [640], 2048)]


def _weight(qtype: str, n: int, k: int) -> torch.Tensor:
    if qtype in ("Q8_0", "Q4_0", "Q4_1"):
        return cq.quantize_weights(qtype, torch.randn(n, k) * 0.05)
    bs, bb = cq.BLOCKS[cq.QTYPES[qtype]]  # random codes with small finite fp16 scales
    nb = n * k // bs
    raw = torch.randint(0, 256, (nb, bb), dtype=torch.uint8)
    scale = (torch.rand(nb, 1) * 1.5e-3 + 5e-4).to(torch.float16).view(torch.uint8)
    raw[:, 0:2] = scale
    if qtype != "Q5_0":
        raw[:, 2:4] = scale
    return raw.reshape(n, -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, nargs="+", default=[32, 48, 64, 96, 128, 192, 256])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (set OMP_NUM_THREADS to match)")
    ap.add_argument("--gemma", action="store_true", help="Gemma 3 270M's layers instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lib = cq.library()
    print(f"isa {lib.kvq_isa().decode() if lib else None}, {args.threads} threads, "
          f"load {' '.join(open('/proc/loadavg').read().split()[:3])}", flush=True)
    for name, q, ns, k in GEMMA if args.gemma else SMOL:
        parts = [_weight(q, n, k) for n in ns]
        copies = max(2, (48 << 20) // sum(p.numel() for p in parts))
        ring = [[p.clone() for p in parts] for _ in range(copies)]
        n_all = sum(ns)

        def int8(x: torch.Tensor, ps: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat([cq.gemm_int8(q, p, k, x) for p in ps], dim=1)

        def dequant(x: torch.Tensor, ps: list[torch.Tensor]) -> torch.Tensor:
            w, o = torch.empty(n_all, k), 0
            for p in ps:
                cq.dequantize(q, p, k, out=w[o : o + p.shape[0]])
                o += p.shape[0]
            return x @ w.T

        for m in args.m:
            x = torch.randn(m, k)
            ts: dict[str, list[float]] = {"int8": [], "dequant": []}
            for i in range(max(6, 2 * copies)):
                for key, fn in (("int8", int8), ("dequant", dequant)):
                    t = time.perf_counter()
                    fn(x, ring[i % copies])
                    ts[key].append(time.perf_counter() - t)
            a, b = (statistics.median(ts[key]) * 1e6 for key in ("int8", "dequant"))
            print(f"{name:<22}{q:<5}M={m:<4} int8 {a:8.1f} us  dequant+sgemm {b:8.1f} us  ratio {a / b:4.2f}", flush=True)


if __name__ == "__main__":
    main()
