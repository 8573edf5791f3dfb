"""Where a CPU speculative verify step's time goes: the one-call GGML decoder stack
(`csrc/quant/decoder_stack_f32.c`) on the built-in SmolLM2-135M Q4_1, a step of 1 row against
one of k + 1 rows of one sequence (a verify step's shape: positions L-1 .. L+k-1 through one
block table), at chosen context lengths, with thread 0's time per phase of each layer (a
library built with -DKVQS_PROFILE: qkv = input norm + activation quantization + the qkv GEMM;
attention = the K/V writes and the attention items; o = merging the splits + the o GEMM;
gate/up = norm + gate and up GEMMs + SiLU; down = the down GEMM; barrier waits included).
The LM head is outside the stack (time it with `cpu_quant_bench.py`).

    PYTHONPATH=. python benchmarks/stack_verify_profile.py [--lens 120,600,1500] [--rows 4] [--threads 1,2]
        [--base DIR]   # also a second source tree's csrc/quant (e.g. `git archive` of a base
                       # commit): its stack runs interleaved with this one, same caches, and the
                       # outputs are compared bit for bit

The KV caches hold random values (timing only). Builds need gcc with OpenMP; AVX2 flags.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

PHASES = ("qkv", "attention", "o", "gate/up", "down")
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-ffp-contract=off", "-mavx2", "-mfma", "-mf16c", "-DKVQS_PROFILE"]
if os.environ.get("KVQS_PROFILE_AVX512"):  # the flags the library takes on AVX-512 (+VNNI) machines
    FLAGS += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]


def build(src: Path, out: Path) -> ctypes.CDLL:
    subprocess.check_call(["gcc", *FLAGS, f"-I{src}", *map(str, sorted(src.glob("*.c"))), "-o", str(out), "-lm"])
    lib = ctypes.CDLL(str(out))
    lib.kvq_stack_profile.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lens", default="120,600,1500", help="context lengths L (the first row's, this token included)")
    ap.add_argument("--rows", type=int, default=4, help="k + 1")
    ap.add_argument("--threads", default="1")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--base", type=Path, default=None, help="another source tree to compare with")
    args = ap.parse_args()

    from kvserve import LLM
    from kvserve.kernels import cpu_quant_stack as cqs
    from kvserve.platform.ggml_stack import GGMLDecoderStack

    torch.zeros(1).add_(1)  # PyTorch's OpenMP runtime first (shared with the library)
    here = Path(__file__).resolve().parents[1] / "kvserve" / "csrc" / "quant"
    srcs = {"this": here} | ({"base": args.base.resolve() / "kvserve" / "csrc" / "quant"} if args.base else {})
    tmp = Path(tempfile.mkdtemp(prefix="kvq-prof-"))
    libs = {name: build(src, tmp / f"{name}.so") for name, src in srcs.items()}
    max_len = max(int(x) for x in args.lens.split(",")) + args.rows + 16
    llm = LLM("smollm2", max_model_len=max_len, num_kv_blocks=(max_len + 15) // 16 + 4)
    runner = llm.engine.runner
    for c in runner.kv_caches:
        c.normal_()
    stacks = {}
    for name, lib in libs.items():
        cqs.library = lambda lib=lib: cqs._bind(lib)
        st = GGMLDecoderStack(runner.model)
        if not st._build_stack(runner.kv_caches, tuple(c.data_ptr() for c in runner.kv_caches)):
            raise SystemExit("the GGML decoder stack does not apply to this model")
        stacks[name] = st._stack
    bs = next(iter(stacks.values())).block_size
    table = torch.arange((max_len + bs - 1) // bs, dtype=torch.int32)
    prof = (ctypes.c_double * 6)()

    def call(name: str, L: int, M: int) -> tuple[float, list[float], torch.Tensor]:
        pos = torch.arange(L - 1, L - 1 + M, dtype=torch.int64)
        ids = torch.full((M,), 100, dtype=torch.int64)
        libs[name].kvq_stack_profile(prof, 1)
        t = time.perf_counter()
        out = stacks[name](ids, pos, table.repeat(M, 1).contiguous(), (pos + 1).int(), pos.clone())
        dt = time.perf_counter() - t
        libs[name].kvq_stack_profile(prof, 1)
        return dt, [prof[i] for i in range(len(PHASES))], out

    print(f"cpu: {os.uname().machine}, load {os.getloadavg()[0]:.2f}; ms, median of {args.reps} (phases: mean)")
    for threads in (int(x) for x in args.threads.split(",")):
        torch.set_num_threads(threads)
        for L in (int(x) for x in args.lens.split(",")):
            for M in (1, args.rows):
                times = {n: [] for n in stacks}
                phases = {n: [0.0] * len(PHASES) for n in stacks}
                outs = {n: call(n, L, M)[2] for n in stacks}  # warm-up, and the outputs to compare
                for _ in range(args.reps):
                    for n in stacks:  # interleaved
                        dt, ph, _ = call(n, L, M)
                        times[n].append(dt)
                        phases[n] = [a + b for a, b in zip(phases[n], ph)]
                for n in stacks:
                    med = sorted(times[n])[len(times[n]) // 2] * 1e3
                    ph = "  ".join(f"{p} {v / args.reps * 1e3:5.2f}" for p, v in zip(PHASES, phases[n]))
                    print(f"threads {threads} L {L:5d} rows {M}: {n:4s} step {med:6.2f}  [{ph}]")
                if len(outs) == 2:
                    a, b = outs.values()
                    print(f"    outputs bit-identical: {torch.equal(a, b)}")
    print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
