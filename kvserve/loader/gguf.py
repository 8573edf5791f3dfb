"""GGUF checkpoints (llama.cpp's single-file format): config, tokenizer and weights.

A GGUF file carries everything an HF folder does, under llama.cpp's names: metadata keys
(`llama.block_count`, `tokenizer.ggml.tokens`, ...) instead of `config.json`, tensor names like
`blk.0.attn_q.weight`, and (usually) quantized blocks. This module translates all three into the
HF shapes the rest of kvserve already speaks:

- `load_gguf_config` -> an HF `config.json`-style dict (feed it to `ModelConfig.from_hf_dict`),
- `load_gguf_tokenizer` -> `kvserve.loader.tokenizer.Tokenizer` (see `gguf_tokenizer.py`),
- `iter_gguf_weights` -> `(hf_name, tensor)` pairs, dequantized with the `gguf` package's own
  kernels and with llama.cpp's Q/K row permutation undone, so they equal what HF transformers'
  GGUF loader produces (checked bit-exact in tests/models/test_gguf.py).

Opening a file walks its header once (`gguf_reader.py`: tens of milliseconds, no per-string
objects); still, open it once with `GGUFFile` and pass that to all three functions (each also
accepts a path), so the config is built once and the vocabulary decoded once.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from kvserve.loader.gguf_reader import FLOAT32 as GGUF_FLOAT32
from kvserve.loader.gguf_reader import GGMLQuantizationType, GGUFTensor, StringArray, read_gguf

if TYPE_CHECKING:
    from kvserve.loader.tokenizer import Tokenizer
    from kvserve.models.linear import QuantizedTensor

logger = logging.getLogger(__name__)

# GGUF `general.architecture` -> HF `architectures[0]`. Mistral GGUFs say "llama" too: same math,
# and llama.cpp stores no sliding window for them, so they load as Llama. Mixtral files say
# "llama" with `llama.expert_count` > 0 (see `_build_config`).
_HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gpt-oss": "GptOssForCausalLM",
}

# Per-layer tensor names (after `blk.N.`) -> HF names (after the layer prefix).
_LLAMA_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 sandwiches attention and MLP between two norms each; llama.cpp's `ffn_norm` is the
# pre-MLP one there (Llama's post_attention_layernorm plays that role).
_GEMMA3_LAYER_NAMES = {
    **_LLAMA_LAYER_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# gpt-oss: llama.cpp's `post_attention_norm` is the pre-MLP norm; experts come stacked
# (`ffn_{gate,up,down}_exps`, gate and up already split) and are expanded per expert on reading.
_GPT_OSS_LAYER_NAMES = {
    **_LLAMA_LAYER_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "attn_sinks": "self_attn.sinks",
    "ffn_gate_inp": "mlp.router",
}
# Stacked experts ([n_expert, out, in]; gpt-oss, Qwen3-MoE, Mixtral) -> the per-expert projection
# they are split into on reading (`gguf_experts.py`); Mixtral files written before llama.cpp
# stacked them hold one tensor per expert, `blk.N.ffn_gate.E.weight`.
_STACKED_EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_PER_EXPERT_TENSOR = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")
# Qwen3-MoE and Mixtral: the router (kept dense by the model) under Qwen's name.
_MOE_LAYER_NAMES = {**_LLAMA_LAYER_NAMES, "ffn_gate_inp": "mlp.gate"}
# Phi-3 stores q/k/v as one `attn_qkv` and gate ‖ up as one `ffn_up` (HF's fused names; the
# model splits them at load).
_PHI3_LAYER_NAMES = {**_LLAMA_LAYER_NAMES, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
_LLAMA_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_GPT2_LAYER_NAMES = {
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}
_GPT2_GLOBAL_NAMES = {
    "token_embd": "transformer.wte",
    "position_embd": "transformer.wpe",
    "output_norm": "transformer.ln_f",
    "output": "lm_head",
}
# HF GPT-2 uses Conv1D ([in, out]); llama.cpp stores these as Linear ([out, in]).
_GPT2_CONV1D = {"attn_qkv", "attn_output", "ffn_up", "ffn_down"}
# Tensors that are not parameters: RoPE frequency factors (carried into the config instead:
# Llama 3's rope_freqs, Phi-3's LongRoPE factors) and the precomputed rotary tables of very old
# conversions.
_SKIPPED_TENSORS = re.compile(
    r"^(rope_freqs\.weight|rope_factors_(long|short)\.weight|blk\.\d+\.attn_rot_embd(\.weight)?)$"
)
_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)$")
_GLOBAL_TENSOR = re.compile(r"^([a-z0-9_]+)\.(weight|bias)$")


class GGUFFile:
    """One parsed GGUF file: metadata and memory-mapped tensors (`gguf_reader.read_gguf`).

    Tensor data stays in the page cache (one `mmap` of the file); nothing is dequantized until
    `iter_gguf_weights` asks for it, one tensor at a time. Arrays in the metadata stay in the
    map too, and are turned into Python lists only when `get` asks for them.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        self.reader = read_gguf(self.path, SUPPORTED_TENSOR_TYPES)
        self.tensors: dict[str, GGUFTensor] = self.reader.tensors
        self._cache: dict[str, Any] = {}
        self._config: dict[str, Any] | None = None
        arch = self.get("general.architecture")
        if not isinstance(arch, str):
            raise ValueError(f"{self.path} has no general.architecture metadata")
        self.architecture: str = arch

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, architecture={self.architecture!r})"

    def __contains__(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        """Metadata value as a Python scalar, str or list (float32 scalars rounded to shortest)."""
        if key in self._cache:
            return self._cache[key]
        field = self.reader.fields.get(key)
        if field is None:
            return default
        value = field.value
        if isinstance(value, (np.ndarray, StringArray)):
            # Not cached: a vocabulary is read once, and its list would outlive the tokenizer.
            return value.tolist()
        if field.type == GGUF_FLOAT32:
            # 1e-5 is stored as 9.99999974e-06; give back the decimal it was written from.
            value = float(str(np.float32(value)))
        self._cache[key] = value
        return value

    def array_len(self, key: str) -> int | None:
        """Length of an array field without decoding it (e.g. the vocab size from the tokens);
        None if the key is missing or not an array."""
        field = self.reader.fields.get(key)
        return None if field is None or field.elem_type is None else len(field.value)

    def dequantize(self, name: str, index: int | None = None) -> np.ndarray:
        """One tensor (or, with `index`, its `index`-th slice along the outermost dimension: one
        expert of a stacked expert tensor) as a fresh, writable float32 array in numpy
        (row-major) shape."""
        t = self.tensors[name]
        from kvserve.loader.gguf_reader import GGMLQuantizationType as Q

        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists ne0 (innermost) first
        data = t.data
        if index is not None:  # the data view is [.., ne1, ne0 or row_bytes]: slicing it is free
            data, shape = data[index], shape[1:]
        if t.tensor_type in (Q.F32, Q.F16, Q.F64):
            # astype copies, and turns a big-endian file's values into native floats.
            return data.astype(np.float32).reshape(shape)
        if t.tensor_type == Q.BF16:  # the top half of a float32
            return (data.astype(np.uint32) << 16).view(np.float32).reshape(shape)
        if t.tensor_type == Q.MXFP4:  # gpt-oss's 4-bit format (kvserve/kernels/mxfp4.py)
            from kvserve.kernels import mxfp4

            raw = torch.from_numpy(np.array(data, dtype=np.uint8).reshape(-1, mxfp4.row_bytes(shape[-1])))
            return mxfp4.dequantize(raw, shape[-1]).numpy().reshape(shape)
        from gguf import quants  # only for block formats: importing gguf costs ~0.3 s

        try:
            out = quants.dequantize(data, t.tensor_type)
        except NotImplementedError as e:
            raise ValueError(
                f"{self.path}: tensor {name!r} has GGML type {t.tensor_type.name}, which this "
                f"version of the gguf package cannot dequantize ({e})"
            ) from e
        if out.dtype != np.float32:
            out = out.astype(np.float32)
        return out.reshape(shape)


# GGML tensor types kvserve loads (F64 is dequantized to float32 like the rest).
SUPPORTED_TENSOR_TYPES = (
    "F32", "F16", "BF16", "F64", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q5_K", "Q6_K", "MXFP4",
)


def _as_gguf(src: str | Path | GGUFFile) -> GGUFFile:
    return src if isinstance(src, GGUFFile) else GGUFFile(src)


def _require_arch(gf: GGUFFile) -> str:
    if gf.architecture not in _HF_ARCHITECTURES:
        raise ValueError(
            f"{gf.path}: unsupported GGUF architecture {gf.architecture!r} (general.architecture); "
            f"supported: {', '.join(sorted(_HF_ARCHITECTURES))} (Mistral, Mixtral and SmolLM files say llama)"
        )
    return gf.architecture


def _uniform(gf: GGUFFile, key: str, required: bool = False) -> Any:
    """A per-model integer that some files store per layer (a list); require one value."""
    v = gf.get(key)
    if isinstance(v, list):
        if len(set(v)) != 1:
            raise ValueError(f"{gf.path}: {key} varies per layer ({sorted(set(v))}); unsupported")
        v = v[0]
    if v is None and required:
        raise ValueError(f"{gf.path} is missing required metadata {key!r}")
    return v


# -- config -----------------------------------------------------------------------------------
def load_gguf_config(src: str | Path | GGUFFile) -> dict[str, Any]:
    """HF `config.json`-style dict for the model in a GGUF file."""
    gf = _as_gguf(src)
    if gf._config is None:
        gf._config = _build_config(gf)
    return copy.deepcopy(gf._config)


def _build_config(gf: GGUFFile) -> dict[str, Any]:
    a = arch = _require_arch(gf)
    embd = gf.tensors.get("token_embd.weight")
    vocab = gf.get(f"{a}.vocab_size") or gf.array_len("tokenizer.ggml.tokens")
    if embd is not None:
        rows = int(embd.shape[-1])
        if vocab is not None and vocab != rows:
            logger.warning("%s: vocab_size %s != embedding rows %s; using the latter", gf.path, vocab, rows)
        vocab = rows
    if vocab is None:
        raise ValueError(f"{gf.path}: cannot tell the vocab size (no metadata, tokens or embedding)")
    cfg: dict[str, Any] = {"architectures": [_HF_ARCHITECTURES[arch]], "model_type": arch}
    if gf.get("general.name"):
        cfg["_name_or_path"] = gf.get("general.name")
    layers = _uniform(gf, f"{a}.block_count", required=True)
    hidden = _uniform(gf, f"{a}.embedding_length", required=True)
    heads = _uniform(gf, f"{a}.attention.head_count", required=True)
    ctx = _uniform(gf, f"{a}.context_length")
    ffn = _uniform(gf, f"{a}.feed_forward_length")

    if arch == "gpt2":
        pos = gf.tensors.get("position_embd.weight")
        n_pos = ctx or (int(pos.shape[-1]) if pos is not None else 1024)
        cfg.update(
            n_embd=hidden, n_head=heads, n_layer=layers, n_positions=n_pos, n_ctx=n_pos,
            n_inner=ffn or 4 * hidden, vocab_size=vocab, activation_function="gelu_new",
            layer_norm_epsilon=gf.get(f"{a}.attention.layer_norm_epsilon", 1e-5),
        )
    else:
        kv_heads = _uniform(gf, f"{a}.attention.head_count_kv") or heads
        head_dim = _uniform(gf, f"{a}.attention.key_length")
        if head_dim is None and arch == "llama":
            head_dim = gf.get(f"{a}.rope.dimension_count")  # llama rotates whole heads
        head_dim = head_dim or hidden // heads
        if arch == "gpt-oss":  # every layer's MLP is experts of this width
            ffn = _uniform(gf, f"{a}.expert_feed_forward_length") or ffn
        if ffn is None:
            ffn = _ffn_width(gf)
        cfg.update(
            hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
            rms_norm_eps=gf.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-6),
            rope_theta=float(gf.get(f"{a}.rope.freq_base", 10000.0)),
            max_position_embeddings=ctx or 2048, vocab_size=vocab, hidden_act="silu",
            attention_bias="blk.0.attn_q.bias" in gf.tensors or "blk.0.attn_qkv.bias" in gf.tensors,
        )
        window = gf.get(f"{a}.attention.sliding_window")
        if window:
            cfg.update(sliding_window=window, use_sliding_window=True)
        if arch == "gemma3":
            _gemma3_config(gf, cfg)
        rope_scaling = _rope_scaling(gf, head_dim, cfg["rope_theta"], cfg)
        if rope_scaling is not None:
            cfg["rope_scaling"] = rope_scaling
        if arch == "gpt-oss":
            _gpt_oss_config(gf, cfg)
        elif arch == "phi3":
            _phi3_config(gf, cfg)
        elif arch == "qwen3moe" or (arch == "llama" and (_uniform(gf, f"{a}.expert_count") or 0) > 0):
            _moe_config(gf, cfg)
    cfg["tie_word_embeddings"] = "output.weight" not in gf.tensors
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("padding_token_id", "pad_token_id")):
        v = gf.get(f"tokenizer.ggml.{key}")
        if v is not None:
            cfg[hf_key] = v
    eos = [gf.get("tokenizer.ggml.eos_token_id")]
    # Chat models end turns with EOT/EOM tokens that differ from EOS; generation stops on all.
    eos += [gf.get(f"tokenizer.ggml.{k}") for k in ("eot_token_id", "eom_token_id")]
    eos += list(gf.get("tokenizer.ggml.eos_token_ids") or [])
    eos.append(cfg.pop("_gemma_end_of_turn", None))
    eos += cfg.pop("_harmony_stops", [])
    not_eos = cfg.pop("_harmony_not_eos", None)
    eos = list(dict.fromkeys(e for e in eos if e is not None and e != not_eos))
    if eos:
        cfg["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    cfg["torch_dtype"] = _checkpoint_dtype(gf)
    return cfg


def _gemma3_config(gf: GGUFFile, cfg: dict[str, Any]) -> None:
    """What a Gemma 3 GGUF leaves to llama.cpp's code (`llama-model.cpp`): every 6th layer is
    global (the rest slide), local layers use RoPE base 10k, the softmax scale is 1/sqrt(head_dim)
    (1/sqrt(hidden / heads) for the 62-layer 27B), and the MLP is GeGLU."""
    a = gf.architecture
    layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    scalar = cfg["hidden_size"] // heads if layers == 62 else cfg["head_dim"]
    cfg.update(
        model_type="gemma3_text", hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=scalar,
        rope_local_base_freq=float(gf.get(f"{a}.rope.freq_base_swa", 10000.0)),
        layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(layers)],
    )
    cfg.pop("hidden_act", None)
    cfg.pop("use_sliding_window", None)
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if gf.get(f"{a}.{key}") is not None:
            cfg[key] = float(gf.get(f"{a}.{key}"))
    # Chat turns end with <end_of_turn> (HF's generation_config lists it beside <eos>); llama.cpp
    # files do not name it as EOT, so look it up among the first (control) tokens.
    field = gf.reader.fields.get("tokenizer.ggml.tokens")
    if field is not None and isinstance(field.value, StringArray):
        head = field.value.tolist(limit=1024)
        if "<end_of_turn>" in head:
            cfg["_gemma_end_of_turn"] = head.index("<end_of_turn>")


def _gpt_oss_config(gf: GGUFFile, cfg: dict[str, Any]) -> None:
    """What a gpt-oss GGUF leaves to llama.cpp's code: even layers slide, odd ones are full; YaRN
    over the original context without truncating its correction range (HF's gpt-oss config);
    the experts' count, top-k and MXFP4 blocks (kept 4-bit)."""
    a = gf.architecture
    layers = cfg["num_hidden_layers"]
    rope = dict(cfg.pop("rope_scaling", None) or {"rope_type": "default"})
    if rope["rope_type"] == "yarn":
        rope.update(
            beta_fast=float(gf.get(f"{a}.rope.scaling.yarn_beta_fast") or 32.0),
            beta_slow=float(gf.get(f"{a}.rope.scaling.yarn_beta_slow") or 1.0), truncate=False,
        )
    rope["rope_theta"] = cfg["rope_theta"]
    cfg.pop("use_sliding_window", None)
    cfg.update(
        model_type="gpt_oss", rope_parameters=rope, rms_norm_eps=gf.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5),
        num_local_experts=_uniform(gf, f"{a}.expert_count", required=True),
        num_experts_per_tok=_uniform(gf, f"{a}.expert_used_count", required=True),
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        sliding_window=cfg.get("sliding_window") or 128,
        swiglu_limit=float(_uniform(gf, f"{a}.swiglu_clamp_exp") or 7.0),  # llama.cpp's default for gpt-oss
    )
    # Turns end with <|return|> or <|call|> (both in HF's generation_config; files name only
    # one as EOS); <|end|> closes one message of the reply (the analysis before the final
    # answer), so it must not stop generation (llama.cpp drops it from its end tokens likewise).
    field = gf.reader.fields.get("tokenizer.ggml.tokens")
    if field is not None and isinstance(field.value, StringArray):
        tokens = field.value.tolist()
        where = {t: i for i, t in enumerate(tokens) if t in ("<|return|>", "<|call|>", "<|end|>")}
        stops = [where[t] for t in ("<|return|>", "<|call|>") if t in where]
        if stops:
            cfg["_harmony_stops"] = stops
            cfg["_harmony_not_eos"] = where.get("<|end|>")
    gate = gf.tensors.get("blk.0.ffn_gate_exps.weight")
    if gate is not None and gate.tensor_type == GGMLQuantizationType.MXFP4:
        cfg["quantization_config"] = {"quant_method": "mxfp4"}


def _ffn_width(gf: GGUFFile) -> int:
    """The MLP width from the first layer's up projection (dense, Phi-3's gate ‖ up, stacked or
    per-expert), for files without feed_forward_length. GGUF shapes list `in` first."""
    for name in ("ffn_up", "ffn_up_exps", "ffn_up.0"):
        t = gf.tensors.get(f"blk.0.{name}.weight")
        if t is not None:
            fused = gf.architecture == "phi3" and name == "ffn_up" and "blk.0.ffn_gate.weight" not in gf.tensors
            return int(t.shape[1]) // (2 if fused else 1)
    raise ValueError(f"{gf.path} has no {gf.architecture}.feed_forward_length and no blk.0.ffn_up tensor")


def _phi3_config(gf: GGUFFile, cfg: dict[str, Any]) -> None:
    """Phi-3 / Phi-4-mini: partial rotary (`rope.dimension_count` < head_dim) and LongRoPE, which
    llama.cpp's converter stores as the `rope_factors_long` / `rope_factors_short` tensors beside
    `rope.scaling.original_context_length` and `rope.scaling.attn_factor`."""
    a = gf.architecture
    rot = _uniform(gf, f"{a}.rope.dimension_count")
    if rot and rot != cfg["head_dim"]:
        cfg["partial_rotary_factor"] = rot / cfg["head_dim"]
    orig = gf.get(f"{a}.rope.scaling.original_context_length")
    if orig:
        cfg["original_max_position_embeddings"] = int(orig)
    long_t, short_t = gf.tensors.get("rope_factors_long.weight"), gf.tensors.get("rope_factors_short.weight")
    if long_t is None and short_t is None:
        return
    if long_t is None or short_t is None or not orig:
        raise ValueError(
            f"{gf.path}: LongRoPE needs rope_factors_long, rope_factors_short and "
            f"{a}.rope.scaling.original_context_length; the file has only some of them"
        )
    scaling: dict[str, Any] = {
        "rope_type": "longrope", "original_max_position_embeddings": int(orig),
        "long_factor": gf.dequantize("rope_factors_long.weight").reshape(-1).tolist(),
        "short_factor": gf.dequantize("rope_factors_short.weight").reshape(-1).tolist(),
    }
    attn_factor = gf.get(f"{a}.rope.scaling.attn_factor")
    if attn_factor is not None:
        scaling["attention_factor"] = float(attn_factor)
    cfg["rope_scaling"] = scaling


def _moe_config(gf: GGUFFile, cfg: dict[str, Any]) -> None:
    """Qwen3-MoE ("qwen3moe") and Mixtral ("llama" with experts): expert count, top-k and width.
    llama.cpp renormalizes the top-k weights for both (Qwen3-MoE's `norm_topk_prob`, unless the
    file says `expert_weights_norm` = false). A Qwen3-MoE layer without a router keeps a dense
    MLP (`mlp_only_layers`)."""
    a = gf.architecture
    experts = _uniform(gf, f"{a}.expert_count", required=True)
    top_k = _uniform(gf, f"{a}.expert_used_count", required=True)
    width = _uniform(gf, f"{a}.expert_feed_forward_length")
    if width is None:
        up = gf.tensors.get("blk.0.ffn_up_exps.weight")
        width = int(up.shape[1]) if up is not None else cfg["intermediate_size"]
    if a == "llama":
        cfg.update(architectures=["MixtralForCausalLM"], model_type="mixtral", intermediate_size=width,
                   num_local_experts=experts, num_experts_per_tok=top_k)
        return
    dense = [i for i in range(cfg["num_hidden_layers"]) if f"blk.{i}.ffn_gate_inp.weight" not in gf.tensors]
    cfg.update(
        model_type="qwen3_moe", num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=width,
        norm_topk_prob=bool(gf.get(f"{a}.expert_weights_norm", True)), decoder_sparse_step=1, mlp_only_layers=dense,
    )


def _checkpoint_dtype(gf: GGUFFile) -> str:
    """The dtype `dtype="auto"` should pick: the file's float type, float32 if it is quantized
    (the dequantized values are exact in float32; HF's GGUF loader also produces float32)."""
    from kvserve.loader.gguf_reader import GGMLQuantizationType as Q

    names = {Q.F16: "float16", Q.BF16: "bfloat16"}
    kinds = {t.tensor_type for t in gf.tensors.values() if len(t.shape) >= 2}
    if len(kinds) == 1 and next(iter(kinds)) in names:
        return names[next(iter(kinds))]
    return "float32"


def _rope_scaling(gf: GGUFFile, head_dim: int, theta: float, cfg: dict[str, Any]) -> dict[str, Any] | None:
    a = gf.architecture
    kind = gf.get(f"{a}.rope.scaling.type")
    factor = gf.get(f"{a}.rope.scaling.factor") or gf.get(f"{a}.rope.scale_linear")
    if kind in ("linear", None) and factor and factor != 1.0:
        return {"rope_type": "linear", "factor": float(factor)}
    if kind not in (None, "none", "linear"):
        # yarn, longrope, ...: carried through so ModelConfig rejects what no model implements.
        out: dict[str, Any] = {"rope_type": kind, "factor": float(factor or 1.0)}
        orig = gf.get(f"{a}.rope.scaling.original_context_length")
        if orig:
            out["original_max_position_embeddings"] = orig
        return out
    if "rope_freqs.weight" in gf.tensors:
        factors = gf.dequantize("rope_freqs.weight").reshape(-1).astype(np.float64)
        found = _fit_llama3_rope(factors, head_dim, theta)
        if found is None and not np.allclose(factors, 1.0):
            # Not the Llama-3 shape: keep the raw per-frequency divisors for a model to apply.
            logger.warning("%s: rope_freqs is not Llama-3 shaped; kept as gguf_rope_freqs", gf.path)
            cfg["gguf_rope_freqs"] = factors.tolist()
        return found
    return None


def _llama3_factors(inv_freq: np.ndarray, factor: float, lo: float, hi: float, orig: float) -> np.ndarray:
    """Per-frequency divisors llama.cpp stores in rope_freqs for Llama-3 rope scaling."""
    wavelen = 2 * math.pi / inv_freq
    smooth = (orig / wavelen - lo) / (hi - lo)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < orig / hi, 1.0, np.where(wavelen > orig / lo, factor, mid))


def _fit_llama3_rope(factors: np.ndarray, head_dim: int, theta: float) -> dict[str, Any] | None:
    """Recover HF's llama3 rope_scaling dict from the rope_freqs tensor, if it has that shape.

    Only the two wavelength cut-offs (orig/lo, orig/hi) matter, so with orig fixed at 8192 the
    smooth region's factors pin lo and hi down; the published Llama 3.x values are tried first.
    """
    if np.allclose(factors, 1.0) or factors.size != head_dim // 2:
        return None
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # [head_dim/2]
    factor = float(factors.max())
    candidates = [(1.0, 4.0, 8192.0)]
    mid = (factors > 1 + 1e-6) & (factors < factor - 1e-6)
    if mid.sum() >= 2 and factor > 1:
        # smooth = (orig/wavelen - lo)/(hi - lo) is linear in 1/wavelen = inv_freq/(2*pi).
        smooth = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)
        slope, icept = np.polyfit(inv_freq[mid] / (2 * math.pi), smooth, 1)
        if slope > 0:
            span = 8192.0 / slope
            candidates.append((-icept * span, -icept * span + span, 8192.0))
    for lo, hi, orig in candidates:
        if lo > 0 and hi > lo and np.allclose(
            _llama3_factors(inv_freq, factor, lo, hi, orig), factors, rtol=1e-4, atol=1e-6
        ):
            return {
                "rope_type": "llama3", "factor": factor, "low_freq_factor": round(lo, 6),
                "high_freq_factor": round(hi, 6), "original_max_position_embeddings": int(orig),
            }
    return None


# -- weights ----------------------------------------------------------------------------------
def _hf_name(arch: str, gguf_name: str, gguf_file: GGUFFile | None = None) -> str | None:
    """HF parameter name for a GGUF tensor; None for tensors that are not parameters.
    (`gguf_file` tells a Phi-3 file's fused gate ‖ up `ffn_up` from a separate one.)"""
    if _SKIPPED_TENSORS.match(gguf_name):
        return None
    gpt2 = arch == "gpt2"
    moe = arch in ("qwen3moe", "llama")  # a "llama" file with experts is Mixtral
    m = _LAYER_TENSOR.match(gguf_name)
    per_expert = _PER_EXPERT_TENSOR.match(gguf_name) if moe else None
    if per_expert:  # an old Mixtral file: blk.N.ffn_gate.E.weight
        layer, proj, e = per_expert.groups()
        return f"model.layers.{layer}.mlp.experts.{e}.{proj}_proj.weight"
    if m:
        layer, part, kind = m.groups()
        table = (_GPT2_LAYER_NAMES if gpt2 else _GEMMA3_LAYER_NAMES if arch == "gemma3"
                 else _GPT_OSS_LAYER_NAMES if arch == "gpt-oss" else _MOE_LAYER_NAMES if moe
                 else _PHI3_LAYER_NAMES if arch == "phi3" else _LLAMA_LAYER_NAMES)
        if arch == "phi3" and gguf_file is not None and f"blk.{layer}.ffn_gate.weight" in gguf_file.tensors:
            table = {**_PHI3_LAYER_NAMES, "ffn_up": "mlp.up_proj"}  # gate and up stored apart
        if (arch == "gpt-oss" or moe) and part in _STACKED_EXPERTS:  # expanded per expert by the reader
            return f"model.layers.{layer}.mlp.experts.{_STACKED_EXPERTS[part]}.{kind}"
        if part == "attn_sinks" and arch == "gpt-oss":
            return f"model.layers.{layer}.self_attn.sinks"
        if part in table:
            prefix = "transformer.h" if gpt2 else "model.layers"
            return f"{prefix}.{layer}.{table[part]}.{kind}"
    else:
        m = _GLOBAL_TENSOR.match(gguf_name)
        table = _GPT2_GLOBAL_NAMES if gpt2 else _LLAMA_GLOBAL_NAMES
        if m and m.group(1) in table:
            return f"{table[m.group(1)]}.{m.group(2)}"
    raise ValueError(
        f"GGUF tensor {gguf_name!r} has no counterpart in kvserve's {arch!r} GGUF mapping "
        f"({_HF_ARCHITECTURES[arch]} and its variants); another variant of the architecture?"
    )


def _unpermute_rows(w: torch.Tensor | QuantizedTensor, n_heads: int) -> torch.Tensor | QuantizedTensor:
    """Undo llama.cpp's RoPE row order: within each head, GGUF row 2j is HF row j and row 2j+1
    is HF row j + head_dim/2 (llama.cpp rotates adjacent pairs, HF rotates halves). Whole rows
    move, so a matrix of GGML blocks is permuted by its rows of bytes."""
    if not isinstance(w, torch.Tensor):
        return type(w)(w.qtype, _unpermute_rows(w.data, n_heads), w.cols)
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"cannot un-permute {rows} rows over {n_heads} heads")
    rest = w.shape[1:]
    # [n_heads, head_dim/2, 2, *rest] -> [n_heads, 2, head_dim/2, *rest]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def has_quantized_matrices(gf: GGUFFile) -> bool:
    """Whether any projection matrix is stored in a GGML block format."""
    from kvserve.models.linear import GGML_BLOCK

    return any(len(t.shape) >= 2 and int(t.tensor_type) in GGML_BLOCK for t in gf.tensors.values())


def _raw_blocks(gf: GGUFFile, name: str) -> QuantizedTensor:
    """A GGML-quantized matrix as its block bytes [rows, row_bytes] (a view of the file)."""
    from kvserve.models.linear import QuantizedTensor

    t = gf.tensors[name]
    cols, rows = int(t.shape[0]), int(np.prod(t.shape[1:]))
    data = np.asarray(t.data).reshape(rows, -1)  # uint8 [rows, row_bytes], read-only
    with warnings.catch_warnings():  # torch warns about read-only memory; the linear copies it
        warnings.simplefilter("ignore", UserWarning)
        return QuantizedTensor(int(t.tensor_type), torch.from_numpy(data), cols)


def iter_gguf_weights(
    src: str | Path | GGUFFile, dtype: torch.dtype = torch.float32, keep_quantized: bool = False
) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
    """Yield `(hf_name, tensor)` for every parameter in the file, dequantized to `dtype`, or,
    with `keep_quantized`, GGML-quantized matrices as `QuantizedTensor`s of their block bytes
    (rows permuted like the dense ones: a row of blocks is a row of the matrix).

    One tensor is dequantized at a time, so peak extra memory is about one float32 tensor.
    `lm_head.weight` appears only if the file has `output.weight` (else the head is tied).
    """
    from kvserve.models.linear import GGML_BLOCK

    gf = _as_gguf(src)
    arch = _require_arch(gf)
    cfg = load_gguf_config(gf)
    # llama.cpp permutes Q/K only for its "llama" architecture; Qwen2/3 use NeoX-style rope there.
    permute = arch == "llama"
    start, count = time.perf_counter(), 0
    for name in gf.tensors:
        hf_name = _hf_name(arch, name, gf)
        if hf_name is None:
            continue
        t = gf.tensors[name]
        if name.split(".")[-2] in _STACKED_EXPERTS:  # [n_expert, out, in] -> one tensor per expert
            from kvserve.loader.gguf_experts import split_experts

            yield from split_experts(gf, name, hf_name, dtype, keep_quantized)
            count += 1
            continue
        raw = keep_quantized and arch != "gpt2" and len(t.shape) == 2 and int(t.tensor_type) in GGML_BLOCK
        w = _raw_blocks(gf, name) if raw else torch.from_numpy(gf.dequantize(name))  # [out, in]
        if permute and (name.endswith((".attn_q.weight", ".attn_q.bias"))):
            w = _unpermute_rows(w, cfg["num_attention_heads"])
        elif permute and (name.endswith((".attn_k.weight", ".attn_k.bias"))):
            w = _unpermute_rows(w, cfg["num_key_value_heads"])
        elif arch == "gpt2" and w.dim() == 2 and name.split(".")[-2] in _GPT2_CONV1D:
            w = w.t()  # [out, in] -> Conv1D's [in, out]
        elif arch == "gemma3" and name.endswith("norm.weight"):
            w = w - 1  # llama.cpp stores Gemma's (1 + weight); HF's checkpoints hold weight
        count += 1
        yield hf_name, w if raw else w.to(dtype).contiguous()
    logger.info(
        "read %d tensors from %s (%s) in %.2f s (including consumer time)",
        count, gf.path.name, "GGML blocks kept" if keep_quantized else f"dequantized to {dtype}",
        time.perf_counter() - start,
    )


# -- tokenizer --------------------------------------------------------------------------------
def load_gguf_tokenizer(src: str | Path | GGUFFile) -> Tokenizer:
    """The tokenizer embedded in a GGUF file (vocab, merges, special tokens, chat template)."""
    from kvserve.loader.gguf_tokenizer import build_gguf_tokenizer

    return build_gguf_tokenizer(_as_gguf(src))
