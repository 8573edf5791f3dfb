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

Parsing the header builds a numpy view per vocab string (~2-3 s for a 49k vocab), so open the
file once with `GGUFFile` and pass that to all three functions; each also accepts a path.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import struct
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

if TYPE_CHECKING:
    from kvserve.loader.tokenizer import Tokenizer
    from kvserve.models.linear import QuantizedTensor

logger = logging.getLogger(__name__)

_GGUF_MAGIC = b"GGUF"

# GGUF `general.architecture` -> HF `architectures[0]`. Mistral GGUFs say "llama" too: same math,
# and llama.cpp stores no sliding window for them, so they load as Llama.
_HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
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
# Tensors that are not parameters: RoPE frequency factors (carried into the config instead) and
# the precomputed rotary tables of very old conversions.
_SKIPPED_TENSORS = re.compile(r"^(rope_freqs\.weight|blk\.\d+\.attn_rot_embd(\.weight)?)$")
_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)$")
_GLOBAL_TENSOR = re.compile(r"^([a-z0-9_]+)\.(weight|bias)$")


class GGUFFile:
    """One parsed GGUF file: metadata (decoded lazily, cached) and memory-mapped tensors.

    Tensor data stays in the page cache via `np.memmap`; nothing is dequantized until
    `iter_gguf_weights` asks for it, one tensor at a time.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        # Walk the header ourselves first: the gguf package's reader indexes a memmap and fails
        # deep inside numpy (or not at all) on a cut-short or corrupt file.
        _check_layout(self.path)
        from gguf import GGUFReader

        try:
            self.reader = GGUFReader(self.path)
        except Exception as e:  # anything _check_layout let through
            raise ValueError(f"{self.path} is not a readable GGUF file: {e}") from e
        self.tensors = {t.name: t for t in self.reader.tensors}
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
        from gguf import GGUFValueType

        value = field.contents()
        if field.types == [GGUFValueType.FLOAT32]:
            # 1e-5 is stored as 9.99999974e-06; give back the decimal it was written from.
            value = float(str(np.float32(value)))
        self._cache[key] = value
        return value

    def array_len(self, key: str) -> int | None:
        """Length of an array field without decoding it (e.g. the vocab size from the tokens)."""
        field = self.reader.fields.get(key)
        return None if field is None else len(field.data)

    def dequantize(self, name: str) -> np.ndarray:
        """One tensor as a fresh, writable float32 array in numpy (row-major) shape."""
        t = self.tensors[name]
        from gguf import GGMLQuantizationType, quants

        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists ne0 (innermost) first
        try:
            if t.tensor_type == GGMLQuantizationType.F64:
                out = np.asarray(t.data, dtype=np.float32)
            else:
                # A plain ndarray view: numpy's memmap subclass adds a hook to every slice.
                out = quants.dequantize(np.asarray(t.data), t.tensor_type)
        except NotImplementedError as e:
            raise ValueError(
                f"{self.path}: tensor {name!r} has GGML type {t.tensor_type.name}, which this "
                f"version of the gguf package cannot dequantize ({e})"
            ) from e
        if out.dtype != np.float32:
            out = out.astype(np.float32)
        elif t.tensor_type == GGMLQuantizationType.F32:
            out = out.copy()  # F32 comes back as a view of the read-only memmap
        return out.reshape(shape)


# GGML tensor types kvserve loads (F64 is dequantized to float32 like the rest).
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "F64", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
_SUPPORTED_VERSIONS = (2, 3)
_MAX_DIMS = 4  # GGML_MAX_DIMS
# Smallest encodings, to tell whether a count can fit in the rest of the file at all.
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, a one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset
# GGUFValueType id -> struct code of the fixed-size scalars (8 = string, 9 = array).
_SCALAR_CODES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Bounds-checked reads from a GGUF file's bytes; every failure names the path and the byte
    offset where it happened."""

    def __init__(self, path: Path, buf: Any, size: int) -> None:
        self.path, self.buf, self.size = path, buf, size
        self.pos = 0
        self.endian = "<"

    def fail(self, what: str, at: int | None = None) -> ValueError:
        return ValueError(f"{self.path}: corrupt GGUF at byte offset {self.pos if at is None else at}: {what}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise ValueError(
                f"{self.path}: GGUF file is cut short: {what} at byte offset {self.pos} needs {n} "
                f"bytes, but the file ends at byte {self.size}"
            )

    def scalar(self, code: str, what: str) -> Any:
        n = struct.calcsize(code)
        self.need(n, what)
        (v,) = struct.unpack_from(self.endian + code, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str) -> bytes:
        n = self.scalar("Q", f"length of {what}")
        self.need(n, what)
        out = bytes(self.buf[self.pos : self.pos + n]) if n <= 256 else b""  # long values skipped
        self.pos += n
        return out

    def skip_value(self, vtype: int, what: str, depth: int = 0) -> Any:
        """Step over one metadata value; returns it when it is a scalar or a short string."""
        if vtype in _SCALAR_CODES:
            return self.scalar(_SCALAR_CODES[vtype], what)
        if vtype == _STRING:
            return self.string(what).decode("utf-8", "replace")
        if vtype == _ARRAY and depth < 4:
            at = self.pos
            etype = self.scalar("I", f"element type of {what}")
            count = self.scalar("Q", f"length of {what}")
            if etype in _SCALAR_CODES:
                n = struct.calcsize(_SCALAR_CODES[etype])
                if count > (self.size - self.pos) // n:
                    self.need(count * n, f"{count} elements of {what}")
                self.pos += count * n
            elif etype in (_STRING, _ARRAY):
                if count > (self.size - self.pos) // 8:  # each element starts with 8 bytes
                    raise self.fail(f"{what} claims {count} elements, more than the rest of the file "
                                    "can hold (cut short, or a corrupt count)", at)
                for i in range(count):
                    self.skip_value(etype, f"{what}[{i}]", depth + 1)
            else:
                raise self.fail(f"{what} has unknown element type {etype}", at)
            return None
        raise self.fail(f"{what} has unknown value type {vtype}", self.pos - 4)


def _check_layout(path: Path) -> None:
    """Walk a GGUF file's header (magic, version, counts, metadata, tensor infos) with bounds
    checks, then check that every tensor has a supported type and that its data lies inside the
    file. Raises ValueError naming the path and the byte offset (or tensor) where it breaks."""
    import mmap

    size = path.stat().st_size
    if size < 24:
        with open(path, "rb") as f:
            head = f.read(4)
        if len(head) == 4 and head != _GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file (starts with {head!r}, not b'GGUF')")
        raise ValueError(
            f"{path}: GGUF file is cut short: the 24-byte header at byte offset 0 needs 24 bytes, "
            f"but the file ends at byte {size}"
        )
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        _walk_header(_Cursor(path, buf, size))


def _walk_header(c: _Cursor) -> None:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    magic = bytes(c.buf[0:4])
    if magic != _GGUF_MAGIC:
        raise ValueError(f"{c.path} is not a GGUF file (starts with {magic!r}, not b'GGUF')")
    c.pos = 4
    version = c.scalar("I", "version")
    if version not in _SUPPORTED_VERSIONS and struct.unpack(">I", struct.pack("<I", version))[0] in _SUPPORTED_VERSIONS:
        c.endian = ">"  # a big-endian file
        version = struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in _SUPPORTED_VERSIONS:
        raise c.fail(f"GGUF version {version} is not supported (supported: 2, 3)", 4)
    n_tensors = c.scalar("Q", "tensor count")
    n_kv = c.scalar("Q", "metadata count")
    rest = c.size - c.pos
    if n_kv > rest // _MIN_KV_BYTES or n_tensors > rest // _MIN_TENSOR_INFO_BYTES or (
        n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > rest
    ):
        raise c.fail(
            f"{n_tensors} tensors and {n_kv} metadata entries (header counts at byte offsets 8 and "
            f"16) cannot fit in a file of {c.size} bytes (cut short, or a corrupt header)", 8
        )

    alignment = 32
    for i in range(n_kv):
        at = c.pos
        key = c.string(f"key of metadata entry {i}").decode("utf-8", "replace")
        vtype = c.scalar("I", f"value type of {key!r}")
        value = c.skip_value(vtype, f"metadata {key!r}")
        if key == "general.alignment":
            if not isinstance(value, int) or value <= 0 or value & (value - 1):
                raise c.fail(f"general.alignment must be a power of two (got {value!r})", at)
            alignment = value

    infos = []
    for i in range(n_tensors):
        at = c.pos
        name = c.string(f"name of tensor {i}").decode("utf-8", "replace")
        n_dims = c.scalar("I", f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise c.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {_MAX_DIMS} allowed)", c.pos - 4)
        dims = [c.scalar("Q", f"shape of tensor {name!r}") for _ in range(n_dims)]
        ggml_type = c.scalar("I", f"type of tensor {name!r}")
        offset = c.scalar("Q", f"data offset of tensor {name!r}")
        try:
            type_name = GGMLQuantizationType(ggml_type).name
        except ValueError:
            type_name = f"unknown type id {ggml_type}"
        if type_name not in SUPPORTED_TENSOR_TYPES:
            raise ValueError(
                f"{c.path}: tensor {name!r} has GGML type {type_name}, which kvserve does not "
                f"support; supported types: {', '.join(SUPPORTED_TENSOR_TYPES)}"
            )
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        if dims[0] % block:
            raise c.fail(f"tensor {name!r} rows of {dims[0]} values are not whole {block}-value "
                         f"{type_name} blocks", at)
        infos.append((name, offset, math.prod(dims) // block * block_bytes))

    data_start = -(-c.pos // alignment) * alignment
    for name, offset, nbytes in infos:
        start = data_start + offset
        if start + nbytes > c.size:
            raise ValueError(
                f"{c.path}: tensor {name!r} data at byte offsets {start}..{start + nbytes} lies past "
                f"the end of the file ({c.size} bytes): cut short, or a corrupt tensor offset"
            )


def _as_gguf(src: str | Path | GGUFFile) -> GGUFFile:
    return src if isinstance(src, GGUFFile) else GGUFFile(src)


def _require_arch(gf: GGUFFile) -> str:
    if gf.architecture not in _HF_ARCHITECTURES:
        raise ValueError(
            f"{gf.path}: unsupported GGUF architecture {gf.architecture!r} (general.architecture); "
            f"supported: {', '.join(sorted(_HF_ARCHITECTURES))} (Mistral and SmolLM files say llama)"
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
        if ffn is None:
            ffn = int(gf.tensors["blk.0.ffn_up.weight"].shape[-1])
        cfg.update(
            hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
            rms_norm_eps=gf.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-6),
            rope_theta=float(gf.get(f"{a}.rope.freq_base", 10000.0)),
            max_position_embeddings=ctx or 2048, vocab_size=vocab, hidden_act="silu",
            attention_bias="blk.0.attn_q.bias" in gf.tensors,
        )
        window = gf.get(f"{a}.attention.sliding_window")
        if window:
            cfg.update(sliding_window=window, use_sliding_window=True)
        rope_scaling = _rope_scaling(gf, head_dim, cfg["rope_theta"], cfg)
        if rope_scaling is not None:
            cfg["rope_scaling"] = rope_scaling
    cfg["tie_word_embeddings"] = "output.weight" not in gf.tensors
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("padding_token_id", "pad_token_id")):
        v = gf.get(f"tokenizer.ggml.{key}")
        if v is not None:
            cfg[hf_key] = v
    eos = [gf.get("tokenizer.ggml.eos_token_id")]
    # Chat models end turns with EOT/EOM tokens that differ from EOS; generation stops on all.
    eos += [gf.get(f"tokenizer.ggml.{k}") for k in ("eot_token_id", "eom_token_id")]
    eos += list(gf.get("tokenizer.ggml.eos_token_ids") or [])
    eos = list(dict.fromkeys(e for e in eos if e is not None))
    if eos:
        cfg["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    cfg["torch_dtype"] = _checkpoint_dtype(gf)
    return cfg


def _checkpoint_dtype(gf: GGUFFile) -> str:
    """The dtype `dtype="auto"` should pick: the file's float type, float32 if it is quantized
    (the dequantized values are exact in float32; HF's GGUF loader also produces float32)."""
    from gguf import GGMLQuantizationType as Q

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
def _hf_name(arch: str, gguf_name: str) -> str | None:
    """HF parameter name for a GGUF tensor; None for tensors that are not parameters."""
    if _SKIPPED_TENSORS.match(gguf_name):
        return None
    gpt2 = arch == "gpt2"
    m = _LAYER_TENSOR.match(gguf_name)
    if m:
        layer, part, kind = m.groups()
        table = _GPT2_LAYER_NAMES if gpt2 else _LLAMA_LAYER_NAMES
        if part in table:
            prefix = "transformer.h" if gpt2 else "model.layers"
            return f"{prefix}.{layer}.{table[part]}.{kind}"
    else:
        m = _GLOBAL_TENSOR.match(gguf_name)
        table = _GPT2_GLOBAL_NAMES if gpt2 else _LLAMA_GLOBAL_NAMES
        if m and m.group(1) in table:
            return f"{table[m.group(1)]}.{m.group(2)}"
    raise ValueError(
        f"GGUF tensor {gguf_name!r} has no counterpart in the {_HF_ARCHITECTURES[arch]} "
        "implementation (MoE or another variant of the architecture?)"
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
        hf_name = _hf_name(arch, name)
        if hf_name is None:
            continue
        t = gf.tensors[name]
        raw = keep_quantized and arch != "gpt2" and len(t.shape) == 2 and int(t.tensor_type) in GGML_BLOCK
        w = _raw_blocks(gf, name) if raw else torch.from_numpy(gf.dequantize(name))  # [out, in]
        if permute and (name.endswith((".attn_q.weight", ".attn_q.bias"))):
            w = _unpermute_rows(w, cfg["num_attention_heads"])
        elif permute and (name.endswith((".attn_k.weight", ".attn_k.bias"))):
            w = _unpermute_rows(w, cfg["num_key_value_heads"])
        elif arch == "gpt2" and w.dim() == 2 and name.split(".")[-2] in _GPT2_CONV1D:
            w = w.t()  # [out, in] -> Conv1D's [in, out]
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
