"""Batched sampling: each row gets its own settings in one pass over the batch.

Work is done only for the rows, and only with the tensors, that a knob needs: an all-greedy batch
with no penalties is one argmax; penalties, logit_bias and min_tokens touch only the rows that set
them; top-k / top-p need a partial sort (topk) of the rows that set them. On CPU a top-p row
whose nucleus is wider than a few hundred tokens finds its cutoff by a radix select, never a
full sort; on a GPU top-p rows are sorted, which is cheap there, and `process_logits` + `sample`
queue their work without a single host sync (host data goes up through pinned memory).
Nothing loops in Python over the vocabulary or over rows that use no knob.

A random row draws ONE uniform number per step, from its own generator when seeded, and picks the
token by inverse CDF over the kept tokens in vocabulary order. So a seeded request yields the same
tokens whatever else shares the batch (the kept set depends only on the row's own values, never
on the batch's sort widths or tie order), and a preempted request resumes its stream exactly. The
CDF is accumulated in float64 through per-block sums, so no token's probability is lost to fp32
rounding of a 50k-long running sum.

Structured output: rows with a grammar carry a token bitmask (one int32 word per 32 tokens,
filled on the host by each request's matcher and uploaded without a sync); their disallowed
tokens are set to -inf before anything else, so every knob below works within the grammar.

Order of operations (as in vLLM): grammar mask -> repetition penalty -> presence/frequency penalties ->
logit_bias -> min_tokens ban -> (random rows) temperature -> min_p / top-k / top-p -> draw.
Logprobs are reported from the model's raw distribution (before any of this), as vLLM and the
OpenAI API do.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kvserve.core.sampling_params import SamplingParams
from kvserve.models import fused_ops

# Top-p rows first look for the crossing token among this many most likely tokens; rows whose
# nucleus is wider find it by a radix select over the whole vocabulary instead of a full sort.
_TOP_P_CANDIDATES = 256
# Vocabulary block size of the two-level (block sums, then one block) inverse CDF.
_CDF_BLOCK = 256

# (chosen token logprob, its rank (1 = most likely), top ids, top logprobs)
LogprobEntry = tuple[float, int, list[int], list[float]]


@dataclass
class SamplingBatch:
    """One row per request sampled this step."""

    params: list[SamplingParams]
    generators: list[torch.Generator | None]  # per row; None = the sampler's shared generator
    token_ids: list[list[int]]  # per row: prompt + output so far (read, never copied or changed)
    num_prompt_tokens: list[int]
    eos_token_ids: frozenset[int] = frozenset()
    # Structured output: bitmask[i] (int32 [N, ceil(V / 32)], on the logits' device) holds the
    # allowed tokens of row i, for each i in bitmask_rows (other rows are not read).
    bitmask: torch.Tensor | None = None
    bitmask_rows: list[int] = field(default_factory=list)

    @classmethod
    def from_lists(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        eos_token_ids: frozenset[int] | set[int] = frozenset(),
        generators: list[torch.Generator | None] | None = None,
    ) -> SamplingBatch:
        return cls(
            params, generators or [None] * len(params),
            [list(p) + list(o) for p, o in zip(prompt_token_ids, output_token_ids)],
            [len(p) for p in prompt_token_ids], frozenset(eos_token_ids),
        )

    @property
    def all_greedy(self) -> bool:
        return all(p.greedy for p in self.params)

    def num_output_tokens(self, i: int) -> int:
        return len(self.token_ids[i]) - self.num_prompt_tokens[i]

    def output_ids(self, i: int) -> list[int]:
        return self.token_ids[i][self.num_prompt_tokens[i] :]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Present only when some row asked for logprobs (rows that did not hold None).
    logprobs: list[LogprobEntry | None] = field(default_factory=list)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The argmax of each row of [N, V] logits -> [N] int64 (the first of equal maxima). One row
    is reduced flat: on CPU PyTorch's row-wise argmax over a single long row takes about twice
    as long (80 vs 45 us for a 49k vocabulary), once per step of batch-1 decode."""
    if logits.is_cuda and logits.dim() == 2 and logits.stride(-1) == 1 and fused_ops.enabled_for(logits):
        from kvserve.models import triton_ops

        return triton_ops.argmax_rows(logits)  # the same ids, in a few us rather than ~27 (128k vocab)
    if logits.shape[0] == 1:
        return logits.reshape(-1).argmax().view(1)
    return logits.argmax(dim=-1)


class Sampler:
    def __init__(self, default_generator: torch.Generator | None = None) -> None:
        self.default_generator = default_generator

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        # logits: [N, V] fp32
        raw = logits
        logits = self.process_logits(logits, batch)
        tokens = greedy_tokens(logits) if batch.all_greedy else self.sample(logits, batch)  # [N]
        out = SamplerOutput(tokens.tolist())
        lp_rows = [i for i, p in enumerate(batch.params) if p.logprobs is not None]
        if lp_rows:
            idx = _index(lp_rows, raw.device)
            entries = compute_logprobs(
                _rows(raw, lp_rows, idx), tokens[idx], [batch.params[i].logprobs for i in lp_rows]
            )
            out.logprobs = [None] * len(tokens)
            for i, entry in zip(lp_rows, entries):
                out.logprobs[i] = entry
        return out

    # -- logits processing ------------------------------------------------------------------
    def process_logits(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """The grammar mask, penalties, logit_bias and the min_tokens ban, each only on the rows
        that use it. Returns `logits` itself when no row does, else a processed copy (the input
        is kept). A row with `SamplingParams.modifies_logits` False is never changed here."""
        params = batch.params
        n_out = [batch.num_output_tokens(i) for i in range(len(params))]
        rep = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        pres_freq = [i for i, p in enumerate(params) if (p.presence_penalty or p.frequency_penalty) and n_out[i]]
        bias = [i for i, p in enumerate(params) if p.logit_bias]
        masked = set(batch.bitmask_rows) if batch.bitmask is not None else set()
        # A grammar decides itself when EOS may come: min_tokens does not ban it there (a
        # finished grammar allows nothing else).
        ban = [i for i, p in enumerate(params) if n_out[i] < p.min_tokens and i not in masked]
        if not (rep or pres_freq or bias or ban or masked):
            return logits
        logits = logits.clone()
        vocab, dev, dt = logits.shape[1], logits.device, logits.dtype
        if masked:
            from kvserve.structured.grammar import apply_bitmask

            apply_bitmask(logits, batch.bitmask, batch.bitmask_rows)
        # Penalties touch only the (row, token) cells of tokens that occurred: O(tokens), not O(V).
        if rep:
            # Tokens seen in the prompt or the output: positive logits divided, negative multiplied.
            local, toks = _flatten([batch.token_ids[i] for i in rep], vocab, dev)
            pen = _tensor([params[i].repetition_penalty for i in rep], dt, dev)[local]
            rows = _index(rep, dev)[local]
            vals = logits[rows, toks]
            # Repeated cells all write the same value, so duplicates are harmless.
            logits[rows, toks] = torch.where(vals > 0, vals / pen, vals * pen)
        if pres_freq:
            rows, toks = _flatten([batch.output_ids(i) for i in pres_freq], vocab, torch.device("cpu"))
            # Counted on the host: unique() on a GPU would wait for the device.
            cells, counts = torch.unique(rows * vocab + toks, return_counts=True)
            rows, toks, counts = _to(cells // vocab, dev), _to(cells % vocab, dev), _to(counts, dev)
            freq = _tensor([params[i].frequency_penalty for i in pres_freq], dt, dev)[rows]
            pres = _tensor([params[i].presence_penalty for i in pres_freq], dt, dev)[rows]
            rows = _index(pres_freq, dev)[rows]
            logits[rows, toks] -= freq * counts.to(dt) + pres
        if bias:
            cells = [(i, t, b) for i in bias for t, b in params[i].logit_bias.items() if t < vocab]
            if cells:
                r, t, b = zip(*cells)
                logits.index_put_(
                    (_index(r, dev), _index(t, dev)), _tensor(b, dt, dev), accumulate=True
                )
        if ban:
            cells = []
            for i in ban:
                p = params[i]
                stops = p.all_stop_token_ids if p.ignore_eos else p.all_stop_token_ids | batch.eos_token_ids
                cells.extend((i, t) for t in stops if t < vocab)
            if cells:
                r, t = zip(*cells)
                logits.index_put_((_index(r, dev), _index(t, dev)), _tensor(float("-inf"), dt, dev))
        return logits

    # -- drawing ----------------------------------------------------------------------------
    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Tokens for processed logits [N, V]: greedy rows take the argmax, the others a draw."""
        params = batch.params
        n = logits.shape[0]
        dev = logits.device
        tokens = torch.empty(n, dtype=torch.long, device=dev)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        if greedy:
            g_idx = _index(greedy, dev)
            tokens[g_idx] = greedy_tokens(_rows(logits, greedy, g_idx))
        rand = [i for i, p in enumerate(params) if not p.greedy]
        if not rand:
            return tokens
        r_idx = _index(rand, dev)
        w = random_weights(_rows(logits, rand, r_idx), [params[i] for i in rand])  # [R, V]
        tokens[r_idx] = inverse_cdf(w, self._uniforms(batch, rand, dev))
        return tokens

    def _uniforms(self, batch: SamplingBatch, rows: list[int], dev: torch.device) -> torch.Tensor:
        """One U[0, 1) float64 per row: seeded rows from their own generator, the rest from the
        shared one (in a single call)."""
        gens = [batch.generators[i] for i in rows]
        shared = [j for j, g in enumerate(gens) if g is None]
        u = torch.empty(len(rows), dtype=torch.float64, device=dev)
        if shared:
            draws = torch.rand(len(shared), generator=self.default_generator, dtype=torch.float64, device=dev)
            if len(shared) == len(rows):
                return draws
            u[_index(shared, dev)] = draws
        for j, g in enumerate(gens):
            if g is not None:
                u[j : j + 1] = torch.rand(1, generator=g, dtype=torch.float64, device=dev)
        return u


def random_weights(sub: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distribution a random row draws from, unnormalized: [R, V] processed logits ->
    weights with each row's top token at exactly 1, temperature applied and the tokens that
    min_p / top-k / top-p drop zeroed. (Speculative decoding verifies drafts against it.)"""
    dev = sub.device
    rand = range(len(params))
    # Unnormalized probabilities with the row's top token at exactly 1 (so min_p is a plain
    # threshold on w and nothing needs normalizing): w = exp((l - max l) / T), built in place.
    w = sub - sub.amax(dim=-1, keepdim=True)  # [R, V]
    temps = [params[i].temperature for i in rand]
    if any(t != 1.0 for t in temps):
        w.div_(_tensor(temps, w.dtype, dev)[:, None])
    w.exp_()
    trunc = [j for j, i in enumerate(rand) if _truncates(params[i])]
    if trunc:
        t_idx = _index(trunc, dev)
        wt = _rows(w, trunc, t_idx)  # [T, V] (w itself when every row truncates)
        cut = truncation_cutoffs(wt, [params[j] for j in trunc])  # [T]
        wt.masked_fill_(wt < cut[:, None], 0.0)
        if wt is not w:
            w.index_copy_(0, t_idx, wt)
    return w


def _truncates(p: SamplingParams) -> bool:
    return p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0


def truncation_cutoffs(w: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Per row, the smallest weight that min_p / top-k / top-p keep: the kept set is
    `w >= cutoff`. w: [T, V] fp32 unnormalized probabilities whose row max is 1.

    min_p keeps p >= min_p * p_max, i.e. w >= min_p. top-k keeps the k largest; top-p keeps the
    smallest most-likely prefix (within what min_p and top-k allow) whose mass reaches top_p,
    including the token that crosses it. Tokens tied with the last kept one are kept too, so
    the set depends only on the row's own values (never on the batch)."""
    t, vocab = w.shape
    dev = w.device
    cut = _tensor([p.min_p for p in params], w.dtype, dev)  # [T]
    k_of = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    sort_rows = [j for j, p in enumerate(params) if k_of[j] < vocab or p.top_p < 1.0]
    if not sort_rows:
        return cut
    s_idx = _index(sort_rows, dev)
    ws = _rows(w, sort_rows, s_idx)  # [S, V]
    p_list = [params[j].top_p for j in sort_rows]
    mp_list = [params[j].min_p if params[j].top_p < 1.0 else 0.0 for j in sort_rows]
    top_p = _tensor(p_list, torch.float64, dev)  # [S]
    min_p = _tensor(mp_list, w.dtype, dev)  # [S], only where top-p needs it
    # The allowed prefix before top-p: top_k, narrowed by min_p where top-p works within it.
    limit = _tensor([k_of[j] for j in sort_rows], torch.long, dev)  # [S]
    if any(mp_list):
        limit = torch.minimum(limit, (ws >= min_p[:, None]).sum(dim=-1))
    # Top-p-only rows: on CPU, look for the crossing token among the most likely
    # _TOP_P_CANDIDATES and radix-select the rest; on a GPU a full sort is cheap and, unlike
    # that fallback, needs no host sync.
    only_p = [p < 1.0 and k_of[j] == vocab for p, j in zip(p_list, sort_rows)]
    p_width = vocab if dev.type != "cpu" else min(vocab, _TOP_P_CANDIDATES)
    k = max(p_width if op else k_of[j] for op, j in zip(only_p, sort_rows))
    vals = ws.topk(k, dim=-1).values  # [S, K] descending
    lim = limit.clamp(max=k)
    keep = lim  # kept prefix length
    missed: list[int] = []
    if any(p < 1.0 for p in p_list):
        vals_in = vals.masked_fill(torch.arange(k, device=dev)[None, :] >= lim[:, None], 0.0)
        cum = vals_in.cumsum(dim=-1, dtype=torch.float64)  # [S, K]
        mass = cum.gather(1, (lim - 1)[:, None]).squeeze(1)  # the allowed set's mass
        wide = [m for m, op in enumerate(only_p) if op] if k < vocab else []
        if wide:  # their allowed set may reach past the candidates
            w_idx = _index(wide, dev)
            mass[w_idx] = _allowed(ws[w_idx], min_p[w_idx], [mp_list[m] for m in wide]).sum(dim=-1).double()
        thr = top_p * mass
        before = F.pad(cum[:, :-1], (1, 0))  # mass strictly before each position
        # Position j is kept while the mass before it is below top_p: the crossing token stays.
        n_keep = (before < thr[:, None]).sum(dim=-1).clamp(min=1)
        keep = torch.where(top_p < 1.0, torch.minimum(n_keep, lim), lim)
        if wide:  # rows whose crossing token lies beyond the candidates (a host sync, on CPU)
            missed = [m for m, miss in zip(wide, (cum[w_idx, -1] < thr[w_idx]).tolist()) if miss]
    found = vals.gather(1, (keep - 1)[:, None]).squeeze(1)  # [S]
    if missed:
        m_idx = _index(missed, dev)
        allowed = _allowed(ws[m_idx], min_p[m_idx], [mp_list[m] for m in missed])
        found[m_idx] = nucleus_cutoff(allowed, top_p[m_idx])
    cut[s_idx] = torch.maximum(cut[s_idx], found)
    return cut


def nucleus_cutoff(w: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The largest weight c such that the weights >= c hold at least top_p of their row's mass
    (the weight of the token that crosses top_p), without sorting: a radix select on the fp32
    bit patterns, which order like the values for w >= 0. A mass histogram over the top 11
    bits finds the bucket holding c; the few keys in that bucket settle the other 20 bits.
    w: [M, V] fp32 >= 0; top_p: [M] float64. Returns [M] fp32."""
    m = w.shape[0]
    dev = w.device
    w = w.contiguous()
    keys = w.view(torch.int32)  # [M, V]
    top = (keys >> 20).long()  # [M, V] sign + exponent + 3 mantissa bits
    hist = torch.zeros(m, 1 << 11, dtype=w.dtype, device=dev).scatter_add_(1, top, w).double()
    thr = top_p * hist.sum(dim=-1)  # [M]
    above = torch.zeros(m, dtype=torch.float64, device=dev)  # mass of keys above the prefix
    prefix, above = _radix_digit(hist, above, thr)
    # Only keys in the chosen bucket matter from here on: gather them (sparse, small).
    rows, cols = (top == prefix[:, None]).nonzero(as_tuple=True)
    sub_keys, sub_w = keys[rows, cols], w[rows, cols]  # [n]
    for shift in (10, 0):
        digit = (sub_keys >> shift) & 1023
        live = (sub_keys >> (shift + 10)) == prefix[rows]  # [n]: still matches the prefix
        flat = rows[live] * 1024 + digit[live].long()
        hist = torch.zeros(m * 1024, dtype=w.dtype, device=dev).index_add_(0, flat, sub_w[live])
        d, above = _radix_digit(hist.view(m, 1024).double(), above, thr)
        prefix = (prefix << 10) | d
    return prefix.to(torch.int32).view(w.dtype)


def _radix_digit(hist: torch.Tensor, above: torch.Tensor, thr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hist: [M, D] mass per digit among keys matching the prefix so far; above: [M] mass of keys
    beyond the prefix. Returns the largest digit that still leaves >= thr of the mass at or
    above it, and the mass strictly above that digit."""
    tail = hist.flip(-1).cumsum(dim=-1).flip(-1)  # [M, D]: mass at digits >= d
    d = ((above[:, None] + tail) >= thr[:, None]).sum(dim=-1).sub_(1).clamp_(min=0)  # [M]
    above = above + F.pad(tail, (0, 1)).gather(1, (d + 1)[:, None]).squeeze(1)
    return d, above


def _allowed(w: torch.Tensor, min_p: torch.Tensor, min_p_list: list[float]) -> torch.Tensor:
    """w with the tokens that min_p drops zeroed."""
    return w.masked_fill(w < min_p[:, None], 0.0) if any(min_p_list) else w


def inverse_cdf(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row, drawn with probability w / w.sum(): the first index whose cumulative
    weight exceeds u * total, in vocabulary order. w: [R, V] >= 0 with a positive entry per
    row; u: [R] float64 in [0, 1). Two levels: the running sum is over block sums and then
    within one block, in float64, so no token's share is lost to the rounding of a 50k-long
    fp32 running sum. A zero-weight token is never picked."""
    r, vocab = w.shape
    nb = -(-vocab // _CDF_BLOCK)
    if nb * _CDF_BLOCK != vocab:
        w = F.pad(w, (0, nb * _CDF_BLOCK - vocab))
    blocks = w.view(r, nb, _CDF_BLOCK)  # [R, NB, B]
    bcum = blocks.sum(dim=-1).double().cumsum(dim=-1)  # [R, NB]
    total = bcum[:, -1:]
    # x in [0, total): the upper clamp guards u * total rounding up to total.
    x = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))  # [R, 1]
    b = torch.searchsorted(bcum, x, right=True).clamp_(max=nb - 1)  # [R, 1]
    base = torch.where(b > 0, bcum.gather(1, (b - 1).clamp(min=0)), torch.zeros_like(x))
    inner = blocks.gather(1, b[:, :, None].expand(r, 1, _CDF_BLOCK)).squeeze(1)  # [R, B]
    icum = inner.cumsum(dim=-1, dtype=torch.float64)  # [R, B]
    rem = torch.minimum(x - base, torch.nextafter(icum[:, -1:], torch.zeros_like(x)))
    j = torch.searchsorted(icum, rem, right=True).clamp_(max=_CDF_BLOCK - 1)
    return (b * _CDF_BLOCK + j).squeeze(1)


def compute_logprobs(
    raw_logits: torch.Tensor, tokens: torch.Tensor, num_top: list[int | None]
) -> list[LogprobEntry | None]:
    """Chosen-token logprob, its rank and the top-k alternatives for rows that asked."""
    logprobs = torch.log_softmax(raw_logits, dim=-1)  # [N, V]
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)  # [N]
    ranks = (logprobs > chosen[:, None]).sum(dim=-1) + 1
    k_max = max((k for k in num_top if k), default=0)
    top_vals, top_ids = logprobs.topk(k_max, dim=-1) if k_max else (None, None)
    chosen_l, ranks_l = chosen.tolist(), ranks.tolist()
    top_ids_l = top_ids.tolist() if k_max else None
    top_vals_l = top_vals.tolist() if k_max else None
    out: list[LogprobEntry | None] = []
    for i, k in enumerate(num_top):
        if k is None:
            out.append(None)
        elif k == 0:
            out.append((chosen_l[i], ranks_l[i], [], []))
        else:
            out.append((chosen_l[i], ranks_l[i], top_ids_l[i][:k], top_vals_l[i][:k]))
    return out


# -- helpers ------------------------------------------------------------------------------------
def _index(rows: list[int] | tuple[int, ...], dev: torch.device) -> torch.Tensor:
    return _tensor(rows, torch.long, dev)


def _tensor(data: object, dtype: torch.dtype, dev: torch.device) -> torch.Tensor:
    return _to(torch.tensor(data, dtype=dtype), dev)


def _to(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """A host tensor on `dev`; to a GPU through pinned memory, so the host never waits for the
    device (the sampler queues its work without a sync until the tokens are read)."""
    if dev.type == "cpu":
        return t
    return t.pin_memory().to(dev, non_blocking=True)


def _rows(x: torch.Tensor, rows: list[int], idx: torch.Tensor) -> torch.Tensor:
    """x[rows], without a copy when rows are all of x in order."""
    if len(rows) == x.shape[0] and rows == list(range(len(rows))):
        return x
    return x.index_select(0, idx)


def _flatten(lists: list[list[int]], vocab: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices and token ids of every (row, token) pair, built without a per-token loop."""
    lengths = torch.tensor([len(x) for x in lists], dtype=torch.long)
    toks = torch.tensor(list(itertools.chain.from_iterable(lists)), dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(lists)), lengths)
    if toks.numel() and int(toks.max()) >= vocab:  # padded/extra vocab ids cannot be penalized
        keep = toks < vocab
        rows, toks = rows[keep], toks[keep]
    return _to(rows, dev), _to(toks, dev)
