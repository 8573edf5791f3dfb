"""32 concurrent mixed streaming / non-streaming greedy requests all complete, with unique ids,
and each equals the same request run alone (fp32 on CPU: batching must not change results)."""

from __future__ import annotations

import asyncio

from tests.server.conftest import API_KEY, MODEL_NAME, wait_idle

WORDS = "the quick brown fox jumps over the lazy dog paged attention keeps blocks café 日本語 😀".split()


def _request(i: int) -> tuple[str, dict, bool]:
    """(kind, body, stream) for request i: completions and chat, streamed or not."""
    kind = "chat" if i % 4 in (2, 3) else "completion"
    stream = i % 2 == 1
    words = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + (i * 7) % 40))
    common = {"model": MODEL_NAME, "temperature": 0, "max_tokens": 8 + (i * 5) % 40}
    if i % 3 == 0:
        common["ignore_eos"] = True
    if kind == "chat":
        return kind, {**common, "messages": [{"role": "user", "content": words}]}, stream
    return kind, {**common, "prompt": words}, stream


async def _run(client, kind: str, body: dict, stream: bool) -> tuple[str, str, str]:
    """-> (response id, text, finish_reason)"""
    extra = {k: body[k] for k in ("ignore_eos",) if k in body}
    kwargs = {k: v for k, v in body.items() if k not in extra}
    if kind == "chat":
        create = client.chat.completions.create
    else:
        create = client.completions.create
    if not stream:
        r = await create(extra_body=extra, **kwargs)
        c = r.choices[0]
        return r.id, (c.message.content if kind == "chat" else c.text), c.finish_reason
    text, finish, ids = [], None, set()
    async for chunk in await create(stream=True, extra_body=extra, **kwargs):
        ids.add(chunk.id)
        for ch in chunk.choices:
            text.append((ch.delta.content or "") if kind == "chat" else ch.text)
            if ch.finish_reason:
                assert finish is None, "two finish chunks"
                finish = ch.finish_reason
    assert len(ids) == 1 and finish is not None
    return ids.pop(), "".join(text), finish


def test_32_concurrent_mixed_requests_match_solo_runs(server):
    from openai import AsyncOpenAI

    requests = [_request(i) for i in range(32)]

    async def main():
        async with AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120) as client:
            together = await asyncio.gather(*(_run(client, *r) for r in requests))
            alone = [await _run(client, kind, body, False) for kind, body, _ in requests]
        return together, alone

    together, alone = asyncio.run(main())
    ids = [t[0] for t in together]
    assert len(set(ids)) == 32
    for i, (t, a) in enumerate(zip(together, alone)):
        assert t[1] == a[1], f"request {i} ({requests[i][0]}, stream={requests[i][2]}) differs"
        assert t[2] == a[2]
    m = wait_idle(server.url)
    assert m["kvserve:kv_cache_blocks_used"] == 0
