"""Draft-model proposer: a smaller model with the same vocabulary proposes k tokens by greedy
decoding, on its own paged KV cache, run by the same engine process.

The draft keeps, per request, a shadow `Request` in its own `KVCacheManager` (no prefix
caching) and a `ModelRunner` of its own. Each `propose` call first brings every request's
draft KV up to date (a prefill of the prompt the first time, then the tokens accepted since
the last call: at most k + 1), sampling the first draft token in the same forward, then runs
k - 1 one-token decode steps for all requests together. Positions of rejected drafts are
simply recomputed next time (their slots overwritten). Under tensor parallelism the draft
model is loaded and run whole on rank 0 (`ps.single_rank`); the drafts travel to the other
ranks in the step's plan. Drafts are greedy, i.e. a point mass:
the verifier's rejection rule keeps sampled requests' output distribution exact (a sampled
request just accepts less often than with drafts sampled from the draft's distribution).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Sequence

from kvserve.core.config import CacheConfig
from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.request import Request
from kvserve.core.sampling_params import SamplingParams
from kvserve.core.scheduler import CachedRequestData, NewRequestData, SchedulerOutput
from kvserve.distributed import parallel_state as ps
from kvserve.spec_decode.config import SpeculativeConfig
from kvserve.spec_decode.proposer import Proposal, ProposalBatch

if TYPE_CHECKING:
    from kvserve.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)

_GREEDY = SamplingParams(temperature=0.0, max_tokens=1 << 30)


class DraftModelProposer:
    def __init__(self, engine: LLMEngine, config: SpeculativeConfig) -> None:
        from kvserve.loader.model_loader import load_model
        from kvserve.loader.resolve import resolve_model
        from kvserve.runner.model_runner import ModelRunner

        args = engine.args
        try:
            resolved = resolve_model(config.model)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"speculative_config.model: {e}") from None
        with ps.single_rank():  # under tensor parallelism: whole, on rank 0 only
            loaded = load_model(
                resolved, dtype=args.dtype, device=engine.runner.device, backend=engine.backend,
                load_tokenizer=False, platform=engine.platform, quantization=args.quantization,
            )
        if loaded.config.vocab_size != engine.model_config.vocab_size:
            raise ValueError(
                f"speculative_config.model: the draft model's vocabulary ({loaded.config.vocab_size} ids) "
                f"differs from the target's ({engine.model_config.vocab_size})"
            )
        if loaded.config.max_position_embeddings < engine.max_model_len:
            raise ValueError(
                f"speculative_config.model: the draft model's context ({loaded.config.max_position_embeddings}) "
                f"is shorter than max_model_len ({engine.max_model_len})"
            )
        self.k = config.num_speculative_tokens
        bs = engine.cache_config.block_size
        # As many tokens as the target's cache holds (a draft block is smaller).
        num_blocks = engine.cache_config.num_blocks
        self.kv = KVCacheManager(num_blocks, bs, enable_prefix_caching=False)
        with ps.single_rank():
            self.runner = ModelRunner(
                loaded.model, loaded.config, CacheConfig(bs, num_blocks, False), num_blocks, loaded.dtype,
                engine.runner.device, engine.backend, set(), seed=0, max_num_seqs=args.max_num_seqs,
                max_model_len=engine.max_model_len, use_cuda_graphs=False,
            )
        self._shadow: dict[str, Request] = {}
        self._known: set[str] = set()  # requests the draft runner holds state for
        self._gone: set[str] = set()

    def _sync(self, req: Request) -> Request:
        """The shadow request, its tokens set to the target's and its computed prefix cut to
        the part that still agrees."""
        sh = self._shadow.get(req.request_id)
        if sh is None:
            sh = self._shadow[req.request_id] = Request(req.request_id, req.prompt_token_ids, _GREEDY)
        old = sh.all_token_ids
        new = req.all_token_ids
        # The drafts computed last time past the accepted prefix are stale; only the tail
        # (the last call's drafts) can differ.
        limit = min(sh.num_computed_tokens, len(new), len(old))
        i = max(0, limit - 2 * self.k - 2)
        while i < limit and old[i] == new[i]:
            i += 1
        sh.num_computed_tokens = i
        sh.all_token_ids = list(new)
        return sh

    def propose(self, requests: Sequence[Request], max_tokens: Sequence[int]) -> ProposalBatch:
        with ps.single_rank():  # the draft runs whole on this rank (no collectives)
            return self._propose(requests, max_tokens)

    def _propose(self, requests: Sequence[Request], max_tokens: Sequence[int]) -> ProposalBatch:
        out = ProposalBatch()
        shadows: list[Request] = []
        ks: list[int] = []
        so = SchedulerOutput(finished_req_ids=self._gone)
        self._gone = set()
        for req, k in zip(requests, max_tokens):
            sh = self._sync(req)
            k = min(k, self.k)
            # room for the catch-up tokens and k - 1 more draft positions
            need = sh.num_tokens - sh.num_computed_tokens + k - 1
            blocks = self.kv.allocate_slots(sh, need)
            if blocks is None:
                continue  # the draft cache is full: no drafts for this request now
            num_new = sh.num_tokens - sh.num_computed_tokens
            so.new_requests.append(NewRequestData(
                sh.request_id, list(sh.all_token_ids), req.num_prompt_tokens, _GREEDY,
                list(sh.block_ids), sh.num_computed_tokens,
            ))
            so.num_scheduled_tokens[sh.request_id] = num_new
            shadows.append(sh)
            ks.append(k)
        if not shadows:
            return out
        drafts: dict[str, list[int]] = {sh.request_id: [] for sh in shadows}
        res = self.runner.execute(so)
        live = []
        for sh, k in zip(shadows, ks):
            sh.num_computed_tokens = sh.num_tokens
            tok = res.sampled[sh.request_id][0]
            drafts[sh.request_id].append(tok)
            sh.all_token_ids.append(tok)
            if k > 1:
                live.append((sh, k))
        for step in range(1, self.k):
            live = [(sh, k) for sh, k in live if k > step]
            if not live:
                break
            so = SchedulerOutput()
            for sh, _ in live:
                so.cached_requests.append(CachedRequestData(sh.request_id, [], sh.num_computed_tokens))
                so.num_scheduled_tokens[sh.request_id] = 1
            res = self.runner.execute(so)
            for sh, _ in live:
                sh.num_computed_tokens += 1
                tok = res.sampled[sh.request_id][0]
                drafts[sh.request_id].append(tok)
                sh.all_token_ids.append(tok)
        for rid, d in drafts.items():
            out.proposals[rid] = Proposal(d)
        return out

    def drop(self, request_id: str) -> None:
        sh = self._shadow.pop(request_id, None)
        if sh is not None:
            self.kv.free(sh)
            self._gone.add(request_id)
