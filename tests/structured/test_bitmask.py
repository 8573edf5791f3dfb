"""The token bitmask: applied to every row or a subset, in fp32 and other dtypes, it sets
exactly the disallowed tokens of the listed rows to -inf and leaves unlisted rows alone; it
agrees with xgrammar's own kernel."""

from __future__ import annotations

import pytest
import torch

from kvserve.structured.grammar import allocate_bitmask, apply_bitmask


def test_both_paths_agree_on_all_rows_and_subsets():
    g = torch.Generator().manual_seed(0)
    vocab = 1000  # not a multiple of 32: the last word is partly padding
    logits = torch.randn(5, vocab, generator=g)
    mask = allocate_bitmask(5, vocab)
    mask.copy_(torch.randint(-(2**31), 2**31 - 1, mask.shape, generator=g, dtype=torch.int64).to(torch.int32))
    bits = ((mask[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).bool().view(5, -1)[:, :vocab]
    for rows in ([0, 1, 2, 3, 4], [1, 3]):
        cpu = logits.clone()
        apply_bitmask(cpu, mask, rows)
        other = logits.clone().double()
        apply_bitmask(other, mask, rows)
        want = logits.clone()
        for r in rows:
            want[r].masked_fill_(~bits[r], float("-inf"))
        assert torch.equal(cpu, want)
        assert torch.equal(other.float(), want)


def test_matches_xgrammar_kernel():
    import xgrammar as xgr

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4099, generator=g)
    mask = allocate_bitmask(3, 4099)
    mask.copy_(torch.randint(-(2**31), 2**31 - 1, mask.shape, generator=g, dtype=torch.int64).to(torch.int32))
    ours, theirs = logits.clone(), logits.clone()
    apply_bitmask(ours, mask, [0, 2])
    xgr.apply_token_bitmask_inplace(theirs, mask, vocab_size=4099, indices=[0, 2])
    assert torch.equal(ours, theirs)


def test_batched_fill_equals_row_by_row(tiny_llama):
    """BitmaskFiller's threaded batch fill writes the same rows as one matcher at a time, at
    different positions of different grammars, and leaves unlisted rows alone."""
    from kvserve.core.sampling_params import StructuredOutputsParams as SO
    from kvserve.loader.tokenizer import Tokenizer
    from kvserve.structured.grammar import BitmaskFiller, GrammarCompiler, RequestGrammar

    tok = Tokenizer.from_folder(tiny_llama[0])
    vocab = tok.vocab_size + 3
    comp = GrammarCompiler(tok, vocab, [tok.eos_token_id])
    specs = [SO(json={"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}),
             SO(regex=r"[a-c]+x\d{2}"), SO(json_object=True), SO(choice=["yes", "no"])]
    prefixes = ['{"a": "hel', "abca", '{"k', ""]
    grammars = []
    for spec, prefix in zip(specs, prefixes):
        g = RequestGrammar(comp.compile(spec))
        for t in tok.encode(prefix, add_special_tokens=False):
            assert not g.accept(t)
        grammars.append(g)
    rows = [0, 2, 3, 5]
    want = allocate_bitmask(6, vocab)
    for g, r in zip(grammars, rows):
        g.fill_bitmask(want, r)
    got = allocate_bitmask(6, vocab)
    BitmaskFiller(max_threads=2).fill(grammars, got, rows)
    assert torch.equal(got, want)
    assert (got[[1, 4]] == -1).all()


def test_deferred_tokens_and_a_broken_grammar(tiny_llama):
    """defer() + the next fill equals accept() + fill; a stop token reports completion without
    the matcher; a grammar that rejected a token allows only stop tokens (the request ends)."""
    from kvserve.core.sampling_params import StructuredOutputsParams as SO
    from kvserve.loader.tokenizer import Tokenizer
    from kvserve.structured.grammar import GrammarCompiler, RequestGrammar

    tok = Tokenizer.from_folder(tiny_llama[0])
    vocab, eos = tok.vocab_size + 3, tok.eos_token_id
    comp = GrammarCompiler(tok, vocab, [eos])
    compiled = comp.compile(SO(regex=r"ab+c"))
    ids = tok.encode("abbb", add_special_tokens=False)
    now, later = RequestGrammar(compiled, [eos]), RequestGrammar(compiled, [eos])
    for t in ids:
        assert not now.accept(t)
        assert not later.defer(t)
    a, b = allocate_bitmask(1, vocab), allocate_bitmask(1, vocab)
    now.fill_bitmask(a, 0)
    later.fill_bitmask(b, 0)
    assert torch.equal(a, b) and not later.pending
    assert later.defer(eos)  # a stop token completes the grammar
    broken = RequestGrammar(compiled, [eos])
    assert broken.accept(tok.encode("z", add_special_tokens=False)[0]) and broken.failed
    m = allocate_bitmask(1, vocab)
    broken.fill_bitmask(m, 0)
    bits = ((m[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[:vocab]
    assert bits.nonzero().flatten().tolist() == [eos]


def test_mask_narrower_than_the_logits_bans_the_extra_columns():
    """A padded LM head (more rows than the tokenizer has ids): the mask covers the grammar's
    vocabulary only, and the listed rows' extra columns become -inf; other rows are untouched."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 1100, generator=g)
    mask = allocate_bitmask(3, 1000)  # 32 words: columns 1024.. are past the mask
    mask.copy_(torch.randint(-(2**31), 2**31 - 1, mask.shape, generator=g, dtype=torch.int64).to(torch.int32))
    bits = ((mask[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).bool().view(3, -1)
    for rows in ([0, 1, 2], [2]):
        got = logits.clone()
        apply_bitmask(got, mask, rows)
        want = logits.clone()
        for r in rows:
            want[r, :1024].masked_fill_(~bits[r], float("-inf"))
            want[r, 1024:] = float("-inf")
        assert torch.equal(got, want)


def test_grammar_vocabulary_is_the_tokenizers(tiny_llama):
    """The compiler hands xgrammar the tokenizer's ids, not the padded LM head's rows."""
    from kvserve import LLM

    llm = LLM(str(tiny_llama[0]), dtype="float32", device="cpu", num_kv_blocks=64)
    from kvserve.structured.manager import StructuredOutputManager

    eng = llm.engine
    m = StructuredOutputManager(eng.tokenizer, eng.model_config.vocab_size, eng.eos_token_ids)
    try:
        assert m.compiler.model_vocab_size == eng.model_config.vocab_size
        assert m.compiler.vocab_size < eng.model_config.vocab_size  # the tiny model is padded
        ids = max(eng.tokenizer.backend.get_vocab().values()) + 1
        assert ids % 32 and m.compiler.vocab_size == ids  # exactly, mid-word
    finally:
        m.shutdown()


def test_mask_narrower_than_half_precision_logits():
    """The padded-head tail is set in place in 16-bit logits too (every row and a subset)."""
    logits = torch.zeros(2, 70, dtype=torch.bfloat16)
    mask = allocate_bitmask(2, 64)
    mask[:, 1] = 0  # tokens 32..63 banned
    for rows in ([0, 1], [1]):
        got = logits.clone()
        apply_bitmask(got, mask, rows)
        for r in range(2):
            banned = torch.isinf(got[r])
            if r in rows:
                assert banned[32:].all() and not banned[:32].any()
            else:
                assert not banned.any()


def _bits(mask: torch.Tensor) -> torch.Tensor:
    return ((mask[..., None] >> torch.arange(32, dtype=torch.int32)) & 1).bool().flatten(-2)


def test_no_bits_past_the_vocabulary_in_any_fill(tiny_llama):
    """xgrammar sets bits past a vocabulary that ends mid-word (the tokenizer's 442 ids) inside
    strings; every fill path (one row, the threaded batch, speculative drafts) clears them,
    so the padded head's columns there can never be sampled."""
    from kvserve.core.sampling_params import StructuredOutputsParams as SO
    from kvserve.loader.tokenizer import Tokenizer
    from kvserve.structured.grammar import BitmaskFiller, GrammarCompiler, RequestGrammar

    tok = Tokenizer.from_folder(tiny_llama[0])
    comp = GrammarCompiler(tok, 512, [tok.eos_token_id])
    vocab = comp.vocab_size
    assert vocab % 32
    compiled = comp.compile(SO(json={"type": "string"}))
    ids = tok.encode('"hello wor', add_special_tokens=False)
    raw = RequestGrammar(compiled)  # no guard: xgrammar's own fill
    gs = [RequestGrammar(compiled, [tok.eos_token_id], comp.guard) for _ in range(2)]
    for t in ids:
        for g in [raw, *gs]:
            g.accept(t)
    mask = allocate_bitmask(4, vocab)
    raw.fill_bitmask(mask, 0)
    gs[0].fill_bitmask(mask, 1)
    BitmaskFiller(max_threads=2).fill(gs, mask, [2, 3])
    bits = _bits(mask)
    assert bits[0, vocab:].any()  # what xgrammar leaves there (0.2.9)
    assert not bits[1:, vocab:].any()
    assert torch.equal(bits[1, :vocab], bits[0, :vocab])
    drafts = tok.encode("ld", add_special_tokens=False)
    dmask = allocate_bitmask(len(drafts) + 1, vocab)
    gs[0].fill_bitmask_for_drafts(dmask, 0, drafts)
    assert not _bits(dmask)[:, vocab:].any()


_ANY = {"type": "string"}
_PATTERN = {"type": "string", "pattern": "^.*$"}


@pytest.mark.parametrize("schema, lead, good, bad", [
    (_ANY, 0xED, 0x9F, 0xB2),  # ED A0..BF: a surrogate
    (_PATTERN, 0xED, 0x80, 0xA0),
    (_PATTERN, 0xE0, 0xA0, 0x9F),  # E0 80..9F: overlong
    (_PATTERN, 0xF0, 0x90, 0x8F),  # F0 80..8F: overlong
])
def test_ill_formed_utf8_is_banned(tiny_llama, schema, lead, good, bad):
    """xgrammar (0.2.9) lets some ill-formed UTF-8 into strings: after `lead` it allows the
    second byte `bad`. The guarded fills (one row, batch, drafts) allow `good` only; the state
    returns to 0 once the character is complete."""
    from kvserve.core.sampling_params import StructuredOutputsParams as SO
    from kvserve.loader.tokenizer import Tokenizer
    from kvserve.structured.grammar import BitmaskFiller, GrammarCompiler, RequestGrammar

    tok = Tokenizer.from_folder(tiny_llama[0])
    comp = GrammarCompiler(tok, 512, [tok.eos_token_id])
    vocab = comp.vocab_size
    dv = [bytes(b) for b in comp.info.decoded_vocab]
    lead_t, good_t, bad_t = dv.index(bytes([lead])), dv.index(bytes([good])), dv.index(bytes([bad]))
    compiled = comp.compile(SO(json=schema))
    quote = tok.encode('"', add_special_tokens=False)
    raw = RequestGrammar(compiled)
    gs = [RequestGrammar(compiled, [tok.eos_token_id], comp.guard) for _ in range(4)]
    for g in [raw, *gs]:
        for t in quote:
            g.accept(t)
    mask = allocate_bitmask(5, vocab)
    raw.accept(lead_t)
    raw.fill_bitmask(mask, 0)
    assert _bits(mask)[0, bad_t]  # xgrammar's own fill
    for g in gs[:3]:
        g.accept(lead_t)
    gs[0].fill_bitmask(mask, 1)
    BitmaskFiller(max_threads=2).fill(gs[1:3], mask, [2, 3])
    dmask = allocate_bitmask(2, vocab)
    gs[3].fill_bitmask_for_drafts(dmask, 0, [lead_t])
    bits = torch.cat([_bits(mask)[1:4], _bits(dmask)[1:]])
    assert bits[:, good_t].all() and not bits[:, bad_t].any()
    g = gs[0]
    g.accept(good_t)
    while g.utf8:  # complete the character with continuation bytes
        g.accept(dv.index(b"\x80"))
    g.fill_bitmask(mask, 4)
    assert _bits(mask)[4, dv.index(b"a")]


def test_a_grammar_of_surrogates_keeps_its_own_mask(tiny_llama):
    """A grammar that allows only ill-formed UTF-8 after a lead byte (a class of surrogates)
    keeps xgrammar's mask there instead of an empty one (which would leave nothing to sample)."""
    from kvserve.core.sampling_params import StructuredOutputsParams as SO
    from kvserve.loader.tokenizer import Tokenizer
    from kvserve.structured.grammar import GrammarCompiler, RequestGrammar

    tok = Tokenizer.from_folder(tiny_llama[0])
    comp = GrammarCompiler(tok, 512, [tok.eos_token_id])
    dv = [bytes(b) for b in comp.info.decoded_vocab]
    g = RequestGrammar(comp.compile(SO(regex="[\\ud800-\\udfff]")), [tok.eos_token_id], comp.guard)
    g.accept(dv.index(b"\xed"))
    assert g.utf8
    mask = allocate_bitmask(1, comp.vocab_size)
    g.fill_bitmask(mask, 0)
    assert _bits(mask)[0, dv.index(b"\xb2")]
