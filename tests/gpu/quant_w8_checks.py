"""Checks of the int32-word int8 GEMV (`triton_quant._dot_rows_w8`, KVSERVE_INT8_GEMV=words) against
the fp64 product of the dequantized weight: the plain GEMV (bias or not), the SiLU·mul and RoPE + K/V
store epilogues, both int8 layouts (HF int8 per channel: KIND 2; GGUF Q8_0 in groups of 32 and an
int8 weight in groups of 128: KIND 1), bf16 / fp16 / fp32 activations, and its tile configs. Shared
by the GPU tests (`tests/gpu/test_quant_gpu.py`) and the CPU test that runs them under
TRITON_INTERPRET=1 on tiny shapes (`tests/platform/test_int8_gemv_words.py`)."""

from __future__ import annotations

import functools

import torch

from tests.gpu import quant_w4_checks as w4
from tests.gpu.quant_checks import formats


def int8_formats(n: int, k: int, device: str, seed: int = 0) -> dict:
    """The int8 layouts of `quant_checks.formats` (the same weights) and one in groups of 128
    (no format stores that from HF, the kernels take it: w = s q per group)."""
    from kvserve.platform.cuda_quant import QWeight

    out = formats(n, k, device, seed, only="Q8_0")
    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05)
    from kvserve.platform.cuda_quant import quantize

    out["int8"] = quantize(w, "int8").to(torch.device(device))
    if k % 128 == 0:
        wg = w.view(n, k // 128, 128)
        s = (wg.abs().amax(dim=2) / 127.0).to(torch.float16)
        q = (wg / s.float()[:, :, None]).round().clamp(-127, 127).to(torch.int8).view(n, k)
        out["int8-g128"] = QWeight("int8", q, s, None, 128, k).to(torch.device(device))
    return out


# The checks are `quant_w4_checks`' with bits=8 (the same products, epilogues and env switch).
check_gemv = functools.partial(w4.check_gemv, bits=8)
check_silu = functools.partial(w4.check_silu, bits=8)
check_rope = functools.partial(w4.check_rope, bits=8)
check_env_switch = functools.partial(w4.check_env_switch, bits=8)


if __name__ == "__main__":
    w4.run_interpret(bits=8)
