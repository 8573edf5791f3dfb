"""Tensor parallelism on 2 GPUs: Llama-3.1-8B shapes (random bf16 weights) at TP=1 and TP=2.

    python benchmarks/tp_bench.py                        # both sections, TP=1 then TP=2
    python benchmarks/tp_bench.py --num-requests 64      # a shorter throughput run
    python benchmarks/tp_bench.py --only decode          # batch-1 decode only
    python benchmarks/tp_bench.py --tp 1,2,2nccl --profile   # + TP=2 on NCCL only; kernel table

(a) batch-1 decode: 128-token prompt, 256 new tokens, greedy: ms/token (median of 3 runs).
(b) offline throughput: N requests (default 256), random ids in [0, 10000), prompt and output
    lengths uniform in [100, 1024], ignore_eos, max_model_len 4096: output tok/s.

Each TP size runs in its own child process (a fresh CUDA context; a crash or a timeout of one
still reports the other), one engine per TP size serving both sections. The whole run is capped
by --time-budget seconds (default 450): each child gets a share and is killed past it; results
measured before the cut still print. Prints a table with the cards and the TP=2 / TP=1 speedup
and writes tp_bench.json to --out (default $OUT or .).

A size written `Nnccl` runs TP=N with every all-reduce on NCCL (`KVSERVE_TP_ALL_REDUCE=nccl`)
instead of the one-shot symmetric-memory kernel used for small tensors by default; `Nnopdl`
launches every kernel without programmatic dependent launch (`KVSERVE_PDL=0`, models/pdl.py);
the suffixes combine (`2nccl-nopdl`). `--profile`
also prints, per size, rank 0's GPU kernel time by kernel over 64 greedy decode steps next to their
wall time (torch.profiler; kernels inside CUDA graphs included).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:  # run as `python -m benchmarks.tp_bench` or as `python benchmarks/tp_bench.py`
    from benchmarks import gpu_bench
except ImportError:
    import gpu_bench  # type: ignore[no-redef]

MODEL = "Llama-3.1-8B"
# --smoke: the script's own plumbing on CPU (gloo) with a tiny Llama, in seconds.
SMOKE_CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=10000,
                    max_position_embeddings=4096, torch_dtype="float32")


def log(msg: str) -> None:
    print(msg, flush=True)


# -- child: one TP size ---------------------------------------------------------------------------
def profile_decode(llm, tp: int, steps: int = 64) -> dict:
    """Rank 0's kernels over `steps` greedy batch-1 decode steps (as in the decode section): GPU
    time per kernel name (exclusive and total, see `split_timeline`) and idle gaps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from kvserve import SamplingParams

    eng = llm.engine
    eng.add_request("prof", list(range(1, 129)), SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True))
    for _ in range(8):  # prefill and the first decode steps, unprofiled
        eng.step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            eng.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    while eng.has_unfinished_requests():
        eng.step()
    kernels = [(ev.time_range.start, ev.time_range.end, ev.name) for ev in prof.events()
               if ev.device_type == torch.autograd.DeviceType.CUDA]
    split = split_timeline(kernels)
    busy, idle, counts = split["busy"], split["idle"], split["idle_gaps"]
    log(f"[tp={tp}] profile: {steps} decode steps, wall {wall / steps * 1e6:.0f} us/step, "
        f"rank-0 GPU busy {busy / steps:.0f} us/step, {len(kernels) / steps:.0f} kernels/step")
    log(f"    idle between kernels, us/step (gaps/step): "
        + ", ".join(f"{k} {v / steps:.0f} ({counts[k] / steps:.1f})" for k, v in idle.items()))
    log("    us/step by kernel: exclusive (what it adds to the busy timeline after the kernels that "
        "started before it) / total (its own duration; under PDL it includes its wait)")
    top = sorted(split["exclusive"].items(), key=lambda kv: -kv[1])[:16]
    for name, us in top:
        log(f"    {us / steps:8.1f} / {split['total'][name] / steps:8.1f}  {name[:100]}")
    return {"wall_us_per_step": wall / steps * 1e6, "busy_us_per_step": busy / steps,
            "kernels_per_step": len(kernels) / steps,
            "idle_us_per_step": {k: v / steps for k, v in idle.items()},
            "top_kernels_exclusive_us_per_step": {k[:110]: v / steps for k, v in top}}


def split_timeline(kernels: list[tuple[float, float, str]]) -> dict:
    """Kernels as (start, end, name), any order, in µs -> per name its `total` duration and its
    `exclusive` time: the part of [start, end] after every kernel that started before it had
    ended, i.e. what it adds to the GPU's busy timeline. Exclusive times sum to `busy` (the
    union of the kernels' intervals), so they stay a breakdown of the step when kernels overlap
    (programmatic dependent launch starts a kernel before the previous one ends; its own
    duration then includes its wait). `idle` sums the gaps between busy stretches by length:
    short ones are the GPU's dispatch between the kernels of a graph, long ones the host."""
    total: dict[str, float] = {}
    exclusive: dict[str, float] = {}
    idle = {"<3us": 0.0, "3-10us": 0.0, "10-50us": 0.0, ">=50us": 0.0}
    gaps = dict.fromkeys(idle, 0)
    covered = None  # end of the busy timeline so far
    for start, end, name in sorted(kernels):
        total[name] = total.get(name, 0.0) + (end - start)
        if covered is not None and start > covered:
            gap = start - covered
            key = "<3us" if gap < 3 else "3-10us" if gap < 10 else "10-50us" if gap < 50 else ">=50us"
            idle[key] += gap
            gaps[key] += 1
        begin = start if covered is None else max(start, covered)
        exclusive[name] = exclusive.get(name, 0.0) + max(0.0, end - begin)
        covered = end if covered is None else max(covered, end)
    return {"total": total, "exclusive": exclusive, "busy": sum(exclusive.values()), "idle": idle, "idle_gaps": gaps}


def run_child(tp: int, sections: set[str], num_requests: int, out_path: Path, smoke: bool,
              profile: bool = False) -> None:
    import torch

    from kvserve import LLM, SamplingParams
    from kvserve.distributed import parallel_state as ps

    cards = ["cpu"] * tp if smoke else [torch.cuda.get_device_name(i) for i in range(tp)]
    result: dict[str, object] = {"tp": tp, "cards": cards}

    def save() -> None:
        out_path.write_text(json.dumps(result))

    save()
    with tempfile.TemporaryDirectory() as tmp:
        if smoke:
            folder = str(Path(tmp))
            Path(tmp, "config.json").write_text(json.dumps(SMOKE_CONFIG))
            extra = dict(device="cpu", kv_cache_memory=256 << 20)
        else:
            folder = gpu_bench.model_folder(MODEL, Path(tmp))
            extra = dict(gpu_memory_utilization=0.9)
        t0 = time.perf_counter()
        llm = LLM(folder, load_format="dummy", tensor_parallel_size=tp, max_model_len=4096,
                  max_num_seqs=256, enable_prefix_caching=False, **extra)
        eng = llm.engine
        result["startup_s"] = time.perf_counter() - t0
        result["kv_tokens"] = eng.cache_config.num_blocks * eng.cache_config.block_size
        tp_state = ps.get_tp()
        result["all_reduce"] = ("-" if tp == 1 else "one-shot" if tp_state.one_shot is not None
                                else torch.distributed.get_backend(tp_state.group))
        log(f"[tp={tp}] engine up in {result['startup_s']:.0f}s; KV cache {result['kv_tokens']} tokens per rank; "
            f"all-reduce {result['all_reduce']}")
        save()
        if "decode" in sections:
            # 128-token prompt, 256 new tokens, median of 3
            s = gpu_bench.kvserve_decode(llm, new=16 if smoke else 256)
            result["decode_ms"] = s * 1e3
            log(f"[tp={tp}] batch-1 decode: {s * 1e3:.3f} ms/token ({1 / s:.0f} tok/s)")
            save()
            if profile and not smoke:
                result["profile"] = profile_decode(llm, tp)
                save()
        if "throughput" in sections:
            prompts, outs = gpu_bench.workload(num_requests)
            if smoke:
                outs = [8] * num_requests
            # Warm-up with the same prompt lengths (other ids) and short outputs: Triton
            # compiles kernel variants per new shape, which must not be timed.
            k = min(64, num_requests)
            warm = [{"prompt_token_ids": [(t * 7 + 1) % 10000 for t in p]} for p in prompts[:k]]
            llm.generate(warm, SamplingParams(max_tokens=8, temperature=0.6, ignore_eos=True), use_tqdm=False)
            sps = [SamplingParams(max_tokens=o, temperature=0.6, ignore_eos=True) for o in outs]
            t0 = time.perf_counter()
            res = llm.generate([{"prompt_token_ids": p} for p in prompts], sps, use_tqdm=False)
            dt = time.perf_counter() - t0
            n_out = sum(len(r.outputs[0].token_ids) for r in res)
            result.update(throughput_tok_s=n_out / dt, throughput_s=dt, requests=num_requests,
                          preemptions=eng.stats()["num_preemptions"], graph_steps=eng.runner.num_graph_steps)
            log(f"[tp={tp}] throughput: {num_requests} requests, {n_out} tokens in {dt:.1f}s = {n_out / dt:.0f} out tok/s")
            save()
        eng.shutdown()
        del llm, eng
        gc.collect()


# -- parent ---------------------------------------------------------------------------------------
_LABEL = r"(\d+)(nccl|nopdl|nccl-nopdl)?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="decode,throughput", help="sections: decode, throughput")
    ap.add_argument("--num-requests", type=int, default=256, help="throughput requests (default: %(default)s)")
    ap.add_argument("--tp", default="1,2", help="TP sizes to run, in order; 'Nnccl' = TP=N on NCCL only "
                    "(default: %(default)s)")
    ap.add_argument("--profile", action="store_true", help="also print rank 0's kernel times over 64 decode steps")
    ap.add_argument("--time-budget", type=float, default=450.0,
                    help="seconds for the whole run; each TP size gets its share (default: %(default)s)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script itself, no GPU")
    ap.add_argument("--_child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_label", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sections = set(args.only.split(","))
    if args.num_requests < 1:
        ap.error("--num-requests must be >= 1")
    if args.time_budget <= 0:
        ap.error("--time-budget must be > 0")
    if args._child is not None:
        run_child(args._child, sections, args.num_requests, Path(args._result), args.smoke, args.profile)
        return

    labels = [x.strip() for x in args.tp.split(",")]
    for label in labels:
        if not re.fullmatch(_LABEL, label):
            ap.error(f"--tp: {label!r} is not a size (N, Nnccl, Nnopdl or Nnccl-nopdl)")
    start = time.monotonic()
    rows: dict[str, dict] = {}
    base_env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    base_env["PYTHONPATH"] = root + os.pathsep + base_env.get("PYTHONPATH", "")
    for i, label in enumerate(labels):
        size, suffix = re.fullmatch(_LABEL, label).groups(default="")
        tp = int(size)
        env = dict(base_env)
        if "nccl" in suffix:
            env["KVSERVE_TP_ALL_REDUCE"] = "nccl"
        if "nopdl" in suffix:
            env["KVSERVE_PDL"] = "0"
        left = args.time_budget - (time.monotonic() - start)
        share = left / (len(labels) - i)
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            result_path = Path(f.name)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", str(tp), "--_result", str(result_path),
               "--only", args.only, "--num-requests", str(args.num_requests)] + (["--smoke"] if args.smoke else []) \
            + (["--profile"] if args.profile else [])
        log(f"== TP={label} (up to {share:.0f}s)")
        status = "ok"
        try:
            proc = subprocess.run(cmd, env=env, timeout=share)
            if proc.returncode != 0:
                status = f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            status = f"cut at {share:.0f}s"
        try:
            rows[label] = json.loads(result_path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            rows[label] = {}
        rows[label]["status"] = status
        result_path.unlink(missing_ok=True)

    def fmt(v, spec: str) -> str:
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    log(f"\n{'tiny (smoke, CPU)' if args.smoke else MODEL} shapes, {'fp32' if args.smoke else 'bf16'} random weights; total {time.monotonic() - start:.0f}s")
    log("| TP (label) | all-reduce | cards | batch-1 decode ms/token | throughput out tok/s | requests | start-up s | status |")
    log("|---|---|---|---|---|---|---|---|")
    for label, r in rows.items():
        cards = " + ".join(r.get("cards", [])) or "-"
        log(f"| {label} | {r.get('all_reduce', '-')} | {cards} | {fmt(r.get('decode_ms'), '.3f')} | "
            f"{fmt(r.get('throughput_tok_s'), '.0f')} | {r.get('requests', '-')} | {fmt(r.get('startup_s'), '.0f')} | "
            f"{r['status']} |")
    one, two = rows.get("1", {}), rows.get("2", {})
    speed = {}
    if one.get("decode_ms") and two.get("decode_ms"):
        speed["decode"] = one["decode_ms"] / two["decode_ms"]
    if one.get("throughput_tok_s") and two.get("throughput_tok_s"):
        speed["throughput"] = two["throughput_tok_s"] / one["throughput_tok_s"]
    off1, off2 = rows.get("1nopdl", {}), rows.get("2nopdl", {})
    if off1.get("decode_ms") and off2.get("decode_ms"):
        speed["decode without PDL"] = off1["decode_ms"] / off2["decode_ms"]
    for k, v in speed.items():
        log(f"speedup TP=2 / TP=1, {k}: {v:.2f}x" + ("  (target >= 1.6x)" if k == "decode" else ""))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "tp_bench.json").write_text(json.dumps({"rows": rows, "speedup": speed}, indent=1))


if __name__ == "__main__":
    main()
