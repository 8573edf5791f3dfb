"""The fused MoE Triton kernels on the CPU under TRITON_INTERPRET=1 (tiny fp32 shapes, both the
decode pairs path and the expert-sorted grouped GEMM, ragged sizes) against the fp32 oracle, and
the expert sort's invariants. The GPU runs the same checks at real shapes
(`tests/gpu/test_fused_moe.py`). A few seconds."""

from __future__ import annotations

from tests.interpreted import run_interpreted


def test_fused_moe_kernels_interpreted():
    run_interpreted("moe_checks", timeout=120, skip_unsupported=True)


def test_cpu_ops_have_no_fused_moe():
    """Off CUDA the model keeps its expert loop: the native ops return None."""
    import torch

    from kvserve.models.ops import Ops

    x = torch.zeros(2, 8)
    assert Ops().fused_moe(torch.nn.Module(), x, x[:, :2], torch.zeros(2, 2, dtype=torch.long)) is None
