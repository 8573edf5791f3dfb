"""The LM head of a speculative verify step on the CPU: the built-in model's tied Q8_0 head
(49152 x 576) at 1 / 2 / 4 / 6 / 8 activation rows, `kvq_gemm` (row-count-dependent kernels)
against `kvq_gemm_rows` (the LM head's path), interleaved in one process; wall and CPU time
(time.process_time, all threads), and whether each row equals its one-row product bit for bit.

    PYTHONPATH=. python benchmarks/head_rows_bench.py [--threads 1] [--reps 15]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from kvserve.kernels import cpu_quant


def head_weight() -> tuple[torch.Tensor, int, int]:
    import gguf

    from kvserve.loader.resolve import smollm2_path

    r = gguf.GGUFReader(str(smollm2_path()))
    t = next(t for t in r.tensors if t.name == "token_embd.weight")
    return torch.from_numpy(np.array(t.data)).contiguous(), int(t.tensor_type), int(t.shape[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--rows", default="1,2,4,6,8")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    w, qtype, K = head_weight()
    name = next(n for n, q in cpu_quant.QTYPES.items() if q == qtype)
    print(f"head {w.shape[0]} x {K} {name}, threads {args.threads}, load {os.getloadavg()[0]:.2f}")
    torch.manual_seed(0)
    x = torch.randn(max(int(m) for m in args.rows.split(",")), K)
    kinds = {"kvq_gemm": False, "kvq_gemm_rows": True}
    one = {k: torch.cat([cpu_quant.gemm_int8(qtype, w, K, x[i : i + 1], rowwise=rw) for i in range(x.shape[0])])
           for k, rw in kinds.items()}
    for m in (int(v) for v in args.rows.split(",")):
        t = {k: ([], []) for k in kinds}
        same = {k: torch.equal(cpu_quant.gemm_int8(qtype, w, K, x[:m], rowwise=rw), one[k][:m]) for k, rw in kinds.items()}
        for _ in range(args.reps):
            for k, rw in kinds.items():
                w0, c0 = time.perf_counter(), time.process_time()
                cpu_quant.gemm_int8(qtype, w, K, x[:m], rowwise=rw)
                t[k][0].append(time.perf_counter() - w0)
                t[k][1].append(time.process_time() - c0)
        cells = []
        for k in kinds:
            ws, cs = sorted(t[k][0]), sorted(t[k][1])
            cells.append(f"{k} wall {ws[len(ws) // 2] * 1e3:.2f} (min {ws[0] * 1e3:.2f}) cpu {cs[len(cs) // 2] * 1e3:.2f} ms, "
                         f"rows == 1-row: {same[k]}")
        print(f"M={m}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
