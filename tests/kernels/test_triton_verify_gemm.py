"""The verify GEMM (`kvserve/kernels/triton_verify_gemm.py`) on the CPU under TRITON_INTERPRET=1:
fp32 / fp16 at small shapes, every epilogue, split-K, 2..16 rows (`tests/gpu/verify_gemm_checks.py`;
the GPU runs bf16 at Llama shapes in `tests/gpu/test_verify_gemm.py`). A few seconds. Also the
environment switch and its routing."""

from __future__ import annotations

import pytest

from tests.interpreted import run_interpreted


def test_verify_gemm_interpreted():
    run_interpreted("verify_gemm_checks", timeout=300, skip_unsupported=True)


def test_verify_gemm_env(monkeypatch):
    pytest.importorskip("triton")
    from kvserve.kernels import triton_verify_gemm as vg

    for value, want in ((None, True), ("cublas", False), ("triton", True)):
        vg.requested.cache_clear()
        if value is None:
            monkeypatch.delenv("KVSERVE_VERIFY_GEMM", raising=False)
        else:
            monkeypatch.setenv("KVSERVE_VERIFY_GEMM", value)
        assert vg.requested() is want
    for bad in ("Triton", "", "1"):
        vg.requested.cache_clear()
        monkeypatch.setenv("KVSERVE_VERIFY_GEMM", bad)
        with pytest.raises(ValueError, match="KVSERVE_VERIFY_GEMM"):
            vg.requested()
    vg.requested.cache_clear()


def test_verify_gemm_config_fills_the_gpu():
    pytest.importorskip("triton")
    from kvserve.kernels.triton_verify_gemm import verify_gemm_config

    assert verify_gemm_config(64, 4096)[2] == 4  # o_proj: 64 tiles of 64 rows -> 256 programs
    assert verify_gemm_config(64, 14336)[2] == 4  # down
    assert verify_gemm_config(96, 4096)[2] == 2  # qkv + RoPE
    assert verify_gemm_config(448, 4096)[2] == 1  # gate/up + SiLU·mul


def test_few_rows_routing(monkeypatch):
    """2..16 contiguous 16-bit rows take the verify GEMM with KVSERVE_VERIFY_GEMM=triton (the
    default), never with cublas."""
    pytest.importorskip("triton")
    import types

    import torch

    from kvserve.kernels import triton_verify_gemm as vg
    from kvserve.platform.cuda_linear import _few_rows, _one_row

    layer = types.SimpleNamespace(weight=torch.zeros(64, 32, dtype=torch.bfloat16))
    x = torch.zeros(17, 32, dtype=torch.bfloat16)
    monkeypatch.setenv("KVSERVE_VERIFY_GEMM", "triton")
    vg.requested.cache_clear()
    try:
        assert [_few_rows(layer, x[:m]) for m in (1, 2, 5, 16, 17)] == [False, True, True, True, False]
        assert _one_row(layer, x[:1]) and not _one_row(layer, x[:2])
        assert not _few_rows(layer, x[:5].float())
        assert not _few_rows(layer, x[:5, ::2])  # not contiguous along K
        monkeypatch.setenv("KVSERVE_VERIFY_GEMM", "cublas")
        vg.requested.cache_clear()
        assert not _few_rows(layer, x[:5])
    finally:
        vg.requested.cache_clear()
