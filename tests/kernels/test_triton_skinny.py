"""The skinny (2..8-row) Triton products on the CPU under TRITON_INTERPRET=1 (tiny fp32 / fp16
shapes, ragged N and K, several block configurations, the preloaded-tile path, the SiLU·mul and
RoPE + K/V store epilogues with per-row positions and slots) against fp64 and the unfused
kernels' bits. The GPU runs the same checks at Llama shapes (`tests/gpu/test_skinny.py`)."""

from __future__ import annotations

import pytest

from tests.interpreted import run_interpreted


def test_skinny_kernels_interpreted():
    run_interpreted("skinny_checks", timeout=600, skip_unsupported=True)


def test_skinny_max_rows_setting(monkeypatch):
    """KVSERVE_SKINNY_MAX_ROWS: 1 (off, the default) to 8; anything else is an error naming the variable."""
    from kvserve.platform import cuda_linear

    monkeypatch.setenv("KVSERVE_SKINNY_MAX_ROWS", "5")
    assert cuda_linear._skinny_max_rows() == 5
    monkeypatch.delenv("KVSERVE_SKINNY_MAX_ROWS")
    assert cuda_linear._skinny_max_rows() == 1  # off until a GPU run has timed it
    for bad in ("0", "9", "x", ""):
        monkeypatch.setenv("KVSERVE_SKINNY_MAX_ROWS", bad)
        with pytest.raises(ValueError, match="KVSERVE_SKINNY_MAX_ROWS"):
            cuda_linear._skinny_max_rows()
