"""The one-row 4-bit / int8 GEMVs for Nsight Compute: Llama-3.1-8B gate_up (28672 x 4096, SiLU·mul),
bf16 activations, each decode called a few times in turn (a code at a time, half math; --kind int8
for int8 per channel), so `ncu` can read one launch of each:

    ncu --clock-control none -k regex:_qgemv --launch-skip 4 --launch-count 4 \\
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \\
        python -m benchmarks.gpu_ncu_gemv
"""

from __future__ import annotations

import argparse

import torch

from kvserve.kernels import triton_qgemv_half, triton_quant
from kvserve.platform.cuda_quant import quantize


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", default="int4", choices=["int4", "int8"])
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--rows", type=int, default=1)
    args = ap.parse_args()
    n, k = 28672, 4096
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05
    qw = quantize(w, args.kind)
    if args.rows > 1:
        x = torch.randn(args.rows, k, device="cuda", dtype=torch.bfloat16)
        for _ in range(args.calls):
            triton_quant.qmm(x, qw)
            torch.nn.functional.linear(x, w)
        torch.cuda.synchronize()
        print("ncu qmm calls done")
        return
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    for _ in range(args.calls):
        triton_quant.qgemv(x, qw, silu=True, words=False)
        triton_qgemv_half.qgemv_half(x, qw, silu=True)
    torch.cuda.synchronize()
    print("ncu gemv calls done")


if __name__ == "__main__":
    main()
