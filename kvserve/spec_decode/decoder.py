"""The engine's side of speculative decoding: after each step, ask the proposer for drafts
for every decoding request that may speculate, and back off where speculation does not pay.

Back-off (per request): a verify step that accepted none of its drafts costs a wider forward
and bought nothing. After a step in which the first draft is rejected, the request drafts one
token next time, and if its first drafts have been accepted less often than the step's
threshold (counting from one hit in two tries) it also proposes nothing for a while: 8 steps,
then 64, then 256 for each further such miss, until a draft is accepted again. A one-token
draft pays when its chance of acceptance beats what its row costs against what a token costs:
with a step of B rows costing a + B*b (r = b/a, the platform's `draft_row_cost`), that is
B*r / (1 + B*r): ~0.23 at batch 1 on a 2-core CPU (r ~0.3), 0.9 at batch 32 there, where rows
are compute; 0.03 at batch 1 on a GPU, 0.5 at batch 32. So at batch 1 a request whose output
keeps copying its input is not silenced by a miss (between two copied spans it drafts one
token a step, which is where the next span is found, and an unlucky start costs it 8 steps),
while in a wide CPU batch every miss starts a cool-down. A request whose drafts always fail
then adds one row in each of about log8(n) of its n steps. The draft length adapts too: a
request starts with one draft token, doubles it (up to k) after a step that accepted every
draft, drops to accepted + 1 after a partial acceptance and to 1 after none.

Per step, the drafts of all requests together are capped so that decode rows + drafts stay
within `_FREE_ROWS` (at least k drafts): at batch 1 a CPU step reads the weights once for up
to that many rows (the one-call decoder stack's limit), while at large batches every extra row
costs compute, so a wide batch speculates a few requests at a time (rotating).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from kvserve.core.request import Request, RequestStatus
from kvserve.platform.base import Platform
from kvserve.spec_decode.config import SpeculativeConfig
from kvserve.spec_decode.ngram import NgramProposer
from kvserve.spec_decode.proposer import Proposer

if TYPE_CHECKING:
    from kvserve.core.scheduler import Scheduler

_MAX_COOLDOWN = 256
_FREE_ROWS = 64


def max_step_rows(max_num_seqs: int, k: int) -> int:
    """The most rows a step of up to `max_num_seqs` decoding requests can have with up to k
    drafts each under the per-step cap (the verify CUDA graphs' largest size)."""
    return min(max_num_seqs * (k + 1), max(max_num_seqs + k, _FREE_ROWS))


class _Backoff:
    __slots__ = ("drafts_seen", "accepted_seen", "cooldowns", "cooldown", "k", "hits", "tries")

    def __init__(self, k: int) -> None:
        self.drafts_seen = self.accepted_seen = self.cooldown = 0
        self.cooldowns = 0  # cool-downs started since the last accepted draft
        self.k = k  # draft length for the next proposal
        # verify steps whose first draft was accepted, of those tried (a prior of one in two)
        self.hits, self.tries = 1, 2


class SpecDecoder:
    def __init__(
        self, config: SpeculativeConfig, proposer: Proposer | None = None, row_cost: float = Platform.draft_row_cost
    ) -> None:
        self.config = config
        self.row_cost = row_cost  # the platform's draft_row_cost (see the module docstring)
        if proposer is None:
            if config.method != "ngram":
                raise ValueError(f"speculative_config.method {config.method!r} needs a proposer built by the engine")
            proposer = NgramProposer(config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max)
        self.proposer = proposer
        self._state: dict[str, _Backoff] = {}
        # The back-off's draft-length adaptation (off: num_speculative_tokens whenever a request
        # proposes; the cool-down after rejected steps stays). Benchmarks compare the two.
        self.adapt_length = True
        # Benchmarks: True starts a cool-down after every miss (the rule before the threshold).
        self.cool_every_miss = False
        self.draft_time_s = 0.0  # time spent proposing
        self.num_proposals = 0  # requests given drafts
        self.num_backed_off = 0  # request-steps skipped by the back-off
        self._rotate = 0

    def _disabled(self, scheduler: Scheduler) -> bool:
        n = self.config.disable_by_batch_size
        return n is not None and len(scheduler.running) >= n

    def idle(self, scheduler: Scheduler) -> bool:
        """The next `propose` would give nobody drafts: every running request is backed off
        (asynchronous scheduling may then plan the next step before this one's tokens are
        back; `skip` stands in for that `propose`)."""
        if self._disabled(scheduler):
            return True
        if not self.config.backoff or not scheduler.running:
            return False
        for req in scheduler.running:
            st = self._state.get(req.request_id)
            if st is None or st.cooldown <= 0 or req.num_draft_tokens != st.drafts_seen:
                return False
        return True

    def skip(self, scheduler: Scheduler) -> None:
        """A step was planned without asking for drafts (after `idle()`): count it in each
        backed-off request's cool-down as `propose` would have."""
        live = scheduler.requests
        for rid in [r for r in self._state if r not in live]:
            del self._state[rid]
            self.proposer.drop(rid)
        if self._disabled(scheduler):
            return  # as `propose` in a wide batch: nobody's cool-down counts this step
        for req in scheduler.running:
            st = self._state.get(req.request_id)
            if st is not None and st.cooldown > 0:
                st.cooldown -= 1
                self.num_backed_off += 1

    def propose(self, scheduler: Scheduler) -> None:
        """Set `spec_token_ids` on the running requests that speculate in the next step."""
        t0 = time.perf_counter()
        live = scheduler.requests
        for rid in [r for r in self._state if r not in live]:
            del self._state[rid]
            self.proposer.drop(rid)
        cfg = self.config
        max_len = scheduler.config.max_model_len
        reqs: list[Request] = []
        ks: list[int] = []
        running = [] if self._disabled(scheduler) else scheduler.running  # (back-off state kept)
        width = len(running) * self.row_cost
        threshold = 1.0 if self.cool_every_miss else width / (1.0 + width)
        room = max(cfg.num_speculative_tokens, _FREE_ROWS - len(running))
        if running:  # who gets drafts first rotates, so a capped batch shares them
            self._rotate = (self._rotate + 1) % len(running)
            running = running[self._rotate :] + running[: self._rotate]
        for req in running:
            if req.status != RequestStatus.RUNNING or req.num_computed_tokens != req.num_tokens - 1:
                continue  # mid-prefill
            st = self._state.get(req.request_id)
            if st is None:
                st = self._state[req.request_id] = _Backoff(
                    1 if cfg.backoff and self.adapt_length else cfg.num_speculative_tokens
                )
            if req.num_draft_tokens != st.drafts_seen and cfg.backoff:  # verified since the last call
                drafted = req.num_draft_tokens - st.drafts_seen
                accepted = req.num_accepted_tokens - st.accepted_seen
                st.tries += 1
                st.hits += accepted > 0
                if accepted == 0:
                    if st.hits < threshold * st.tries:
                        st.cooldowns += 1
                        st.cooldown = min(8**st.cooldowns, _MAX_COOLDOWN)
                    st.k = 1
                else:
                    st.cooldowns = 0
                    st.k = min(2 * st.k, cfg.num_speculative_tokens) if accepted == drafted else accepted + 1
                if not self.adapt_length:
                    st.k = cfg.num_speculative_tokens
            st.drafts_seen, st.accepted_seen = req.num_draft_tokens, req.num_accepted_tokens
            if st.cooldown > 0:
                st.cooldown -= 1
                self.num_backed_off += 1
                continue
            k = min(
                st.k,
                req.max_tokens - req.num_output_tokens - 1,
                max_len - req.num_tokens - 1,
            )
            if k > 0:
                reqs.append(req)
                ks.append(k)
        if reqs:
            batch = self.proposer.propose(reqs, ks)
            for req in reqs:
                p = batch.proposals.get(req.request_id)
                if p is not None and p.token_ids and room > 0:
                    req.spec_token_ids = list(p.token_ids[:room])
                    room -= len(req.spec_token_ids)
                    self.num_proposals += 1
        self.draft_time_s += time.perf_counter() - t0
