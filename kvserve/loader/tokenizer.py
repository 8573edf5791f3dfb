"""One tokenizer type for every checkpoint format: a thin wrapper over `tokenizers.Tokenizer`.

HF folders load `tokenizer.json` directly (fast, no `transformers` import); folders that ship
only a slow tokenizer (sentencepiece `tokenizer.model`) go through `transformers.AutoTokenizer`
once to convert it. GGUF files build the `tokenizers.Tokenizer` from their embedded vocab and
merges (`kvserve.loader.gguf`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable

from tokenizers import Tokenizer as _HFTokenizer

logger = logging.getLogger(__name__)


def _token_str(tok: Any) -> str | None:
    if tok is None:
        return None
    if isinstance(tok, dict):
        return tok.get("content")
    return str(tok)


class Tokenizer:
    """Encode/decode text and expose the special tokens and chat template a model needs."""

    def __init__(
        self,
        backend: _HFTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        add_bos_token: bool | None = None,
        extra_eos_token_ids: Iterable[int] = (),
    ) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.chat_template = chat_template
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = backend.token_to_id(eos_token) if eos_token else None
        # When set, encode() adds/omits BOS itself instead of trusting the post-processor
        # (GGUF files carry `tokenizer.ggml.add_bos_token`; HF folders encode it in
        # tokenizer.json's post-processor, so they leave this None).
        self.add_bos_token = add_bos_token
        self.extra_eos_token_ids = set(extra_eos_token_ids)
        self.all_special_ids: set[int] = {
            t.content and backend.token_to_id(t.content)
            for t in backend.get_added_tokens_decoder().values()
            if t.special
        } - {None}
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._id_to_token_cache: list[str | None] | None = None

    # -- encoding ---------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if (
            add_special_tokens
            and self.add_bos_token
            and self.bos_token_id is not None
            and (not ids or ids[0] != self.bos_token_id)
        ):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        return [self.backend.id_to_token(int(i)) for i in ids]

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def __len__(self) -> int:
        return self.vocab_size

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        folder = Path(folder)
        cfg: dict[str, Any] = {}
        cfg_path = folder / "tokenizer_config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        tok_json = folder / "tokenizer.json"
        if tok_json.is_file():
            backend = _HFTokenizer.from_file(str(tok_json))
        else:
            backend = _convert_with_transformers(folder)
        special: dict[str, Any] = {}
        smap = folder / "special_tokens_map.json"
        if smap.is_file():
            special = json.loads(smap.read_text(encoding="utf-8"))
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = folder / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        chat_json = folder / "chat_template.json"
        if template is None and chat_json.is_file():
            template = json.loads(chat_json.read_text(encoding="utf-8")).get("chat_template")
        return cls(
            backend,
            bos_token=_token_str(cfg.get("bos_token") or special.get("bos_token")),
            eos_token=_token_str(cfg.get("eos_token") or special.get("eos_token")),
            pad_token=_token_str(cfg.get("pad_token") or special.get("pad_token")),
            chat_template=template,
        )


def _convert_with_transformers(folder: Path) -> _HFTokenizer:
    try:
        from transformers import AutoTokenizer
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        raise FileNotFoundError(
            f"{folder} has no tokenizer.json and transformers is not installed to convert it"
        ) from e
    try:
        hf = AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    except Exception as e:
        raise FileNotFoundError(f"could not load a tokenizer from {folder}: {e}") from e
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise FileNotFoundError(f"the tokenizer in {folder} has no fast (tokenizers) version")
    logger.info("converted the slow tokenizer in %s with transformers", folder)
    return backend
