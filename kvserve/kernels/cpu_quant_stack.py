"""A quantized Llama-family or Gemma 3 decoder stack as one C call per decode step
(`csrc/quant/decoder_stack_f32.c`).

Batch-1 decode on a CPU reads every weight once per token; everything else is overhead, and op
by op from Python that overhead is ~100 us per layer (ctypes marshalling, output allocations,
one OpenMP team start per op). Here one call runs every layer inside one OpenMP region, with
the weights kept in their GGML block bytes (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K; multiplied by
the kvq kernels after quantizing each activation to 8 bits), fp32 activations and an fp32 paged
KV cache. The LM head is left to the caller.

Built from plain data (tensors and ints), so it does not depend on the model classes: per layer
the two norm weights, five linears (qkv, o, gate, up, down), each given as up to three parts
with their own qtype whose outputs are concatenated (a GGUF "Q4_K_M" file keeps attn_v in Q6_K
next to a Q4_K attn_q), and the layer's KV cache `[2, num_blocks, block_size, Hkv, D]` fp32.
Gemma 3 adds per layer the q / k norms, the pre- and post-feedforward norms, its window and
which of two RoPE sets it uses, and per model the embedding scale and GELU-tanh.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvserve.kernels import cpu_quant

# GGML type ids the stack multiplies (kvq.h) and the embedding types it can look up directly.
QUANT_TYPES = {qtype: name for name, qtype in cpu_quant.QTYPES.items()}
_PLAIN_EMBED = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}
MAX_PARTS = 3
ABI_VERSION = 3

# Column layout of the per-layer pointer table (the enums in decoder_stack_f32.c).
_INPUT_NORM, _POST_NORM, _K_CACHE, _V_CACHE, _LINEARS = range(5)
_PART_COLS = 4
_LIN_COLS = 2 + MAX_PARTS * _PART_COLS
_NUM_LINEARS = 5
_PRE_FF_NORM = _LINEARS + _NUM_LINEARS * _LIN_COLS
_POST_FF_NORM, _Q_NORM, _K_NORM, _WINDOW, _ROPE_SET = range(_PRE_FF_NORM + 1, _PRE_FF_NORM + 6)
_LAYER_COLS = _PRE_FF_NORM + 6

# Model flags (KVQS_QK_NORM, KVQS_SANDWICH, KVQS_GELU_TANH).
_QK_NORM, _SANDWICH, _GELU_TANH = 1, 2, 4
ACTIVATIONS = {"silu": 0, "gelu_tanh": _GELU_TANH}

# Return codes of kvq_decoder_stack_f32.
_OK, _EARG, _EID, _ESEQ, _ESCRATCH = 0, -1, -2, -3, -4


class _Model(ctypes.Structure):
    """kvq_stack_model."""

    _fields_ = [
        ("num_layers", ctypes.c_int32),
        ("hidden", ctypes.c_int32),
        ("num_heads", ctypes.c_int32),
        ("num_kv_heads", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
        ("inter", ctypes.c_int32),
        ("block_size", ctypes.c_int32),
        ("window", ctypes.c_int32),
        ("num_blocks", ctypes.c_int64),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
        ("embed_qtype", ctypes.c_int32),
        ("flags", ctypes.c_int32),
        ("vocab", ctypes.c_int64),
        ("embed_row_bytes", ctypes.c_int64),
        ("embed", ctypes.c_void_p),
        ("final_norm", ctypes.c_void_p),
        ("inv_freq", ctypes.c_void_p),
        ("layers", ctypes.c_void_p),
        ("embed_scale", ctypes.c_float),
        ("reserved", ctypes.c_int32),
        ("local_inv_freq", ctypes.c_void_p),
    ]


@dataclass(frozen=True, slots=True)
class QuantLinear:
    """One linear as parts `(qtype, weight, K)` whose outputs are concatenated in order:
    `weight` is uint8 `[rows, row_bytes]`, GGML blocks as in the GGUF file; K the input width.
    `bias` (fp32, all parts' rows) is optional."""

    parts: Sequence[tuple[int, torch.Tensor, int]]
    bias: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return sum(w.shape[0] for _, w, _ in self.parts)


@dataclass(frozen=True, slots=True)
class StackLayer:
    input_norm: torch.Tensor  # [H] fp32
    qkv: QuantLinear  # [(Hq + 2 Hkv) D, H], q and k rows in HF's rotate-half order
    o: QuantLinear  # [H, Hq D]
    post_norm: torch.Tensor  # [H] fp32 (sandwich: the attention output's own norm)
    gate: QuantLinear  # [I, H]
    up: QuantLinear  # [I, H]
    down: QuantLinear  # [H, I]
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, Hkv, D] fp32
    # Gemma 3 (each norm weight is the factor applied: 1 + Gemma's weight)
    pre_ff_norm: torch.Tensor | None = None  # [H] fp32, sandwich: the MLP's input norm
    post_ff_norm: torch.Tensor | None = None  # [H] fp32, sandwich: the MLP output's own norm
    q_norm: torch.Tensor | None = None  # [D] fp32, per q head before RoPE (all layers or none)
    k_norm: torch.Tensor | None = None  # [D] fp32, per k head before RoPE
    window: int = 0  # this layer's sliding window; 0: the stack's `sliding_window`
    local_rope: bool = False  # RoPE by `local_inv_freq` instead of `inv_freq`


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    if getattr(lib, "_kvq_stack_bound", False):
        return lib
    if lib.kvq_stack_abi_version() != ABI_VERSION:
        raise RuntimeError("stale kvq library: decoder stack ABI mismatch")
    p = ctypes.c_void_p
    lib.kvq_decoder_stack_scratch.argtypes = [p, ctypes.c_int, ctypes.c_int]
    lib.kvq_decoder_stack_scratch.restype = ctypes.c_int64
    lib.kvq_decoder_stack_f32.argtypes = [p, ctypes.c_int, p, p, p, ctypes.c_int64, p, p, p, p, ctypes.c_int64]
    lib.kvq_decoder_stack_f32.restype = ctypes.c_int
    lib._kvq_stack_bound = True
    return lib


def library() -> ctypes.CDLL | None:
    """The kvq library with the stack's entry points bound, or None where it can't be built."""
    lib = cpu_quant.library()
    return None if lib is None else _bind(lib)


def _check_f32(t: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
    if t.dtype != torch.float32 or tuple(t.shape) != shape or not t.is_contiguous():
        raise ValueError(
            f"{name}: expected a contiguous float32 tensor of shape {shape}, got {t.dtype} {tuple(t.shape)}"
        )


class QuantDecoderStack:
    """All layers of a quantized Llama-family or Gemma 3 model for a decode step of up to `max_rows` rows.

    `__call__(input_ids, positions, block_tables, seq_lens, slot_mapping)` writes each row's new
    k and v to its slot (-1: don't write) of every layer's cache, attends over its context
    (`seq_lens`, this token included; the token's own k and v at its position, as its slot
    receives them) through its block table, and returns the final norm's output `[M, H]` fp32.
    Validation errors are ValueError, a token id outside the vocabulary IndexError; nothing is
    written then. The stack keeps references to every tensor it was given. Runs on
    `torch.get_num_threads()` OpenMP threads."""

    def __init__(
        self,
        layers: Sequence[StackLayer],
        *,
        embed: torch.Tensor,  # [vocab, row_bytes] uint8 in embed_qtype, or [vocab, H] f32 / f16 / bf16
        embed_qtype: int,
        final_norm: torch.Tensor,  # [H] fp32
        inv_freq: torch.Tensor,  # [D / 2] fp32 RoPE inverse frequencies
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        eps: float,
        scale: float | None = None,  # default head_dim ** -0.5
        sliding_window: int | None = None,
        max_rows: int = 8,
        lib: ctypes.CDLL | None = None,
        local_inv_freq: torch.Tensor | None = None,  # [D / 2] fp32 of layers with local_rope
        embed_scale: float | None = None,  # embedding rows times this (Gemma: sqrt(H) as fp32)
        activation: str = "silu",  # or "gelu_tanh"
        sandwich_norms: bool = False,  # Gemma's post-attention / pre- and post-feedforward norms
    ) -> None:
        lib = lib if lib is not None else library()
        if lib is None:
            raise RuntimeError("the kvq CPU kernels are unavailable")
        self._lib = _bind(lib)
        if not layers:
            raise ValueError("layers: at least one layer is needed")
        if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
        if head_dim % 8 or not 8 <= head_dim <= 256:
            raise ValueError(f"head_dim must be a multiple of 8 in [8, 256], got {head_dim}")
        if not 1 <= max_rows <= 64:
            raise ValueError(f"max_rows must be in [1, 64], got {max_rows}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        qk_norm = layers[0].q_norm is not None
        if any((layer.q_norm is None) != (not qk_norm) or (layer.k_norm is None) != (not qk_norm) for layer in layers):
            raise ValueError("q_norm / k_norm: every layer has both or none has either")
        if sandwich_norms and any(layer.pre_ff_norm is None or layer.post_ff_norm is None for layer in layers):
            raise ValueError("sandwich_norms: every layer needs pre_ff_norm and post_ff_norm")
        if any(layer.window < 0 for layer in layers):
            raise ValueError("window: must be >= 0")
        if any(layer.local_rope for layer in layers) and local_inv_freq is None:
            raise ValueError("local_inv_freq: needed by a layer with local_rope")
        H = final_norm.numel()
        I = layers[0].gate.rows
        D, Hq, Hkv = head_dim, num_heads, num_kv_heads
        _check_f32(final_norm, (H,), "final_norm")
        _check_f32(inv_freq, (D // 2,), "inv_freq")
        keep: list[torch.Tensor] = [final_norm, inv_freq]
        if local_inv_freq is not None:
            _check_f32(local_inv_freq, (D // 2,), "local_inv_freq")
            keep.append(local_inv_freq)

        if embed_qtype in _PLAIN_EMBED:
            if embed.dtype != _PLAIN_EMBED[embed_qtype] or embed.dim() != 2 or embed.shape[1] != H:
                raise ValueError(
                    f"embed: expected [vocab, {H}] {_PLAIN_EMBED[embed_qtype]}, got {embed.dtype} {tuple(embed.shape)}"
                )
        elif embed_qtype in QUANT_TYPES:
            self._check_weight(embed, embed_qtype, H, "embed")
        else:
            raise ValueError(f"embed_qtype {embed_qtype} is not supported")
        if embed.stride(1) != 1:
            raise ValueError("embed: rows must be contiguous")
        keep.append(embed)

        kv0 = layers[0].kv_cache
        if kv0.dim() != 5 or kv0.shape[0] != 2 or tuple(kv0.shape[3:]) != (Hkv, D):
            raise ValueError(f"kv_cache: expected [2, num_blocks, block_size, {Hkv}, {D}], got {tuple(kv0.shape)}")
        self.num_blocks, self.block_size = int(kv0.shape[1]), int(kv0.shape[2])

        shapes = {"qkv": ((Hq + 2 * Hkv) * D, H), "o": (H, Hq * D), "gate": (I, H), "up": (I, H), "down": (H, I)}
        table = torch.zeros((len(layers), _LAYER_COLS), dtype=torch.int64)
        for i, layer in enumerate(layers):
            _check_f32(layer.input_norm, (H,), f"layers[{i}].input_norm")
            _check_f32(layer.post_norm, (H,), f"layers[{i}].post_norm")
            _check_f32(layer.kv_cache, tuple(kv0.shape), f"layers[{i}].kv_cache")
            row = [layer.input_norm.data_ptr(), layer.post_norm.data_ptr(),
                   layer.kv_cache[0].data_ptr(), layer.kv_cache[1].data_ptr()]
            keep += [layer.input_norm, layer.post_norm, layer.kv_cache]
            for name in ("qkv", "o", "gate", "up", "down"):
                lin: QuantLinear = getattr(layer, name)
                rows, K = shapes[name]
                where = f"layers[{i}].{name}"
                if not 1 <= len(lin.parts) <= MAX_PARTS:
                    raise ValueError(f"{where}: 1 to {MAX_PARTS} parts, got {len(lin.parts)}")
                if lin.rows != rows:
                    raise ValueError(f"{where}: parts have {lin.rows} rows in all, expected {rows}")
                cols = [len(lin.parts), 0]
                if lin.bias is not None:
                    _check_f32(lin.bias, (rows,), f"{where}.bias")
                    cols[1] = lin.bias.data_ptr()
                    keep.append(lin.bias)
                for qtype, w, k in lin.parts:
                    if k != K:
                        raise ValueError(f"{where}: part K is {k}, expected {K}")
                    self._check_weight(w, qtype, K, where)
                    cols += [w.data_ptr(), qtype, w.stride(0), w.shape[0]]
                    keep.append(w)
                cols += [0] * (_LIN_COLS - len(cols))
                row += cols
            extra = [0] * 4
            for j, (name, t, n) in enumerate((
                ("pre_ff_norm", layer.pre_ff_norm if sandwich_norms else None, H),
                ("post_ff_norm", layer.post_ff_norm if sandwich_norms else None, H),
                ("q_norm", layer.q_norm, D), ("k_norm", layer.k_norm, D),
            )):
                if t is not None:
                    _check_f32(t, (n,), f"layers[{i}].{name}")
                    extra[j] = t.data_ptr()
                    keep.append(t)
            row += extra + [layer.window, int(layer.local_rope)]
            table[i] = torch.tensor(row, dtype=torch.int64)
        self._table = table
        self._keep = keep

        self.hidden, self.max_rows = H, max_rows
        self._model = _Model(
            num_layers=len(layers), hidden=H, num_heads=Hq, num_kv_heads=Hkv, head_dim=D, inter=I,
            block_size=self.block_size, window=sliding_window or 0, num_blocks=self.num_blocks, eps=eps,
            scale=D**-0.5 if scale is None else scale, embed_qtype=embed_qtype,
            flags=(_QK_NORM if qk_norm else 0) | (_SANDWICH if sandwich_norms else 0) | ACTIVATIONS[activation],
            vocab=embed.shape[0], embed_row_bytes=embed.stride(0) * embed.element_size(), embed=embed.data_ptr(),
            final_norm=final_norm.data_ptr(), inv_freq=inv_freq.data_ptr(), layers=table.data_ptr(),
            embed_scale=embed_scale or 0.0, reserved=0,
            local_inv_freq=None if local_inv_freq is None else local_inv_freq.data_ptr(),
        )
        self._model_ref = ctypes.byref(self._model)
        self._threads = 0
        self._scratch = torch.empty(0, dtype=torch.uint8)
        self._size_scratch(torch.get_num_threads())

    def _size_scratch(self, threads: int) -> None:
        # Shared buffers plus one block per OpenMP thread; the C side runs on as many threads as
        # the scratch was sized for, at most. Also the one-time check of the model's table.
        nbytes = self._lib.kvq_decoder_stack_scratch(self._model_ref, self.max_rows, threads)
        if nbytes < 0:
            raise ValueError("decoder stack: the model's shapes, qtypes, row strides or windows (two distinct at most) "
                "are not supported")
        self._scratch = torch.empty(nbytes, dtype=torch.uint8)
        self._threads = threads

    def _check_weight(self, w: torch.Tensor, qtype: int, K: int, where: str) -> None:
        if qtype not in QUANT_TYPES:
            raise ValueError(f"{where}: qtype {qtype} is not one of {sorted(QUANT_TYPES)}")
        if K % cpu_quant.block_size(qtype):
            raise ValueError(f"{where}: K={K} is not a whole number of {QUANT_TYPES[qtype]} blocks")
        need = cpu_quant.row_bytes(qtype, K)
        if w.dtype != torch.uint8 or w.dim() != 2 or w.stride(1) != 1 or w.shape[1] != need:
            raise ValueError(
                f"{where}: expected uint8 [rows, {need}] with contiguous rows, got {w.dtype} {tuple(w.shape)}"
            )

    def __call__(
        self,
        input_ids: torch.Tensor,  # [M] int64
        positions: torch.Tensor,  # [M] int64
        block_tables: torch.Tensor,  # [M, width] int32
        seq_lens: torch.Tensor,  # [M] int32, this token included
        slot_mapping: torch.Tensor,  # [M] int64, -1 = don't write
    ) -> torch.Tensor:  # [M, H] fp32
        m = input_ids.shape[0]
        if not 1 <= m <= self.max_rows:
            raise ValueError(f"input_ids: 1 to {self.max_rows} rows, got {m}")
        for t, dtype, name in (
            (input_ids, torch.int64, "input_ids"), (positions, torch.int64, "positions"),
            (seq_lens, torch.int32, "seq_lens"), (slot_mapping, torch.int64, "slot_mapping"),
        ):
            if t.dtype != dtype or t.shape != (m,) or not t.is_contiguous():
                raise ValueError(f"{name}: expected a contiguous {dtype} tensor of shape ({m},)")
        if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != m or (
            not block_tables.is_contiguous()
        ):
            raise ValueError(f"block_tables: expected a contiguous int32 tensor of shape [{m}, width]")
        if torch.get_num_threads() > self._threads:
            self._size_scratch(torch.get_num_threads())
        out = torch.empty((m, self.hidden), dtype=torch.float32)
        rc = self._lib.kvq_decoder_stack_f32(
            self._model_ref, m, input_ids.data_ptr(), positions.data_ptr(), block_tables.data_ptr(),
            block_tables.shape[1], seq_lens.data_ptr(), slot_mapping.data_ptr(), out.data_ptr(),
            self._scratch.data_ptr(), self._scratch.numel(),
        )
        if rc == _OK:
            return out
        if rc == _EID:
            raise IndexError(f"input_ids: a token id is outside [0, {self._model.vocab}): {input_ids.tolist()}")
        if rc == _ESEQ:
            raise ValueError(
                "seq_lens / block_tables / slot_mapping: a context is empty, longer than its block table, "
                f"or names a block or slot outside the cache ({self.num_blocks} blocks of {self.block_size})"
            )
        raise RuntimeError(f"kvq_decoder_stack_f32 failed with code {rc}")
