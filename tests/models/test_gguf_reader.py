"""kvserve's GGUF reader against the `gguf` package's GGUFReader on files written by GGUFWriter:
every metadata value and every tensor (name, dims, type, offset, bytes), little- and big-endian,
GGUF v2 and v3; tensor data as views of the one memory map; the GGUF tokenizer's fast paths."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFEndian, GGUFValueType

from kvserve.loader.gguf import SUPPORTED_TENSOR_TYPES, GGUFFile
from kvserve.loader.gguf_reader import StringArray, read_gguf

pytestmark = pytest.mark.timeout(60)

V = GGUFValueType
# (key, value, value type, element type) for every value type the format has.
SCALARS = [
    ("t.u8", 200, V.UINT8), ("t.i8", -100, V.INT8), ("t.u16", 60000, V.UINT16),
    ("t.i16", -30000, V.INT16), ("t.u32", 4_000_000_000, V.UINT32), ("t.i32", -2_000_000_000, V.INT32),
    ("t.f32", 1e-5, V.FLOAT32), ("t.bool", True, V.BOOL), ("t.u64", 2**63 + 5, V.UINT64),
    ("t.i64", -(2**62), V.INT64), ("t.f64", 0.1, V.FLOAT64), ("t.str", "héllo, wörld ✓", V.STRING),
    ("t.empty_str", "", V.STRING),
]
ARRAYS = [
    ("a.u8", [0, 1, 255], V.UINT8), ("a.i8", [-128, 0, 127], V.INT8), ("a.u16", [1, 65535], V.UINT16),
    ("a.i16", [-5, 5], V.INT16), ("a.u32", [7] * 9, V.UINT32), ("a.i32", list(range(-3, 40)), V.INT32),
    ("a.f32", [0.5, -1.25, 1e-5], V.FLOAT32), ("a.bool", [True, False, True], V.BOOL),
    ("a.u64", [2**64 - 1, 0], V.UINT64), ("a.i64", [-(2**63), 2**63 - 1], V.INT64),
    ("a.f64", [0.1, 2.5], V.FLOAT64), ("a.str", ["", "a b", "Ġthe", "日本語", "\n", "x" * 300], V.STRING),
]
# Types the reader maps without kvserve's tensor-type filter: plain, BF16 and block formats.
TENSOR_TYPES = [Q.F32, Q.F16, Q.BF16, Q.F64, Q.I8, Q.I16, Q.I32, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K]


def _write(path: Path, endian: GGUFEndian = GGUFEndian.LITTLE, alignment: int | None = None,
           kvserve_types: bool = False) -> Path:
    """Every metadata type and a tensor of each of TENSOR_TYPES (those GGUFFile takes, with
    `kvserve_types`), in 1 to 4 dimensions."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama", endianess=endian)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, value, vtype in SCALARS:
        w.add_key_value(key, value, vtype)
    for key, value, etype in ARRAYS:
        w.add_key_value(key, value, V.ARRAY, sub_type=etype)
    shapes = [(7,), (3, 5), (2, 3, 4), (2, 1, 2, 3)]  # numpy order, ne0 last
    for i, qtype in enumerate(TENSOR_TYPES):
        block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        if kvserve_types and qtype.name not in SUPPORTED_TENSOR_TYPES:
            continue
        if qtype in (Q.F32, Q.F16, Q.F64, Q.I8, Q.I16, Q.I32):
            dtype = {Q.F32: np.float32, Q.F16: np.float16, Q.F64: np.float64, Q.I8: np.int8,
                     Q.I16: np.int16, Q.I32: np.int32}[qtype]
            x = (rng.standard_normal(shapes[i % 4]) * 50).astype(dtype)
            w.add_tensor(f"t{i}.{qtype.name}", x)
        else:  # random block bytes, rows of 2 blocks ([.., rows, row_bytes])
            outer = shapes[i % 4][:-1] or (1,)
            raw = rng.integers(0, 256, (*outer, 2 * nbytes), dtype=np.uint8)
            w.add_tensor(f"t{i}.{qtype.name}", raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _assert_same_as_gguf_reader(path: Path) -> None:
    ref = gguf.GGUFReader(path)
    ours = read_gguf(path)
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert list(ours.fields) == keys
    for key in keys:
        field, mine = ref.fields[key], ours.fields[key]
        assert mine.offset == field.offset, key
        assert mine.type == field.types[0], key
        value = mine.value.tolist() if isinstance(mine.value, (np.ndarray, StringArray)) else mine.value
        if mine.type == V.ARRAY:
            assert mine.elem_type == field.types[-1], key
            assert len(mine.value) == len(field.data), key
        assert value == field.contents(), key
        assert type(value) is type(field.contents()), key
    assert ours.alignment == ref.alignment and ours.data_offset == ref.data_offset
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert mine.tensor_type == t.tensor_type and mine.tensor_type.name == t.tensor_type.name
        np.testing.assert_array_equal(mine.shape, t.shape)
        assert mine.shape.dtype == np.uint64
        assert (mine.n_elements, mine.n_bytes, mine.data_offset) == (t.n_elements, t.n_bytes, t.data_offset)
        assert mine.data.tobytes() == np.asarray(t.data).tobytes(), t.name
        if t.tensor_type == Q.BF16:  # typed as uint16 here, bytes in gguf's reader
            assert mine.data.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
        else:
            assert mine.data.shape == t.data.shape and mine.data.dtype == t.data.dtype, t.name


@pytest.mark.parametrize("endian", [GGUFEndian.LITTLE, GGUFEndian.BIG], ids=["little", "big"])
def test_same_as_gguf_reader(tmp_path: Path, endian: GGUFEndian) -> None:
    _assert_same_as_gguf_reader(_write(tmp_path / "all.gguf", endian))


def test_custom_alignment(tmp_path: Path) -> None:
    path = _write(tmp_path / "align.gguf", alignment=64)
    _assert_same_as_gguf_reader(path)
    ours = read_gguf(path)
    assert ours.alignment == 64 and ours.data_offset % 64 == 0
    assert all(t.data_offset % 64 == 0 for t in ours.tensors.values())


def test_version_2(tmp_path: Path) -> None:
    # v2 and v3 share the layout (v3 added big-endian files); both readers take either.
    path = _write(tmp_path / "v3.gguf")
    data = path.read_bytes()
    assert struct.unpack_from("<I", data, 4)[0] == 3
    v2 = tmp_path / "v2.gguf"
    v2.write_bytes(data[:4] + struct.pack("<I", 2) + data[8:])
    _assert_same_as_gguf_reader(v2)
    assert read_gguf(v2).version == 2


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # random block bytes hold NaN scales
def test_big_endian_values_decode(tmp_path: Path) -> None:
    little = GGUFFile(_write(tmp_path / "le.gguf", kvserve_types=True))
    big = GGUFFile(_write(tmp_path / "be.gguf", GGUFEndian.BIG, kvserve_types=True))
    assert big.reader.byte_order == ">" and little.reader.byte_order == "<"
    for key, value, _ in SCALARS + ARRAYS:
        assert big.get(key) == little.get(key), key
    for name in big.tensors:
        if name.endswith(("F32", "F16", "BF16", "F64", "Q8_0", "Q4_K")):
            np.testing.assert_array_equal(big.dequantize(name), little.dequantize(name), err_msg=name)


def test_tensor_data_are_views_of_the_file(tmp_path: Path) -> None:
    ours = read_gguf(_write(tmp_path / "all.gguf"))
    bases = set()
    for t in ours.tensors.values():
        assert not t.data.flags.writeable and not t.data.flags.owndata
        base = t.data
        while isinstance(base.base, np.ndarray):
            base = base.base
        bases.add(id(base))
    assert len(bases) == 1  # one map for the whole file
    tokens = ours.fields["a.i32"].value
    assert isinstance(tokens, np.ndarray) and not tokens.flags.owndata


def test_gguf_file_get(tmp_path: Path) -> None:
    gf = GGUFFile(_write(tmp_path / "all.gguf", kvserve_types=True))
    assert gf.get("t.f32") == 1e-5  # float32 rounded back to the decimal it was written from
    assert gf.get("t.f64") == 0.1 and gf.get("t.bool") is True and gf.get("t.str") == "héllo, wörld ✓"
    assert gf.get("a.i32") == list(range(-3, 40)) and isinstance(gf.get("a.i32"), list)
    assert gf.get("a.str") == ARRAYS[-1][1]
    assert gf.get("missing", 5) == 5 and "a.str" in gf and "missing" not in gf
    assert gf.array_len("a.str") == 6
    assert gf.array_len("t.u8") is None and gf.array_len("missing") is None
    assert isinstance(gf.reader.fields["a.str"].value, StringArray)  # still undecoded


def _raw_gguf(kvs: list[tuple[str, int, bytes]], tensors: list[tuple[str, list[int], int, int]]) -> bytes:
    """A little-endian v3 GGUF built by hand: (key, value type, encoded value) entries and
    (name, dims, type, offset) tensor infos, then zeroed data."""
    s = lambda b: struct.pack("<Q", len(b)) + b  # noqa: E731
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs))
    out += b"".join(s(k.encode() if isinstance(k, str) else k) + struct.pack("<I", t) + v for k, t, v in kvs)
    for name, dims, qtype, offset in tensors:
        out += s(name.encode()) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, qtype, offset)
    return out + b"\0" * (-len(out) % 32) + b"\0" * 1024


ARCH = ("general.architecture", V.STRING, struct.pack("<Q", 5) + b"llama")


def test_duplicate_key_and_tensor_refused(tmp_path: Path) -> None:
    path = tmp_path / "dup.gguf"
    path.write_bytes(_raw_gguf([ARCH, ARCH], []))
    with pytest.raises(ValueError, match=r"byte offset \d+: duplicate metadata key 'general.architecture'"):
        GGUFFile(path)
    path.write_bytes(_raw_gguf([ARCH], [("w", [4], 0, 0), ("w", [4], 0, 32)]))
    with pytest.raises(ValueError, match=r"duplicate tensor name 'w'"):
        GGUFFile(path)


def test_invalid_utf8_and_bad_alignment_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(_raw_gguf([(b"general.\xff", V.UINT8, b"\x01")], []))
    with pytest.raises(ValueError, match=rf"{path}: corrupt GGUF at byte offset 40: key of metadata "
                                         r"entry 0 is not valid UTF-8"):
        GGUFFile(path)
    for value in (struct.pack("<I", 48), struct.pack("<I", 0)):
        path.write_bytes(_raw_gguf([ARCH, ("general.alignment", V.UINT32, value)], []))
        with pytest.raises(ValueError, match="general.alignment must be a power of two"):
            GGUFFile(path)


def test_nested_and_empty_arrays(tmp_path: Path) -> None:
    # GGUFWriter writes neither; llama.cpp's reader takes both.
    inner = [struct.pack("<IQ", V.INT32, 2) + struct.pack("<2i", 1, 2),
             struct.pack("<IQ", V.STRING, 1) + struct.pack("<Q", 2) + b"ab"]
    nested = struct.pack("<IQ", V.ARRAY, 2) + b"".join(inner)
    path = tmp_path / "nested.gguf"
    path.write_bytes(_raw_gguf([
        ARCH, ("n", V.ARRAY, nested), ("e_i32", V.ARRAY, struct.pack("<IQ", V.INT32, 0)),
        ("e_str", V.ARRAY, struct.pack("<IQ", V.STRING, 0)), ("after", V.UINT8, b"\x07"),
    ], []))
    gf = GGUFFile(path)
    assert gf.get("n") == [[1, 2], ["ab"]] and gf.get("after") == 7
    assert gf.get("e_i32") == [] and gf.get("e_str") == []
    assert gf.array_len("e_i32") == 0 and gf.array_len("e_str") == 0


# -- the GGUF tokenizer's whole-vocabulary paths ------------------------------------------------
def _tokenizer_file(path: Path, tokens: list[str], types: list[int], merges: list[str]) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tokenizer_raw_text_tokens_duplicates_and_merges(tmp_path: Path) -> None:
    from kvserve.loader.gguf import load_gguf_tokenizer
    from kvserve.loader.gguf_tokenizer import _byte_alphabet

    alphabet = list(_byte_alphabet().values())
    # "€" and " a" are raw text (a few converters wrote that); "<x y>" is a control token and
    # keeps its space; "Ġa" duplicates the rewritten " a" and keeps its first id.
    tokens = ["<x y>", *alphabet, "€", " a", "Ġa", "ab", "âĤ"]
    types = [3] + [1] * (len(tokens) - 1)
    merges = ["â Ĥ", "âĤ ¬", "Ġ a", "a b"]
    tok = load_gguf_tokenizer(_tokenizer_file(tmp_path / "t.gguf", tokens, types, merges))
    ids = tok.encode("€ a<x y>ab", add_special_tokens=False)
    n = len(alphabet) + 1
    assert ids == [n, n + 1, 0, n + 3]
    assert tok.decode(ids, skip_special_tokens=False) == "€ a<x y>ab"

    with pytest.raises(ValueError, match=r"malformed merge 'a  b'"):
        load_gguf_tokenizer(_tokenizer_file(tmp_path / "m.gguf", tokens, types, ["â Ĥ", "a  b"]))
    with pytest.raises(ValueError, match=r"malformed merge 'ab'"):
        load_gguf_tokenizer(_tokenizer_file(tmp_path / "m2.gguf", tokens, types, ["ab", "a  b"]))


def test_tokenizer_reads_vocab_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each string array is decoded once per tokenizer build, never per token."""
    from kvserve.loader.gguf import load_gguf_tokenizer
    from kvserve.loader.gguf_tokenizer import _byte_alphabet

    tokens = ["<s>", *_byte_alphabet().values(), "ab"]
    gf = GGUFFile(_tokenizer_file(tmp_path / "t.gguf", tokens, [3] + [1] * (len(tokens) - 1), ["a b"]))
    calls: list[int] = []
    original = StringArray.tolist
    monkeypatch.setattr(StringArray, "tolist", lambda self: calls.append(len(self)) or original(self))
    load_gguf_tokenizer(gf)
    assert sorted(calls) == [1, len(tokens)]


def test_type_table_matches_the_gguf_package():
    """The reader's own GGML type table (it avoids importing `gguf` at start-up) agrees with
    the package on every type it names, and members of both enums are interchangeable."""
    import gguf

    from kvserve.loader import gguf_reader as r

    for t in r.GGMLQuantizationType:
        theirs = gguf.GGMLQuantizationType(int(t))
        assert theirs.name == t.name and theirs == t and hash(theirs) == hash(t)
        assert r.GGML_QUANT_SIZES[t] == gguf.GGML_QUANT_SIZES[theirs], t.name
        assert gguf.GGML_QUANT_SIZES[t] == r.GGML_QUANT_SIZES[theirs]
