"""The one-call CPU decoder stack (kvserve/csrc/decoder_stack_bf16.c, models/cpu_decoder.py)
against the op-by-op forward it replaces (bit for bit: hidden states and KV-cache writes) and
against fp32 math, and the conditions under which a step uses it."""

from __future__ import annotations

import random

import pytest
import torch

from kvserve import LLM
from kvserve.attention.base import AttentionMetadata
from kvserve.engine.trace import RecordingBackend
from kvserve.models import cpu_kernels
from kvserve.models.cpu_decoder import DecoderStack
from tests.models.decode_metadata import decode_metadata

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None, reason="no AVX512-BF16 CPU or C compiler")

BS, NUM_BLOCKS = 16, 48


def _model(tiny_model_factory, arch: str, dtype: str = "bfloat16"):
    folder, _ = tiny_model_factory(arch)
    return LLM(str(folder), dtype=dtype, device="cpu", num_kv_blocks=64).engine.runner.model


def _decode_step(rows: int, seed: int, cfg, dtype=torch.bfloat16):
    """Random caches and one decode step of `rows` sequences with random lengths and blocks:
    (input_ids, positions, caches, metadata) shaped as the runner builds them."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    caches = [torch.randn(2, NUM_BLOCKS, BS, cfg.num_kv_heads, cfg.head_dim).to(dtype) for _ in range(cfg.num_layers)]
    lens = [rng.choice([2, BS, BS + 1, rng.randint(3, 120)]) for _ in range(rows)]
    width = max(-(-n // BS) for n in lens)
    blocks = rng.sample(range(NUM_BLOCKS), rows * width)  # no two sequences share a block
    tables = torch.tensor(blocks, dtype=torch.int32).view(rows, width)
    for i, n in enumerate(lens):
        tables[i, -(-n // BS):] = 0  # past a sequence's last block, as the runner pads
    slots = torch.tensor([int(tables[i, (n - 1) // BS]) * BS + (n - 1) % BS for i, n in enumerate(lens)])
    md = decode_metadata(tables, lens, slots, BS)
    ids = torch.randint(0, cfg.vocab_size, (rows,))
    return ids, torch.tensor(lens) - 1, caches, md


def _fresh(md: AttentionMetadata) -> AttentionMetadata:
    """The same step with an empty backend cache (each forward builds its own plan)."""
    return AttentionMetadata(**{**md.__dict__, "backend_cache": {}})


@pytest.mark.parametrize("arch", ["llama", "llama3", "mistral_sw", "qwen2", "smollm2"])
@pytest.mark.parametrize("rows", [1, 2, 4])
def test_stack_is_bit_identical_to_op_by_op_forward(tiny_model_factory, arch, rows):
    model = _model(tiny_model_factory, arch)
    ids, pos, caches, md = _decode_step(rows, seed=rows * 31 + len(arch), cfg=model.config)
    before, op_caches = [c.clone() for c in caches], [c.clone() for c in caches]
    with torch.inference_mode():
        fused = model(ids, pos, caches, _fresh(md))
        assert isinstance(model.cpu_decoder, DecoderStack) and model.cpu_decoder.num_steps == 1
        stack, model.cpu_decoder = model.cpu_decoder, False
        plain = model(ids, pos, op_caches, _fresh(md))
    assert fused.dtype == torch.bfloat16 and fused.shape == plain.shape == (rows, model.config.hidden_size)
    assert torch.equal(fused, plain)
    for a, b, old in zip(caches, op_caches, before):
        assert torch.equal(a, b) and not torch.equal(a, old)  # the same new K/V in the same slots
    # A new set of caches (e.g. reallocated): the stack repoints its table and still agrees.
    model.cpu_decoder = stack
    ids2, pos2, caches2, md2 = _decode_step(rows, seed=rows + 99, cfg=model.config)
    op_caches2 = [c.clone() for c in caches2]
    with torch.inference_mode():
        fused2 = model(ids2, pos2, caches2, _fresh(md2))
        model.cpu_decoder = False
        plain2 = model(ids2, pos2, op_caches2, _fresh(md2))
    assert stack.num_steps == 2
    assert torch.equal(fused2, plain2) and all(torch.equal(a, b) for a, b in zip(caches2, op_caches2))


@pytest.mark.parametrize("arch", ["llama", "smollm2", "qwen2"])
def test_stack_matches_fp32_forward(tiny_model_factory, arch):
    """The bf16 stack against the same weights run in fp32 (PyTorch ops, fp32 cache)."""
    model = _model(tiny_model_factory, arch)
    ref = _model(tiny_model_factory, arch, dtype="float32")
    ids, pos, caches, md = _decode_step(3, seed=5, cfg=model.config)
    ref_caches = [c.float() for c in caches]
    with torch.inference_mode():
        got = model(ids, pos, caches, _fresh(md)).float()
        want = ref(ids, pos, ref_caches, _fresh(md))
    assert model.cpu_decoder.num_steps == 1 and ref.cpu_decoder is False
    rel = (got - want).norm() / want.norm()
    assert rel < 0.02, f"relative error {rel:.4f} against fp32"
    # The new K/V written by the stack are the fp32 ones rounded (within bf16 accumulation error).
    for layer in (0, -1):
        s = md.slot_mapping
        k_got = caches[layer][0].view(-1, *caches[layer].shape[3:])[s].float()
        k_want = ref_caches[layer][0].view(-1, *ref_caches[layer].shape[3:])[s]
        assert (k_got - k_want).norm() / k_want.norm() < 0.02


def test_steps_that_do_not_fit_run_op_by_op(tiny_model_factory):
    model = _model(tiny_model_factory, "smollm2")
    cfg = model.config
    with torch.inference_mode():
        model(*_decode_step(2, 1, cfg))
        stack = model.cpu_decoder
        assert stack.num_steps == 1
        model(*_decode_step(cpu_kernels.MAX_ROWS + 1, 2, cfg))  # too many rows
        ids, pos, caches, md = _decode_step(1, 3, cfg)
        md.is_pure_decode = False  # e.g. a step with a prefill chunk
        model(ids, pos, caches, md)
        ids, pos, caches, md = _decode_step(1, 4, cfg)
        attn = model.layers[1].self_attn
        seen = []
        attn.backend = RecordingBackend(attn.backend, lambda *a: seen.append(a))  # `kvserve trace`
        model(ids, pos, caches, md)
    assert seen and stack.num_steps == 1


@pytest.mark.parametrize("arch,dtype", [("qwen3", "bfloat16"), ("llama", "float32")])
def test_models_it_does_not_support_keep_the_layers(tiny_model_factory, arch, dtype):
    """q/k norm (Qwen3) and fp32: the op-by-op forward, and the stack is never built again."""
    model = _model(tiny_model_factory, arch, dtype)
    with torch.inference_mode():
        model(*_decode_step(1, 7, model.config, getattr(torch, dtype)))
    assert model.cpu_decoder is False


def test_stack_result_does_not_depend_on_the_thread_count(tiny_model_factory):
    """Threads split weight rows and attention items, never a sum: 1 and 3 threads agree bit for
    bit with the default."""
    model = _model(tiny_model_factory, "smollm2")
    ids, pos, caches, md = _decode_step(3, seed=11, cfg=model.config)
    results = []
    default = torch.get_num_threads()
    try:
        for n in (default, 1, 3):
            torch.set_num_threads(n)
            step_caches = [c.clone() for c in caches]
            with torch.inference_mode():
                results.append((model(ids, pos, step_caches, _fresh(md)), step_caches))
    finally:
        torch.set_num_threads(default)
    assert model.cpu_decoder.num_steps == 3
    for hidden, step_caches in results[1:]:
        assert torch.equal(hidden, results[0][0])
        assert all(torch.equal(a, b) for a, b in zip(step_caches, results[0][1]))
