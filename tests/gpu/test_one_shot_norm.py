"""The fused all-reduce + residual add + RMSNorm kernel (distributed/one_shot_norm.py) on 2 GPUs.

It must give exactly what the unfused path gives (the all-reduce, then the Triton add-and-norm),
the same bits on every rank, call after call (its rotating buffer slots, emptied after each
read), eagerly and replayed from a CUDA graph, for one row and for many, after a GEMV that
pushed its output itself (`linear_push`), for a hidden size that
is not a power of two, with and without a residual, in bf16 and fp16; fp32 is not eligible
(the caller then all-reduces and normalizes separately). Skipped without 2 CUDA GPUs.

    python -m pytest tests/gpu/test_one_shot_norm.py -q
"""

from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"
)

CASES = [  # (rows, cols, dtype, with residual)
    (1, 4096, torch.bfloat16, True),
    (1, 4096, torch.bfloat16, False),
    (3, 1000, torch.bfloat16, True),
    (64, 4096, torch.bfloat16, True),
    (256, 4096, torch.bfloat16, True),
    (2, 2048, torch.float16, False),
    (7, 4096, torch.float16, True),
]


def _reference_sum(ar, x: torch.Tensor) -> torch.Tensor:
    """The unfused all-reduce: PyTorch's one-shot kernel in bf16; an fp32 NCCL sum rounded to
    fp16 (the one-shot kernel has no fp16), which is what the one-shot kernel's fp32 accumulation
    gives for two ranks."""
    import torch.distributed as dist

    if x.dtype == torch.bfloat16:
        ref = x.clone()
        assert ar(ref)
        return ref
    ref = x.float()
    dist.all_reduce(ref)
    return ref.to(x.dtype)


def _worker(rank: int, port: int, q) -> None:
    try:
        import torch.distributed as dist

        from kvserve.distributed import one_shot
        from kvserve.models import triton_ops

        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                device_id=device)
        cpu = dist.new_group(backend="gloo")
        ar = one_shot.create(dist.group.WORLD, cpu, device)
        report: dict = {"one_shot": ar is not None, "fused": ar is not None and ar.norm is not None, "cases": []}
        if report["fused"]:
            for rows, cols, dtype, with_res in CASES:
                g = torch.Generator(device=device).manual_seed(1000 * rank + rows)
                shared = torch.Generator(device=device).manual_seed(7 + rows)  # same on both ranks
                mismatches = 0
                sums = []
                for call in range(5):  # epochs 1..5: both slots, reused
                    x = torch.randn(rows, cols, generator=g, device=device).to(dtype)
                    res = torch.randn(rows, cols, generator=shared, device=device).to(dtype) if with_res else None
                    w = torch.randn(cols, generator=shared, device=device).to(dtype)
                    ref = _reference_sum(ar, x)
                    want_out, want_res = triton_ops.rmsnorm(ref, w, 1e-5, res)
                    if want_res is None:
                        want_res = ref
                    x_before = x.clone()
                    out, summed = ar.norm(x, res, w, 1e-5)
                    mismatches += int(not torch.equal(out, want_out)) + int(not torch.equal(summed, want_res))
                    mismatches += int(not torch.equal(x, x_before))  # input untouched
                    sums.append(summed.float().sum().item())
                # The same calls captured in a graph, replayed: the epochs keep advancing.
                x = torch.randn(rows, cols, generator=g, device=device).to(dtype)
                res = torch.randn(rows, cols, generator=shared, device=device).to(dtype) if with_res else None
                w = torch.randn(cols, generator=shared, device=device).to(dtype)
                ref = _reference_sum(ar, x)
                want_out, want_res = triton_ops.rmsnorm(ref, w, 1e-5, res)
                want_res = ref if want_res is None else want_res
                s = torch.cuda.Stream(device)
                s.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(s):
                    ar.norm(x, res, w, 1e-5)  # warm-up outside the graph
                torch.cuda.current_stream(device).wait_stream(s)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    outs = [ar.norm(x, res, w, 1e-5) for _ in range(3)]
                for _ in range(4):
                    for o in outs:
                        o[0].zero_()
                    graph.replay()
                    torch.cuda.synchronize(device)
                    for out, summed in outs:
                        mismatches += int(not torch.equal(out, want_out)) + int(not torch.equal(summed, want_res))
                report["cases"].append((rows, cols, str(dtype), with_res, mismatches, sums))
            # A one-row GEMV that pushes its output (row_parallel_linear), then the reduction.
            for k, n, dtype in ((2048, 4096, torch.bfloat16), (7168, 4096, torch.bfloat16), (300, 1000, torch.float16)):
                g = torch.Generator(device=device).manual_seed(5 + rank + n + k)
                shared = torch.Generator(device=device).manual_seed(11 + n + k)
                lin = torch.nn.Linear(k, n, bias=False).to(device, dtype)
                with torch.no_grad():
                    lin.weight.copy_(torch.randn(n, k, generator=g, device=device).to(dtype) / k**0.5)
                mismatches = 0
                for call in range(4):
                    x = torch.randn(1, k, generator=g, device=device).to(dtype)
                    res = torch.randn(1, n, generator=shared, device=device).to(dtype)
                    w = torch.randn(n, generator=shared, device=device).to(dtype)
                    ref = _reference_sum(ar, triton_ops.gemv(x, lin.weight))
                    want_out, want_res = triton_ops.rmsnorm(ref, w, 1e-5, res)
                    y = ar.norm.linear_push(lin, x)
                    assert y is not None
                    out, summed = ar.norm(y, res, w, 1e-5)
                    mismatches += int(not torch.equal(out, want_out)) + int(not torch.equal(summed, want_res))
                report["cases"].append((1, n, f"push {k}->{n} {dtype}", True, mismatches, [0.0]))
            x32 = torch.ones(2, 64, device=device)
            report["fp32_declined"] = ar.norm(x32, x32, torch.ones(64, device=device), 1e-5) is None
        torch.cuda.synchronize(device)
        q.put((rank, report, None))
        dist.barrier(cpu)
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - reported to the test
        q.put((rank, None, traceback.format_exc()))


def test_fused_all_reduce_rmsnorm_matches_unfused():
    import torch.multiprocessing as mp

    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    procs = [ctx.Process(target=_worker, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = {}
        for _ in range(2):
            rank, report, err = q.get()
            assert err is None, f"rank {rank}:\n{err}"
            results[rank] = report
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    if not torch.cuda.can_device_access_peer(0, 1):
        pytest.skip("GPUs 0 and 1 cannot reach each other's memory: no symmetric memory here")
    for rank, report in results.items():
        assert report["one_shot"] and report["fused"], (rank, report)
        assert report["fp32_declined"]
        for rows, cols, dtype, with_res, mismatches, _sums in report["cases"]:
            assert mismatches == 0, (rank, rows, cols, dtype, with_res, mismatches)
    # Every rank computed the same sums.
    assert [c[5] for c in results[0]["cases"]] == [c[5] for c in results[1]["cases"]]
