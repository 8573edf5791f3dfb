"""Build a ready-to-run model, its config and tokenizer from a resolved checkpoint."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from kvserve.attention.base import AttentionBackend
from kvserve.core.config import ModelConfig, normalize_dtype
from kvserve.loader.resolve import ResolvedModel
from kvserve.loader.tokenizer import Tokenizer
from kvserve.models.registry import build_model

logger = logging.getLogger(__name__)

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


def resolve_device(device: str) -> torch.device:
    if not isinstance(device, str):
        raise ValueError(f"device must be a string such as 'auto', 'cpu' or 'cuda' (got {device!r})")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device {device!r} is not a valid torch device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str, checkpoint_dtype: str | None, device: torch.device) -> torch.dtype:
    """'auto' on CUDA runs bf16 (fp16 when the checkpoint is fp16); on the CPU it keeps an
    fp32 checkpoint in fp32 and runs 16-bit/quantized ones in bf16 (CPUs have no fast fp16
    matmul). 'float32' / 'float16' / 'bfloat16' are honoured everywhere."""
    name = normalize_dtype(dtype)
    if name == "auto":
        ckpt = normalize_dtype(checkpoint_dtype) if checkpoint_dtype in _TORCH_DTYPES or checkpoint_dtype in ("fp16", "bf16", "fp32") else None
        if ckpt == "float32" and device.type != "cuda":
            name = "float32"
        elif ckpt == "float16" and device.type == "cuda":
            name = "float16"
        else:
            name = "bfloat16"
    return _TORCH_DTYPES[name]


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
) -> LoadedModel:
    """load_format 'dummy' skips the checkpoint and fills random weights (speed work at real
    shapes from a config.json alone)."""
    t0 = time.perf_counter()
    gen_defaults: dict[str, Any] = {}
    if resolved.kind == "gguf":
        from kvserve.loader import gguf

        gf = gguf.GGUFFile(resolved.path)
        hf_cfg = gguf.load_gguf_config(gf)
        cfg = ModelConfig.from_hf_dict(hf_cfg)
        # GGUF tensors are mostly quantized: 'auto' computes in bf16 (fp32 is exact but
        # about half as fast on CPUs; ask for it explicitly).
        torch_dtype = resolve_dtype(dtype, None, device)
        tokenizer = gguf.load_gguf_tokenizer(gf) if load_tokenizer else None

        def read_weights(shard):
            # GGUF tensors are dequantized whole, then sliced (one tensor at a time).
            from kvserve.loader.safetensors import narrow

            return ((n, narrow(t, n, shard)) for n, t in gguf.iter_gguf_weights(gf, torch_dtype))
    else:
        from kvserve.loader.safetensors import iter_weights

        folder = resolved.path
        hf_cfg = json.loads((folder / "config.json").read_text())
        cfg = ModelConfig.from_hf_dict(hf_cfg)
        torch_dtype = resolve_dtype(dtype, cfg.torch_dtype, device)
        tokenizer = _folder_tokenizer(folder) if load_tokenizer else None
        gen_path = folder / "generation_config.json"
        if gen_path.is_file():
            gen_defaults = json.loads(gen_path.read_text())

        def read_weights(shard):
            return iter_weights(folder, torch_dtype, shard) if load_format != "dummy" else iter(())

    with torch.device("meta"):
        model = build_model(cfg, backend)
    shard = getattr(model, "weight_shard", None)
    weights = read_weights(shard)
    # Materialize on the target device in the compute dtype, then fill from the checkpoint;
    # rotary tables are recomputed because meta buffers hold no data.
    model = model.to_empty(device=device).to(torch_dtype)
    model.tie_weights()  # to_empty gives each use of a shared parameter its own storage
    _reset_rotary(model)
    if load_format == "dummy":
        _random_init(model)
    else:
        model.load_weights(weights)
    model.eval()
    model.requires_grad_(False)
    from kvserve.models.cpu_linear import prepack_linears, prepack_supported

    if prepack_supported(device, torch_dtype):
        prepack_linears(model)

    eos: set[int] = set(cfg.eos_token_ids)
    gen_eos = gen_defaults.get("eos_token_id")
    if isinstance(gen_eos, int):
        eos.add(gen_eos)
    elif isinstance(gen_eos, list):
        eos.update(int(e) for e in gen_eos)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    logger.info(
        "loaded %s (%s, %d layers) as %s on %s in %.2fs",
        resolved.name, cfg.architecture, cfg.num_layers, torch_dtype, device, time.perf_counter() - t0,
    )
    return LoadedModel(model, cfg, tokenizer, torch_dtype, device, eos, gen_defaults)


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
