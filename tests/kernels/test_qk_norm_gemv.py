"""The qkv GEMV with the q/k norm epilogue (`kvserve/models/triton_qk_norm.py`) on the CPU: under
TRITON_INTERPRET=1 against the GEMV then `rope_qk_` (small fp32 shapes), compiled for sm_90
(`tests/gpu/qk_norm_sass.py`), and its switch `KVSERVE_QK_NORM_GEMV`. The GPU runs the same
check at real shapes (`tests/gpu/test_qk_norm_gemv.py`)."""

from __future__ import annotations

import pytest

from tests.interpreted import run_interpreted, run_sass_check


def test_qk_norm_gemv_interpreted():
    run_interpreted("qk_norm_checks", timeout=180, skip_unsupported=True)


def test_qk_norm_gemv_compiles_for_sm90():
    run_sass_check("qk_norm_sass", "qk norm sass checks passed")


def test_env_switch(monkeypatch):
    pytest.importorskip("triton")
    from kvserve.platform.cuda_ops import CudaTritonOps, qk_norm_gemv_mode

    monkeypatch.delenv("KVSERVE_QK_NORM_GEMV", raising=False)
    assert qk_norm_gemv_mode() is False and CudaTritonOps().qk_norm_gemv is False
    monkeypatch.setenv("KVSERVE_QK_NORM_GEMV", "1")
    assert qk_norm_gemv_mode() is True and CudaTritonOps().qk_norm_gemv is True
    monkeypatch.setenv("KVSERVE_QK_NORM_GEMV", "yes")
    with pytest.raises(ValueError, match="KVSERVE_QK_NORM_GEMV"):
        CudaTritonOps()
