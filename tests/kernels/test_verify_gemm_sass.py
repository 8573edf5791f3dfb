"""The verify GEMM compiled for sm_90 (no GPU): wgmma/mma tensor-core products, the weight stream
through asynchronous copies in the K loop, no spills (`tests/gpu/verify_gemm_sass.py`)."""

from __future__ import annotations

from tests.interpreted import run_sass_check


def test_verify_gemm_sass():
    run_sass_check("verify_gemm_sass", "verify gemm sass checks passed")
