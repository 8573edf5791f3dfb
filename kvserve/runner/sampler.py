"""Batched sampling: each row gets its own settings in one pass over the batch.

Tensors are built only for the knobs some row uses; an all-greedy batch with no penalties is a
single argmax. Random rows draw with the exponential-race trick (argmax of p / Exp(1) noise,
equivalent to sampling from p) so each seeded row can take its noise from its own generator:
a seeded request yields the same tokens whatever else shares the batch.
Logprobs are reported from the model's raw distribution (before penalties/temperature), as
vLLM and the OpenAI API do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvserve.core.sampling_params import SamplingParams


@dataclass
class SamplingBatch:
    params: list[SamplingParams]
    generators: list[torch.Generator | None]  # per row; None = the runner's shared generator
    prompt_token_ids: list[list[int]]  # for repetition_penalty
    output_token_ids: list[list[int]]  # for penalties and min_tokens
    eos_token_ids: list[frozenset[int]]

    @property
    def all_greedy(self) -> bool:
        return all(p.greedy for p in self.params)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Present only when some row asked for logprobs (rows that did not hold None).
    logprobs: list[tuple[float, int, list[int], list[float]] | None] = field(default_factory=list)
    # each: (chosen token logprob, its rank (1 = most likely), top ids, top logprobs)


class Sampler:
    def __init__(self, default_generator: torch.Generator | None = None) -> None:
        self.default_generator = default_generator

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        # logits: [N, V] fp32
        raw = logits
        logits = self.process_logits(logits, batch)
        if batch.all_greedy:
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample(logits, batch)
        token_list = tokens.tolist()
        out = SamplerOutput(token_list)
        if any(p.logprobs is not None for p in batch.params):
            out.logprobs = compute_logprobs(raw, tokens, [p.logprobs for p in batch.params])
        return out

    # -- logits processing ------------------------------------------------------------------
    def process_logits(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        params = batch.params
        needs_copy = any(
            p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
            or p.logit_bias or p.min_tokens for p in params
        )
        if not needs_copy:
            return logits
        logits = logits.clone()
        vocab = logits.shape[1]
        for i, p in enumerate(params):
            out_ids = batch.output_token_ids[i]
            row = logits[i]
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(batch.prompt_token_ids[i]) | set(out_ids)), dtype=torch.long, device=row.device)
                seen = seen[seen < vocab]
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if (p.presence_penalty or p.frequency_penalty) and out_ids:
                ids = torch.tensor(out_ids, dtype=torch.long, device=row.device)
                counts = torch.bincount(ids, minlength=vocab)[:vocab].to(row.dtype)
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
            if p.logit_bias:
                ids = torch.tensor([t for t in p.logit_bias if t < vocab], dtype=torch.long, device=row.device)
                bias = torch.tensor([p.logit_bias[t] for t in p.logit_bias if t < vocab], dtype=row.dtype, device=row.device)
                row.index_add_(0, ids, bias)
            if p.min_tokens and len(out_ids) < p.min_tokens:
                banned = [t for t in (set(batch.eos_token_ids[i]) | p.all_stop_token_ids) if t < vocab]
                if p.ignore_eos:
                    banned = [t for t in p.all_stop_token_ids if t < vocab]
                if banned:
                    row[torch.tensor(banned, dtype=torch.long, device=row.device)] = float("-inf")
        return logits

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        params = batch.params
        n, vocab = logits.shape
        temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=logits.device)
        probs = torch.softmax(logits / temps[:, None], dim=-1)  # [N, V]
        probs = apply_top_k_top_p_min_p(probs, params)
        # Exponential race: argmax(p / E), E ~ Exp(1) i.i.d., is a draw from p.
        noise = torch.empty_like(probs)
        shared = self.default_generator
        for i, p in enumerate(params):
            if not p.greedy:
                gen = batch.generators[i] or shared
                noise[i].exponential_(generator=gen)
        sampled = (probs / noise).argmax(dim=-1)
        greedy_rows = torch.tensor([p.greedy for p in params], device=logits.device)
        if bool(greedy_rows.any()):
            sampled = torch.where(greedy_rows, logits.argmax(dim=-1), sampled)
        return sampled


def apply_top_k_top_p_min_p(probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Zero out tokens outside each row's top-k / nucleus / min-p set (no renormalization is
    needed: the exponential race samples proportionally to what remains)."""
    use_k = any(p.top_k > 0 for p in params)
    use_p = any(p.top_p < 1.0 for p in params)
    use_min_p = any(p.min_p > 0 for p in params)
    if not (use_k or use_p or use_min_p):
        return probs
    n, vocab = probs.shape
    dev = probs.device
    if use_min_p:
        min_p = torch.tensor([p.min_p for p in params], device=dev, dtype=probs.dtype)
        threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
        probs = probs.masked_fill(probs < threshold, 0.0)
    if use_k or use_p:
        sorted_p, order = probs.sort(dim=-1, descending=True)  # [N, V]
        keep = torch.ones_like(sorted_p, dtype=torch.bool)
        if use_k:
            k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=dev)
            kth = sorted_p.gather(1, (k.clamp(max=vocab) - 1)[:, None])  # [N, 1]
            keep &= sorted_p >= kth  # ties with the k-th value are kept
        if use_p:
            top_p = torch.tensor([p.top_p for p in params], device=dev, dtype=probs.dtype)
            masked = sorted_p * keep
            # Renormalize over what top-k kept, then keep each token whose preceding mass is
            # below top_p: the token that crosses the threshold stays.
            masked = masked / masked.sum(dim=-1, keepdim=True)
            before = masked.cumsum(dim=-1) - masked
            keep &= before < top_p[:, None]
            keep[:, 0] = True
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_p)
    return probs


def compute_logprobs(
    raw_logits: torch.Tensor, tokens: torch.Tensor, num_top: list[int | None]
) -> list[tuple[float, int, list[int], list[float]] | None]:
    """Chosen-token logprob, its rank and the top-k alternatives for rows that asked."""
    logprobs = torch.log_softmax(raw_logits, dim=-1)  # [N, V]
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)  # [N]
    ranks = (logprobs > chosen[:, None]).sum(dim=-1) + 1
    k_max = max((k for k in num_top if k), default=0)
    top_vals, top_ids = (logprobs.topk(k_max, dim=-1) if k_max else (None, None))
    chosen_l, ranks_l = chosen.tolist(), ranks.tolist()
    out: list[tuple[float, int, list[int], list[float]] | None] = []
    for i, k in enumerate(num_top):
        if k is None:
            out.append(None)
        elif k == 0:
            out.append((chosen_l[i], ranks_l[i], [], []))
        else:
            out.append((chosen_l[i], ranks_l[i], top_ids[i, :k].tolist(), top_vals[i, :k].tolist()))
    return out
