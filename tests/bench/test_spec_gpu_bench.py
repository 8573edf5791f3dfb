"""benchmarks/spec_gpu_bench.py's static-input filling, on CPU with eager stand-in graphs: a
verify step of k + 1 rows per request gets consecutive positions, one block table per request
and the verify groups its graph attends by; the variants list starts with the default."""

from __future__ import annotations

import pytest
import torch

from benchmarks import spec_gpu_bench as sgb
from kvserve import LLM
from kvserve.runner.cuda_graphs import DecodeGraphs


@pytest.fixture(scope="module")
def runner(tiny_llama):
    llm = LLM(str(tiny_llama[0]), dtype="float32", device="cpu", num_kv_blocks=64)
    llm.engine.runner.model.cpu_decoder = False
    return llm.engine.runner


@pytest.mark.parametrize("grouped", [True, False])
def test_fill_static_verify_rows(runner, grouped):
    k = 4
    g = DecodeGraphs(runner, 2, eager=True, split=False, verify_width=k + 1, max_rows=2 * (k + 1),
                     group_verify=grouped)
    g.sizes = [1, 2, k + 1, 2 * (k + 1)]
    g.capture()
    n = sgb.fill_static(g, 2, k + 1, 20, runner.block_size)
    m = g.max_bs
    assert n == 10
    assert g.i64[m : m + n].tolist() == [20, 21, 22, 23, 24] * 2
    assert g.seq_lens[:n].tolist() == [21, 22, 23, 24, 25] * 2
    assert g.grouped(n, verify=True) == grouped
    assert g.groups[:n].tolist() == ([5, -1, -2, -3, -4] * 2 if grouped else [1] * 10)
    assert torch.equal(g.block_tables[0], g.block_tables[4]) and not torch.equal(g.block_tables[0], g.block_tables[5])
    md = g._metadata(n, g.grouped(n, verify=True))
    assert (md.verify_groups is not None) == grouped
    g.i64[:n] %= runner.model.config.vocab_size  # the bench draws Llama-3.1-8B ids
    with torch.inference_mode():
        assert g.replay(n, verify=True).shape[0] == n
    sgb.fill_static(g, 2, 1, 20, runner.block_size)
    assert g.groups[:2].tolist() == [1, 1]


def test_variants_default_first(monkeypatch):
    monkeypatch.delenv("KVSERVE_VERIFY_ATTN", raising=False)
    assert sgb.verifyprof_variants() == [("attn=grouped", {}), ("attn=rows", {"group_verify": False})]
    monkeypatch.setenv("KVSERVE_VERIFY_ATTN", "rows")
    assert sgb.verifyprof_variants()[0] == ("attn=rows", {})


def test_kernel_groups():
    rows = [{"kernel": "_gemv_rope_kernel", "count": 32, "total_us": 600.0, "mean_us": 0, "exclusive_us": 590.0},
            {"kernel": "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x32x64", "count": 128, "total_us": 3900.0,
             "mean_us": 0, "exclusive_us": 3800.0},
            {"kernel": "_rope_qk_kernel", "count": 32, "total_us": 90.0, "mean_us": 0, "exclusive_us": 60.0},
            {"kernel": "_silu_mul_kernel", "count": 32, "total_us": 80.0, "mean_us": 0, "exclusive_us": 50.0},
            {"kernel": "_verify_decode_kernel", "count": 32, "total_us": 150.0, "mean_us": 0, "exclusive_us": 120.0},
            {"kernel": "_decode_reduce_kernel", "count": 32, "total_us": 70.0, "mean_us": 0, "exclusive_us": 40.0},
            {"kernel": "vectorized_elementwise_kernel[CopyFunctor]", "count": 1, "total_us": 3.0, "mean_us": 0,
             "exclusive_us": 3.0}]
    got = {r["kernel"]: (r["count"], r["exclusive_us"]) for r in sgb.group_rows(rows)}
    assert got["cublas gemm (+ split-k reduce)"] == (128, 3800.0)
    assert got["attention"] == (64, 160.0)
    assert got["epilogue (rope / kv store, silu*mul)"] == (64, 110.0)
    assert got["triton gemv (+ fused epilogue)"] == (32, 590.0)
    assert any(k.startswith("other (") for k in got)


def test_verify_variants_add_the_verify_gemm(monkeypatch):
    pytest.importorskip("triton")
    from kvserve.kernels.triton_verify_gemm import requested

    monkeypatch.delenv("KVSERVE_VERIFY_ATTN", raising=False)
    monkeypatch.delenv("KVSERVE_VERIFY_GEMM", raising=False)
    requested.cache_clear()
    v = sgb.verify_variants()
    assert [x[2] for x in v] == [None, None, "cublas"] and v[-1][1] == {}
    with sgb.verify_gemm_mode("cublas"):
        assert not requested()
    assert requested()
    monkeypatch.setenv("KVSERVE_VERIFY_GEMM", "cublas")
    requested.cache_clear()
    assert [x[2] for x in sgb.verify_variants()] == [None, None, "triton"]
    requested.cache_clear()
