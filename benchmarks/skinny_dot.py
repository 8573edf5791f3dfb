"""A measurement-only alternative to `kvserve/kernels/triton_skinny.py` for the kernel table of
`benchmarks/spec_gpu_bench.py`: the 2..8-row product on tensor cores (the rows padded to 16,
`tl.dot` of an activation tile [16, BLOCK_K] with a weight tile [BLOCK_N, BLOCK_K]^T, the weight
loads pipelined by Triton over `STAGES` stages). The engine does not use it; if it reads the
weights faster than the FMA kernel at 5..8 rows, it is the candidate to move into the kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _skinny_dot_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_x, stride_w, stride_o, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows64 = tl.where(rows < N, rows, 0).to(tl.int64)
    mr = tl.arange(0, 16)
    cols = tl.arange(0, BLOCK_K)
    acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        c = k0 + cols
        x = tl.load(x_ptr + mr[:, None] * stride_x + c[None, :], mask=(mr < M)[:, None] & (c < K)[None, :], other=0.0)
        w = tl.load(w_ptr + rows64[:, None] * stride_w + c[None, :], mask=(c < K)[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    out = out_ptr + mr[:, None] * stride_o + rows[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(mr < M)[:, None] & (rows < N)[None, :])


DOT_CONFIGS = [(16, 256, 4, 4), (32, 256, 4, 4), (16, 512, 4, 3), (32, 128, 4, 6), (64, 128, 4, 4)]


def skinny_dot(x: torch.Tensor, weight: torch.Tensor, config: tuple[int, int, int, int] = (16, 256, 4, 4)) -> torch.Tensor:
    """x [M <= 16, K] @ weight [N, K].T; config = (BLOCK_N, BLOCK_K, num_warps, STAGES)."""
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_n, block_k, warps, stages = config
    _skinny_dot_kernel[(triton.cdiv(n, block_n),)](
        x, weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, num_warps=warps,
    )
    return out
