"""The norm and SiLU·mul kernels that also write FP8 activations (KVSERVE_FP8_FUSED_ACT=1) equal
the unfused kernels then `act_quant_fp8` bit for bit, under TRITON_INTERPRET=1 on the CPU
(`tests/gpu/fp8_act_checks.py`; the GPU runs them at real shapes in tests/gpu/test_quant_gpu.py),
compiled for sm_90 (`tests/gpu/fp8_act_sass.py`), and the switch."""

from __future__ import annotations

import pytest

from tests.interpreted import run_interpreted, run_sass_check


def test_fp8_act_kernels_interpreted():
    run_interpreted("fp8_act_checks", timeout=300)


def test_fp8_act_kernels_compile_for_sm90():
    """No spills; FP8 stores through the hardware's e4m3 conversion (`tests/gpu/fp8_act_sass.py`)."""
    run_sass_check("fp8_act_sass", "fp8 act sass checks passed")


def test_fp8_fused_act_switch(monkeypatch):
    from kvserve.platform.cuda_quant import fp8_fused_act_mode

    monkeypatch.delenv("KVSERVE_FP8_FUSED_ACT", raising=False)
    assert fp8_fused_act_mode() is True  # the default since its GPU run
    monkeypatch.setenv("KVSERVE_FP8_FUSED_ACT", "0")
    assert fp8_fused_act_mode() is False
    monkeypatch.setenv("KVSERVE_FP8_FUSED_ACT", "1")
    assert fp8_fused_act_mode() is True
    monkeypatch.setenv("KVSERVE_FP8_FUSED_ACT", "yes")
    with pytest.raises(ValueError, match="KVSERVE_FP8_FUSED_ACT"):
        fp8_fused_act_mode()
