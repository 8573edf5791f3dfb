"""Checks of the quantized Triton kernels (`kvserve/kernels/triton_quant.py`) against the
PyTorch reference (dequantize in fp32, then a float64 product), shared by the GPU tests
(`tests/gpu/test_quant_gpu.py`, real shapes) and the CPU test that runs them under
TRITON_INTERPRET=1 on tiny shapes (`tests/platform/test_cuda_quant.py`)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from kvserve.platform.cuda_quant import QWeight, int4_group, quantize, repack_ggml


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double().cpu(), ref.double().cpu()
    assert torch.isfinite(got).all()
    return ((got - ref).norm() / ref.norm().clamp(min=1e-30)).item()


@contextlib.contextmanager
def env(**values: str | None):
    """Set (None: unset) environment variables for the block, then restore them."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def rope_case(d: int, device: str, pos: int = 37) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp64 angles [64, d / 2], the fp32 cos / sin table on `device`, the position tensor) of the
    RoPE GEMV checks."""
    half = d // 2
    inv = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float64) / half))
    ang = torch.arange(64, dtype=torch.float64)[:, None] * inv[None, :]
    return ang, torch.cat([ang.cos(), ang.sin()], dim=1).float().to(device), torch.tensor([pos], device=device)


def rope_reference(x: torch.Tensor, qw, ang: torch.Tensor, hq: int, hkv: int, d: int, pos: int = 37) -> torch.Tensor:
    """x times the dequantized qkv weight in fp64, q and k heads rotated at `pos`: [hq + 2 hkv, d]."""
    half = d // 2
    y = (x.double() @ qw.dequantize(torch.float64).T).view(hq + 2 * hkv, d).cpu()
    c, s = ang[pos].cos(), ang[pos].sin()
    rot = y.clone()
    x1, x2 = y[: hq + hkv, :half], y[: hq + hkv, half:]
    rot[: hq + hkv, :half] = x1 * c - x2 * s
    rot[: hq + hkv, half:] = x2 * c + x1 * s
    return rot


def assert_rope_result(got: torch.Tensor, cache: torch.Tensor, rot: torch.Tensor, hq: int, hkv: int, d: int,
                       tol: float, what) -> None:
    """The RoPE GEMV's output and its K / V store (cache [2, 4, 16, hkv, d], slot 21) against `rot`."""
    e = rel_err(got.view(hq + 2 * hkv, d), rot)
    assert e < tol, (what, e)
    kv = cache.view(2, 64, hkv, d)[:, 21].cpu()
    assert rel_err(kv[0], rot[hq: hq + hkv]) < tol and rel_err(kv[1], rot[hq + hkv:]) < tol, what
    assert cache.view(2, 64, hkv, d)[:, :21].abs().sum() == 0, what


def formats(n: int, k: int, device: str, seed: int = 0, only: str | None = None) -> dict[str, QWeight]:
    """One weight of every layout the kernels take (or the one named `only`), on `device`."""
    from kvserve.kernels import cpu_quant
    from kvserve.models.linear import QuantizedTensor
    from tests.kernels.test_cpu_quant import random_weight

    g = torch.Generator().manual_seed(seed)
    w = None if only else torch.randn(n, k, generator=g) * 0.05
    out = {} if only else {
        "int8": quantize(w, "int8"),
        "int4-g128": quantize(w, "int4", 128) if k % 128 == 0 else quantize(w, "int4", 32),
        "int4-g32": quantize(w, "int4", 32),
        "fp8": quantize(w, "fp8"),
    }
    for name in ("Q8_0", "Q4_0", "Q4_1", "Q4_K"):
        if only and name != only:
            continue
        if k % cpu_quant.BLOCKS[cpu_quant.QTYPES[name]][0] == 0:
            raw = random_weight(name, n, k, seed=seed + 1)
            out[name] = repack_ggml(QuantizedTensor(cpu_quant.QTYPES[name], raw, k))
    return {name: qw.to(torch.device(device)) for name, qw in out.items()}


def check_products(n: int, k: int, device: str, dtype: torch.dtype, rows: list[int], tol: float) -> dict[str, float]:
    """qgemv (1 row), qmm (several), dequantize: relative error against the reference. The GEMM
    reads int8 codes (int8, Q8_0) as int32 words (`_deq_tile_w`), the other formats a code at a
    time (`_deq_tile`): both tiles are checked here."""
    from kvserve.kernels import triton_quant

    errs: dict[str, float] = {}
    g = torch.Generator().manual_seed(7)
    bias = (torch.randn(n, generator=g) * 0.1).to(device=device, dtype=dtype)
    for name, qw in formats(n, k, device).items():
        assert triton_quant._qmm_codes(qw)[1] == (name in ("int8", "Q8_0")), name
        wref = qw.dequantize(torch.float64)
        d = triton_quant.dequantize(qw, torch.float32)
        assert torch.equal(d.cpu(), qw.dequantize(torch.float32).cpu()) or rel_err(d, wref) < 1e-6, name
        for m in rows:
            x = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
            for b in (None, bias):
                ref = x.double() @ wref.T + (0 if b is None else b.double())
                got = triton_quant.qgemv(x, qw, b) if m == 1 else triton_quant.qmm(x, qw, b)
                assert got.dtype == dtype and got.shape == (m, n)
                e = rel_err(got, ref)
                errs[f"{name} m={m}{' bias' if b is not None else ''}"] = e
                assert e < tol, (name, m, e)
    return errs


def check_qmm4(n: int, k: int, device: str, dtype: torch.dtype, rows: list[int], tol: float,
               configs: tuple = (None,)) -> dict[str, float]:
    """The 4-bit word GEMM (`triton_qmm4`, both modes, the given tile configs: None is
    `qmm4_config`'s) on every 4-bit layout, with and without a bias, against the reference."""
    from kvserve.kernels import triton_quant

    errs: dict[str, float] = {}
    g = torch.Generator().manual_seed(11)
    bias = (torch.randn(n, generator=g) * 0.1).to(device=device, dtype=dtype)
    weights = formats(n, k, device)
    if k % 64 == 0:  # (the group size of a tensor-parallel shard where 128 does not divide)
        weights["int4-g64"] = quantize(torch.randn(n, k, generator=g) * 0.05, "int4", 64).to(torch.device(device))
    for name, qw in weights.items():
        if qw.kind != "int4":
            continue
        wref = qw.dequantize(torch.float64)
        for m in rows:
            x = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
            for b in (None, bias):
                ref = x.double() @ wref.T + (0 if b is None else b.double())
                for mode in ("words", "raw"):
                    for cfg in configs:
                        got = triton_quant.qmm(x, qw, b, config=cfg, mode=mode)
                        assert got.dtype == dtype and got.shape == (m, n)
                        e = rel_err(got, ref)
                        key = f"{name} {mode} m={m} {cfg}{' bias' if b is not None else ''}"
                        errs[key] = e
                        assert e < tol, (key, e)
    return errs


def check_fp8_scale_after(n: int, k: int, device: str, dtype: torch.dtype, rows: list[int], tol: float) -> None:
    """The FP8 GEMM with the scales applied to the sums (KVSERVE_FP8_QMM_SCALE_AFTER)."""
    from kvserve.kernels import triton_quant

    g = torch.Generator().manual_seed(12)
    qw = formats(n, k, device)["fp8"]
    wref = qw.dequantize(torch.float64)
    bias = (torch.randn(n, generator=g) * 0.1).to(device=device, dtype=dtype)
    for m in rows:
        x = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
        got = triton_quant.qmm(x, qw, bias, fp8_scale_after=True)
        e = rel_err(got, x.double() @ wref.T + bias.double())
        assert e < tol, (m, e)


def check_silu(n: int, k: int, device: str, dtype: torch.dtype, tol: float) -> None:
    """The SiLU·mul epilogue: gate rows [0, n), up rows [n, 2n)."""
    from kvserve.kernels import triton_quant

    g = torch.Generator().manual_seed(8)
    for name, qw in formats(2 * n, k, device).items():
        x = torch.randn(1, k, generator=g).to(device=device, dtype=dtype)
        y = x.double() @ qw.dequantize(torch.float64).T
        ref = torch.nn.functional.silu(y[:, :n]) * y[:, n:]
        got = triton_quant.qgemv(x, qw, None, silu=True)
        assert got.shape == (1, n)
        assert rel_err(got, ref) < tol, (name, rel_err(got, ref))


def check_rope(device: str, dtype: torch.dtype, tol: float, hq: int = 4, hkv: int = 2, d: int = 64, k: int = 256) -> None:
    """The qkv + RoPE + K/V store epilogue against the plain product then a fp64 rotation."""
    from kvserve.kernels import triton_quant

    n = (hq + 2 * hkv) * d
    g = torch.Generator().manual_seed(9)
    ang, cos_sin, pos = rope_case(d, device)
    for name, qw in formats(n, k, device).items():
        x = torch.randn(1, k, generator=g).to(device=device, dtype=dtype)
        cache = torch.zeros(2, 4, 16, hkv, d, device=device, dtype=dtype)
        slot = torch.tensor([21], device=device)
        got = triton_quant.qgemv_rope_(x, qw, None, pos, cos_sin, hq, hkv, d, cache, slot)
        assert_rope_result(got, cache, rope_reference(x, qw, ang, hq, hkv, d), hq, hkv, d, tol, name)


def check_act_quant(device: str) -> None:
    from kvserve.kernels import triton_quant

    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(3)).to(device=device, dtype=torch.bfloat16)
    q, s = triton_quant.act_quant_fp8(x)
    ref_s = x.float().abs().amax(1, keepdim=True) / 448.0
    assert torch.allclose(s.cpu(), ref_s.cpu())
    assert rel_err(q.float() * s, x.float()) < 0.08  # e4m3: 3 mantissa bits


PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def dequantized_folder(src: Path, scheme: str, dst: Path) -> Path:
    """The HF checkpoint with every weight the GPU quantizes replaced by its dequantized value
    (the LM head in int8 for int4, as the platform keeps it)."""
    import shutil

    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    for f in src.glob("*.safetensors"):
        sd = load_file(f)
        for name, t in sd.items():
            k = t.shape[-1] if t.dim() == 2 else 0
            is_proj = any(f".{p}." in name for p in PROJ)
            if t.dim() != 2 or not (is_proj or name == "lm_head.weight"):
                continue
            s = "int8" if (name == "lm_head.weight" and scheme == "int4") else scheme
            if s == "int4" and int4_group(k) is None or s != "int4" and k % 32:
                continue
            qw = quantize(t.float(), s, int4_group(k) or 128)
            sd[name] = qw.dequantize(torch.float32).to(t.dtype)
        save_file(sd, dst / f.name)
    return dst


def run_interpret() -> None:
    """Everything above on tiny CPU shapes (run with TRITON_INTERPRET=1)."""
    check_products(8, 256, "cpu", torch.float32, [1, 3], tol=1e-5)
    check_silu(4, 256, "cpu", torch.float32, tol=1e-5)
    check_rope("cpu", torch.float32, tol=1e-5, hq=2, hkv=1, d=8)
    check_act_quant("cpu")
    # 16-bit activations take the GEMVs' folded-constant path (fp32 ones subtract it exactly).
    # (the interpreter's tl.dot is wrong in bf16, which numpy lacks: the GEMM in fp16)
    check_products(8, 256, "cpu", torch.bfloat16, [1], tol=1.5e-2)
    check_products(8, 256, "cpu", torch.float16, [1, 3], tol=2e-3)
    check_silu(4, 256, "cpu", torch.float16, tol=2e-3)
    # the 4-bit word GEMM: both modes, split K (whole groups per split), groups of 128 and 32
    split = ((16, 32, 128, 4, 2, 2), (16, 16, 64, 4, 2, 4))
    check_qmm4(48, 1024, "cpu", torch.float32, [3], tol=1e-5, configs=split)
    check_qmm4(48, 512, "cpu", torch.float16, [5], tol=2e-3, configs=(None, split[0]))
    check_fp8_scale_after(8, 256, "cpu", torch.float32, [3], tol=1e-5)
    check_fp8_scale_after(8, 256, "cpu", torch.float16, [3], tol=2e-3)
    print("interpret checks passed")


if __name__ == "__main__":
    run_interpret()
