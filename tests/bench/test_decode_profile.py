"""benchmarks/gpu_decode_profile.py's CPU-side accounting: kernel names shortened so torch's
elementwise kernels stay apart, per-step rows with exclusive times under PDL overlap, the table,
and the no-CUDA exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_decode_profile as gdp

DIV = ("void at::native::vectorized_elementwise_kernel<4, at::native::BinaryFunctor<float, float, float, "
       "at::native::binary_internal::DivFunctor<float> >, std::array<char*, 3ul> >(int, at::native::BinaryFunctor<"
       "float, float, float, at::native::binary_internal::DivFunctor<float> >, std::array<char*, 3ul>)")
SUM = ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<float, "
       "at::native::sum_functor<float, float, float>::operator()(at::TensorIterator&)::{lambda(float, float)#1}>, "
       "unsigned int, float, 4> >(at::native::ReduceOp<float>)")


@pytest.mark.parametrize("full,short", [
    (DIV, "vectorized_elementwise_kernel[DivFunctor]"),
    (SUM, "reduce_kernel[sum_functor]"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, at::native::(anonymous "
     "namespace)::SoftMaxForwardEpilogue>(float*, float const*, int)", "cunn_SoftMaxForward"),
    ("void at::native::sbtopk::gatherTopK<float, unsigned int, 2, false>(unsigned int)", "gatherTopK"),
    ("_route_kernel", "_route_kernel"),
    ("Memcpy DtoD (Device -> Device)", "Memcpy DtoD (Device -> Device)"),
])
def test_short_name(full, short):
    assert gdp.short_name(full) == short


def test_short_name_is_capped():
    assert len(gdp.short_name("k" * 200, width=30)) == 30


def test_rows_and_table_with_overlapping_kernels():
    # two steps; "_gate_up_kernel" starts (PDL) while "_route_kernel" still runs
    step = [(0, 4, "_route_kernel"), (3, 20, "_gate_up_kernel"), (21, 22, DIV), (23, 24, DIV)]
    kernels = step + [(a + 100, b + 100, n) for a, b, n in step]
    rows = gdp.kernel_rows(kernels, steps=2)
    by = {r["kernel"]: r for r in rows}
    assert [r["kernel"] for r in rows] == ["_gate_up_kernel", "_route_kernel", "vectorized_elementwise_kernel[DivFunctor]"]
    assert by["_gate_up_kernel"] == {"kernel": "_gate_up_kernel", "count": 1, "total_us": 17, "mean_us": 17,
                                     "exclusive_us": 16}
    assert by["vectorized_elementwise_kernel[DivFunctor]"]["count"] == 2
    table = gdp.format_table(rows, "title")
    lines = table.splitlines()
    assert lines[0] == "title" and lines[1].split()[0] == "kernel" and len(lines) == 2 + 3 + 1
    assert lines[-1].split() == ["sum", "4", "23.0", "22.0"]  # 17 + 4 + 2 total; 16 + 4 + 2 exclusive


def test_diff_rows_and_table():
    one = gdp.kernel_rows([(0, 5, "_gemv_kernel"), (4, 9, "_rmsnorm_kernel"), (9, 20, "_gemv_kernel")])
    many = gdp.kernel_rows([(0, 5, "gemm_bf16"), (6, 9, "_rmsnorm_kernel"), (9, 12, "_rope_qk_kernel"),
                            (12, 20, "gemm_bf16")])
    rows = gdp.diff_rows(one, many)
    by = {r["kernel"]: r for r in rows}
    assert rows[0]["kernel"] == "_gemv_kernel" and by["_gemv_kernel"]["d_excl_us"] == -16
    assert by["gemm_bf16"]["count_base"] == 0 and by["gemm_bf16"]["count_other"] == 2
    assert by["gemm_bf16"]["d_excl_us"] == 13 and by["_rope_qk_kernel"]["d_total_us"] == 3
    assert by["_rmsnorm_kernel"]["d_excl_us"] == -1  # 4 us exclusive (PDL overlap) -> 3
    lines = gdp.format_diff(rows, "1", "5", "t").splitlines()
    assert lines[0] == "t" and len(lines) == 2 + 4 + 1
    assert lines[-1].split() == ["sum", "3", "4", "20.0", "19.0", "-1.0", "-2.0"]


def test_exits_cleanly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_decode_profile", "--models", "Qwen3-30B-A3B"], cwd=root,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0 and "no CUDA device" in r.stdout, r.stderr[-2000:]
