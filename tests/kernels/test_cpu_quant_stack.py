"""The one-call quantized decoder stack (`kvserve/kernels/cpu_quant_stack.py`) against a plain
PyTorch fp32 reference of the same math on the dequantized weights.

The reference keeps its own unpaged K/V history per sequence; the stack's paged cache is filled
for the earlier positions with the reference's k and v (the "prefill"), then several decode
steps in a row run through both, growing the cache.

Tolerance: the kvq kernels quantize every activation to 8-bit blocks before multiplying
(scale = max|x| / 127 per block of 32 or 256 values), which perturbs each matmul input by up
to half a step: a relative RMS error of ~0.5% for Gaussian-like rows (rms step/sqrt(12) over
rms x). Seven matmuls per layer over 2-3 layers, partly damped by the RMSNorms, give an
expected relative error of ~1% on the output; a broken stack (a wrong head, position, block or
sign) is off by tens of percent. So rows are compared by relative L2 error < 3%.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

gguf_quants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType as QT  # noqa: E402

from kvserve.kernels.cpu_quant_stack import QuantDecoderStack, QuantLinear, StackLayer, library  # noqa: E402

REL_TOL = 3e-2


@pytest.fixture(scope="module")
def lib():
    try:
        lib = library()
    except ImportError:
        lib = None
    if lib is None:
        pytest.skip("the kvq CPU kernels are unavailable")
    return lib


# ---------------------------------------------------------------------------------------------
# Random quantized weights


def _quantize(rng: np.random.Generator, qtype: QT, rows: int, k: int, std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(GGML bytes uint8 [rows, row_bytes], dequantized fp32 [rows, k])."""
    if qtype in (QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0):
        raw = gguf_quants.quantize((rng.standard_normal((rows, k)) * std).astype(np.float32), qtype)
    else:
        # Random valid K-format blocks: random quants and sub-block scales, small fp16 super-scales.
        block, size = gguf_quants.GGML_QUANT_SIZES[qtype]
        nb = k // block
        raw = rng.integers(0, 256, size=(rows, nb, size), dtype=np.uint8)
        if qtype == QT.Q6_K:  # ql[128] qh[64] scales[16] d
            raw[..., 208:210] = (rng.uniform(0.5, 1.0, (rows, nb, 1)) * std / 1600).astype(np.float16).view(np.uint8)
        else:  # d dmin scales[12] (qh[32]) qs[128]
            levels = 15 if qtype == QT.Q4_K else 31
            d = rng.uniform(0.5, 1.0, (rows, nb, 1)) * std / (20 * levels)
            raw[..., 0:2] = d.astype(np.float16).view(np.uint8)
            raw[..., 2:4] = (rng.uniform(0.5, 1.0, (rows, nb, 1)) * std / 40).astype(np.float16).view(np.uint8)
        raw = raw.reshape(rows, nb * size)
    deq = gguf_quants.dequantize(raw, qtype)
    return torch.from_numpy(np.ascontiguousarray(raw)), torch.from_numpy(np.ascontiguousarray(deq)).float()


def _linear(rng, qtypes: list[QT], rows: list[int], k: int, bias: bool = False) -> tuple[QuantLinear, dict]:
    parts, deqs = [], []
    for qt, n in zip(qtypes, rows):
        w, d = _quantize(rng, qt, n, k, std=k**-0.5)
        parts.append((int(qt), w, k))
        deqs.append(d)
    b = torch.from_numpy(rng.standard_normal(sum(rows)).astype(np.float32) * 0.1) if bias else None
    return QuantLinear(parts=parts, bias=b), {"w": torch.cat(deqs), "b": b}


@dataclass
class Config:
    layers: int = 2
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    inter: int = 192
    vocab: int = 100
    num_blocks: int = 24
    block_size: int = 16
    window: int | None = None
    qkv: tuple = ((QT.Q8_0, "q"), (QT.Q4_0, "k"), (QT.Q4_1, "v"))  # parts by q / k / v / qkv rows
    o: QT = QT.Q4_1
    gate: tuple = (QT.Q4_0,)
    up: tuple = (QT.Q8_0,)
    down: QT = QT.Q4_1
    embed: int = int(QT.Q8_0)  # or 0 / 1 for fp32 / fp16 rows
    qkv_bias: bool = True
    # Gemma 3: q/k norms, sandwich norms, GELU-tanh, scaled embedding, a softmax scale of its
    # own, and per layer a window (0: full) with the local RoPE base on windowed layers
    gemma: bool = False
    layer_windows: tuple[int, ...] | None = None
    max_rows: int = 4


def build(cfg: Config, seed: int = 0):
    """(stack, reference weights, kv caches)."""
    rng = np.random.default_rng(seed)
    H, D, Hq, Hkv, I = cfg.hidden, cfg.head_dim, cfg.heads, cfg.kv_heads, cfg.inter
    counts = {"q": Hq * D, "k": Hkv * D, "v": Hkv * D, "kv": 2 * Hkv * D, "qk": (Hq + Hkv) * D}
    counts["qkv"] = (Hq + 2 * Hkv) * D
    layers, ref_layers = [], []
    for _ in range(cfg.layers):
        qkv, rq = _linear(rng, [qt for qt, _ in cfg.qkv], [counts[n] for _, n in cfg.qkv], H, bias=cfg.qkv_bias)
        o, ro = _linear(rng, [cfg.o], [H], Hq * D)
        gate, rg = _linear(rng, list(cfg.gate), _split(I, len(cfg.gate)), H)
        up, ru = _linear(rng, list(cfg.up), _split(I, len(cfg.up)), H)
        down, rd = _linear(rng, [cfg.down], [H], I)
        norms = [torch.from_numpy(1 + 0.1 * rng.standard_normal(H).astype(np.float32)) for _ in range(4)]
        head_norms = [torch.from_numpy(1 + 0.3 * rng.standard_normal(D).astype(np.float32)) for _ in range(2)]
        cache = torch.zeros((2, cfg.num_blocks, cfg.block_size, Hkv, D), dtype=torch.float32)
        i = len(layers)
        window = cfg.layer_windows[i] if cfg.layer_windows else 0
        extra = {} if not cfg.gemma else dict(
            pre_ff_norm=norms[2], post_ff_norm=norms[3], q_norm=head_norms[0], k_norm=head_norms[1],
            window=window, local_rope=window > 0,
        )
        layers.append(StackLayer(norms[0], qkv, o, norms[1], gate, up, down, cache, **extra))
        ref_layers.append({"in": norms[0], "post": norms[1], "pre_ff": norms[2], "post_ff": norms[3],
                           "q_norm": head_norms[0], "k_norm": head_norms[1], "window": window,
                           "qkv": rq, "o": ro, "gate": rg, "up": ru, "down": rd})
    if cfg.embed in (0, 1):  # plain fp32 / fp16 rows
        embed = torch.from_numpy(rng.standard_normal((cfg.vocab, H)).astype(np.float32))
        embed = embed if cfg.embed == 0 else embed.half()
        embed_ref = embed.float()
    else:
        embed, embed_ref = _quantize(rng, QT(cfg.embed), cfg.vocab, H, std=1.0)
    final_norm = torch.from_numpy(1 + 0.1 * rng.standard_normal(H).astype(np.float32))
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    gemma = {}
    if cfg.gemma:  # global layers: base 1e6 with linear scaling by 8; local layers: base 1e4
        local_inv_freq, inv_freq = inv_freq, 1.0 / (1e6 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)) / 8
        embed_scale = float(torch.tensor(H**0.5, dtype=torch.float32))
        gemma = dict(local_inv_freq=local_inv_freq, embed_scale=embed_scale, activation="gelu_tanh",
                     sandwich_norms=True, scale=24**-0.5)
    stack = QuantDecoderStack(
        layers, embed=embed, embed_qtype=cfg.embed, final_norm=final_norm, inv_freq=inv_freq, num_heads=Hq,
        num_kv_heads=Hkv, head_dim=D, eps=1e-5, sliding_window=cfg.window, max_rows=cfg.max_rows, **gemma,
    )
    ref = {"layers": ref_layers, "embed": embed_ref, "norm": final_norm, "inv_freq": inv_freq, "cfg": cfg,
           "gemma": gemma}
    return stack, ref, [layer.kv_cache for layer in layers]


def _split(n: int, parts: int) -> list[int]:
    return [n // parts + (i < n % parts) for i in range(parts)] if parts > 1 else [n]


# ---------------------------------------------------------------------------------------------
# Reference


def _rmsnorm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w


def _rope(x: torch.Tensor, pos: int, inv_freq: torch.Tensor) -> torch.Tensor:  # x [heads, D]
    freqs = torch.tensor([pos], dtype=torch.float32) * inv_freq
    emb = torch.cat([freqs, freqs])
    half = x.shape[-1] // 2
    return x * emb.cos() + torch.cat([-x[..., half:], x[..., :half]], -1) * emb.sin()


def ref_step(ref: dict, token: int, pos: int, history: list[list[torch.Tensor]]) -> tuple[torch.Tensor, list]:
    """One token through the reference; appends its k and v ([Hkv, D]) to history[layer]. Returns
    the final norm's output [H] and the new (k, v) per layer."""
    cfg: Config = ref["cfg"]
    Hq, Hkv, D = cfg.heads, cfg.kv_heads, cfg.head_dim
    gemma = ref["gemma"]
    res, x, new = ref["embed"][token].clone(), torch.zeros(cfg.hidden), []
    if gemma:
        res = res * gemma["embed_scale"]
    for i, (layer, hist) in enumerate(zip(ref["layers"], history)):
        if gemma and i:
            x = _rmsnorm(x, ref["layers"][i - 1]["post_ff"])
        res = x + res
        h = _rmsnorm(res, layer["in"])
        qkv = F.linear(h, layer["qkv"]["w"], layer["qkv"]["b"])
        q, k = qkv[: Hq * D].view(Hq, D), qkv[Hq * D : (Hq + Hkv) * D].view(Hkv, D)
        inv_freq, window = ref["inv_freq"], cfg.window
        if gemma:
            q, k = _rmsnorm(q, layer["q_norm"]), _rmsnorm(k, layer["k_norm"])
            window = layer["window"]
            inv_freq = gemma["local_inv_freq"] if window else inv_freq
        q, k = _rope(q, pos, inv_freq), _rope(k, pos, inv_freq)
        v = qkv[(Hq + Hkv) * D :].view(Hkv, D)
        hist.append((k, v))
        new.append((k, v))
        ctx = hist[-window:] if window else hist
        keys = torch.stack([kv[0] for kv in ctx], 1).repeat_interleave(Hq // Hkv, 0)  # [Hq, T, D]
        vals = torch.stack([kv[1] for kv in ctx], 1).repeat_interleave(Hq // Hkv, 0)
        scale = gemma["scale"] if gemma else D**-0.5
        p = torch.softmax((keys @ q.unsqueeze(-1)).squeeze(-1) * scale, -1)  # [Hq, T]
        a = (p.unsqueeze(1) @ vals).reshape(-1)
        o = F.linear(a, layer["o"]["w"])
        if gemma:
            res = _rmsnorm(o, layer["post"]) + res
            h = _rmsnorm(res, layer["pre_ff"])
            act = F.gelu(F.linear(h, layer["gate"]["w"]), approximate="tanh")
        else:
            res = o + res
            h = _rmsnorm(res, layer["post"])
            act = F.silu(F.linear(h, layer["gate"]["w"]))
        x = F.linear(act * F.linear(h, layer["up"]["w"]), layer["down"]["w"])
    if gemma:
        x = _rmsnorm(x, ref["layers"][-1]["post_ff"])
    return _rmsnorm(x + res, ref["norm"]), new


class Seq:
    """A sequence with a random block table, its tokens so far and the reference's history."""

    def __init__(self, rng: np.random.Generator, blocks: list[int], cfg: Config) -> None:
        self.blocks, self.bs, self.cfg = blocks, cfg.block_size, cfg
        self.history: list[list] = [[] for _ in range(cfg.layers)]
        self.len = 0
        self.rng = rng

    def slot(self, pos: int) -> int:
        return self.blocks[pos // self.bs] * self.bs + pos % self.bs

    def prefill(self, ref: dict, caches: list[torch.Tensor], n: int) -> None:
        """n tokens through the reference, their k and v written to the paged caches."""
        for _ in range(n):
            _, new = ref_step(ref, int(self.rng.integers(self.cfg.vocab)), self.len, self.history)
            s = self.slot(self.len)
            for cache, (k, v) in zip(caches, new):
                cache[0].view(-1, *k.shape)[s] = k
                cache[1].view(-1, *v.shape)[s] = v
            self.len += 1


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def run_steps(stack, ref, caches, prefills: list[int], steps: int, seed: int = 1) -> float:
    """Sequences with the given prefill lengths decode `steps` tokens together through the stack and
    the reference; returns the worst relative error (outputs and written k / v)."""
    cfg: Config = ref["cfg"]
    rng = np.random.default_rng(seed)
    need = [(p + steps + cfg.block_size - 1) // cfg.block_size for p in prefills]
    perm = rng.permutation(cfg.num_blocks).tolist()
    assert sum(need) <= cfg.num_blocks
    seqs = []
    for n in need:
        seqs.append(Seq(rng, perm[:n], cfg))
        perm = perm[n:]
    for s, p in zip(seqs, prefills):
        s.prefill(ref, caches, p)
    width = max(need) + 1
    worst = 0.0
    for _ in range(steps):
        ids = [int(rng.integers(cfg.vocab)) for _ in seqs]
        tables = torch.full((len(seqs), width), -1, dtype=torch.int32)
        for i, s in enumerate(seqs):
            tables[i, : len(s.blocks)] = torch.tensor(s.blocks, dtype=torch.int32)
        positions = torch.tensor([s.len for s in seqs], dtype=torch.int64)
        slots = torch.tensor([s.slot(s.len) for s in seqs], dtype=torch.int64)
        out = stack(torch.tensor(ids), positions, tables, positions.int() + 1, slots)
        for i, (s, t) in enumerate(zip(seqs, ids)):
            want, new = ref_step(ref, t, s.len, s.history)
            worst = max(worst, _rel(out[i], want))
            for cache, (k, v) in zip(caches, new):
                worst = max(worst, _rel(cache[0].view(-1, *k.shape)[slots[i]], k))
                worst = max(worst, _rel(cache[1].view(-1, *v.shape)[slots[i]], v))
            s.len += 1
    return worst


# ---------------------------------------------------------------------------------------------
# Tests


def test_one_row_steps_cross_blocks(lib) -> None:
    stack, ref, caches = build(Config())
    assert run_steps(stack, ref, caches, prefills=[13], steps=5) < REL_TOL  # positions 13..17 cross 16


def test_three_rows_different_contexts(lib) -> None:
    stack, ref, caches = build(Config(layers=3))
    assert run_steps(stack, ref, caches, prefills=[1, 15, 47], steps=4) < REL_TOL


def test_sliding_window(lib) -> None:
    stack, ref, caches = build(Config(window=8))
    assert run_steps(stack, ref, caches, prefills=[5, 30], steps=4) < REL_TOL


def test_k_formats_mixed_parts(lib) -> None:
    """Q4_K_M-style: q/k in Q4_K with v in Q6_K, o in Q5_K, gate and up in different types, a
    Q6_K embedding; K-format blocks need multiples of 256 values."""
    cfg = Config(
        hidden=256, heads=4, kv_heads=2, head_dim=64, inter=256, qkv=((QT.Q4_K, "qk"), (QT.Q6_K, "v")),
        o=QT.Q5_K, gate=(QT.Q4_K,), up=(QT.Q5_K, QT.Q4_K), down=QT.Q6_K, embed=int(QT.Q6_K), qkv_bias=False,
    )
    stack, ref, caches = build(cfg)
    assert run_steps(stack, ref, caches, prefills=[20, 3], steps=3) < REL_TOL


@pytest.mark.parametrize("embed", [0, 1])
def test_plain_embedding_single_part(lib, embed: int) -> None:
    cfg = Config(
        qkv=((QT.Q4_1, "qkv"),), gate=(QT.Q4_1, QT.Q8_0), embed=embed, qkv_bias=False, head_dim=64, heads=2, kv_heads=1
    )
    stack, ref, caches = build(cfg)
    assert run_steps(stack, ref, caches, prefills=[16], steps=2) < REL_TOL


def test_gemma3_layers(lib) -> None:
    """Gemma 3's block as a Q4_K_M file stores it at hidden 640 (K not a multiple of 256): q, k,
    gate and up in Q5_0, v in Q8_0, o in Q4_K, down in Q6_K, a Q8_0 embedding; windowed local
    layers (window 8, RoPE base 1e4) around a global one (base 1e6, linear scaling), contexts
    longer than the window, one KV head for four query heads."""
    cfg = Config(
        layers=3, hidden=128, heads=4, kv_heads=1, head_dim=64, inter=256, num_blocks=32,
        qkv=((QT.Q5_0, "qk"), (QT.Q8_0, "v")), o=QT.Q4_K, gate=(QT.Q5_0,), up=(QT.Q5_0,), down=QT.Q6_K,
        qkv_bias=False, gemma=True, layer_windows=(8, 0, 8),
    )
    stack, ref, caches = build(cfg)
    assert run_steps(stack, ref, caches, prefills=[3, 21, 40], steps=4) < REL_TOL


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("window", [None, 8])
@pytest.mark.parametrize("prefill,rows", [(13, 4), (40, 4), (77, 11)])
@pytest.mark.parametrize("head_dim", [32, 64])
def test_verify_rows_equal_one_row_steps(lib, threads: int, window, prefill: int, rows: int, head_dim: int) -> None:
    """A speculative verify step: rows of one sequence (one block table, context lengths L, L + 1,
    ...) in one call give the same bits, outputs and cache, as one-row steps of those positions
    in turn. Their attention items run jointly where their splits start together (each K/V tile
    read once for all rows): 2 threads split each context in two, so rows pair up or not by
    where their halves start; 11 rows exceed the 8 of one joint item; with a window the rows'
    contexts start apart and run alone. Prefill 13: the rows cross a block boundary. (Q4_0 / Q4_1
    weights: their direct kernels give each output the same sums at any row count up to 48; Q8_0
    takes the tile path above 4 rows.) Head size 64 takes the attention's constant-size code
    (and in AVX-512 builds the paired-key scores of joint items)."""
    cfg = Config(heads=6, kv_heads=2, head_dim=head_dim, window=window, max_rows=12, num_blocks=16,
                 qkv=((QT.Q4_0, "q"), (QT.Q4_1, "kv")), up=(QT.Q4_0,))
    stack, ref, caches = build(cfg)
    rng = np.random.default_rng(3)
    seq = Seq(rng, rng.permutation(cfg.num_blocks).tolist()[:8], cfg)
    seq.prefill(ref, caches, prefill)
    snapshot = [c.clone() for c in caches]
    ids = torch.tensor(rng.integers(cfg.vocab, size=rows), dtype=torch.int64)
    table = torch.tensor(seq.blocks, dtype=torch.int32)
    positions = torch.arange(prefill, prefill + rows, dtype=torch.int64)
    slots = torch.tensor([seq.slot(int(p)) for p in positions], dtype=torch.int64)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        joint = stack(ids, positions, table.repeat(rows, 1).contiguous(), (positions + 1).int(), slots)
        joint_caches = [c.clone() for c in caches]
        for c, s in zip(caches, snapshot):
            c.copy_(s)
        for i in range(rows):
            pos = positions[i : i + 1]
            one = stack(ids[i : i + 1], pos, table[None], (pos + 1).int(), slots[i : i + 1])
            assert torch.equal(one[0], joint[i]), f"row {i}"
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(caches, joint_caches))
    # and the rows are right: against the fp32 reference, position by position
    for i in range(rows):
        want, _ = ref_step(ref, int(ids[i]), prefill + i, seq.history)
        assert _rel(joint[i], want) < REL_TOL


def test_gemma3_rejects_more_than_two_windows(lib) -> None:
    with pytest.raises(ValueError, match="windows"):
        build(Config(layers=3, gemma=True, layer_windows=(8, 0, 4)))


def test_errors(lib) -> None:
    stack, _, caches = build(Config())
    tables = torch.zeros((1, 2), dtype=torch.int32)
    lens, slots, pos = torch.tensor([1], dtype=torch.int32), torch.tensor([0]), torch.tensor([0])
    before = caches[0].clone()
    for bad in (100, -1):
        with pytest.raises(IndexError):
            stack(torch.tensor([bad]), pos, tables, lens, slots)
    assert torch.equal(caches[0], before)  # nothing written
    with pytest.raises(ValueError):  # context longer than its block table
        stack(torch.tensor([3]), pos, tables, torch.tensor([33], dtype=torch.int32), slots)
    with pytest.raises(ValueError):  # slot outside the cache
        stack(torch.tensor([3]), pos, tables, lens, torch.tensor([24 * 16]))
    with pytest.raises(ValueError):  # block id outside the cache
        stack(torch.tensor([3]), pos, torch.tensor([[24, 0]], dtype=torch.int32), lens, slots)
    with pytest.raises(ValueError):  # more rows than max_rows
        five = torch.zeros(5, dtype=torch.int64)
        stack(five, five, torch.zeros((5, 2), dtype=torch.int32), torch.ones(5, dtype=torch.int32), five)
    out = stack(torch.tensor([3]), pos, tables, lens, torch.tensor([-1]))  # slot -1: nothing written
    assert torch.equal(caches[0], before) and out.shape == (1, 128) and torch.isfinite(out).all()
