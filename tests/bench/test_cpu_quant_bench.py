"""benchmarks/cpu_quant_bench.py: the pure parts (arguments, seeded workloads, machine flags,
medians, ratios, the Markdown table) without torch or a model; the llama.cpp batched peer
against its own one-sequence greedy output when llama-cpp-python is installed (slow)."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cpu_quant_bench.py"


@pytest.fixture(scope="module")
def cq():
    spec = importlib.util.spec_from_file_location("cpu_quant_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["cpu_quant_bench"] = mod  # dataclasses look their module up by name
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("cpu_quant_bench", None)


def test_import_stays_light():
    import subprocess

    code = (f"import importlib.util, sys; s = importlib.util.spec_from_file_location('m', {str(SCRIPT)!r}); "
            "m = importlib.util.module_from_spec(s); sys.modules['m'] = m; s.loader.exec_module(m); "
            "m.parse_args([]); m.throughput_requests(m.Sizes(), 0, 49152); "
            "print(sorted(k for k in ('torch', 'llama_cpp', 'transformers') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_llamacpp_peer_module_does_not_import_torch():
    """The llama.cpp worker's peak RSS must not carry torch (kvserve.bench.peers imports it lazily)."""
    import subprocess

    code = "import sys, kvserve.bench.peers, kvserve.loader.resolve; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


def test_defaults(cq):
    a = cq.parse_args([])
    assert a.engines == ["kvserve", "llama.cpp", "hf"]
    assert a.measures == ["decode", "throughput", "prefill", "memory"]
    assert (a.dtype, a.hf_dtype, a.rounds, a.threads, a.quick, a.kvserve_env) == ("auto", "auto", 2, 2, False, {})
    assert a.llamacpp_flash_attn == "on" and a.llamacpp_kv_unified == "off" and a.kvserve_kv_cache_mib is None


def test_engine_aliases_measures_and_env(cq):
    a = cq.parse_args(["--engines", "llamacpp, HF,kvserve,hf", "--measures", "memory,decode", "--rounds", "3",
                       "--kvserve-env", "KVSERVE_CPU_ISA=avx2", "--kvserve-env", "X_Y=a=b", "--quick",
                       "--json", "o.json", "--threads", "1", "--dtype", "float32"])
    assert a.engines == ["llama.cpp", "hf", "kvserve"]  # order kept, duplicates dropped
    assert a.measures == ["memory", "decode"]
    assert a.kvserve_env == {"KVSERVE_CPU_ISA": "avx2", "X_Y": "a=b"}
    assert (a.rounds, a.threads, a.quick, a.json, a.dtype) == (3, 1, True, "o.json", "float32")


@pytest.mark.parametrize("argv", [["--engines", "vllm"], ["--measures", "latency"], ["--engines", ","],
                                  ["--rounds", "0"], ["--threads", "0"], ["--kvserve-env", "NOEQUALS"],
                                  ["--kvserve-env", "=x"], ["--kvserve-env", "1A=x"], ["--hf-dtype", "float16"],
                                  ["--llamacpp-kv-unified", "maybe"], ["--kvserve-kv-cache-mib", "0"]])
def test_bad_arguments_exit(cq, argv, capsys):
    with pytest.raises(SystemExit) as e:
        cq.parse_args(argv)
    assert e.value.code == 2


def test_throughput_workload_is_seeded_and_in_range(cq):
    s = cq.Sizes()
    reqs = cq.throughput_requests(s, 0, 49152)
    assert len(reqs) == 32
    assert all(64 <= len(r.prompt) <= 512 and 32 <= r.output_len <= 256 for r in reqs)
    assert all(100 <= t < 49152 for r in reqs for t in r.prompt)
    assert reqs == cq.throughput_requests(s, 0, 49152)
    assert reqs != cq.throughput_requests(s, 1, 49152)
    # lengths spread over the range, not one fixed value
    assert len({len(r.prompt) for r in reqs}) > 20 and len({r.output_len for r in reqs}) > 20


def test_quick_sizes_are_small(cq):
    q = cq.QUICK
    reqs = cq.throughput_requests(q, 0, 1000)
    assert len(reqs) == q.num_requests and all(len(r.prompt) <= q.prompt_max for r in reqs)
    assert q.decode_new < cq.Sizes().decode_new and q.prefill_len < cq.Sizes().prefill_len


def test_decode_and_prefill_prompts(cq):
    s = cq.Sizes()
    d = cq.decode_prompts(s, 0, 49152)
    p = cq.prefill_prompts(s, 0, 49152)
    assert len(d) == s.decode_repeats + 1 and all(len(x) == 32 for x in d)
    assert len(p) == s.prefill_repeats + 1 and all(len(x) == 512 for x in p)
    assert len({tuple(x) for x in p}) == len(p)  # each repeat its own prompt: no prefix-cache hits
    assert len({x[0] for x in p}) == len(p)
    assert d == cq.decode_prompts(s, 0, 49152) and p == cq.prefill_prompts(s, 0, 49152)


def test_isa_flags(cq):
    info = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx2 fma avx512f avx512_bf16 amx_tile\n"
    f = cq.isa_flags(info)
    assert f["avx2"] and f["avx512f"] and f["avx512_bf16"] and f["amx_tile"]
    assert not f["avx512_vnni"] and not f["amx_bf16"]
    assert not any(cq.isa_flags("no flags here").values())
    m = {"cpu": "AMD EPYC", "cores": 2, "isa": cq.isa_flags("flags : avx2 fma"), "versions": {"python": "3.11"},
         "commit": "abc"}
    line = cq.machine_line(m, 2)
    assert "AMD EPYC" in line and "avx2" in line and "no-avx512f" in line and "no-avx512_bf16" in line
    assert "commit abc" in line


def test_load_summary(cq):
    assert cq.load_summary([], 2) == {"samples": 0}
    s = cq.load_summary([1.0, 3.0, 2.0], 2)
    assert (s["min"], s["max"], s["mean"], s["busy"]) == (1.0, 3.0, 2.0, True)
    assert not cq.load_summary([1.5, 2.0], 2)["busy"]


def _runs():
    return [
        {"engine": "kvserve", "dtype": "float32", "decode_tok_s": 20.0, "throughput_tok_s": 60.0, "prefill_tok_s": 500.0,
         "peak_rss_mib": 400.0, "throughput_mode": "continuous batching"},
        {"engine": "llama.cpp", "dtype": "Q4_1", "decode_tok_s": 100.0, "throughput_tok_s": 120.0, "prefill_tok_s": 400.0,
         "peak_rss_mib": 200.0},
        {"engine": "hf", "error": "RuntimeError: boom"},
        {"engine": "kvserve", "dtype": "float32", "decode_tok_s": 30.0, "throughput_tok_s": 80.0, "prefill_tok_s": 700.0,
         "peak_rss_mib": 420.0},
        {"engine": "llama.cpp", "dtype": "Q4_1", "decode_tok_s": 110.0, "throughput_tok_s": 100.0, "prefill_tok_s": 420.0,
         "peak_rss_mib": 210.0},
        {"engine": "kvserve", "dtype": "float32", "decode_tok_s": 25.0, "throughput_tok_s": 70.0, "prefill_tok_s": 600.0,
         "peak_rss_mib": 410.0},
    ]


def test_summarize_takes_medians_and_keeps_errors(cq):
    s = cq.summarize(_runs(), ["kvserve", "llama.cpp", "hf"])
    k = s["kvserve"]
    assert (k["decode_tok_s"], k["throughput_tok_s"], k["prefill_tok_s"], k["peak_rss_mib"]) == (25.0, 70.0, 600.0, 410.0)
    assert k["decode_tok_s_runs"] == [20.0, 30.0, 25.0] and k["rounds"] == 3 and k["dtype"] == "float32"
    assert s["llama.cpp"]["decode_tok_s"] == 105.0  # median of two
    assert s["hf"]["rounds"] == 0 and s["hf"]["errors"] == ["RuntimeError: boom"] and "decode_tok_s" not in s["hf"]


def test_ratios(cq):
    r = cq.ratios(cq.summarize(_runs(), ["kvserve", "llama.cpp", "hf"]))
    assert set(r) == {"llama.cpp"}  # no ratio against a peer that only failed
    assert r["llama.cpp"]["decode_tok_s"] == pytest.approx(25 / 105)
    assert r["llama.cpp"]["throughput_tok_s"] == pytest.approx(70 / 110)
    assert r["llama.cpp"]["peak_rss_mib"] == pytest.approx(410 / 205)


def test_format_table(cq):
    s = cq.summarize(_runs(), ["kvserve", "llama.cpp", "hf"])
    t = cq.format_table(s, ["decode", "throughput", "prefill", "memory"], cq.Sizes())
    lines = t.splitlines()
    assert lines[0].startswith("| engine | weights | batch-1 decode, 32 + 128 (tok/s)")
    assert "prefill 512 (tok/s)" in lines[0] and "throughput, 32 requests" in lines[0]
    ncols = lines[0].count("|")
    assert all(line.count("|") == ncols for line in lines)  # a well-formed Markdown table
    assert lines[2].startswith("| kvserve | float32 | 25.0 (20.0 / 30.0 / 25.0) | 70.0 (60.0 / 80.0 / 70.0)")
    assert lines[4].startswith("| HF transformers | ? | error: RuntimeError: boom")
    assert lines[5].startswith("| kvserve / llama.cpp | | 0.24× | 0.64× |")
    assert len(lines) == 6
    only = cq.format_table(s, ["memory"]).splitlines()
    assert only[0] == "| engine | weights | peak RSS, load + decode (MiB) |"
    assert only[2] == "| kvserve | float32 | 410.0 (400.0 / 420.0 / 410.0) |"


def test_child_env(cq):
    env = cq.child_env(2, {"KVSERVE_CPU_ISA": "avx2"})
    assert env["OMP_NUM_THREADS"] == "2" and env["KVSERVE_CPU_ISA"] == "avx2"
    assert cq.child_env(1)["OMP_NUM_THREADS"] == "1"


@pytest.mark.slow
def test_llamacpp_batched_matches_one_sequence_greedy():
    pytest.importorskip("llama_cpp")
    from kvserve.bench.peers import LlamaCppPeer
    from kvserve.bench.workloads import BenchRequest

    rng = random.Random(1)
    reqs = [BenchRequest([rng.randrange(100, 49152) for _ in range(rng.randint(10, 40))], rng.randint(1, 8))
            for _ in range(4)]
    peer = LlamaCppPeer("smollm2", n_ctx=256, n_threads=1)
    r = peer.throughput_batched(reqs, n_batch=64)  # n_batch < total prompt tokens: prompts span batches
    assert r["output_tokens"] == sum(q.output_len for q in reqs)
    for q, got in zip(reqs, peer.last_batched_tokens):
        peer.llm.reset()
        want = []
        for t in peer.llm.generate(q.prompt, temp=0.0, top_k=1, reset=True):
            want.append(t)
            if len(want) >= q.output_len:
                break
        assert got == want
