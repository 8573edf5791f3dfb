"""The int32-word int8 GEMV (`kvserve/kernels/triton_quant._dot_rows_w8`, KVSERVE_INT8_GEMV=words)
without a GPU: its results under the Triton interpreter (`tests/gpu/quant_w8_checks.py`) and its
sm_90 machine code (`tests/gpu/qgemv_sass.py --int8`: 16-byte code loads, no I2F, no shared memory
or barriers in the K loop, no spills)."""

from __future__ import annotations

from tests.interpreted import run_interpreted, run_sass_check


def test_words_gemv_interpreted():
    run_interpreted("quant_w8_checks", done="w8 interpret checks passed", timeout=600)


def test_words_gemv_sass():
    run_sass_check("qgemv8_sass", "qgemv8 sass checks passed", args=("--quick",))  # the default tiles (the GPU tests compile the sweep)
