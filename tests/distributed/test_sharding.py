"""Tensor-parallel sharding without processes: which slice of each weight a rank reads, and that
the loaders read exactly that slice (safetensors lazily, .bin memory-mapped)."""

from __future__ import annotations

import pytest
import torch

from kvserve.core.config import ModelConfig
from kvserve.distributed import parallel_state as ps
from kvserve.loader.safetensors import iter_weights


@pytest.fixture
def as_rank():
    def set_rank(rank: int, size: int) -> None:
        ps.set_tp(ps.TPState(rank=rank, size=size))

    yield set_rank
    ps.reset_tp()


def test_kv_heads_follow_query_heads():
    """Every query head of a rank uses a KV head that rank holds (GQA group = hq / hkv)."""
    for hq, hkv, tp in [(8, 2, 4), (8, 1, 2), (8, 8, 2), (32, 8, 2), (32, 8, 8), (6, 2, 2)]:
        group = hq // hkv
        for r in range(tp):
            first, n = ps.kv_head_shard(hkv, ps.TPState(rank=r, size=tp))
            q = range(r * hq // tp, (r + 1) * hq // tp)
            assert {h // group for h in q} <= set(range(first, first + n)), (hq, hkv, tp, r)


def test_vocab_shard_pads_the_last_rank():
    assert ps.vocab_shard(10, ps.TPState(rank=0, size=3)) == (0, 4)
    assert ps.vocab_shard(10, ps.TPState(rank=2, size=3)) == (8, 4)  # rows 8, 9 + 2 padding


def test_check_divisible_names_the_option():
    with pytest.raises(ValueError, match="tensor_parallel_size=4 must divide the number of KV heads"):
        ps.check_divisible(num_heads=12, num_kv_heads=6, intermediate_size=64, family="llama", tp_size=4)
    with pytest.raises(ValueError, match="tensor_parallel_size=2 must divide the MLP intermediate size"):
        ps.check_divisible(num_heads=4, num_kv_heads=2, intermediate_size=63, family="llama", tp_size=2)
    ps.check_divisible(num_heads=8, num_kv_heads=1, intermediate_size=64, family="llama", tp_size=4)


def _cfg(**kw) -> ModelConfig:
    d = dict(architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128, num_hidden_layers=1,
             num_attention_heads=4, num_key_value_heads=1, vocab_size=101, max_position_embeddings=64)
    return ModelConfig.from_hf_dict({**d, **kw})


def test_llama_shard_shapes(as_rank):
    from kvserve.attention.torch_ref import TorchRefBackend
    from kvserve.models.llama import LlamaForCausalLM
    from kvserve.platform.base import LayerBuilder

    as_rank(1, 2)
    with torch.device("meta"):
        m = LlamaForCausalLM(_cfg(), LayerBuilder.native(TorchRefBackend()))
    attn, mlp = m.layers[0].self_attn, m.layers[0].mlp
    assert (attn.num_heads, attn.num_kv_heads) == (2, 1)  # the single KV head is replicated
    assert attn.qkv_proj.weight.shape == (2 * 16 + 2 * 16, 64)
    assert attn.o_proj.weight.shape == (64, 2 * 16)
    assert mlp.gate_up_proj.weight.shape == (2 * 64, 64) and mlp.down_proj.weight.shape == (64, 64)
    assert m.embed_tokens.weight.shape == (51, 64) and m.lm_head.weight.shape == (51, 64)
    ws = m.weight_shard
    assert ws("model.layers.0.self_attn.q_proj.weight", (64, 64)) == (0, 32, 32)
    assert ws("model.layers.0.self_attn.k_proj.weight", (16, 64)) == (0, 0, 16)  # replica of head 0
    assert ws("model.layers.0.self_attn.o_proj.weight", (64, 64)) == (1, 32, 32)
    assert ws("model.layers.0.mlp.down_proj.weight", (64, 128)) == (1, 64, 64)
    assert ws("model.layers.0.mlp.up_proj.weight", (128, 64)) == (0, 64, 64)
    assert ws("model.embed_tokens.weight", (101, 64)) == (0, 51, 51)  # 50 rows + 1 padding
    assert ws("model.layers.0.input_layernorm.weight", (64,)) is None


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_loaders_read_only_the_shard(tmp_path, fmt):
    g = torch.Generator().manual_seed(0)
    full = {"a.weight": torch.randn(6, 4, generator=g), "b.weight": torch.randn(4, 6, generator=g),
            "c.weight": torch.randn(5, 2, generator=g), "n.weight": torch.randn(4, generator=g)}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(full, str(tmp_path / "model.safetensors"))
    else:
        torch.save(full, tmp_path / "pytorch_model.bin")
    specs = {"a.weight": (0, 3, 3), "b.weight": (1, 2, 2), "c.weight": (0, 3, 3)}  # c: runs past the end

    def shard(name, shape):
        return specs.get(name)

    got = dict(iter_weights(tmp_path, torch.float32, shard))
    assert torch.equal(got["a.weight"], full["a.weight"][3:6])
    assert torch.equal(got["b.weight"], full["b.weight"][:, 2:4])
    assert torch.equal(got["c.weight"], full["c.weight"][3:5])  # clamped to the 2 remaining rows
    assert torch.equal(got["n.weight"], full["n.weight"])
