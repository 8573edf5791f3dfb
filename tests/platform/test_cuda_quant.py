"""CUDA quantized weights, the device-independent parts (`platform/cuda_quant.py`): exact GGUF
repacks, quantization at load, the linear method's loading / shards / fallbacks (its PyTorch
reference product off CUDA), option errors; and the Triton kernels under TRITON_INTERPRET=1 on
tiny shapes (a subprocess: the interpreter is chosen when a kernel is defined)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kvserve.kernels import cpu_quant
from kvserve.models.linear import Linear, QuantizedTensor
from kvserve.platform.cuda_quant import CudaQuantLinearMethod, int4_group, quantize, repack_ggml
from tests.interpreted import run_interpreted, run_sass_check
from tests.kernels.test_cpu_quant import random_weight

GGUF_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q4_K"]
CPU = torch.device("cpu")

@pytest.mark.parametrize("name", GGUF_TYPES)
def test_repack_is_exact(name):
    q = cpu_quant.QTYPES[name]
    raw = random_weight(name, 6, 512, seed=5)
    qw = repack_ggml(QuantizedTensor(q, raw, 512))
    assert qw.kind == ("int8" if name == "Q8_0" else "int4") and qw.group == 32
    assert torch.equal(qw.dequantize(), cpu_quant.dequantize(q, raw, 512))
    # A row-parallel shard (a column slice on block boundaries) repacks to the same columns.
    part = QuantizedTensor(q, raw, 512).narrow(1, 256, 256)
    assert torch.equal(repack_ggml(part).dequantize(), cpu_quant.dequantize(q, raw, 512)[:, 256:])


def test_unsupported_ggml_type_is_none():
    raw = random_weight("Q6_K", 4, 256, seed=1)
    assert repack_ggml(QuantizedTensor(cpu_quant.QTYPES["Q6_K"], raw, 256)) is None


@pytest.mark.parametrize("scheme,bound", [("int8", 0.01), ("int4", 0.13), ("fp8", 0.04)])
def test_quantize_error(scheme, bound):
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    w[3] = 0.0  # an all-zero row / group: scale 0 must not give NaN
    qw = quantize(w, scheme)
    d = qw.dequantize()
    assert torch.isfinite(d).all() and (d[3] == 0).all()
    assert ((d - w).norm() / w.norm()).item() < bound
    if scheme == "int4":
        assert qw.group == 128 and qw.q.shape == (64, 256) and qw.scale.dtype == torch.float16
        assert qw.nbytes == 64 * 256 + 2 * 64 * 4 * 2  # 4.25 bits a weight
    # Quantizing the dequantized weight again gives the same codes (the stored scales are used).
    again = quantize(d, scheme)
    assert torch.equal(again.dequantize(), d) or ((again.dequantize() - d).abs().max() <= 1e-6)


def test_int4_group_for_shards():
    assert int4_group(4096) == 128 and int4_group(7168) == 128  # Llama-3.1-8B down_proj at TP=2
    assert int4_group(96) == 32 and int4_group(64) == 64 and int4_group(40) is None


def _linear(scheme, out_sizes, k=256, bias=False):
    method = CudaQuantLinearMethod(scheme, CPU, torch.float32)
    layer = Linear(k, out_sizes, bias, method)
    layer.label = "test.weight"
    return layer


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
def test_method_fused_shards(scheme):
    g = torch.Generator().manual_seed(1)
    layer = _linear(scheme, [64, 32, 32], bias=True)
    parts = [torch.randn(r, 256, generator=g) for r in (64, 32, 32)]
    for i in (2, 0, 1):  # any order
        layer.load_shard(parts[i], i)
    layer.bias = torch.nn.Parameter(torch.randn(128, generator=g), requires_grad=False)
    layer.method.finish(layer)
    assert layer.weight is None and layer.qweight.kind == scheme
    want = torch.cat([quantize(p, scheme).dequantize() for p in parts])
    assert torch.equal(layer.qweight.dequantize(), want)
    x = torch.randn(5, 256, generator=g)
    torch.testing.assert_close(layer(x), F.linear(x, want, layer.bias))
    assert "qweight_q" in dict(layer.named_buffers())
    with pytest.raises(Exception, match="loaded twice"):
        layer.load_shard(parts[0], 0)
        layer.load_shard(parts[0], 0)


def test_method_gguf_parts_and_mixed_fallback():
    # q, k, v all Q4_K: one int4 weight, exact.
    q4k = cpu_quant.QTYPES["Q4_K"]
    raws = [random_weight("Q4_K", r, 256, seed=s) for s, r in ((1, 64), (2, 32), (3, 32))]
    layer = _linear(None, [64, 32, 32])
    for i, raw in enumerate(raws):
        layer.load_shard(QuantizedTensor(q4k, raw, 256), i)
    layer.method.finish(layer)
    ref = torch.cat([cpu_quant.dequantize(q4k, r, 256) for r in raws])
    assert layer.qweight.kind == "int4" and torch.equal(layer.qweight.dequantize(), ref)
    # v in Q6_K (a Q4_K_M file): no common layout -> the exact dequantized values, dense.
    layer = _linear(None, [64, 32, 32])
    q6 = random_weight("Q6_K", 32, 256, seed=4)
    layer.load_shard(QuantizedTensor(q4k, raws[0], 256), 0)
    layer.load_shard(QuantizedTensor(q4k, raws[1], 256), 1)
    layer.load_shard(QuantizedTensor(cpu_quant.QTYPES["Q6_K"], q6, 256), 2)
    layer.method.finish(layer)
    assert layer.qweight is None and layer.weight.dtype == torch.float32
    want = torch.cat([ref[:96], cpu_quant.dequantize(cpu_quant.QTYPES["Q6_K"], q6, 256)])
    assert torch.equal(layer.weight, want)
    # A dense part with no scheme (an F32 tensor in the GGUF) stays dense.
    layer = _linear(None, 16)
    w = torch.randn(16, 256)
    layer.load_shard(w)
    layer.method.finish(layer)
    assert layer.qweight is None and torch.equal(layer.weight, w)


def test_method_dummy_and_unquantizable_width():
    layer = _linear("int4", 32)
    layer.method.finish(layer)  # load_format="dummy": nothing loaded
    assert layer.qweight is not None and torch.isfinite(layer.qweight.dequantize()).all()
    layer = _linear("int4", 8, k=40)  # 40 columns: no group fits -> dense
    w = torch.randn(8, 40)
    layer.load_shard(w)
    layer.method.finish(layer)
    assert layer.qweight is None and torch.equal(layer.weight, w)


def test_option_errors():
    from kvserve.engine.arg_utils import EngineArgs
    from kvserve.platform.cpu import CpuPlatform
    from kvserve.platform.cuda import CudaPlatform

    EngineArgs(model="x", quantization="int4")
    with pytest.raises(ValueError, match="quantization"):
        EngineArgs(model="x", quantization="int3")
    with pytest.raises(ValueError, match="quantization"):
        CpuPlatform().weight_format(False, "int8")
    p = CudaPlatform.__new__(CudaPlatform)  # no GPU here: only the option checks
    p.device, p.triton = torch.device("cuda"), True
    with pytest.raises(ValueError, match="quantization"):
        p.weight_format(False, "q4_0")
    assert p.weight_format(True, "none").kind == "dequantize"
    assert p.weight_format(False, "int4").quantize_to == "int4"
    # GGUF blocks: dequantized by default on CUDA (faster above batch 1 so far); "gguf" keeps them
    assert p.weight_format(True, None).kind == "dequantize"
    assert (p.weight_format(True, "gguf").kind, p.weight_format(True, "gguf").quantize_to) == ("ggml", "gguf")
    with pytest.raises(ValueError, match="gguf"):
        p.weight_format(False, "gguf")
    assert CpuPlatform().weight_format(True, "gguf").kind == "ggml"  # the CPU's default, by name
    with pytest.raises(ValueError, match="gguf"):
        CpuPlatform().weight_format(False, "gguf")
    p.triton = False
    with pytest.raises(ValueError, match="Triton"):
        p.weight_format(False, "int8")
    with pytest.raises(ValueError, match="Triton"):
        p.weight_format(True, "gguf")
    assert p.weight_format(True, None).kind == "dequantize"


def test_triton_kernels_interpreted():
    run_interpreted("quant_checks", timeout=300)


def test_int4_word_gemm_asm_is_exact():
    """The 4-bit word GEMM's inline PTX (`_nibbles`: prmt / and / half-precision fmas), which the
    interpreter does not run, emulated bit for bit: 128 + q and s q + m (one rounding) exactly."""
    from tests.gpu import ptx_emu

    ptx_emu.check_nibbles(str(Path(__file__).resolve().parents[2] / "kvserve" / "kernels" / "triton_qmm4.py"))


def test_int8_qmm_compiles_for_sm90():
    """The int8 GEMM's default word tile compiled for sm_90 without a GPU (`tests/gpu/quant_sass.py`):
    its inline PTX assembles (the interpreter runs none), no I2F conversions, no spills in bf16."""
    run_sass_check("quant_sass", "quant sass checks passed")


class _CpuQuantPlatform:
    """The CPU platform with the CUDA quantized method (its PyTorch reference products): the
    engine's loading path for these formats, testable without a GPU."""

    def __new__(cls, scheme):
        from kvserve.models.ops import Ops
        from kvserve.platform.base import LayerBuilder, Platform, WeightFormat
        from kvserve.platform.cpu import CpuPlatform

        class P(CpuPlatform):
            def weight_format(self, checkpoint_quantized, quantization, dtype="auto"):
                return WeightFormat("ggml" if checkpoint_quantized else "dense", scheme or "gguf")

            def resolve_dtype(self, dtype, checkpoint_dtype, weights=None):
                return torch.float32

            def layer_builder(self, backend, dtype, weights):
                method = CudaQuantLinearMethod(scheme, CPU, dtype)
                head = CudaQuantLinearMethod("int8", CPU, dtype) if scheme == "int4" else None
                return LayerBuilder(backend=backend, ops=Ops(), linear_method=method, dtype=dtype, head_method=head)

            def prepare_model(self, model):
                Platform.prepare_model(self, model)

        return P()


@pytest.mark.parametrize("arch,scheme", [("llama", "int4"), ("smollm2", "int8"), ("llama", "fp8")])
def test_engine_loading_matches_dequantized_checkpoint(tiny_model_factory, tmp_path, monkeypatch, arch, scheme):
    """Fused shards, the untied head (int8 under int4), the tied head (dense), the embedding:
    greedy ids of the engine on this method equal the engine on the dequantized checkpoint."""
    from kvserve import LLM, SamplingParams
    from kvserve.engine import llm_engine
    from tests.gpu.quant_checks import dequantized_folder

    folder, _ = tiny_model_factory(arch)
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = [{"prompt_token_ids": [5, 9, 13, 40, 7]}, {"prompt_token_ids": list(range(20, 50))}]
    ref = LLM(str(dequantized_folder(folder, scheme, tmp_path / "deq")), device="cpu", dtype="float32", max_model_len=128)
    want = [o.outputs[0].token_ids for o in ref.generate(prompts, sp, use_tqdm=False)]
    monkeypatch.setattr(llm_engine, "get_platform", lambda device: _CpuQuantPlatform(scheme))
    llm = LLM(str(folder), device="cpu", dtype="float32", max_model_len=128)
    model = llm.engine.runner.model
    assert model.layers[0].mlp.gate_up_proj.qweight.kind == scheme
    head = model.lm_head
    if arch == "smollm2":  # tied: the head is the dense embedding
        assert head.qweight is None and head.weight is model.embed_tokens.weight
    else:
        assert head.qweight.kind == ("int8" if scheme == "int4" else scheme)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)] == want


def test_qmm_env_switches_are_checked():
    """A mistyped KVSERVE_INT4_QMM / KVSERVE_FP8_QMM_SCALE_AFTER / row-count switch is refused by
    name, never silently taken as the default (nor a bare int() traceback)."""
    import os
    import subprocess
    import sys

    for name, value, module in (("KVSERVE_INT4_QMM", "word", "kvserve.kernels.triton_quant"),
                                ("KVSERVE_FP8_QMM_SCALE_AFTER", "yes", "kvserve.kernels.triton_quant"),
                                ("KVSERVE_INT4_QMM_MAX_ROWS", "lots", "kvserve.platform.cuda_quant"),
                                ("KVSERVE_QMM_MAX_ROWS", "-1", "kvserve.platform.cuda_quant")):
        env = dict(os.environ, **{name: value})
        r = subprocess.run([sys.executable, "-c", f"import {module}"], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and f"ValueError: {name} must be" in r.stderr, r.stderr[-500:]
