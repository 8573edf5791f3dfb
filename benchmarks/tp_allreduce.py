"""All-reduce latency on the GPUs of one host: NCCL vs kvserve's one-shot symmetric-memory path,
and the all-reduce + residual add + RMSNorm pair that every TP layer runs after a row-parallel
projection: unfused (one-shot all-reduce, then the Triton add-and-norm) vs the fused kernel.

    python benchmarks/tp_allreduce.py              # 2 GPUs
    python benchmarks/tp_allreduce.py --ranks 4

The decode step of a TP model makes two all-reduces per layer of `rows x hidden` bf16. This
times exactly that: for each size, a CUDA graph of 64 back-to-back calls is captured once per
path and replayed; the table shows microseconds per call (median of 5 timed replays after 3
warm-up ones) and checks that the paths give the same results.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CALLS = 64  # all-reduces per graph (a 32-layer model makes 64 per decode step)


def _time_graph(fn, device) -> float:
    """Microseconds per all-reduce of a graph of CALLS calls of fn."""
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()  # warm-up outside the graph (NCCL/symm-mem set up lazily)
    torch.cuda.current_stream(device).wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(CALLS):
            fn()
    times = []
    for i in range(8):
        dist.barrier()
        torch.cuda.synchronize(device)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        if i >= 3:
            times.append(a.elapsed_time(b) * 1e3 / CALLS)
    return statistics.median(times)


def worker(rank: int, size: int, port: int, hidden: int, rows_list: list[int], q) -> None:
    from kvserve.distributed import one_shot
    from kvserve.models import triton_ops

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            device_id=device)
    cpu = dist.new_group(backend="gloo")
    ar = one_shot.create(dist.group.WORLD, cpu, device)
    results = []
    for rows in rows_list:
        x = torch.randn(rows, hidden, dtype=torch.bfloat16, device=device)
        want = x.float().clone()
        dist.all_reduce(want)
        got = x.clone()
        used = ar is not None and ar(got)
        torch.cuda.synchronize(device)
        err = (got.float() - want).abs().max().item() if used else float("nan")
        y = x.clone()
        nccl_us = _time_graph(lambda: dist.all_reduce(y), device)
        one_us = _time_graph(lambda: ar(y), device) if used else float("nan")
        # The layer's pair: all-reduce, then residual add + RMSNorm.
        res = torch.randn(rows, hidden, dtype=torch.bfloat16, device=device)
        w = torch.randn(hidden, dtype=torch.bfloat16, device=device)
        unfused_us = fused_us = float("nan")
        same = "-"
        if used:
            def unfused():
                ar(y)
                return triton_ops.rmsnorm(y, w, 1e-5, res)

            unfused_us = _time_graph(unfused, device)
        if used and ar.norm is not None:
            fused_us = _time_graph(lambda: ar.norm(y, res, w, 1e-5), device)
            z = x.clone()
            out, summed = ar.norm(z, res, w, 1e-5)
            ar(z)
            want_out, want_res = triton_ops.rmsnorm(z, w, 1e-5, res)
            same = "yes" if torch.equal(out, want_out) and torch.equal(summed, want_res) else "NO"
        results.append((rows, rows * hidden * 2, nccl_us, one_us, err, unfused_us, fused_us, same))
    if rank == 0:
        q.put((torch.cuda.get_device_name(0), ar is not None and ar.norm is not None, results))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=4096, help="row width (Llama-3.1-8B: 4096)")
    ap.add_argument("--rows", default="1,4,16,64,256")
    args = ap.parse_args()
    if torch.cuda.device_count() < args.ranks:
        sys.exit(f"needs {args.ranks} CUDA GPUs, found {torch.cuda.device_count()}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rows = [int(r) for r in args.rows.split(",")]
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    procs = [ctx.Process(target=worker, args=(r, args.ranks, port, args.hidden, rows, q)) for r in range(args.ranks)]
    for p in procs:
        p.start()
    card, enabled, results = q.get()
    for p in procs:
        p.join(60)
    print(f"{args.ranks} x {card}, torch {torch.__version__}, bf16 rows x {args.hidden}, "
          f"graph of {CALLS} calls, median of 5 replays; fused all-reduce + RMSNorm enabled: {enabled}")
    print("| rows | KiB | NCCL us | one-shot us | max abs diff vs fp32 NCCL | one-shot + add&norm us "
          "| fused us | fused == unfused |")
    print("|---|---|---|---|---|---|---|---|")
    for rows_, nbytes, nccl_us, one_us, err, unfused_us, fused_us, same in results:
        print(f"| {rows_} | {nbytes >> 10} | {nccl_us:.1f} | {one_us:.1f} | {err:.3g} | {unfused_us:.1f} "
              f"| {fused_us:.1f} | {same} |")


if __name__ == "__main__":
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    main()
