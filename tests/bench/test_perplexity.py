"""`kvserve.bench.perplexity` and `kvserve bench perplexity`: kvserve's sliding-window perplexity
equals one computed from HF transformers' fp32 logits with the same windows (per token and in
total), window/stride edge cases, bad settings, the bundled text, and the CLI."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from kvserve import LLM
from kvserve.bench.perplexity import Window, default_text, perplexity, plan_windows
from tests.conftest import TINY_VOCAB, requires_smollm2

RTOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    folder, hf_model = tiny_llama
    return folder, hf_model, LLM(str(folder), dtype="float32", device="cpu", num_kv_blocks=256)


def _ids(n: int, seed: int = 3) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, TINY_VOCAB) for _ in range(n)]


@torch.no_grad()
def hf_sliding_window(model, ids: list[int], context: int, stride: int) -> list[float]:
    """The HF guide's loop, written independently of plan_windows: each window scores the
    tokens after the previous window's end (never its own first token)."""
    out: list[float] = []
    prev_end = 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        lp = torch.log_softmax(model(torch.tensor([ids[begin:end]])).logits[0].float(), dim=-1)  # [L, V]
        # Row i predicts token begin + i + 1.
        token_lp = lp[:-1].gather(1, torch.tensor(ids[begin + 1 : end])[:, None])[:, 0]
        new = min(end - prev_end, end - begin - 1)
        out += token_lp[len(token_lp) - new :].tolist()
        prev_end = end
        if end == len(ids):
            break
    return out


@pytest.mark.parametrize("n,context,stride", [
    (150, 32, 16),   # the default shape: stride = context / 2
    (150, 32, 5),    # stride < context, many overlapping windows
    (150, 32, 32),   # stride = context: disjoint windows
    (100, 32, 31),   # a short last window
    (20, 32, 16),    # the text is shorter than one window
    (2, 8, 4),       # the shortest text: one token scored
])
def test_matches_hf_fp32(tiny, n, context, stride) -> None:
    _, hf_model, llm = tiny
    ids = _ids(n)
    ref = hf_sliding_window(hf_model, ids, context, stride)
    r = perplexity(llm, ids, context=context, stride=stride)
    assert r.num_scored == len(ref) == len(r.token_logprobs)
    assert r.num_windows == len(plan_windows(n, context, stride))
    torch.testing.assert_close(torch.tensor(r.token_logprobs), torch.tensor(ref), rtol=0, atol=2e-4)
    want = math.exp(-sum(ref) / len(ref))
    assert r.perplexity == pytest.approx(want, rel=RTOL)
    assert r.mean_nll == pytest.approx(math.log(want), rel=RTOL)


def test_default_stride_and_token_cap(tiny) -> None:
    _, hf_model, llm = tiny
    ids = _ids(150, seed=4)
    full = hf_sliding_window(hf_model, ids, 32, 16)
    r = perplexity(llm, ids, context=32, max_tokens_scored=50)
    assert r.stride == 16 and r.num_scored == 50
    torch.testing.assert_close(torch.tensor(r.token_logprobs), torch.tensor(full[:50]), rtol=0, atol=2e-4)


def test_window_plan() -> None:
    # Every token but the first is scored exactly once, in order; with stride = context the
    # windows are disjoint and each window's first token goes unscored.
    for n, c, s in [(10, 4, 2), (10, 4, 4), (10, 4, 1), (3, 8, 4), (9, 3, 3), (257, 64, 17)]:
        ws = plan_windows(n, c, s)
        scored = [p for w in ws for p in range(w.first_scored, w.end)]
        want = [p for p in range(1, n) if s < c or p % c]
        assert scored == want, (n, c, s)
        assert all(w.end - w.begin <= c and w.begin < w.first_scored for w in ws)
    # stride < context: each scored token sees at least the overlap (or everything before it).
    for w in plan_windows(100, 16, 4)[1:]:
        assert w.first_scored - w.begin >= 16 - 4
    assert plan_windows(10, 4, 4) == [Window(0, 4, 1), Window(4, 8, 5), Window(8, 10, 9)]
    assert plan_windows(3, 8) == [Window(0, 3, 1)]
    assert plan_windows(10, 4, 2, max_tokens_scored=5) == [Window(0, 4, 1), Window(2, 6, 4)]


@pytest.mark.parametrize("kwargs,field", [
    ({"context": 1}, "context"),
    ({"context": 0}, "context"),
    ({"context": 2.5}, "context"),
    ({"context": 8, "stride": 0}, "stride"),
    ({"context": 8, "stride": -3}, "stride"),
    ({"context": 8, "stride": 9}, "stride"),
    ({"context": 8, "max_tokens_scored": 0}, "max_tokens_scored"),
])
def test_bad_settings_name_the_field(kwargs, field) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must"):
        plan_windows(50, **kwargs)


def test_bad_settings_through_perplexity(tiny) -> None:
    _, _, llm = tiny
    with pytest.raises(ValueError, match="^stride must"):
        perplexity(llm, _ids(50), context=8, stride=9)
    with pytest.raises(ValueError, match="^context must"):
        perplexity(llm, _ids(50), context=1)
    with pytest.raises(ValueError, match="^context must be < max_model_len"):
        perplexity(llm, _ids(50), context=llm.engine.max_model_len)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(llm, _ids(1), context=8)


def test_bundled_text() -> None:
    text = default_text()
    assert 20_000 < len(text) < 40_000
    assert text.startswith("We the People of the United States")


def test_cli_json_and_table(tiny, tmp_path, capsys) -> None:
    from kvserve.entrypoints.cli import main

    folder, _, _ = tiny
    base = ["bench", "perplexity", "--model", str(folder), "--dtype", "float32", "--device", "cpu",
            "--context", "64", "--no-progress"]
    assert main(base + ["--max-tokens-scored", "100", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (row,) = data["rows"]
    assert row["engine"] == "kvserve" and row["tokens_scored"] == 100 and row["stride"] == 32
    assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1
    assert row["text"] == "bundled:us_constitution.txt"

    # --text, --stride, --json-out, and the llama.cpp peer on an HF folder: an error row, not a crash.
    (tmp_path / "t.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    out_file = tmp_path / "ppl.jsonl"
    assert main(base + ["--text", str(tmp_path / "t.txt"), "--stride", "64", "--peer", "llama.cpp",
                        "--json-out", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert "tokens_scored" in out and "perplexity" in out
    assert "llama.cpp" in out and "error:" in out
    lines = [json.loads(x) for x in out_file.read_text().splitlines()]
    assert [x["engine"] for x in lines] == ["kvserve", "llama.cpp"]
    assert lines[0]["command"] == "perplexity" and "error" in lines[1]


def test_cli_bad_stride_is_one_line_error(tiny, capsys) -> None:
    from kvserve.entrypoints.cli import main

    folder, _, _ = tiny
    rc = main(["bench", "perplexity", "--model", str(folder), "--dtype", "float32", "--context", "16",
               "--stride", "17"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("kvserve: error: stride must") and len(err.splitlines()) == 1


@pytest.mark.slow
@requires_smollm2
def test_builtin_model_perplexity_is_sane() -> None:
    llm = LLM("smollm2", dtype="float32", device="cpu")
    ids = llm.get_tokenizer().encode(default_text(), add_special_tokens=False)
    r = perplexity(llm, ids, context=128, max_tokens_scored=256)
    assert r.num_scored == 256
    assert 1.5 < r.perplexity < 60  # a 135M model on plain English prose, 64+ tokens of context
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return
    from kvserve.bench.perplexity import llamacpp_perplexity
    from kvserve.loader.resolve import smollm2_path

    peer = llamacpp_perplexity(smollm2_path(), ids, context=128, max_tokens_scored=256)
    assert peer.num_scored == 256
    assert peer.perplexity == pytest.approx(r.perplexity, rel=0.05)  # same Q4_1 weights
