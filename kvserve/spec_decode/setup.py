"""Build the engine's speculative decoder from its `SpeculativeConfig`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvserve.spec_decode.config import SpeculativeConfig
from kvserve.spec_decode.decoder import SpecDecoder

if TYPE_CHECKING:
    from kvserve.engine.llm_engine import LLMEngine


def build_spec_decoder(engine: LLMEngine, config: SpeculativeConfig) -> SpecDecoder:
    row_cost = engine.platform.draft_row_cost
    if config.method == "ngram":
        return SpecDecoder(config, row_cost=row_cost)
    from kvserve.spec_decode.draft_model import DraftModelProposer

    return SpecDecoder(config, DraftModelProposer(engine, config), row_cost=row_cost)
