"""Build a ready-to-run model, its config and tokenizer from a resolved checkpoint."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from kvserve.attention.base import AttentionBackend
from kvserve.core.config import ModelConfig
from kvserve.loader.resolve import ResolvedModel
from kvserve.loader.tokenizer import Tokenizer
from kvserve.models.registry import build_model

if TYPE_CHECKING:
    from kvserve.platform import Platform

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: nn.Module
    config: ModelConfig
    tokenizer: Tokenizer | None
    dtype: torch.dtype
    device: torch.device
    eos_token_ids: set[int]
    # Sampling defaults from generation_config.json (temperature, top_p, top_k, ...).
    generation_defaults: dict[str, Any] = field(default_factory=dict)


def read_model_config(resolved: ResolvedModel) -> ModelConfig:
    """The architecture alone (no weights, no tokenizer): to check a model before ranks start."""
    if resolved.kind == "gguf":
        from kvserve.loader import gguf

        return ModelConfig.from_hf_dict(gguf.load_gguf_config(gguf.GGUFFile(resolved.path)))
    return ModelConfig.from_hf_dict(json.loads((resolved.path / "config.json").read_text()))


def load_model(
    resolved: ResolvedModel,
    *,
    dtype: str,
    device: torch.device,
    backend: AttentionBackend,
    load_tokenizer: bool = True,
    load_format: str = "auto",
    platform: Platform | None = None,
    quantization: str | None = None,
) -> LoadedModel:
    """load_format 'dummy' skips the checkpoint and fills random weights (speed work at real
    shapes from a config.json alone). `quantization`: None keeps the checkpoint's format (GGML
    blocks stay quantized where the platform can multiply them), 'none' dequantizes GGML blocks
    to `dtype`, 'q8_0' / 'q4_0' quantize dense projection weights at load (CPU)."""
    from kvserve.platform import get_platform

    t0 = time.perf_counter()
    platform = platform or get_platform(device)
    gen_defaults: dict[str, Any] = {}
    if resolved.kind == "gguf":
        from kvserve.loader import gguf

        gf = gguf.GGUFFile(resolved.path)
        hf_cfg = gguf.load_gguf_config(gf)
        cfg = ModelConfig.from_hf_dict(hf_cfg)
        quantized = cfg.family in _GGML_FAMILIES and gguf.has_quantized_matrices(gf)
        weights = platform.weight_format(quantized, quantization, dtype)
        torch_dtype = platform.resolve_dtype(dtype, hf_cfg.get("torch_dtype"), weights)
        tokenizer = gguf.load_gguf_tokenizer(gf) if load_tokenizer else None
        keep = weights.kind == "ggml"

        def read_weights(shard):
            # One tensor at a time: GGML blocks kept (or dequantized whole), then sliced.
            from kvserve.loader.safetensors import narrow

            return ((n, narrow(t, n, shard)) for n, t in gguf.iter_gguf_weights(gf, torch_dtype, keep_quantized=keep))
    else:
        from kvserve.loader.safetensors import iter_weights

        folder = resolved.path
        hf_cfg = json.loads((folder / "config.json").read_text())
        cfg = ModelConfig.from_hf_dict(hf_cfg)
        if quantization not in (None, "auto", "none") and cfg.family not in _GGML_FAMILIES:
            raise ValueError(
                f"quantization={quantization!r} supports the Llama and Gemma 3 families only (not {cfg.architecture})"
            )
        weights = platform.weight_format(False, quantization, dtype)
        torch_dtype = platform.resolve_dtype(dtype, cfg.torch_dtype, weights)
        tokenizer = _folder_tokenizer(folder) if load_tokenizer else None
        gen_path = folder / "generation_config.json"
        if gen_path.is_file():
            gen_defaults = json.loads(gen_path.read_text())

        def read_weights(shard):
            return iter_weights(folder, torch_dtype, shard) if load_format != "dummy" else iter(())

    builder = platform.layer_builder(backend, torch_dtype, weights)
    with torch.device("meta"):
        model = build_model(cfg, builder)
    shard = getattr(model, "weight_shard", None)
    weights = _progress(read_weights(shard), len(gf.tensors) if resolved.kind == "gguf" else None, resolved.name)
    # Materialize on the target device in the compute dtype, then fill from the checkpoint;
    # rotary tables are recomputed because meta buffers hold no data.
    _materialize(model, device, torch_dtype)
    model.tie_weights()  # each use of a shared parameter got its own storage
    _reset_rotary(model)
    if load_format == "dummy":
        _random_init(model)
    else:
        model.load_weights(weights)
    model.eval()
    model.requires_grad_(False)
    platform.prepare_model(model)  # repack / merge weights for the chosen kernels

    eos: set[int] = set(cfg.eos_token_ids)
    gen_eos = gen_defaults.get("eos_token_id")
    if isinstance(gen_eos, int):
        eos.add(gen_eos)
    elif isinstance(gen_eos, list):
        eos.update(int(e) for e in gen_eos)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    logger.info(
        "loaded %s (%s, %d layers) as %s on %s, weights %s, in %.2fs",
        resolved.name, cfg.architecture, cfg.num_layers, torch_dtype, device, _describe_weights(model),
        time.perf_counter() - t0,
    )
    return LoadedModel(model, cfg, tokenizer, torch_dtype, device, eos, gen_defaults)


def _progress(weights, total: int | None, name: str):
    """A progress bar over the tensors read, on a terminal only, shown once loading has taken
    2 s (a small model loads before it would appear)."""
    import sys

    if not sys.stderr.isatty():
        return weights
    from tqdm.auto import tqdm

    return tqdm(weights, total=total, desc=f"loading {name}", unit=" tensors", delay=2.0, leave=False,
                dynamic_ncols=True, file=sys.stderr)


def _materialize(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """`model.to_empty(device=device).to(dtype)` without its costs: `to_empty` runs
    `empty_like` on meta tensors through torch's Python decompositions, whose first use imports
    sympy (about 1 s of start-up on a 2-core machine), and `.to(dtype)` copies every floating
    tensor once more. Floating parameters and buffers become uninitialized `dtype` tensors on
    `device`, others keep their dtype."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = nn.Parameter(_empty(p, device, dtype), requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = _empty(b, device, dtype)


def _empty(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device=device)
# Families whose projections are all `Linear`s built by the platform (GGML blocks can stay quantized).
_GGML_FAMILIES = ("llama", "gemma3", "phi3", "moe")


def _describe_weights(model: nn.Module) -> str:
    """'dense' or the GGML formats in use, e.g. 'ggml[Q4_1 x 120, Q8_0 x 1]'."""
    from collections import Counter

    from kvserve.models.linear import GGML_NAMES, Linear

    kinds: Counter[str] = Counter()
    for m in model.modules():
        for p in getattr(m, "parts", None) or []:
            kinds[GGML_NAMES.get(p.qtype, "dense")] += 1
        if isinstance(m, Linear) and m.weight is not None:
            kinds["dense"] += 1
    if set(kinds) <= {"dense"}:
        return "dense"
    return "ggml[" + ", ".join(f"{k} x {n}" for k, n in kinds.most_common()) + "]"


@torch.no_grad()
def _random_init(model: nn.Module) -> None:
    # Drawn on the parameters' device: an 8B model's weights take seconds on a GPU, minutes
    # on the host.
    gens: dict[torch.device, torch.Generator] = {}
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or ".ln_" in name or name.startswith("ln_f"):
            p.fill_(1.0)
        elif p.dim() == 1:
            p.zero_()
        else:
            gen = gens.get(p.device)
            if gen is None:
                gen = gens[p.device] = torch.Generator(device=p.device).manual_seed(0)
            p.copy_((torch.randn(p.shape, generator=gen, device=p.device) * 0.02).to(p.dtype))
    from kvserve.models.linear import Linear

    for m in model.modules():  # weights kept outside parameters (MXFP4 blocks): the method fills them
        if isinstance(m, Linear) and hasattr(m.method, "random_init"):
            m.method.random_init(m, device=next(model.parameters()).device)


def _folder_tokenizer(folder) -> Tokenizer | None:
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        logger.warning("%s has no tokenizer files: only token-id prompts will work", folder)
        return None
    return Tokenizer.from_folder(folder)


def _reset_rotary(model: nn.Module) -> None:
    from kvserve.models.layers import RotaryEmbedding

    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset_parameters()
