"""Verify rows attended by request (`attention/triton/verify.py`), on CPU:

- the kernel under TRITON_INTERPRET=1 against the reference backend (`tests/gpu/verify_attn_checks.py`:
  verify groups mixed with plain rows, short groups and padding rows, split and direct), and
  compiled for sm_90 (`tests/gpu/verify_attn_sass.py`);
- `verify_groups` (which rows form a group) and the decode graphs' static input: verify sizes
  of the ladder carry the groups of the step they replay, plain decode sizes none;
- `KVSERVE_VERIFY_ATTN` (grouped / rows, anything else a ValueError naming it).
"""

from __future__ import annotations

import numpy as np
import pytest

from kvserve.runner.cuda_graphs import verify_attn_grouped, verify_groups
from kvserve.spec_decode.decoder import max_step_rows
from tests.interpreted import run_interpreted, run_sass_check
from tests.spec_decode.test_spec_graphs_async import K, NGRAM, RecordingGraphs, _llm, _oracle, _prompts, _tokens


def test_kernel_interpreted():
    run_interpreted("verify_attn_checks", "verify attention checks passed")


def test_kernel_compiles_for_sm90():
    """Llama-3.1-8B shapes, bf16, 5 rows: tensor-core MMAs, no spills (`tests/gpu/verify_attn_sass.py`)."""
    run_sass_check("verify_attn_sass", "verify attention sass checks passed")


def test_verify_groups():
    from tests.gpu.verify_attn_checks import check_groups

    check_groups()
    assert verify_groups(np.array([4, 4, 4, 4, 4, 4]), 5).tolist() == [5, -1, -2, -3, -4, 1]


def test_env_switch(monkeypatch):
    monkeypatch.delenv("KVSERVE_VERIFY_ATTN", raising=False)
    assert verify_attn_grouped()
    monkeypatch.setenv("KVSERVE_VERIFY_ATTN", "rows")
    assert not verify_attn_grouped()
    monkeypatch.setenv("KVSERVE_VERIFY_ATTN", "shared")
    with pytest.raises(ValueError, match="KVSERVE_VERIFY_ATTN"):
        verify_attn_grouped()


class GroupRecordingGraphs(RecordingGraphs):
    """Records, per replay, the row count and the verify groups its metadata passes."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.seen: list[tuple[int, list[int] | None]] = []

    def replay(self, bs: int, verify: bool = False):
        md = self._metadata(bs, self.grouped(bs, verify))
        self.seen.append((bs, None if md.verify_groups is None else md.verify_groups.tolist()))
        return super().replay(bs, verify)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "rows"])
def test_graph_static_groups(tiny_llama, grouped):
    folder = str(tiny_llama[0])
    plain = _llm(folder)
    prompts = _prompts(2, seed=4)
    want = _tokens(plain, prompts)
    llm = _llm(folder, NGRAM)
    r = llm.engine.runner
    r.graphs = GroupRecordingGraphs(r, 8, eager=True, verify_width=K + 1, max_rows=max_step_rows(8, K),
                                    group_verify=grouped)
    r.graphs.capture()
    _oracle(llm, prompts, want, 1.0, backoff=False)
    assert _tokens(llm, prompts) == want
    seen = r.graphs.seen
    full = [g for bs, g in seen if bs == 10]
    assert full, seen
    for bs, g in seen:
        if not grouped or bs in (1, 2, 4):  # plain sizes below k + 1 rows: no grouped twin
            assert g is None
    if grouped:
        assert [5, -1, -2, -3, -4, 5, -1, -2, -3, -4] in full
        assert r.graphs.twin_sizes == [8]


def test_plain_sizes_get_grouped_twins(tiny_llama):
    """k = 3: a batch-1 verify step has 4 rows, a plain decode size. It replays the grouped
    twin of that graph; plain decode steps of 4 rows keep the per-row graph."""
    from kvserve.spec_decode.config import SpeculativeConfig
    from kvserve.spec_decode.decoder import SpecDecoder
    from kvserve.spec_decode.oracle import OracleProposer
    from tests.conftest import TINY_VOCAB

    folder = str(tiny_llama[0])
    k = 3
    plain = _llm(folder)
    prompts = _prompts(1, seed=6)
    want = _tokens(plain, prompts)
    llm = _llm(folder, {**NGRAM, "num_speculative_tokens": k})
    r = llm.engine.runner
    r.graphs = GroupRecordingGraphs(r, 8, eager=True, verify_width=k + 1, max_rows=max_step_rows(8, k),
                                    group_verify=True)
    r.graphs.capture()
    assert r.graphs.twin_sizes == [4, 8] and set(r.graphs.verify_graphs) == {4, 8}
    refs = {tuple(p["prompt_token_ids"]): w for p, w in zip(prompts, want)}
    llm.engine.spec = SpecDecoder(SpeculativeConfig(num_speculative_tokens=k, backoff=False),
                                  OracleProposer(refs, 1.0, TINY_VOCAB, seed=1))
    assert _tokens(llm, prompts) == want
    assert (4, [4, -1, -2, -3]) in r.graphs.seen
    assert not r.graphs.grouped(4) and r.graphs.grouped(4, verify=True) and r.graphs.grouped(12)
