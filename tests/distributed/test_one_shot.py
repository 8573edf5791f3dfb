"""The one-shot all-reduce's start-up decision (`one_shot.decide`) over gloo, on CPU.

Every rank must run the same collectives whatever it finds locally: a rank that already set
symmetric memory up (an earlier engine in its process) once skipped the host check that its
freshly spawned peer ran, and both waited in different collectives for ever. These tests run
the decision on two gloo processes with different local findings and require the same answer
on both, within seconds. (Symmetric memory itself needs GPUs: tests/gpu/test_tensor_parallel.py.)
"""

from __future__ import annotations

import os
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from kvserve.distributed import one_shot


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, used_on: list[int], env: str, q) -> None:
    os.environ[one_shot.ENV] = env
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        one_shot._USED_IN_THIS_PROCESS = rank in used_on
        ok, reason = one_shot.decide(dist.group.WORLD)
        q.put((rank, ok, reason))
    finally:
        dist.destroy_process_group()


def _decide_on_two_ranks(used_on: list[int], env: str = "auto") -> dict[int, tuple[bool, str]]:
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    port = _port()
    procs = [ctx.Process(target=_rank, args=(r, port, used_on, env, q)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "decide() hung: the ranks ran different collectives"
    out = {}
    while not q.empty():
        rank, ok, reason = q.get()
        out[rank] = (ok, reason)
    assert sorted(out) == [0, 1]
    return out


@pytest.mark.parametrize("used_on", [[0], [1], [0, 1], []])
def test_ranks_agree_whatever_each_found(used_on):
    out = _decide_on_two_ranks(used_on)
    assert out[0][0] == out[1][0]
    if used_on:  # one rank's "no" is everybody's, each saying why
        assert out[0][0] is False
        for rank in (0, 1):
            want = "earlier engine" if rank in used_on else "another rank"
            assert want in out[rank][1]


def test_nccl_choice_is_honoured():
    out = _decide_on_two_ranks([], env="nccl")
    assert out[0] == (False, f"{one_shot.ENV}=nccl")


def test_bad_choice_is_a_value_error(monkeypatch):
    monkeypatch.setenv(one_shot.ENV, "fast")
    with pytest.raises(ValueError, match=one_shot.ENV):
        one_shot.decide(None)


def test_bad_fused_norm_choice_is_a_value_error(monkeypatch):
    """Checked before any collective (decide() gets no group here)."""
    monkeypatch.setenv(one_shot.NORM_ENV, "yes")
    with pytest.raises(ValueError, match=one_shot.NORM_ENV):
        one_shot.decide(None)
