"""End-to-end GPU benchmarks of kvserve, with their ceilings and baselines measured in the same run.

    python -m benchmarks.gpu_bench                      # all sections
    python -m benchmarks.gpu_bench --only decode,prefill --no-compiled
    TRITON_CACHE_DIR=$(mktemp -d) python -m benchmarks.gpu_bench --only throughput   # cold start
    timeout 150 python -m benchmarks.gpu_bench --hf-only 256 --hf-limit 100   # HF generate_batch

(a) decode: batch-1, Llama-3.2-1B / Llama-3.1-8B shapes (bf16, random weights), 128-token
    prompt, 256 new tokens: ms/token against the floor = bytes read per token (every weight
    except the unread embedding table, plus the KV cache) / the bandwidth of a large bf16 GEMV
    (the best of three large shapes);
    next to a gpt-fast-style static-KV-cache decoder under torch.compile("reduce-overhead").
(b) throughput: 256 requests, random ids in [0, 10000), prompt and output lengths uniform in
    [100, 1024], ignore_eos, Qwen3-0.6B shapes, max_model_len 4096: engine start-up time, output
    tok/s of the first run (no warm-up workload) and of a second run, and the workload's floor
    (weights once per step + every cached token's K/V once per step).
(c) prefill: Llama-3.1-8B shapes, 8 x 2048-token prompts in one step: TFLOP/s vs a large
    bf16 matmul.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from kvserve import LLM, SamplingParams

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
CONFIGS = {
    "Llama-3.2-1B": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                         rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, torch_dtype="bfloat16"),
    "Llama-3.1-8B": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
                         rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, torch_dtype="bfloat16"),
    "Qwen3-0.6B": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0,
                       max_position_embeddings=40960, rms_norm_eps=1e-6, torch_dtype="bfloat16"),
}
RESULTS: dict[str, object] = {}


def log(msg: str) -> None:
    print(msg, flush=True)


def model_folder(name: str, root: Path) -> str:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONFIGS[name]))
    return str(folder)


def bench(fn, reps: int = 20) -> float:
    """Median seconds of fn() (CUDA events)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def gemv_read_bw(n: int, k: int, reps: int = 50, triton_gemv: bool = False) -> float:
    """Read bandwidth (B/s) of a bf16 [1, k] x [n, k]^T product (cuBLAS, or kvserve's Triton
    GEMV), two weights alternated, timed back to back."""
    from kvserve.models import triton_ops

    w = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    i = [0]

    def gemv() -> None:
        i[0] ^= 1
        if triton_gemv:
            triton_ops.gemv(x, w[i[0]])
        else:
            x @ w[i[0]].t()
    return n * k * 2 / events_time(gemv, reps)


def events_time(fn, reps: int = 50) -> float:
    """Median seconds of fn() over `reps` calls, timed with CUDA events in groups of 10 back to
    back (no idle gap between launches)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(max(1, reps // 10)):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(10):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / 10)
    return statistics.median(times)


# Large GEMVs (512 MiB - 1 GiB each): the ceiling is the best of them (cuBLAS and Triton). cuBLAS picks a different
# kernel per shape, and on an H100 the square one read only 2.2-2.6 TB/s where an lm_head-shaped
# one read 2.76 (2026-11-27), so one shape alone would understate the card.
CEILING_GEMVS = ((16384, 16384), (131072, 4096), (128256, 4096), (65536, 8192))


def ceilings() -> tuple[float, float]:
    """(GEMV read bandwidth B/s, bf16 matmul FLOP/s), random data."""
    per_shape = {f"cuBLAS {n}x{k}": gemv_read_bw(n, k) for n, k in CEILING_GEMVS}
    # kvserve's own GEMV reads faster than cuBLAS on an H100: the ceiling takes the best of both.
    per_shape.update({f"Triton {n}x{k}": gemv_read_bw(n, k, triton_gemv=True) for n, k in CEILING_GEMVS[1:3]})
    RESULTS["ceiling_gemvs_GBps"] = {k: v / 1e9 for k, v in per_shape.items()}
    bw = max(per_shape.values())
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    flops = 2 * 8192**3 / bench(lambda: a @ b, 20)
    return bw, flops


def weight_read_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: all parameters, but an untied embedding table
    only for its looked-up rows (negligible)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.embed_tokens.weight
    tied = model.lm_head.weight is emb
    return total if tied else total - emb.numel() * emb.element_size()


def kv_bytes_per_token(cfg) -> int:
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2


# -- (a) batch-1 decode ---------------------------------------------------------------------
def kvserve_decode(llm: LLM, prompt_len: int = 128, new: int = 256, reps: int = 3) -> float:
    """Median seconds per output token after the first (decode only)."""
    eng = llm.engine
    rng = random.Random(0)
    sp = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    eng.add_request("warm", [rng.randrange(10000) for _ in range(prompt_len)], SamplingParams(max_tokens=16, ignore_eos=True))
    while eng.has_unfinished_requests():
        eng.step()
    per_tok = []
    for r in range(reps):
        eng.add_request(f"r{r}", [rng.randrange(10000) for _ in range(prompt_len)], sp)
        first = None
        while eng.has_unfinished_requests():
            eng.step()
            if first is None:
                first = time.perf_counter()
        per_tok.append((time.perf_counter() - first) / (new - 1))
    return statistics.median(per_tok)


class CompiledDecoder(torch.nn.Module):
    """gpt-fast-style single-stream Llama decoder: static KV cache, one token per call,
    torch.compile(mode='reduce-overhead'). Shares kvserve's (fused) weights."""

    def __init__(self, model: torch.nn.Module, max_seq: int) -> None:
        super().__init__()
        cfg = model.config
        self.cfg, self.model = cfg, model
        shape = (cfg.num_layers, 1, cfg.num_kv_heads, max_seq, cfg.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=torch.bfloat16, device="cuda"))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=torch.bfloat16, device="cuda"))
        pos = torch.arange(max_seq, device="cuda", dtype=torch.float32)
        freqs = pos[:, None] * model.rotary.inv_freq[None, :].float()
        self.register_buffer("cos", torch.cat([freqs.cos()] * 2, -1).to(torch.bfloat16))
        self.register_buffer("sin", torch.cat([freqs.sin()] * 2, -1).to(torch.bfloat16))
        self.register_buffer("causal", torch.ones(max_seq, max_seq, dtype=torch.bool, device="cuda").tril())

    @staticmethod
    def _norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin

    def forward(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # tok, pos: [1]
        cfg, m = self.cfg, self.model
        hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h = F.embedding(tok, m.embed_tokens.weight)  # [1, H]
        cos, sin = self.cos[pos], self.sin[pos]  # [1, D]
        mask = self.causal[pos][None, None]  # [1, 1, 1, S]
        for i, layer in enumerate(m.layers):
            a = layer.self_attn
            x = self._norm(h, layer.input_layernorm.weight, cfg.norm_eps)
            q, k, v = F.linear(x, a.qkv_proj.weight).split([hq * d, hkv * d, hkv * d], -1)
            q = self._rope(q.view(1, hq, d), cos, sin)
            k = self._rope(k.view(1, hkv, d), cos, sin)
            self.k_cache[i].index_copy_(2, pos, k.view(1, hkv, 1, d))
            self.v_cache[i].index_copy_(2, pos, v.view(1, hkv, 1, d))
            o = F.scaled_dot_product_attention(q.view(1, hq, 1, d), self.k_cache[i], self.v_cache[i],
                                               attn_mask=mask, enable_gqa=True)
            h = h + F.linear(o.reshape(1, hq * d), a.o_proj.weight)
            x = self._norm(h, layer.post_attention_layernorm.weight, cfg.norm_eps)
            g, u = F.linear(x, layer.mlp.gate_up_proj.weight).chunk(2, -1)
            h = h + F.linear(F.silu(g) * u, layer.mlp.down_proj.weight)
        logits = F.linear(self._norm(h, m.norm.weight, cfg.norm_eps), m.lm_head.weight)
        return logits.argmax(-1)  # [1]


def compiled_decode(model: torch.nn.Module, prompt_len: int = 128, new: int = 256) -> tuple[float, float]:
    """(seconds per token, compile seconds)."""
    dec = CompiledDecoder(model, 1024)
    step = torch.compile(dec, mode="reduce-overhead", fullgraph=True)
    tok = torch.tensor([1], device="cuda")
    t0 = time.perf_counter()
    with torch.inference_mode():
        for p in range(3):  # compile + cudagraph warm-up
            step(tok, torch.tensor([p], device="cuda")).clone()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        for p in range(prompt_len):  # "prefill" token by token (not timed)
            tok = step(tok, torch.tensor([p], device="cuda")).clone()
        positions = [torch.tensor([p], device="cuda") for p in range(prompt_len, prompt_len + new)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for p in positions:
            tok = step(tok, p).clone()
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / new, compile_s


def section_decode(root: Path, bw: float, compiled: bool, prefill_too: bool, flops_peak: float) -> None:
    for name in ("Llama-3.2-1B", "Llama-3.1-8B"):
        big = name == "Llama-3.1-8B"
        llm = LLM(model_folder(name, root), load_format="dummy", max_model_len=4096, max_num_seqs=8,
                  max_num_batched_tokens=16384 if big and prefill_too else 2048,
                  enable_prefix_caching=False, gpu_memory_utilization=0.6)
        model = llm.engine.runner.model
        cfg = llm.engine.model_config
        wbytes = weight_read_bytes(model)
        kv = kv_bytes_per_token(cfg) * (128 + 128)  # mean context over the 256 steps
        floor = (wbytes + kv) / bw
        # The floor against the best large cuBLAS GEMV alone (the previous definition).
        bw_cublas = max(v for k, v in RESULTS.get("ceiling_gemvs_GBps", {}).items() if k.startswith("cuBLAS")) * 1e9
        floor_cb = (wbytes + kv) / bw_cublas
        s = kvserve_decode(llm)
        row = {"weight_GB": wbytes / 1e9, "floor_ms": floor * 1e3, "kvserve_ms": s * 1e3,
               "kvserve_pct_bw": 100 * floor / s, "floor_cublas_ms": floor_cb * 1e3,
               "kvserve_pct_cublas_bw": 100 * floor_cb / s}
        log(f"[decode] {name}: kvserve {s * 1e3:.3f} ms/tok, floor {floor * 1e3:.3f} ms -> {100 * floor / s:.1f}% of "
            f"the best GEMV bw ({100 * floor_cb / s:.1f}% of cuBLAS's, floor {floor_cb * 1e3:.3f} ms)")
        if compiled:
            try:
                c, cs = compiled_decode(model)
                row.update(compiled_ms=c * 1e3, compiled_pct_bw=100 * floor / c, compiled_pct_cublas_bw=100 * floor_cb / c,
                           compile_s=cs)
                log(f"[decode] {name}: compiled baseline {c * 1e3:.3f} ms/tok ({100 * floor / c:.1f}%; "
                    f"{100 * floor_cb / c:.1f}% of cuBLAS's), compile {cs:.0f}s")
            except Exception:
                traceback.print_exc()
        RESULTS[f"decode/{name}"] = row
        if big and prefill_too:
            section_prefill(llm, flops_peak)
        del llm, model
        gc.collect()  # the engine holds reference cycles (runner <-> graphs)
        torch.cuda.empty_cache()


# -- (c) prefill ----------------------------------------------------------------------------
def section_prefill(llm: LLM, peak: float, n: int = 8, length: int = 2048) -> None:
    eng = llm.engine
    cfg = eng.model_config
    rng = random.Random(1)
    sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    times = []
    for r in range(4):
        for i in range(n):
            eng.add_request(f"p{r}-{i}", [rng.randrange(10000) for _ in range(length)], sp)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        eng.step()  # one step: all 8 x 2048 tokens (budget 16384), then 8 sampled ids read back
        times.append(time.perf_counter() - t0)
        assert not eng.has_unfinished_requests()
    t = statistics.median(times[1:])
    m = eng.runner.model
    lin = sum(p.numel() for name, p in m.named_parameters() if p.dim() == 2 and "embed" not in name and "lm_head" not in name)
    tokens = n * length
    attn = cfg.num_layers * cfg.num_heads * n * 4 * cfg.head_dim * length * (length + 1) / 2  # causal QK^T + PV
    flops = 2 * lin * tokens + attn + 2 * n * cfg.hidden_size * cfg.vocab_size
    RESULTS["prefill/Llama-3.1-8B"] = {"s": t, "TFLOPs": flops / t / 1e12, "pct_matmul": 100 * flops / t / peak}
    log(f"[prefill] 8x2048 Llama-3.1-8B: {t * 1e3:.1f} ms, {flops / t / 1e12:.0f} TFLOP/s = {100 * flops / t / peak:.1f}% of matmul")


# -- (b) offline throughput -----------------------------------------------------------------
def workload(n: int = 256, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(10000) for _ in range(rng.randint(100, 1024))] for _ in range(n)]
    outs = [rng.randint(100, 1024) for _ in range(n)]
    return prompts, outs


def triton_variants() -> dict[str, int]:
    """Compiled variants of each kvserve Triton kernel in this process."""
    from kvserve.attention.triton import decode, kv_write, prefill
    from kvserve.models import triton_ops

    fns = {"decode": decode._decode_kernel, "decode_reduce": decode._decode_reduce_kernel,
           "prefill": prefill._prefill_kernel, "kv_write": kv_write._write_kv_kernel,
           "rmsnorm": triton_ops._rmsnorm_kernel, "silu_mul": triton_ops._silu_mul_kernel,
           "rope": triton_ops._rope_qk_kernel}
    return {k: sum(len(c[0]) for c in f.device_caches.values()) for k, f in fns.items()}


def run_workload(llm: LLM, prompts: list[list[int]], outs: list[int]) -> tuple[float, int, int]:
    """(seconds, output tokens, engine steps) of one generate() over the workload."""
    eng = llm.engine
    sps = [SamplingParams(max_tokens=o, temperature=0.6, ignore_eos=True) for o in outs]
    steps = [0]
    orig = eng.step

    def counted():
        steps[0] += 1
        return orig()
    eng.step = counted
    t0 = time.perf_counter()
    res = llm.generate([{"prompt_token_ids": p} for p in prompts], sps, use_tqdm=False)
    dt = time.perf_counter() - t0
    eng.step = orig
    n_out = sum(len(r.outputs[0].token_ids) for r in res)
    assert n_out == sum(outs)
    return dt, n_out, steps[0]


def section_throughput(root: Path, bw: float, hf: int) -> None:
    """No warm-up workload: the engine compiles its kernels at start-up (runner/warmup.py), so
    the first run is the number; a second run on the same engine shows the warm speed. Run the
    benchmark with TRITON_CACHE_DIR pointing at an empty folder to measure a cold start."""
    name = "Qwen3-0.6B"
    folder = model_folder(name, root)
    before = triton_variants()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    llm = LLM(folder, load_format="dummy", max_model_len=4096, gpu_memory_utilization=0.9)
    startup = time.perf_counter() - t0
    at_start = triton_variants()
    eng = llm.engine
    prompts, outs = workload()
    dt, n_out, steps = run_workload(llm, prompts, outs)
    after_first = triton_variants()
    graph_steps = eng.runner.num_graph_steps
    dt2, _, steps2 = run_workload(llm, prompts, outs)
    cfg = eng.model_config
    # Floor: every step reads the weights once; each decode step reads each running request's
    # cached K/V once (all 256 requests fit the cache together, so all start at once).
    kvb = kv_bytes_per_token(cfg)
    kv_read = sum(kvb * (p_len + s) for p_len, o in zip(map(len, prompts), outs) for s in range(1, o))
    wb = weight_read_bytes(eng.runner.model)
    floor = (kv_read + wb * steps) / bw
    runner = eng.runner
    row = {"startup_s": startup, "warmup_s": runner.warmup_s,
           "capture_s": runner.graphs.capture_s if runner.graphs is not None else 0.0, "s": dt, "out_tok_s": n_out / dt, "second_run_s": dt2,
           "second_run_tok_s": n_out / dt2, "steps": steps, "second_run_steps": steps2,
           "floor_s": floor, "floor_tok_s": n_out / floor, "kv_read_GB": kv_read / 1e9,
           "weights_read_GB": wb * steps / 1e9, "graph_steps": graph_steps,
           "kv_blocks": eng.cache_config.num_blocks, "preemptions": eng.stats()["num_preemptions"],
           "triton_cache_dir": os.environ.get("TRITON_CACHE_DIR", "default"),
           "variants_before": before, "variants_after_startup": at_start, "variants_after_run": after_first}
    RESULTS[f"throughput/{name}"] = row
    log(f"[throughput] {name}: startup {startup:.1f}s (kernel warm-up {row['warmup_s']:.1f}s, graph capture "
        f"{row['capture_s']:.1f}s; TRITON_CACHE_DIR={row['triton_cache_dir']}); "
        f"first run {n_out} tokens in {dt:.2f}s = {n_out / dt:.0f} out tok/s over {steps} steps "
        f"({graph_steps} graphed); second run {dt2:.2f}s = {n_out / dt2:.0f} tok/s; floor {floor:.2f}s = "
        f"{n_out / floor:.0f} tok/s (KV {kv_read / 1e9:.0f} GB + weights {wb * steps / 1e9:.0f} GB)")
    log(f"[throughput] Triton variants: at start-up {at_start}; new during the first run: "
        f"{ {k: after_first[k] - at_start[k] for k in at_start if after_first[k] != at_start[k]} }")
    if hf:
        sub_p, sub_o = prompts[:hf], outs[:hf]
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in sub_p],
                     [SamplingParams(max_tokens=o, temperature=0.6, ignore_eos=True) for o in sub_o], use_tqdm=False)
        kd = time.perf_counter() - t0
        log(f"[throughput] kvserve on the first {hf} requests: {sum(sub_o) / kd:.0f} out tok/s")
        RESULTS[f"throughput/{name}/subset{hf}"] = {"kvserve_tok_s": sum(sub_o) / kd}
    del llm, eng
    gc.collect()
    torch.cuda.empty_cache()


def hf_generate_batch(folder: str, prompts: list[list[int]], outs: list[int], limit_s: float, out: str) -> None:
    """HF transformers continuous batching (paged|sdpa) on the workload, for at most `limit_s`
    seconds after the requests are queued; progress is logged and saved every ~10 s, so a run
    killed from outside still leaves its partial numbers. Does not wait for the manager to stop
    (in transformers 5.17 it has hung), so call it last."""
    import transformers as tf

    cfg = tf.AutoConfig.from_pretrained(folder)
    with torch.device("cuda"):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="paged|sdpa").eval()
    gen = tf.GenerationConfig(max_new_tokens=max(outs), eos_token_id=-1, do_sample=False, pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=gen)
    manager.start()
    t0 = time.perf_counter()
    for i, (p, o) in enumerate(zip(prompts, outs)):
        manager.add_request(p, request_id=f"h{i}", max_new_tokens=o)
    log(f"[hf] transformers {tf.__version__}: {len(prompts)} requests queued in {time.perf_counter() - t0:.1f}s")
    done, n_out, deadline, next_log = 0, 0, t0 + limit_s, t0 + 10
    while done < len(prompts) and time.perf_counter() < deadline:
        r = manager.get_result(timeout=1)
        if r is not None and r.is_finished():
            done += 1
            n_out += len(r.generated_tokens)
        if time.perf_counter() >= next_log or done == len(prompts):
            next_log += 10
            dt = time.perf_counter() - t0
            RESULTS["throughput/hf_generate_batch"] = {
                "transformers": tf.__version__, "requests": len(prompts), "requests_done": done,
                "finished_out_tokens": n_out, "s": dt, "finished_tok_s": n_out / dt,
                "completed": done == len(prompts)}
            Path(out, "hf_generate_batch.json").write_text(json.dumps(RESULTS, indent=1))
            log(f"[hf] {dt:.0f}s: {done}/{len(prompts)} requests finished, {n_out} tokens "
                f"({n_out / dt:.0f} tok/s counting finished requests only)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="decode,prefill,throughput")
    ap.add_argument("--no-compiled", action="store_true")
    ap.add_argument("--hf", type=int, default=0, help="also time kvserve on the first N requests alone")
    ap.add_argument("--hf-only", type=int, default=0,
                    help="only run HF generate_batch on the first N requests of the workload, then exit")
    ap.add_argument("--hf-limit", type=float, default=100.0, help="seconds HF may run (--hf-only)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if args.hf_only:
        with tempfile.TemporaryDirectory() as tmp:
            prompts, outs = workload()
            hf_generate_batch(model_folder("Qwen3-0.6B", Path(tmp)), prompts[: args.hf_only],
                              outs[: args.hf_only], args.hf_limit, args.out)
        log(json.dumps(RESULTS, indent=1))
        os._exit(0)  # the manager's threads may not stop
    import triton

    props = torch.cuda.get_device_properties(0)
    log(f"card: {props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs); "
        f"torch {torch.__version__}, triton {triton.__version__}")
    bw, peak = ceilings()
    RESULTS["ceilings"] = {"gemv_GBps": bw / 1e9, "matmul_TFLOPs": peak / 1e12, "card": props.name}
    log(f"ceilings: bf16 GEMV read {bw / 1e9:.0f} GB/s (best of {RESULTS['ceiling_gemvs_GBps']}), "
        f"bf16 matmul {peak / 1e12:.0f} TFLOP/s")
    only = set(args.only.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for key, fn in (
            ("decode", lambda: section_decode(root, bw, not args.no_compiled, "prefill" in only, peak)),
            ("throughput", lambda: section_throughput(root, bw, args.hf)),
        ):
            if key in only or (key == "decode" and "prefill" in only) or (key == "throughput" and args.hf):
                try:
                    fn()
                except Exception:
                    traceback.print_exc()
                Path(args.out, "gpu_bench.json").write_text(json.dumps(RESULTS, indent=1))
    log(json.dumps(RESULTS, indent=1))


if __name__ == "__main__":
    main()
