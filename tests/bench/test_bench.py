"""`kvserve bench` end to end on the tiny random-weight Llama: every command runs, writes valid
JSON lines and a report with PNGs, and a broken peer is reported without failing the run."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import httpx
import pytest

from kvserve.entrypoints.cli import main
from tests.server.conftest import ServerProcess

pytest.importorskip("matplotlib")

ENGINE = ["--dtype", "float32", "--device", "cpu", "--kv-cache-memory-gib", "0.01", "--no-progress"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a shared 2-core CI box they lose a lot."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")[0]


def read_jsonl(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows
    for r in rows:
        assert r["machine"]["cores"] >= 1 and "torch" in r["machine"]["versions"] and r["machine"]["commit"]
    return rows


def assert_report(d: Path, *pngs: str) -> str:
    md = (d / "report.md").read_text()
    assert "machine:" in md and "commit" in md
    for name in pngs:
        assert (d / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in md
    return md


def test_throughput_reports_a_broken_peer(model_dir, tmp_path, monkeypatch, capsys):
    from kvserve.bench import peers

    def broken(*args, **kwargs):
        raise RuntimeError("peer exploded")

    monkeypatch.setattr(peers.HFPeer, "__init__", broken)
    out = tmp_path / "r.jsonl"
    rc = main(["bench", "throughput", "-m", str(model_dir), *ENGINE, "--num-requests", "6", "--scale", "0.05",
               "--peers", "hf,llamacpp", "--json-out", str(out), "--report-dir", str(tmp_path / "rep")])
    assert rc == 0
    rows = read_jsonl(out)
    ours = rows[0]
    assert ours["engine"] == "kvserve" and ours["output_tok_s"] > 0 and ours["output_tokens"] > 0
    hf = next(r for r in rows if r["engine"] == "hf-transformers")
    assert "peer exploded" in hf["error"]
    assert any(r["engine"] == "llama.cpp" for r in rows)  # reported, installed or not
    assert "peer exploded" in capsys.readouterr().out
    md = assert_report(tmp_path / "rep", "throughput.png", "kv_timeline.png", "ttft.png")
    assert "error: RuntimeError: peer exploded" in md


def test_throughput_fixed_lengths_is_reproducible(model_dir, tmp_path, capsys):
    from kvserve.bench.workloads import random_requests

    a = random_requests(4, 7, 500, input_len=32, output_len=8)
    assert a == random_requests(4, 7, 500, input_len=32, output_len=8)
    assert {len(r.prompt) for r in a} == {32} and {r.output_len for r in a} == {8}
    rc = main(["bench", "throughput", "-m", str(model_dir), *ENGINE, "--num-requests", "4", "--input-len", "32",
               "--output-len", "8", "--peers", "", "--json-out", str(tmp_path / "r.jsonl")])
    assert rc == 0
    assert read_jsonl(tmp_path / "r.jsonl")[0]["output_tokens"] == 32


def test_latency_with_hf_peer_and_floor(model_dir, tmp_path):
    out = tmp_path / "r.jsonl"
    rc = main(["bench", "latency", "-m", str(model_dir), *ENGINE, "--prompt-len", "32", "--decode-tokens", "4",
               "--batch-sizes", "1,2", "--floor-mib", "8", "--repeats", "2", "--peers", "hf", "--json-out", str(out),
               "--report-dir", str(tmp_path / "rep")])
    assert rc == 0
    rows = {r["engine"]: r for r in read_jsonl(out)}
    assert rows["kvserve"]["decode_ms_b1"] > 0 and rows["kvserve"]["decode_ms_b2"] > 0
    assert rows["kvserve"]["prefill_ms"] > 0
    assert "error" not in rows["hf-transformers"] and rows["hf-transformers"]["kvserve_x"] > 0
    assert rows["bandwidth floor"]["gb_per_s"] > 0
    assert_report(tmp_path / "rep", "decode_b1.png", "prefill.png")


def test_prefix_caching_on_hits_off_does_not(model_dir, tmp_path):
    out = tmp_path / "r.jsonl"
    rc = main(["bench", "prefix", "-m", str(model_dir), *ENGINE, "--num-requests", "4", "--prefix-len", "64",
               "--suffix-len", "8", "--output-len", "2", "--json-out", str(out), "--report-dir", str(tmp_path / "rep")])
    assert rc == 0
    on, off = read_jsonl(out)
    assert on["mode"] == "prefix caching on" and on["prefix_hit_rate"] > 0.5
    assert off["prefix_hit_rate"] == 0
    assert_report(tmp_path / "rep", "prefix.png", "kv_timeline.png")


def test_serve_against_a_real_server(model_dir, tmp_path):
    server = ServerProcess(model_dir, tmp_path / "server.log", "--kv-cache-memory-gib", "0.01")
    try:
        out = tmp_path / "r.jsonl"
        rc = main(["bench", "serve", "--url", server.url, "--concurrency", "1,4", "--num-prompts", "6",
                   "--input-len", "16", "--output-len", "4", "--vocab", "500", "--no-progress",
                   "--json-out", str(out), "--report-dir", str(tmp_path / "rep")])
        assert rc == 0
        rows = read_jsonl(out)
        assert [r["concurrency"] for r in rows] == [1, 4]
        for r in rows:
            assert r["failed"] == 0 and r["output_tokens"] == 24 and r["goodput_req_s"] > 0
            assert r["ttft_p50"] <= r["ttft_p99"] and r["tpot_p90"] > 0 and "itl_mean" in r
        md = assert_report(tmp_path / "rep", "throughput_vs_load.png", "ttft_tpot.png", "kv_timeline.png")
        assert "c=4" in md
        rc = main(["bench", "serve", "--url", server.url, "--request-rate", "100", "--dataset", "chat",
                   "--scale", "0.05", "--num-prompts", "4", "--vocab", "500", "--no-progress",
                   "--json-out", str(out)])
        assert rc == 0 and read_jsonl(out)[-1]["rate"] == 100
        assert_dashboard_metrics_exist(httpx.get(server.url + "/metrics", timeout=10).text)
    finally:
        server.stop()


def assert_dashboard_metrics_exist(metrics_text: str) -> None:
    """Every series the Grafana dashboard queries is one the server exports."""
    dash = json.loads((Path(__file__).parents[2] / "benchmarks/grafana/kvserve.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"kvserve:[a-z_]+", e)}
    exported = set(re.findall(r"^(kvserve:[a-z_]+)", metrics_text, re.M))
    assert len(used) >= 15 and used <= exported, used - exported


def test_kv_ablation(model_dir, tmp_path):
    out = tmp_path / "r.jsonl"
    rc = main(["bench", "kv-ablation", "--model", str(model_dir), "--dtype", "float32", "--prompt-len", "8",
               "--new-tokens", "4", "--repeats", "1", "--json-out", str(out), "--report-dir", str(tmp_path / "rep")])
    assert rc == 0
    (row,) = read_jsonl(out)
    assert row["identical"] and row["cache_off"]["gflop"] > row["cache_on"]["gflop"]
    assert_report(tmp_path / "rep", "kv-ablation.png")


def test_kv_ablation_fp32_check_runs_on_fp32_weights(model_dir, monkeypatch):
    """The float32 identity check loads float32 weights (GGUF blocks dequantized): quantized
    one-row and many-row products are different kernels, so only then must the modes agree."""
    import kvserve
    from kvserve.bench import kv_ablation

    seen = []
    real = kvserve.LLM

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(kvserve, "LLM", spy)
    assert kv_ablation.fp32_identical(str(model_dir), [5, 6, 7, 8], 3, 32)
    assert [k.get("quantization") for k in seen] == ["none", "none"]
    assert [k.get("enable_kv_cache") for k in seen] == [True, False]


def test_report_without_matplotlib_says_how_to_install(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rc = main(["bench", "prefix", "-m", str(model_dir), *ENGINE, "--report-dir", str(tmp_path / "rep")])
    assert rc == 2
    assert "pip install 'kvserve[bench]'" in capsys.readouterr().err
