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
