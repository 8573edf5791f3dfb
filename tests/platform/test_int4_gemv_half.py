"""The 4-bit half-math GEMV (`kvserve/kernels/triton_qgemv4h.py`, KVSERVE_INT4_GEMV=half) without
a GPU: its inline PTX emulated bit for bit (`tests/gpu/ptx_emu.check_block_dot`), its results under
the Triton interpreter (`tests/gpu/quant_h4_checks.py`), and its sm_90 machine code
(`tests/gpu/qgemv4h_sass.py`: 16-byte code loads, no I2F, no shared memory or barriers in the K
loop, no spills)."""

from __future__ import annotations

from tests.interpreted import run_interpreted, run_sass_check


def test_block_dot_asm_is_exact():
    from tests.gpu import ptx_emu

    ptx_emu.check_block_dot()


def test_half_gemv_interpreted():
    run_interpreted("quant_h4_checks", done="h4 interpret checks passed", timeout=600)


def test_half_gemv_sass():
    run_sass_check("qgemv4h_sass", "qgemv4h sass checks passed", args=("--quick",))
