"""Tensor parallelism on CPU with gloo: TP=2 equals TP=1, bad sizes are refused, and a rank
that dies (at start-up or mid-run) ends the run with a clear error within seconds.

Each TP=2 engine spawns one worker process (a few seconds of start-up on two cores), so the
tests share engines where they can. Failure tests run the engine in a subprocess with a
timeout, so a regression shows up as a failed test, never as a hung suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.distributed import parallel_state as ps
from kvserve.distributed.launch import FAIL_AT_START_ENV

COMMON = dict(device="cpu", dtype="float32", num_kv_blocks=48, max_model_len=128, max_num_batched_tokens=32)
PROMPTS = [
    {"prompt_token_ids": [5, 6, 7, 8, 9, 10]},
    {"prompt_token_ids": list(range(20, 60))},  # 40 tokens: chunked over two steps (budget 32)
    {"prompt_token_ids": [300, 301, 302]},
]
SUBPROCESS_TIMEOUT = 120


def _params() -> list[SamplingParams]:
    greedy = dict(max_tokens=6, temperature=0.0, ignore_eos=True)
    return [
        SamplingParams(**greedy, logprobs=3),
        SamplingParams(**greedy, prompt_logprobs=2),
        SamplingParams(max_tokens=6, temperature=0.8, seed=7, ignore_eos=True),  # seeded random
    ]


def _run(llm: LLM):
    outs = llm.generate(PROMPTS, _params(), use_tqdm=False)
    return [
        (
            o.outputs[0].token_ids,
            [{t: lp.logprob for t, lp in d.items()} for d in o.outputs[0].logprobs or []],
            [{t: lp.logprob for t, lp in d.items()} if d else None for d in o.prompt_logprobs or []],
        )
        for o in outs
    ]


def _assert_same(got, want) -> None:
    for (g_ids, g_lp, g_plp), (w_ids, w_lp, w_plp) in zip(got, want):
        assert g_ids == w_ids
        for gl, wl in zip(g_lp + [d for d in g_plp if d], w_lp + [d for d in w_plp if d]):
            assert gl.keys() == wl.keys()
            for t in gl:
                assert gl[t] == pytest.approx(wl[t], abs=1e-4)
        assert len(g_lp) == len(w_lp) and len(g_plp) == len(w_plp)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "llama_kv1"])
def test_tp2_matches_tp1(tiny_model_factory, arch):
    """Greedy tokens, sampled logprobs and prompt logprobs; llama_kv1 has one KV head, so both
    ranks hold a replica of it."""
    folder, _ = tiny_model_factory(arch)
    want = _run(LLM(str(folder), **COMMON))
    llm = LLM(str(folder), tensor_parallel_size=2, **COMMON)
    try:
        assert llm.engine.tp_group.size == 2 and ps.get_tp().size == 2
        model = llm.engine.runner.model
        cfg = llm.engine.model_config
        # This rank holds half the query heads, its KV heads, half the vocabulary.
        attn = model.layers[0].self_attn
        assert attn.num_heads == cfg.num_heads // 2
        assert attn.num_kv_heads == max(1, cfg.num_kv_heads // 2)
        assert model.embed_tokens.weight.shape[0] == -(-cfg.vocab_size // 2)
        assert llm.engine.runner.kv_caches[0].shape[3] == attn.num_kv_heads
        got = _run(llm)
        _assert_same(got, want)
    finally:
        llm.engine.shutdown()
    assert ps.get_tp().size == 1  # the process is back to a single rank
    # Seeded random sampling is also identical (rank 0 samples from the same logits).
    assert got[2][0] == want[2][0]


def test_tp2_async_scheduling_matches_tp1(tiny_model_factory):
    """Asynchronous scheduling forced on: rank 0 launches decode step N+1 before N's ids are
    back, and the worker feeds it from the ids rank 0 broadcast on the device. Same tokens and
    logprobs as a synchronous single rank, across ahead steps, fall-backs (chunked prompts, a
    request ending mid-flight on a stop token) and a second batch on the same engine."""
    folder, _ = tiny_model_factory("llama")
    params = [
        SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True, logprobs=3),
        SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, prompt_logprobs=2),
        SamplingParams(max_tokens=14, temperature=0.8, seed=7, ignore_eos=True),
    ]

    def run(llm, ps_):
        outs = llm.generate(PROMPTS, ps_, use_tqdm=False)
        return [
            (o.outputs[0].token_ids,
             [{t: lp.logprob for t, lp in d.items()} for d in o.outputs[0].logprobs or []],
             [{t: lp.logprob for t, lp in d.items()} if d else None for d in o.prompt_logprobs or []])
            for o in outs
        ]

    tp1 = LLM(str(folder), **COMMON)
    want = run(tp1, params)
    stop = want[0][0][4]  # request 0 stops at its 5th token, with an ahead step in flight
    stopping = [SamplingParams(max_tokens=14, temperature=0.0, stop_token_ids=[stop], logprobs=1)] + params[1:]
    want_stop = run(tp1, stopping)
    # Greedy only: while the penalised request runs rank 0 broadcasts its ids; after it ends
    # every step is plain greedy and each rank takes the argmax itself (no broadcast).
    greedy = [
        SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True, logprobs=2),
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, repetition_penalty=1.5),
    ]
    want_greedy = run(tp1, greedy)
    llm = LLM(str(folder), tensor_parallel_size=2, async_scheduling=True, **COMMON)
    try:
        got = run(llm, params)
        ahead = llm.engine.num_ahead_steps
        got_stop = run(llm, stopping)
        got_greedy = run(llm, greedy)
    finally:
        llm.engine.shutdown()
    _assert_same(got, want)
    _assert_same(got_stop, want_stop)
    _assert_same(got_greedy, want_greedy)
    assert got[2][0] == want[2][0]  # seeded random: rank 0 samples from the same logits
    assert ahead > 5 and llm.engine.num_ahead_steps > ahead


def test_tp2_bf16_cpu_prepacks(tiny_model_factory):
    """bf16 on CPU: the local shards are Linears like any other, so oneDNN prepacking still applies."""
    from kvserve.platform.cpu_linear import onednn_bf16_supported

    if not onednn_bf16_supported():
        pytest.skip("no oneDNN bf16 prepacking on this CPU")
    folder, _ = tiny_model_factory("llama")
    llm = LLM(str(folder), tensor_parallel_size=2, **{**COMMON, "dtype": "bfloat16"})
    try:
        assert llm.engine.runner.model.layers[0].self_attn.o_proj.packed_weight is not None
        out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 4
    finally:
        llm.engine.shutdown()


def test_bad_tensor_parallel_size(tiny_model_factory, monkeypatch):
    folder, _ = tiny_model_factory("llama")  # 4 heads, 2 KV heads
    with pytest.raises(ValueError, match="tensor_parallel_size=3 must divide the number of attention heads"):
        LLM(str(folder), tensor_parallel_size=3, **COMMON)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM(str(folder), tensor_parallel_size=0, **COMMON)
    with pytest.raises(ValueError, match="max_model_len=4096 exceeds"):  # checked before ranks start
        LLM(str(folder), tensor_parallel_size=2, **{**COMMON, "max_model_len": 4096})
    gpt2, _ = tiny_model_factory("gpt2")
    with pytest.raises(ValueError, match="tensor_parallel_size=2.*Llama family"):
        LLM(str(gpt2), tensor_parallel_size=2, **COMMON)
    # Too few GPUs: refused before any process starts.
    args = {**COMMON, "device": "cuda"}
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="tensor_parallel_size=2.*CUDA is not available"):
            LLM(str(folder), tensor_parallel_size=2, **args)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="tensor_parallel_size=2 needs 2 CUDA GPUs on this machine, found 1"):
        LLM(str(folder), tensor_parallel_size=2, **args)
    assert ps.get_tp().size == 1


_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from kvserve import LLM, SamplingParams
    from kvserve.distributed.launch import RankFailedError

    folder, mode = sys.argv[1], sys.argv[2]
    args = json.loads(sys.argv[3])
    t0 = time.monotonic()
    try:
        llm = LLM(folder, tensor_parallel_size=2, **args)
        sp = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
        prompts = [{"prompt_token_ids": [5 + i, 6, 7]} for i in range(4)]
        pid = llm.engine.tp_group.worker_pids[1]
        if mode == "kill-stuck-close":  # the shutdown after the failure blocks (as on a GPU
            llm.engine.tp_group.before_destroy.insert(0, lambda: time.sleep(120))  # kernel spinning on the dead peer)
        for i, out in enumerate(llm.generate_stream(prompts, sp)):
            if i == 3:  # mid-run: rank 1 is killed between two steps of a running batch
                t0 = time.monotonic()
                print("KILLED", t0, flush=True)
                os.kill(pid, signal.SIGKILL)
        print("RESULT no error")
    except RankFailedError as e:
        print("RESULT", json.dumps({"error": str(e), "seconds": time.monotonic() - t0}))
    """
)


def _run_script(folder, mode: str, env: dict[str, str] | None = None, args: dict | None = None) -> dict:
    """Run _SCRIPT in a subprocess; returns the error rank 0 reported and how long it took."""
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(folder), mode, json.dumps(args or COMMON)],
        capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, env={**os.environ, **(env or {})},
    )
    end = time.monotonic()
    lines = proc.stdout.splitlines()
    line = next((x for x in lines if x.startswith("RESULT ")), None)
    fatal = [x for x in proc.stderr.splitlines() if x.startswith("kvserve: fatal:")]
    if line is None and fatal:  # NCCL last resort: the process ended itself with the error
        killed = next(float(x.split()[1]) for x in lines if x.startswith("KILLED "))
        return {"error": "\n".join(fatal), "seconds": end - killed, "total": end - t0, "stderr": proc.stderr}
    assert line is not None, f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    assert line != "RESULT no error", proc.stderr[-4000:]
    result = json.loads(line[len("RESULT "):])
    result["total"] = end - t0
    result["stderr"] = proc.stderr
    return result


def test_killed_rank_fails_fast(tiny_model_factory):
    folder, _ = tiny_model_factory("llama")
    r = _run_script(folder, "kill")
    assert "tensor-parallel rank 1" in r["error"] and "killed by signal 9" in r["error"], r["error"]
    assert r["seconds"] < 10, r  # from the kill to the error


def test_killed_rank_with_stuck_shutdown_still_ends(tiny_model_factory):
    """On CUDA the shutdown that follows a rank's death can block for good (it waits for the
    GPU, where a kernel may spin on the dead peer): the exit deadline must cover it, ending
    the process with the error instead of hanging."""
    folder, _ = tiny_model_factory("llama")
    r = _run_script(folder, "kill-stuck-close")
    assert "tensor-parallel rank 1" in r["error"] and "killed by signal 9" in r["error"], r["error"]
    assert "kvserve: fatal:" in r["error"]  # the last resort, not a clean raise
    assert r["seconds"] < 20, r


def test_startup_error_on_rank1_surfaces_on_rank0(tiny_model_factory):
    folder, _ = tiny_model_factory("llama")
    r = _run_script(folder, "start", env={FAIL_AT_START_ENV: "1"})
    assert "tensor-parallel rank 1" in r["error"], r["error"]
    assert "injected start-up failure on rank 1" in r["error"], r["error"]  # the worker's traceback
    assert "Traceback" in r["error"]
    assert r["total"] < 60, r


def _cli_generate(folder, *extra: str, torchrun: bool = False) -> str:
    args = [
        "generate", "Hello world", "--model", str(folder), "--device", "cpu", "--dtype", "float32",
        "--max-tokens", "6", "--kv-cache-memory-gib", "0.01", "--max-model-len", "128", *extra,
    ]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "kvserve", *args, "--tensor-parallel-size", "2"]
    else:
        cmd = [sys.executable, "-m", "kvserve", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, env=env)
    assert proc.returncode == 0, f"{cmd}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_torchrun_cli_matches_tp1(tiny_model_factory):
    """The multi-machine path on one machine: torchrun starts both ranks, each runs the CLI;
    rank 0 prints the text, rank 1 serves it and exits cleanly."""
    folder, _ = tiny_model_factory("llama")
    want = _cli_generate(folder)
    got = _cli_generate(folder, torchrun=True)
    assert want.strip()
    assert got == want


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_K"])
def test_tp2_ggml_quantized_gguf_matches_tp1(tmp_path, fmt):
    """A GGUF kept quantized, split over 2 gloo ranks: column shards are rows of blocks; row
    shards split the blocks of each row (Q8_0: whole blocks per rank, the same int8 products
    summed in another order) or, where a shard boundary falls inside a block (Q4_K: 256-value
    blocks, 128 columns per rank), are dequantized for that layer. Both give TP=1's tokens."""
    from kvserve.models.linear import Linear
    from tests.models.test_ggml_quantized import _write

    path = _write(tmp_path / f"tp-{fmt}.gguf", fmt)
    kw = dict(device="cpu", num_kv_blocks=48, max_model_len=128, max_num_batched_tokens=32)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=1)
    want = LLM(str(path), **kw).generate(PROMPTS[:2], params, use_tqdm=False)
    llm = LLM(str(path), tensor_parallel_size=2, **kw)
    try:
        model = llm.engine.runner.model
        qkv = model.layers[0].self_attn.qkv_proj
        assert isinstance(qkv, Linear) and all(p.qtype > 0 for p in qkv.parts)  # still blocks on rank 0
        got = llm.generate(PROMPTS[:2], params, use_tqdm=False)
    finally:
        llm.engine.shutdown()
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for gl, wl, t in zip(g.outputs[0].logprobs, w.outputs[0].logprobs, g.outputs[0].token_ids):
            assert abs(gl[t].logprob - wl[t].logprob) < 0.05
