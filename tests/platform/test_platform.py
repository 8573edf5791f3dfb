"""The platform seam: the CPU probe and its ISA levels, the `KVSERVE_CPU_ISA` switch, the dtype
`auto` picks, and the layer builder's choices (which linear method and ops a model gets)."""

from __future__ import annotations

import logging

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.models.linear import DenseLinearMethod, Linear
from kvserve.platform import get_platform
from kvserve.platform.base import WeightFormat
from kvserve.platform.cpu import CpuPlatform
from kvserve.platform.cpuinfo import CpuInfo, at_least, cpu_info, isa_level

AVX2 = CpuInfo("x86_64", "AVX2 box", frozenset({"sse2", "avx", "avx2", "fma", "f16c"}))
AVX512 = CpuInfo("x86_64", "AVX-512 box", AVX2.flags | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"})
BF16 = CpuInfo("x86_64", "Zen 5 box", AVX512.flags | {"avx512_bf16"})
OLD = CpuInfo("x86_64", "old box", frozenset({"sse2", "avx"}))
ARM = CpuInfo("aarch64", "Neoverse", frozenset({"fp", "asimd", "asimddp", "bf16", "sve"}))


def test_levels_follow_the_flags():
    assert OLD.levels() == ("baseline",)
    assert AVX2.levels() == ("baseline", "avx2")
    assert AVX512.levels() == ("baseline", "avx2", "avx512")
    assert BF16.levels() == ("baseline", "avx2", "avx512", "avx512_bf16")
    assert ARM.levels() == ("baseline", "neon", "dotprod")
    assert at_least("avx512_bf16", "avx2", BF16) and not at_least("avx2", "avx512", BF16)


def test_isa_switch_caps_the_level(monkeypatch):
    monkeypatch.delenv("KVSERVE_CPU_ISA", raising=False)
    assert isa_level(BF16) == "avx512_bf16"
    monkeypatch.setenv("KVSERVE_CPU_ISA", "avx2")
    assert isa_level(BF16) == "avx2"
    monkeypatch.setenv("KVSERVE_CPU_ISA", "baseline")
    assert isa_level(BF16) == "baseline" and isa_level(ARM) == "baseline"
    monkeypatch.setenv("KVSERVE_CPU_ISA", "avx512")
    with pytest.raises(ValueError, match="KVSERVE_CPU_ISA='avx512'.*lacks it"):
        isa_level(AVX2)
    monkeypatch.setenv("KVSERVE_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="KVSERVE_CPU_ISA='sse9' is not a level"):
        isa_level(AVX2)


def test_this_cpu_is_probed():
    info = cpu_info()
    assert info.levels()[0] == "baseline"
    if info.is_x86:
        assert ("avx2" in info.levels()) == info.has("avx2", "fma", "f16c")


def test_auto_dtype_is_native(monkeypatch):
    monkeypatch.delenv("KVSERVE_CPU_ISA", raising=False)
    ggml = WeightFormat("ggml")
    for info, bf16_ckpt in ((AVX2, torch.float32), (AVX512, torch.float32), (BF16, torch.bfloat16)):
        p = CpuPlatform(info=info)
        assert p.resolve_dtype("auto", "bfloat16") == bf16_ckpt, info.model
        assert p.resolve_dtype("auto", "float32") == torch.float32
        assert p.resolve_dtype("auto", None, ggml) == torch.float32  # the int8 kernels' accumulation type
        assert p.resolve_dtype("bfloat16", "float32") == torch.bfloat16  # explicit: honoured
    monkeypatch.setenv("KVSERVE_CPU_ISA", "avx2")
    assert CpuPlatform(info=BF16).resolve_dtype("auto", "bfloat16") == torch.float32


def test_describe_is_one_line_naming_the_paths():
    line = get_platform(torch.device("cpu")).describe()
    assert "\n" not in line and "ISA level" in line and "GGML int8 kernels" in line


def test_weight_format_and_bad_quantization():
    p = CpuPlatform(info=AVX2)
    assert p.weight_format(True, None) == WeightFormat("ggml")
    assert p.weight_format(True, "none") == WeightFormat("dequantize")
    assert p.weight_format(False, "q8_0") == WeightFormat("ggml", 8)
    assert p.weight_format(False, "q4_0") == WeightFormat("ggml", 2)
    with pytest.raises(ValueError, match="quantization"):
        p.weight_format(False, "q3_k")


def test_forced_avx2_bf16_runs_dense_and_logs_the_platform(tiny_llama, monkeypatch, caplog):
    """What crashed on AVX2-only CPUs: bf16 with oneDNN prepacking. Forced to the AVX2 level (on
    any machine), bf16 layers stay dense, nothing raises, and the start-up line names the level."""
    monkeypatch.setenv("KVSERVE_CPU_ISA", "avx2" if "avx2" in cpu_info().levels() else "baseline")
    with caplog.at_level(logging.INFO, logger="kvserve.platform.base"):
        llm = LLM(str(tiny_llama[0]), dtype="bfloat16", device="cpu", num_kv_blocks=32)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("platform:")]
    assert len(lines) == 1 and "ISA level" in lines[0]
    model = llm.engine.runner.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(type(m.method) is DenseLinearMethod for m in linears)
    assert model.cpu_decoder in (None, False)  # no bf16 C stack below AVX512-BF16
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_engine_auto_dtype_follows_the_platform(tiny_llama, monkeypatch):
    monkeypatch.setenv("KVSERVE_CPU_ISA", "baseline")
    llm = LLM(str(tiny_llama[0]), device="cpu", num_kv_blocks=32)
    assert llm.engine.loaded.dtype == torch.float32  # tiny_llama is fp32; baseline has no bf16 anyway
    assert llm.engine.platform.level == "baseline"


def test_bad_isa_env_is_a_value_error(tiny_llama, monkeypatch):
    monkeypatch.setenv("KVSERVE_CPU_ISA", "turbo")
    with pytest.raises(ValueError, match="KVSERVE_CPU_ISA"):
        LLM(str(tiny_llama[0]), device="cpu", num_kv_blocks=32)
