"""Engine configuration. Pure Python: no torch import here.

`ModelConfig` is the architecture description every model class reads. It is built from an
HF `config.json` dict (GGUF metadata is first translated into the same dict shape by
`kvserve.loader.gguf`), so there is exactly one place that knows HF's field names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# HF `architectures` entries we implement, mapped to the model family that runs them.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "Qwen3ForCausalLM": "llama",
    "GPT2LMHeadModel": "gpt2",
    "Gemma3ForCausalLM": "gemma3",
    "Phi3ForCausalLM": "phi3",
    "Qwen3MoeForCausalLM": "moe",
    "MixtralForCausalLM": "moe",
    "GptOssForCausalLM": "gpt_oss",
}

SUPPORTED_DTYPES = ("auto", "float32", "float16", "bfloat16")
_DTYPE_ALIASES = {
    "fp32": "float32", "float": "float32", "float32": "float32",
    "fp16": "float16", "half": "float16", "float16": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "auto": "auto",
}


def normalize_dtype(dtype: str) -> str:
    """Map user spellings ('bf16', 'half', ...) onto a canonical dtype name."""
    if not isinstance(dtype, str) or dtype.lower() not in _DTYPE_ALIASES:
        raise ValueError(
            f"dtype must be one of {sorted(_DTYPE_ALIASES)} (got {dtype!r})"
        )
    return _DTYPE_ALIASES[dtype.lower()]


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    family: str  # "llama" | "gpt2" | "gemma3" | "phi3" | "moe" | "gpt_oss"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    hidden_act: str = "silu"
    sliding_window: int | None = None
    # Per-layer attention kinds where they differ ("sliding_attention" | "full_attention", Gemma 3):
    # a sliding layer attends within `sliding_window`, a full one over the whole context.
    layer_types: tuple[str, ...] | None = None
    local_rope_theta: float | None = None  # RoPE base of the sliding layers (Gemma 3)
    attn_scale: float | None = None  # softmax scale; None = head_dim ** -0.5
    final_logit_softcapping: float | None = None  # logits = cap * tanh(logits / cap)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None  # checkpoint dtype, used for dtype="auto"
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        """K and V elements per token per layer (multiply by the element size)."""
        return 2 * self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        archs = d.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            mt = d.get("model_type")
            by_type = {
                "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                "gpt2": "GPT2LMHeadModel", "gemma3_text": "Gemma3ForCausalLM",
                "gemma3": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM",
                "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM",
                "gpt_oss": "GptOssForCausalLM",
            }
            arch = by_type.get(mt)
        if arch is None:
            raise ValueError(
                f"unsupported model architecture {archs or d.get('model_type')!r}; "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        if family == "gpt2":
            hidden = d["n_embd"]
            heads = d["n_head"]
            return cls(
                architecture=arch, family=family, vocab_size=d["vocab_size"],
                hidden_size=hidden, intermediate_size=d.get("n_inner") or 4 * hidden,
                num_layers=d["n_layer"], num_heads=heads, num_kv_heads=heads,
                head_dim=hidden // heads, max_position_embeddings=d["n_positions"],
                norm_eps=d.get("layer_norm_epsilon", 1e-5), tie_word_embeddings=True,
                attention_bias=True, o_bias=True, mlp_bias=True,
                hidden_act=d.get("activation_function", "gelu_new"),
                bos_token_id=d.get("bos_token_id"), eos_token_ids=eos_ids,
                torch_dtype=_dtype_name(d), raw=dict(d),
            )
        if family == "gemma3":
            return _gemma3_config(cls, arch, d, eos_ids)
        if family == "gpt_oss":
            return _gpt_oss_config(cls, arch, d, eos_ids)
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        rope_scaling = d.get("rope_scaling")
        rope_theta = d.get("rope_theta")
        # transformers >= 5 folds rope settings into `rope_parameters`.
        rp = d.get("rope_parameters")
        if isinstance(rp, dict):
            rope_theta = rope_theta or rp.get("rope_theta")
            if rope_scaling is None and rp.get("rope_type", "default") != "default":
                rope_scaling = dict(rp)
        if rope_scaling is not None:
            rope_scaling = _check_rope_scaling(rope_scaling, ("longrope",) if family == "phi3" else ())
        # Mistral and Phi-3 apply a configured window; Qwen2/3 only with use_sliding_window.
        windowed = family == "phi3" or arch in ("MistralForCausalLM", "MixtralForCausalLM")
        sliding = d.get("sliding_window") if d.get("use_sliding_window", windowed) else None
        return cls(
            architecture=arch, family=family, vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"], num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads, head_dim=head_dim,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", arch == "Qwen2ForCausalLM")),
            o_bias=False,
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            hidden_act=d.get("hidden_act", "silu"),
            sliding_window=sliding,
            bos_token_id=d.get("bos_token_id"), eos_token_ids=eos_ids,
            torch_dtype=_dtype_name(d), raw=dict(d),
        )


def _check_rope_scaling(rope_scaling: dict[str, Any] | None, extra: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """A copy with `rope_type` set, None for default RoPE; ValueError for a type we lack
    (`extra`: types the family implements itself, e.g. Phi-3's longrope, formerly "su")."""
    if rope_scaling is None:
        return None
    rope_scaling = dict(rope_scaling)
    rtype = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rtype == "su":
        rtype = "longrope"
    allowed = ("default", "linear", "llama3", *extra)
    if rtype not in allowed:
        raise ValueError(f"unsupported rope_scaling type {rtype!r}; supported: {', '.join(allowed)}")
    rope_scaling["rope_type"] = rtype
    rope_scaling.pop("rope_theta", None)
    return None if rtype == "default" else rope_scaling


def _gemma3_config(cls: type[ModelConfig], arch: str, d: dict[str, Any], eos_ids: tuple[int, ...]) -> ModelConfig:
    """Gemma 3 (text): sliding and full layers (`layer_types`, or every 6th layer full), each
    with its own RoPE base (`rope_parameters` per layer kind in transformers >= 5; older configs
    say `rope_theta` / `rope_local_base_freq` / `rope_scaling`, the scaling for full layers)."""
    heads, hidden, n_layers = d["num_attention_heads"], d["hidden_size"], d["num_hidden_layers"]
    head_dim = d.get("head_dim") or hidden // heads
    rp = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else {}
    full = dict(rp.get("full_attention") or {})
    local = dict(rp.get("sliding_attention") or {})
    theta = full.get("rope_theta", d.get("rope_theta", 1_000_000.0))
    local_theta = local.get("rope_theta", d.get("rope_local_base_freq", 10_000.0))
    scaling = full if full.get("rope_type", "default") != "default" else d.get("rope_scaling")
    if local.get("rope_type", "default") != "default":
        raise ValueError(f"unsupported rope_parameters.sliding_attention type {local['rope_type']!r}")
    types = d.get("layer_types")
    if not types:
        pattern = int(d.get("sliding_window_pattern", 6))
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
    if len(types) != n_layers or set(types) - {"sliding_attention", "full_attention"}:
        raise ValueError(f"layer_types must name sliding_attention/full_attention for each of {n_layers} layers")
    if d.get("attn_logit_softcapping") is not None:
        raise ValueError("attn_logit_softcapping is not supported (Gemma 2 style attention soft-capping)")
    if d.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention is not supported (a causal LM is required)")
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    return cls(
        architecture=arch, family="gemma3", vocab_size=d["vocab_size"], hidden_size=hidden,
        intermediate_size=d["intermediate_size"], num_layers=n_layers, num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads, head_dim=head_dim,
        max_position_embeddings=d.get("max_position_embeddings", 32768),
        norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
        rope_scaling=_check_rope_scaling(scaling), tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        attention_bias=bool(d.get("attention_bias", False)), qk_norm=True, hidden_act=act,
        sliding_window=d.get("sliding_window") or 4096, layer_types=tuple(types),
        local_rope_theta=float(local_theta),
        attn_scale=float(d.get("query_pre_attn_scalar") or head_dim) ** -0.5,
        final_logit_softcapping=d.get("final_logit_softcapping"),
        bos_token_id=d.get("bos_token_id"), eos_token_ids=eos_ids,
        torch_dtype=_dtype_name(d), raw=dict(d),
    )


def _gpt_oss_config(cls: type[ModelConfig], arch: str, d: dict[str, Any], eos_ids: tuple[int, ...]) -> ModelConfig:
    """gpt-oss: q/k/v/o biases, alternating sliding/full layers (`layer_types`, by default
    sliding on even layers), YaRN RoPE (`rope_parameters`, by default factor 32 over 4096
    positions, as transformers fills it in), attention sinks and MoE experts (read by the model
    from `raw`); `intermediate_size` is each expert's width."""
    heads, hidden, n_layers = d["num_attention_heads"], d["hidden_size"], d["num_hidden_layers"]
    head_dim = d.get("head_dim") or hidden // heads
    rp = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    if not rp:
        rp = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
              "original_max_position_embeddings": 4096}
    theta = rp.get("rope_theta", d.get("rope_theta", 150_000.0))
    types = d.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)]
    if len(types) != n_layers or set(types) - {"sliding_attention", "full_attention"}:
        raise ValueError(f"layer_types must name sliding_attention/full_attention for each of {n_layers} layers")
    bias = bool(d.get("attention_bias", True))
    return cls(
        architecture=arch, family="gpt_oss", vocab_size=d["vocab_size"], hidden_size=hidden,
        intermediate_size=d["intermediate_size"], num_layers=n_layers, num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads, head_dim=head_dim,
        max_position_embeddings=d.get("max_position_embeddings", 131072),
        norm_eps=d.get("rms_norm_eps", 1e-5), rope_theta=float(theta),
        rope_scaling=_check_rope_scaling(rp, ("yarn",)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=bias, o_bias=bias, hidden_act=d.get("hidden_act", "silu"),
        sliding_window=d.get("sliding_window") or 128, layer_types=tuple(types),
        bos_token_id=d.get("bos_token_id"), eos_token_ids=eos_ids,
        torch_dtype=_dtype_name(d), raw=dict(d),
    )


def _dtype_name(d: dict[str, Any]) -> str | None:
    t = d.get("torch_dtype") or d.get("dtype")
    return str(t).replace("torch.", "") if t else None


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    num_blocks: int = 0  # 0 = derive from kv_cache_memory / gpu_memory_utilization
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1 (got {self.block_size})")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    # False = the KV-cache ablation: every step recomputes each request's whole context
    # (what generation costs without a cache). Outputs are identical, only slower.
    enable_kv_cache: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1 (got {self.max_num_seqs})")
        if self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1 (got {self.max_model_len})")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1 (got {self.max_num_batched_tokens})"
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                "max_num_batched_tokens must be >= max_model_len when chunked prefill is off "
                f"(got {self.max_num_batched_tokens} < {self.max_model_len})"
            )
