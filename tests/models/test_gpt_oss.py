"""gpt-oss: greedy parity with HF transformers in fp32 on tiny random models (6 query heads over
2 KV heads, 5 experts with top-2 routing, attention sinks, biases everywhere, a clamped SwiGLU
whose limit bites, YaRN RoPE, a sliding window shorter than the prompts), batched and one at a
time; an MXFP4 checkpoint in gpt-oss's on-disk layout (kept 4-bit) against HF on the
dequantized weights; tensor parallelism on CPU processes against one process."""

from __future__ import annotations

import json

import pytest
import torch

from kvserve import LLM
from kvserve.kernels import mxfp4
from tests.conftest import TINY_VOCAB, _save_tokenizer
from tests.interpreted import run_interpreted, run_sass_check
from tests.models.test_parity import NEW_TOKENS, assert_batched_and_alone_match_hf, _prompts, hf_greedy
from tests.models.tp_check import assert_tp2_matches_tp1



def _config(inter: int = 32, yarn: dict | None = None):
    import transformers as tf

    kw = dict(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=inter, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, head_dim=16, num_local_experts=5, num_experts_per_tok=2,
        sliding_window=6, max_position_embeddings=512, swiglu_limit=0.6, eos_token_id=2, bos_token_id=1,
        pad_token_id=0,
    )
    if yarn is not None:
        kw["rope_parameters"] = yarn
    return tf.GptOssConfig(**kw)


def _hf_model(inter: int = 32, yarn: dict | None = None):
    """A tiny random HF gpt-oss with weights scaled so routing, sinks, biases and the clamp matter."""
    import transformers as tf

    torch.manual_seed(0)
    hf = tf.AutoModelForCausalLM.from_config(_config(inter, yarn)).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() >= 2:
                p.mul_(4.0 if "emb" in name else 2.0)
            elif name.endswith(("sinks", "router.bias")):
                p.copy_(torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return hf


def _check(llm, hf, prompts):
    refs = [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    assert_batched_and_alone_match_hf(llm, prompts, refs, alone=2)


YARN_ACTIVE = {"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
               "original_max_position_embeddings": 64, "rope_theta": 10000.0}


@pytest.mark.parametrize("yarn", [None, YARN_ACTIVE], ids=["default-rope", "yarn-ramp"])
def test_gpt_oss_greedy_matches_hf_batched_and_alone(yarn, tmp_path):
    from kvserve.models.gpt_oss import GptOssMoE

    hf = _hf_model(yarn=yarn)
    hf.save_pretrained(tmp_path)
    _save_tokenizer(tmp_path)
    # Chunked prefill (budget 24 < the 40-token prompt) and prefix caching are on.
    llm = LLM(str(tmp_path), dtype="float32", device="cpu", num_kv_blocks=64, max_num_batched_tokens=24)
    model = llm.engine.runner.model
    assert isinstance(model.layers[0].mlp, GptOssMoE)
    assert [l.self_attn.sliding_window for l in model.layers] == [6, None, 6]
    _check(llm, hf, _prompts()[1:])
    # A repeated prompt hits the prefix cache and still gives HF's tokens.
    _check(llm, hf, [_prompts()[4]])


def _write_mxfp4_checkpoint(hf, path) -> None:
    """Quantize every expert's weights to MXFP4, put the dequantized values back into `hf` (the
    oracle) and save a checkpoint in gpt-oss's layout: `*_blocks` [E, out, G, 16] and `*_scales`
    [E, out, G] uint8, biases dense, `quantization_config.quant_method = "mxfp4"`."""
    from safetensors.torch import load_file, save_file

    packed: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                continue
            data = torch.stack([mxfp4.quantize(p[e].t()) for e in range(p.shape[0])])  # [E, out, G * 17]
            cols = p.shape[1]
            for e in range(p.shape[0]):
                p[e].copy_(mxfp4.dequantize(data[e], cols).t())
            packed[name] = data
    hf.save_pretrained(path)
    state = load_file(str(path / "model.safetensors"))
    for name, data in packed.items():
        del state[name]
        blocks, scales = mxfp4.to_gpt_oss(data, data.shape[-1] // mxfp4.BLOCK_BYTES * mxfp4.BLOCK)
        state[f"{name}_blocks"] = blocks.reshape(*scales.shape, 16)
        state[f"{name}_scales"] = scales
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                  "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(cfg))


def test_gpt_oss_mxfp4_checkpoint_stays_4bit_and_matches_hf(tmp_path):
    from kvserve.platform.mxfp4_linear import Mxfp4LinearMethod

    hf = _hf_model(inter=64)
    _write_mxfp4_checkpoint(hf, tmp_path)
    _save_tokenizer(tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", device="cpu", num_kv_blocks=64)
    model = llm.engine.runner.model
    for layer in model.layers:
        for expert in layer.mlp.experts:
            for proj in (expert.gate_up_proj, expert.down_proj):
                assert isinstance(proj.method, Mxfp4LinearMethod) and proj.weight is None
                (part,) = proj.parts
                assert part.qtype == mxfp4.MXFP4 and part.data.dtype == torch.uint8
                assert part.data.numel() == proj.out_features * proj.in_features // 32 * 17  # 4.25 bits a weight
    assert not any(p.dtype == torch.uint8 for p in model.parameters())
    _check(llm, hf, _prompts()[1:])


def test_mxfp4_layouts_and_gguf_dequantization_agree():
    """gpt-oss's pair -> GGML type 39 bytes -> back is the identity, and our dequantization of
    the GGML bytes equals the gguf package's (llama.cpp's reference)."""
    gguf = pytest.importorskip("gguf")
    torch.manual_seed(1)
    w = torch.randn(6, 96) * torch.logspace(-3, 2, 6)[:, None]
    data = mxfp4.quantize(w)
    assert data.shape == (6, 3 * 17)
    blocks, scales = mxfp4.to_gpt_oss(data, 96)
    assert torch.equal(mxfp4.from_gpt_oss(blocks, scales), data)
    ref = gguf.quants.dequantize(data.numpy(), gguf.GGMLQuantizationType.MXFP4)
    ours = mxfp4.dequantize(data, 96)
    assert torch.equal(ours, torch.from_numpy(ref).reshape(6, 96))
    # HF's gpt-oss dequantization of the safetensors pair (low nibble = even weight).
    lut = torch.tensor(mxfp4.FP4_VALUES)
    hf = torch.stack([lut[(blocks & 15).long()], lut[(blocks >> 4).long()]], -1).reshape(6, 3, 32)
    hf = torch.ldexp(hf, scales.to(torch.int32)[..., None] - 127).reshape(6, 96)
    assert torch.equal(ours, hf)
    assert (ours - w).abs().max() <= w.abs().amax(dim=1, keepdim=True).max() / 4  # coarse, but a quantization


@pytest.mark.parametrize("inter, fmt", [(64, "mxfp4"), (32, "mxfp4"), (32, "dense")])
def test_gpt_oss_tensor_parallel_matches_tp1(inter, fmt, tmp_path):
    """TP=2 on CPU processes (gloo): heads, KV heads and sinks split, each rank holding half of
    every expert; greedy tokens and logprobs equal TP=1's. MXFP4 experts whose half is a whole
    number of 32-weight blocks (inter 64) stay 4-bit; a half block (inter 32) is dequantized for
    the down projection's columns."""
    hf = _hf_model(inter=inter)
    if fmt == "mxfp4":
        _write_mxfp4_checkpoint(hf, tmp_path)
    else:
        hf.save_pretrained(tmp_path)
    _save_tokenizer(tmp_path)
    assert_tp2_matches_tp1(str(tmp_path), _prompts()[1:4])


def test_unsupported_architecture_lists_gpt_oss():
    from kvserve.core.config import ModelConfig
    from kvserve.models.registry import model_class

    with pytest.raises(ValueError, match="GptOssForCausalLM"):
        ModelConfig.from_hf_dict({"architectures": ["NopeForCausalLM"]})
    with pytest.raises(ValueError, match="GptOssForCausalLM"):
        model_class("NopeForCausalLM")


@pytest.mark.parametrize("module, done", [("sink_checks", "sink checks passed"),
                                          ("mxfp4_moe_checks", "mxfp4 moe checks passed")])
def test_triton_kernels_interpreted(module, done):
    """Under TRITON_INTERPRET=1 on tiny shapes (a subprocess: the interpreter is chosen when a
    kernel is defined): the attention kernels with sinks (decode direct and split + reduce,
    prefill) against the PyTorch backend; the grouped MXFP4 MoE kernel against the expert loop."""
    run_interpreted(module, done, timeout=600)


def test_mxfp4_moe_kernels_compile_for_sm90():
    """The default MXFP4 MoE GEMV kernels compiled for sm_90 without a GPU (`tests/gpu/mxfp4_sass.py`):
    16-byte vector loads of the codes, no flush-to-zero float ops (the decode makes subnormals), no
    spills."""
    run_sass_check("mxfp4_sass", "mxfp4 sass checks passed")


def test_gpt_oss_trace_cli(tmp_path, capsys):
    """`kvserve trace` on a gpt-oss model: a sliding layer's attention recorded step by step."""
    from kvserve.entrypoints import cli

    _hf_model().save_pretrained(tmp_path)
    _save_tokenizer(tmp_path)
    args = ["trace", "Hello world", "--json", "--model", str(tmp_path), "--dtype", "float32", "--device", "cpu",
            "--steps", "3", "--layer", "0"]
    assert cli.main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["num_heads"] == 6 and data["num_kv_heads"] == 2
    assert [s["stage"] for s in data["steps"]] == ["prefill", "decode", "decode"]


@pytest.mark.parametrize("rows", [1, 3, 8, 20])
def test_mxfp4_cpu_product_matches_dequantized(rows, monkeypatch):
    """The C kernel (up to 8 rows, straight from the blocks), the dequantize-once sgemm (more
    rows) and the PyTorch fallback all give x @ dequantize(W).T + b."""
    torch.manual_seed(rows)
    data = mxfp4.quantize(torch.randn(40, 96) * 0.1)
    x, b = torch.randn(rows, 96), torch.randn(40)
    ref = x.double() @ mxfp4.dequantize(data, 96).double().t() + b.double()
    got = mxfp4.linear(data, 96, x, b)
    assert got.dtype == torch.float32 and torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5)
    assert mxfp4.linear(data, 96, x.bfloat16(), b).dtype == torch.bfloat16
    monkeypatch.setattr(mxfp4, "_library", lambda: None)
    assert torch.allclose(mxfp4.linear(data, 96, x, b).double(), ref, rtol=1e-5, atol=1e-5)


def test_gguf_mxfp4_tensors_read(tmp_path):
    """GGML type 39 (MXFP4) tensors in a GGUF file open and dequantize like kvserve's blocks."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from kvserve.loader.gguf import GGUFFile

    data = mxfp4.quantize(torch.randn(3, 64))  # [3, 2 * 17]
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_tensor("m", data.numpy(), raw_dtype=gguf.GGMLQuantizationType.MXFP4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got = GGUFFile(tmp_path / "m.gguf").dequantize("m")
    assert got.shape == (3, 64)
    np.testing.assert_array_equal(got, mxfp4.dequantize(data, 64).numpy())


def _write_gguf(hf, path) -> None:
    """`hf` (experts already on MXFP4 values) as llama.cpp lays out a gpt-oss GGUF: stacked
    experts with gate and up split (`ffn_{gate,up,down}_exps`, MXFP4 blocks in GGML's layout),
    `attn_sinks`, `ffn_gate_inp` (router), `post_attention_norm` (the pre-MLP norm), YaRN keys."""
    import gguf

    from tests.models.test_gguf import _tiny_vocab

    cfg = hf.config
    q = gguf.GGMLQuantizationType.MXFP4
    w = gguf.GGUFWriter(str(path), "gpt-oss")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_expert_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(cfg.rope_parameters["factor"])
    w.add_rope_scaling_orig_ctx_len(cfg.rope_parameters["original_max_position_embeddings"])
    w.add_expert_count(cfg.num_local_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_sliding_window(cfg.sliding_window)
    w.add_key_value("gpt-oss.swiglu_clamp_exp", cfg.swiglu_limit, gguf.GGUFValueType.FLOAT32)
    tokens, _ = _tiny_vocab()
    tokens += [f"<t{i}>" for i in range(TINY_VOCAB - len(tokens))]
    types = [1] * TINY_VOCAB  # all normal: the engine never samples control tokens, HF would
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["Ġ t", "h e", "Ġt he"])
    w.add_eos_token_id(2)
    sd = {k: v.detach().float() for k, v in hf.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    w.add_tensor("output.weight", sd["lm_head.weight"].numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        names = {"attn_norm.weight": "input_layernorm.weight", "post_attention_norm.weight": "post_attention_layernorm.weight",
                 "attn_sinks.weight": "self_attn.sinks", "ffn_gate_inp.weight": "mlp.router.weight",
                 "ffn_gate_inp.bias": "mlp.router.bias"}
        for part in ("q", "k", "v"):
            names[f"attn_{part}.weight"], names[f"attn_{part}.bias"] = f"self_attn.{part}_proj.weight", f"self_attn.{part}_proj.bias"
        names["attn_output.weight"], names["attn_output.bias"] = "self_attn.o_proj.weight", "self_attn.o_proj.bias"
        for g, h in names.items():
            w.add_tensor(f"blk.{i}.{g}", sd[p + h].numpy())
        gu, gu_b = sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.gate_up_proj_bias"]  # [E, H, 2I], [E, 2I]
        dn, dn_b = sd[p + "mlp.experts.down_proj"], sd[p + "mlp.experts.down_proj_bias"]  # [E, I, H], [E, H]
        for name, mats, bias in (("gate", [m.t()[0::2] for m in gu], gu_b[:, 0::2]), ("up", [m.t()[1::2] for m in gu], gu_b[:, 1::2]),
                                 ("down", [m.t() for m in dn], dn_b)):
            blocks = torch.stack([mxfp4.quantize(m) for m in mats]).numpy()  # [E, out, row_bytes]
            w.add_tensor(f"blk.{i}.ffn_{name}_exps.weight", blocks, raw_dtype=q)
            w.add_tensor(f"blk.{i}.ffn_{name}_exps.bias", bias.contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gpt_oss_gguf_mxfp4_matches_hf(tmp_path):
    """A gpt-oss GGUF with MXFP4 experts: config from its metadata, experts kept 4-bit, greedy
    tokens equal HF's on the same (dequantized) weights; TP=2 equals TP=1."""
    pytest.importorskip("gguf")
    from kvserve.platform.mxfp4_linear import Mxfp4LinearMethod

    hf = _hf_model(inter=64)
    _write_mxfp4_checkpoint(hf, tmp_path / "st")  # puts MXFP4-representable expert values into hf
    _write_gguf(hf, tmp_path / "m.gguf")
    llm = LLM(str(tmp_path / "m.gguf"), dtype="float32", device="cpu", num_kv_blocks=64)
    model = llm.engine.runner.model
    assert [l.self_attn.sliding_window for l in model.layers] == [6, None, 6]
    ex = model.layers[1].mlp.experts[3]
    assert isinstance(ex.gate_up_proj.method, Mxfp4LinearMethod) and ex.down_proj.parts[0].qtype == mxfp4.MXFP4
    _check(llm, hf, _prompts()[1:4])
    assert_tp2_matches_tp1(str(tmp_path / "m.gguf"), _prompts()[1:3])  # per-expert GGUF tensors sliced per rank


def test_gguf_gpt4o_pre_tokenizer_splits_like_o200k():
    """llama.cpp's "gpt-4o" pre-tokenizer (gpt-oss GGUF files) splits as tiktoken's o200k regex."""
    regex = pytest.importorskip("regex")
    from tokenizers.pre_tokenizers import ByteLevel

    from kvserve.loader.gguf_tokenizer import _pre_tokenizer

    o200k = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
             r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
             r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    byte_level = ByteLevel(add_prefix_space=False, use_regex=False)
    pre = _pre_tokenizer("gpt-4o")
    for text in ["Hello World's HTTPServer isn't 1234567 ok!!\n\n  done/path", "CamelCaseWORDS they'RE  \t x",
                 "日本語のテキスト 😀 Café, naïve"]:
        want = [byte_level.pre_tokenize_str(m)[0][0] for m in regex.findall(o200k, text)]
        assert [p for p, _ in pre.pre_tokenize_str(text)] == want



def test_mxfp4_moe_env_settings_are_checked(monkeypatch):
    """KVSERVE_MXFP4_MOE takes 'packed' (the default) or 'legacy'; a bad value is an error naming
    the variable."""
    import importlib

    pytest.importorskip("triton")
    from kvserve.kernels import triton_mxfp4_moe as tm

    try:
        monkeypatch.setenv("KVSERVE_MXFP4_MOE", "fast")
        with pytest.raises(ValueError, match="KVSERVE_MXFP4_MOE"):
            importlib.reload(tm)
        monkeypatch.setenv("KVSERVE_MXFP4_MOE", "packed")
        monkeypatch.setenv("KVSERVE_MXFP4_GEMV_MAX_PAIRS", "many")
        with pytest.raises(ValueError, match="KVSERVE_MXFP4_GEMV_MAX_PAIRS"):
            importlib.reload(tm)
        monkeypatch.delenv("KVSERVE_MXFP4_GEMV_MAX_PAIRS")
        assert importlib.reload(tm).MOE_IMPL == "packed"
        monkeypatch.setenv("KVSERVE_MXFP4_MOE", "legacy")
        assert importlib.reload(tm).MOE_IMPL == "legacy"
    finally:
        monkeypatch.delenv("KVSERVE_MXFP4_MOE", raising=False)
        monkeypatch.delenv("KVSERVE_MXFP4_GEMV_MAX_PAIRS", raising=False)
        assert importlib.reload(tm).MOE_IMPL == "packed"  # the default


def test_mxfp4_down_split_setting_is_checked(monkeypatch):
    """The down GEMV config's SPLIT (KVSERVE_MXFP4_GEMV_DOWN's fifth value, read at each call):
    0, the sequential kernel, by default and for a 4-value setting; 1..16 the split kernels; a bad
    setting is an error naming the variable (or `gemv_cfg` when passed in)."""
    pytest.importorskip("triton")
    from kvserve.kernels import triton_mxfp4_moe as tm

    monkeypatch.delenv("KVSERVE_MXFP4_GEMV_DOWN", raising=False)
    monkeypatch.delenv("KVSERVE_MXFP4_GEMV_GU", raising=False)
    assert tm.gemv_configs(torch.float32)[1][4] == 0  # fp32: the sequential kernel
    assert tm.gemv_configs(torch.bfloat16)[1][4] == 2  # 16-bit: split in two (timed on an H100)
    monkeypatch.setenv("KVSERVE_MXFP4_GEMV_DOWN", "16,8,2,1")
    assert tm.gemv_configs()[1] == (16, 8, 2, 1, 0)
    monkeypatch.setenv("KVSERVE_MXFP4_GEMV_DOWN", "32,16,4,1,2")
    assert tm.gemv_configs()[1] == (32, 16, 4, 1, 2)
    for bad in ("32,16,4", "32,16,4,1,2,1", "32,16,4,1,-1", "32,16,4,1,17", "32,16,4,1,x"):
        monkeypatch.setenv("KVSERVE_MXFP4_GEMV_DOWN", bad)
        with pytest.raises(ValueError, match="KVSERVE_MXFP4_GEMV_DOWN"):
            tm.gemv_configs()
    monkeypatch.delenv("KVSERVE_MXFP4_GEMV_DOWN")
    for split in (0, 1, 16):
        assert tm.down_config((32, 16, 4, 1, split))[4] == split
    gu = [mxfp4.quantize(torch.randn(64, 32)) for _ in range(3)]  # 3 experts: gate/up [64, 32], down [32, 32]
    dn = [mxfp4.quantize(torch.randn(32, 32)) for _ in range(3)]
    packed = tm.pack_experts(gu, torch.zeros(3, 64), dn, torch.zeros(3, 32), 32, 32)
    with pytest.raises(ValueError, match="gemv_cfg"):
        tm.fused_moe_mxfp4(torch.randn(1, 32), torch.tensor([[0, 2]]), torch.full((1, 2), 0.5), packed, 1.702, 7.0,
                           path="gemv", gemv_cfg=((32, 8, 4, 1), (32, 16, 4, 1, 99)))


def test_mxfp4_gemv_decode_setting_is_checked(monkeypatch):
    """DECODE (the GEMV configs' fourth value): 0 and 1 fp32 math (1 the default), 2 and 3 packed
    half math (3 with the prefetch), anything else an error naming the variable; a DECODE 2 / 3
    down reads whole 32-value blocks of the activation, so the gate/up BLOCK_N must be a multiple
    of 32 (an error naming both variables, or `gemv_cfg` when passed in)."""
    pytest.importorskip("triton")
    from kvserve.kernels import triton_mxfp4_moe as tm

    monkeypatch.delenv("KVSERVE_MXFP4_GEMV_GU", raising=False)
    monkeypatch.delenv("KVSERVE_MXFP4_GEMV_DOWN", raising=False)
    assert tm.gemv_configs(torch.float32) == ((32, 8, 4, 1), (32, 16, 4, 1, 0))  # fp32: fp32 math
    assert tm.gemv_configs() == tm.gemv_configs(torch.float16) == ((64, 8, 8, 3), (16, 16, 4, 3, 2))
    monkeypatch.setenv("KVSERVE_MXFP4_GEMV_GU", "32,8,4,3")
    monkeypatch.setenv("KVSERVE_MXFP4_GEMV_DOWN", "32,16,4,3,2")
    assert tm.gemv_configs() == ((32, 8, 4, 3), (32, 16, 4, 3, 2))
    for name, bad in (("KVSERVE_MXFP4_GEMV_GU", "32,8,4,4"), ("KVSERVE_MXFP4_GEMV_DOWN", "32,16,4,-1"),
                      ("KVSERVE_MXFP4_GEMV_GU", "16,8,4,3")):  # the last: BLOCK_N 16 against a DECODE 3 down
        monkeypatch.setenv("KVSERVE_MXFP4_GEMV_GU", "32,8,4,3")
        monkeypatch.setenv("KVSERVE_MXFP4_GEMV_DOWN", "32,16,4,3,2")
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match=name):
            tm.gemv_configs()
    monkeypatch.delenv("KVSERVE_MXFP4_GEMV_GU")
    monkeypatch.delenv("KVSERVE_MXFP4_GEMV_DOWN")
    assert all(c[0][3] in (2, 3) and c[1][3] in (1, 2, 3) and (c[1][3] < 2 or c[0][0] % 32 == 0)
               for c in tm.GEMV_F16_CANDIDATES)
    for cfg in [c for pair in tm.GEMV_F16_CANDIDATES for c in pair] + list(tm.GEMV_DEFAULT_HALF):
        (tm.gemv_config if len(cfg) == 4 else tm.down_config)(cfg)  # whole blocks per thread
    # the half math's tile must give each thread a whole block's 4 code words (NaN on an H100 else)
    with pytest.raises(ValueError, match="gemv_cfg.*BLOCK_N \\* BLOCK_G"):
        tm.down_config((16, 2, 2, 2), "gemv_cfg[1]")
    with pytest.raises(ValueError, match="KVSERVE_MXFP4_GEMV_GU"):
        tm.gemv_config((16, 4, 4, 3), "KVSERVE_MXFP4_GEMV_GU")
    assert tm.gemv_config((16, 4, 4, 1)) == (16, 4, 4, 1)  # the fp32 math has no such constraint
    gu = [mxfp4.quantize(torch.randn(64, 32)) for _ in range(3)]
    dn = [mxfp4.quantize(torch.randn(32, 32)) for _ in range(3)]
    packed = tm.pack_experts(gu, torch.zeros(3, 64), dn, torch.zeros(3, 32), 32, 32)
    for cfg in (((16, 8, 4, 1), (32, 16, 4, 2)), ((32, 8, 4, 5), (32, 16, 4, 1))):
        with pytest.raises(ValueError, match="gemv_cfg"):
            tm.fused_moe_mxfp4(torch.randn(1, 32), torch.tensor([[0, 2]]), torch.full((1, 2), 0.5), packed, 1.702,
                               7.0, path="gemv", gemv_cfg=cfg)
    with pytest.raises(ValueError, match="multiple of 32"):
        tm.act_f16(torch.randn(1, 48))


def test_platform_routing_equals_gpt_oss_routing():
    """On CUDA `GptOssMoE` routes through the platform's `route_experts` (softmax over every expert
    in fp32, top k, renormalized: one Triton launch there); that is gpt-oss's own routing (top k of
    the logits, softmax among the k) up to fp32 rounding, with the same experts."""
    from kvserve.models.ops import Ops

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 32, generator=g) * 4
    top, ids_ref = torch.topk(logits, 4, dim=-1)
    w_ref = torch.softmax(top, dim=-1)
    w, ids = Ops().route_experts(logits, 4, True, torch.float32)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-7)
