"""Grouped verify attention (`kvserve/attention/triton/verify.py`) on the GPU against the
reference backend: the shared checks of `tests/gpu/verify_attn_checks.py` (also run on the CPU
under TRITON_INTERPRET=1), then Llama-3.1-8B head shapes in bf16 at ~1k context, and agreement
with the per-row decode kernel.

    python -m pytest tests/gpu/test_verify_attention.py -q
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_shared_checks(dtype):
    from tests.gpu import verify_attn_checks

    verify_attn_checks.run("cuda", dtype)


@pytest.mark.parametrize("num_sms", [None, 4], ids=["splits", "few-splits"])
def test_llama8b_shapes(num_sms):
    from tests.gpu.verify_attn_checks import check_case

    # one request's 5 verify rows at ~1k context, a second one's 3 rows, a plain decode row
    reqs = [(1023, 5), (700, 3), (1500, 1), (64, 5)]
    check_case(reqs, "cuda", torch.bfloat16, heads=(32, 8), head_dim=128, width=5, pad=3, num_sms=num_sms, seed=3)
