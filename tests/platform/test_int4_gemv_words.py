"""The int32-word 4-bit GEMV (`kvserve/kernels/triton_quant._dot_rows_w4`, KVSERVE_INT4_GEMV=words)
without a GPU: its results under the Triton interpreter (`tests/gpu/quant_w4_checks.py`) and its
sm_90 machine code (`tests/gpu/qgemv_sass.py`: 16-byte code loads, no I2F, no shared memory or
barriers in the K loop, no spills)."""

from __future__ import annotations

from tests.interpreted import run_interpreted, run_sass_check


def test_words_gemv_interpreted():
    run_interpreted("quant_w4_checks", done="w4 interpret checks passed", timeout=600)


def test_words_gemv_sass():
    run_sass_check("qgemv_sass", "qgemv sass checks passed", args=("--quick",))  # the default tiles (the GPU tests compile the sweep)
