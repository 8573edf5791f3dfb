"""Per-shape timing of the quantized GEMM (`kvq_gemm`, csrc/quant/kvq_dot.c) against a plain
streaming read of the same bytes, on the built-in SmolLM2-135M shapes.

Decode reads every weight once per token and the model (~96 MB) is larger than the L3, so each
timed call multiplies a different copy of the weight out of a ring of copies totalling
`--ring-mb` MB (cold weights, like a real decode step), never the same cache-hot copy twice.
The streaming-read baseline is a C loop summing the same byte count with AVX2 loads over the
same ring, run with the same thread counts in the same process: GB/s of the GEMM next to it
says how close the kernel is to memory bandwidth. Timings are best of `--repeats` (the
machine may be shared: best-of filters other work out).

    python benchmarks/cpu_quant_kernels.py                        # the working tree's kernels
    python benchmarks/cpu_quant_kernels.py --compare HEAD~1       # plus kvq_*.c of a git rev
    python benchmarks/cpu_quant_kernels.py --m 1 2 4 32 --threads 1 2 --repeats 30
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kvserve.kernels import cpu_quant as cq

# (name, qtype, N, K): the built-in model's linear shapes (qkv as its three parts)
SHAPES = [
    ("q 576x576", "Q4_1", 576, 576),
    ("k/v 192x576", "Q4_1", 192, 576),
    ("o 576x576", "Q4_1", 576, 576),
    ("gate/up 1536x576", "Q4_1", 1536, 576),
    ("down 576x1536", "Q4_1", 576, 1536),
    ("lm_head 49152x576", "Q8_0", 49152, 576),
]
EXTRA_SHAPES = [
    ("Q4_0 1536x576", "Q4_0", 1536, 576),
    ("Q4_K 1536x1536", "Q4_K", 1536, 1536),
    ("Q5_K 1536x1536", "Q5_K", 1536, 1536),
    ("Q6_K 1536x1536", "Q6_K", 1536, 1536),
]

# Gemma 3 270M Q4_K_M (`--model gemma3-270m`): hidden 640, intermediate 2048, 4 query heads and
# 1 kv head of 256; the K-format tensors of its layers and its tied Q8_0 head (`--gemma`)
GEMMA_SHAPES = [
    ("g q 1024x640", "Q5_0", 1024, 640),
    ("g k 256x640", "Q5_0", 256, 640),
    ("g v 256x640", "Q8_0", 256, 640),
    ("g o 640x1024", "Q4_K", 640, 1024),
    ("g gate/up 2048x640", "Q5_0", 2048, 640),
    ("g down 640x2048", "Q4_K", 640, 2048),
    ("g down 640x2048", "Q6_K", 640, 2048),
    ("g head 262144x640", "Q8_0", 262144, 640),
]

_STREAM_C = r"""
#include <immintrin.h>
#include <stdint.h>
#include <omp.h>
/* Sum n bytes (a multiple of 128) with 256-bit loads, split over the OpenMP threads. */
int64_t stream_sum(const uint8_t *p, int64_t n, int nt) {
    int64_t total = 0;
#pragma omp parallel num_threads(nt) reduction(+ : total)
    {
        int id = omp_get_thread_num(), t = omp_get_num_threads();
        int64_t blocks = n / 128, b0 = blocks * id / t, b1 = blocks * (id + 1) / t;
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t b = b0; b < b1; b++) {
            const __m256i *q = (const __m256i *)(p + 128 * b);
            a0 = _mm256_add_epi64(a0, _mm256_loadu_si256(q));
            a1 = _mm256_add_epi64(a1, _mm256_loadu_si256(q + 1));
            a2 = _mm256_add_epi64(a2, _mm256_loadu_si256(q + 2));
            a3 = _mm256_add_epi64(a3, _mm256_loadu_si256(q + 3));
        }
        a0 = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
        int64_t v[4];
        _mm256_storeu_si256((__m256i *)v, a0);
        total += v[0] + v[1] + v[2] + v[3];
    }
    return total;
}

#include <time.h>
static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

/* Fastest single pass of `size` bytes, each pass over the next copy of the ring. */
double stream_best(const uint8_t *ring, int64_t copies, int64_t size, int nt, int rounds) {
    double best = 1e30;
    volatile int64_t sink = 0;
    for (int r = 0; r < rounds; r++)
        for (int64_t c = 0; c < copies; c++) {
            double t = now();
            sink += stream_sum(ring + c * size, size / 128 * 128, nt);
            t = now() - t;
            if (t < best) best = t;
        }
    return best;
}

typedef void (*gemm_fn)(int, const void *, int64_t, const void *, const float *, float *, int64_t, int64_t, int64_t,
                        int64_t);
/* Fastest single kvq_gemm call, each call on the next copy of the weight in the ring. */
double gemm_best(gemm_fn fn, int q, const uint8_t *ring, int64_t copies, int64_t size, int64_t rb, const void *xq,
                 float *out, int64_t M, int64_t N, int64_t K, int rounds) {
    double best = 1e30;
    for (int r = 0; r < rounds; r++)
        for (int64_t c = 0; c < copies; c++) {
            double t = now();
            fn(q, ring + c * size, rb, xq, 0, out, N, M, N, K);
            t = now() - t;
            if (t < best) best = t;
        }
    return best;
}
"""


def _compile(sources: list[Path], out: Path, flags: list[str]) -> ctypes.CDLL:
    cmd = ["cc", "-O3", "-fopenmp", "-shared", "-fPIC", "-ffp-contract=off", *flags, *map(str, sources), "-o", str(out), "-lm"]
    subprocess.run(cmd, check=True)
    torch.zeros(1).add_(1)  # PyTorch's OpenMP runtime first (shared, so set_num_threads applies)
    return ctypes.CDLL(str(out))


def _stream_lib(tmp: Path) -> ctypes.CDLL:
    src = tmp / "stream.c"
    src.write_text(_STREAM_C)
    lib = _compile([src], tmp / "stream.so", ["-mavx2"])
    lib.stream_sum.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    lib.stream_sum.restype = ctypes.c_int64
    i64, p, i = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.stream_best.argtypes = [p, i64, i64, i, i]
    lib.stream_best.restype = ctypes.c_double
    lib.gemm_best.argtypes = [p, i, p, i64, i64, i64, p, p, i64, i64, i64, i]
    lib.gemm_best.restype = ctypes.c_double
    return lib


def _rev_lib(rev: str, tmp: Path) -> ctypes.CDLL:
    """The kvq library built from csrc/quant at a git revision (for before/after in one run)."""
    root = Path(__file__).resolve().parent.parent
    rel = "kvserve/csrc/quant"
    names = subprocess.run(["git", "-C", str(root), "ls-tree", "--name-only", f"{rev}:{rel}"], check=True,
                           capture_output=True, text=True).stdout.split()
    d = tmp / ("rev-" + hashlib.sha1(rev.encode()).hexdigest()[:8])
    d.mkdir()
    for n in names:
        blob = subprocess.run(["git", "-C", str(root), "show", f"{rev}:{rel}/{n}"], check=True, capture_output=True).stdout
        (d / n).write_bytes(blob)
    lib = _compile(sorted(d.glob("*.c")), d / "kvq.so", cq._LEVEL_FLAGS[cq.isa_level()])
    cq._declare(lib)
    return lib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 32])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3, help="passes over the ring; the fastest call is kept")
    ap.add_argument("--ring-mb", type=int, default=192, help="total bytes of weight copies cycled through")
    ap.add_argument("--compare", metavar="REV", help="also time kvq_*.c as of this git revision")
    ap.add_argument("--extra", action="store_true", help="also Q4_0 and the K formats")
    ap.add_argument("--gemma", action="store_true", help="instead: Gemma 3 270M's shapes and formats")
    ap.add_argument("--decode", action="store_true",
                    help="instead: LLM('smollm2', device='cpu') batch-1 greedy decode tok/s (best of --repeats)")
    ap.add_argument("--only", nargs="+", help="shape names containing any of these strings")
    args = ap.parse_args()

    if args.decode:
        _decode(args.repeats, args.threads)
        return
    tmp = Path(tempfile.mkdtemp(prefix="kvq-bench-"))
    stream = _stream_lib(tmp)
    libs: list[tuple[str, ctypes.CDLL]] = []
    if args.compare:
        libs.append((args.compare, _rev_lib(args.compare, tmp)))
    lib = cq.library()
    if lib is None:
        sys.exit("kvq library unavailable")
    libs.append(("tree", lib))
    print(f"isa {lib.kvq_isa().decode()}, ring {args.ring_mb} MB, best of {args.repeats}; "
          f"GB/s = weight bytes / time")
    hdr = f"{'shape':<20}{'fmt':<5}{'M':>3}{'thr':>4}  {'stream GB/s':>11}"
    for name, _ in libs:
        hdr += f"  {name + ' us':>12}{'GB/s':>7}"
    print(hdr)

    shapes = GEMMA_SHAPES if args.gemma else SHAPES + (EXTRA_SHAPES if args.extra else [])
    if args.only:
        shapes = [s for s in shapes if any(o in s[0] for o in args.only)]
    for sname, qtype, n, k in shapes:
        w1 = _weight(qtype, n, k)
        size = w1.numel()
        copies = max(2, -(-args.ring_mb * 2**20 // size))
        ring = w1.unsqueeze(0).repeat(copies, 1, 1)  # [copies, N, row_bytes], distinct addresses
        sbest = {t: stream.stream_best(ring.data_ptr(), copies, size, t, args.repeats) for t in args.threads}
        for m in args.m:
            x = torch.randn(m, k)
            for t in args.threads:
                torch.set_num_threads(t)
                line = f"{sname:<20}{qtype:<5}{m:>3}{t:>4}  {size / sbest[t] / 1e9:>11.1f}"
                for _, lb in libs:
                    sec = _gemm_best(stream, lb, cq.QTYPES[qtype], ring, k, x, args.repeats)
                    line += f"  {sec * 1e6:>12.1f}{size / sec / 1e9:>7.1f}"
                print(line, flush=True)
        del ring


def _weight(qtype: str, n: int, k: int) -> torch.Tensor:
    """Valid blocks: quantized Gaussian values (Q8_0/Q4_0/Q4_1) or random codes with small
    finite scales (the K formats), as tests/kernels/test_cpu_quant.py makes them."""
    if qtype in ("Q8_0", "Q4_0", "Q4_1"):
        return cq.quantize_weights(qtype, torch.randn(n, k) * 0.05)
    g = torch.Generator().manual_seed(0)
    bs, bb = cq.BLOCKS[cq.QTYPES[qtype]]
    nb = n * k // bs
    raw = torch.randint(0, 256, (nb, bb), generator=g, dtype=torch.uint8)
    scale = (torch.rand(nb, 1, generator=g) * 1.5e-3 + 5e-4).to(torch.float16).view(torch.uint8)
    if qtype == "Q6_K":
        raw[:, bb - 2 : bb] = scale
    else:
        raw[:, 0:2] = scale
        raw[:, 2:4] = scale
    return raw.reshape(n, -1)


def _decode(repeats: int, threads: list[int]) -> None:
    """128 greedy tokens from a short prompt after a warm-up: tok/s of the whole generate call
    (prefill included, so a lower bound on the decode rate)."""
    from kvserve import LLM, SamplingParams

    llm = LLM("smollm2", device="cpu")
    sp = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
    prompt = "The history of the printing press"
    for t in threads:
        torch.set_num_threads(t)
        llm.generate([prompt], sp)
        best = min(_timed(lambda: llm.generate([prompt], sp)) for _ in range(repeats))
        print(f"decode threads={t}: {128 / best:.1f} tok/s (best of {repeats}, 128 tokens incl. prefill)", flush=True)


def _timed(fn) -> float:  # noqa: ANN001
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _gemm_best(stream: ctypes.CDLL, lib: ctypes.CDLL, q: int, ring: torch.Tensor, k: int, x: torch.Tensor,
               repeats: int) -> float:
    """Fastest single kvq_gemm call (timed in C) over `repeats` passes of the ring."""
    m, copies, n, rb = x.shape[0], ring.shape[0], ring.shape[1], ring.shape[2]
    xq = torch.empty(lib.kvq_act_bytes(q, m, k), dtype=torch.uint8)
    lib.kvq_quantize_act(q, x.data_ptr(), k, xq.data_ptr(), m, k)
    out = torch.empty(m, n)
    fn = ctypes.cast(lib.kvq_gemm, ctypes.c_void_p).value
    return stream.gemm_best(fn, q, ring.data_ptr(), copies, n * rb, rb, xq.data_ptr(), out.data_ptr(), m, n, k, repeats)


if __name__ == "__main__":
    main()
