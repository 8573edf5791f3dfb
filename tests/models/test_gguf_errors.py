"""Bad GGUF input is refused with a ValueError naming the file (and, for a file cut short or a
corrupt header, the byte offset where it broke), never a numpy/IndexError crash or a hang:
truncation at every section, bad magic / version / counts / offsets, unsupported tensor types
and architectures, and the one-line CLI error."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from kvserve.loader.gguf import SUPPORTED_TENSOR_TYPES, GGUFFile, load_gguf_config

pytestmark = pytest.mark.timeout(60)

OFFSET = re.compile(r"byte offsets? \d+")


def _write(path: Path, arch: str = "llama", extra: dict[str, tuple[np.ndarray, Q]] | None = None) -> Path:
    """A tiny llama-shaped GGUF: a little metadata, a token list and three tensors."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(16)])
    w.add_token_types([1] * 16)
    w.add_eos_token_id(2)
    w.add_tensor("token_embd.weight", rng.standard_normal((16, 32)).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(32, np.float32))
    q = gguf.quants.quantize(rng.standard_normal((8, 32)).astype(np.float32), Q.Q8_0)
    w.add_tensor("blk.0.attn_q.weight", q, raw_dtype=Q.Q8_0)
    for name, (data, qtype) in (extra or {}).items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, gguf.GGUFReader]:
    path = _write(tmp_path_factory.mktemp("gguf-good") / "good.gguf")
    GGUFFile(path)  # the uncorrupted file opens
    return path.read_bytes(), gguf.GGUFReader(path)


def _bad(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    return path


def _refused(path: Path, *patterns: str) -> str:
    with pytest.raises(ValueError) as e:
        GGUFFile(path)
    msg = str(e.value)
    assert str(path) in msg
    for p in patterns:
        assert re.search(p, msg), msg
    return msg


def _cut_points(reader: gguf.GGUFReader) -> dict[str, int]:
    tokens = reader.fields["tokenizer.ggml.tokens"]
    first, last = reader.tensors[0], reader.tensors[-1]
    return {
        "empty": 0,
        "magic": 2,
        "version": 6,
        "counts": 20,
        "kv_key": reader.fields["general.architecture"].offset + 4,
        "kv_string_array": tokens.offset + 60,
        "kv_last_value": reader.fields["tokenizer.ggml.eos_token_id"].offset + 30,
        "tensor_info_name": first.field.offset + 10,
        "tensor_info_dims": first.field.offset + 8 + len(first.name) + 6,
        "tensor_info_offset": last.field.offset + last.field.parts[-1].nbytes - 1 + sum(
            p.nbytes for p in last.field.parts[:-1]),
        "data_start": first.data_offset,
        "data_middle": first.data_offset + first.n_bytes // 2,
        "data_last_byte": last.data_offset + last.n_bytes - 1,
    }


@pytest.mark.parametrize("where", [
    "empty", "magic", "version", "counts", "kv_key", "kv_string_array", "kv_last_value",
    "tensor_info_name", "tensor_info_dims", "tensor_info_offset", "data_start", "data_middle",
    "data_last_byte",
])
def test_truncated_file_names_path_and_offset(tmp_path, good, where) -> None:
    data, reader = good
    cut = _cut_points(reader)[where]
    assert cut < len(data)
    msg = _refused(_bad(tmp_path, data[:cut]), OFFSET.pattern)
    if where.startswith("data"):
        assert "lies past the end of the file" in msg and "tensor '" in msg
    else:
        assert "cut short" in msg


def test_every_prefix_is_refused_cleanly(tmp_path, good) -> None:
    """No truncation point escapes as anything but a ValueError with an offset."""
    data, reader = good
    end = max(t.data_offset + t.n_bytes for t in reader.tensors)  # the writer pads past it
    path = tmp_path / "cut.gguf"
    for cut in [*range(0, end, 7), end - 1]:
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=OFFSET.pattern):
            GGUFFile(path)


def test_bad_magic(tmp_path, good) -> None:
    data, _ = good
    _refused(_bad(tmp_path, b"GGML" + data[4:]), r"not a GGUF file", r"b'GGML'")
    _refused(_bad(tmp_path, b"\x89PNG" + b"\0" * 4), r"not a GGUF file")


@pytest.mark.parametrize("version", [0, 1, 4, 0xFFFF])
def test_bad_version(tmp_path, good, version) -> None:
    data, _ = good
    msg = _refused(_bad(tmp_path, data[:4] + struct.pack("<I", version) + data[8:]), r"byte offset 4")
    assert f"version {version} is not supported" in msg and "2, 3" in msg


@pytest.mark.parametrize("field,value", [("tensors", 2**60), ("kv", 2**40), ("tensors", 10**6), ("kv", 2**64 - 1)])
def test_absurd_counts(tmp_path, good, field, value) -> None:
    data, _ = good
    at = 8 if field == "tensors" else 16
    bad = data[:at] + struct.pack("<Q", value) + data[at + 8:]
    _refused(_bad(tmp_path, bad), r"cannot fit in a file of \d+ bytes", OFFSET.pattern)


def test_tensor_offset_past_end(tmp_path, good) -> None:
    data, reader = good
    t = reader.tensors[1]
    # The tensor info ends with its uint64 data offset.
    end = t.field.offset + sum(p.nbytes for p in t.field.parts)
    bad = data[: end - 8] + struct.pack("<Q", 1 << 40) + data[end:]
    _refused(_bad(tmp_path, bad), rf"tensor '{t.name}'", r"byte offsets \d+\.\.\d+", "past the end")


def test_huge_string_length(tmp_path, good) -> None:
    data, reader = good
    f = reader.fields["general.architecture"]
    bad = data[: f.offset] + struct.pack("<Q", 2**62) + data[f.offset + 8 :]  # the key's length
    _refused(_bad(tmp_path, bad), "cut short", OFFSET.pattern)


def test_unknown_tensor_type_id(tmp_path, good) -> None:
    data, reader = good
    t = reader.tensors[0]
    type_at = t.field.offset + sum(p.nbytes for p in t.field.parts) - 8 - 4
    bad = data[:type_at] + struct.pack("<I", 99) + data[type_at + 4 :]
    _refused(_bad(tmp_path, bad), rf"tensor '{t.name}'", r"unknown type id 99", "supported types: F32")


@pytest.mark.parametrize("qtype,block_bytes", [(Q.Q5_1, 24), (Q.IQ2_XXS, 66), (Q.Q8_K, 292), (Q.I32, 4)])
def test_unsupported_tensor_type(tmp_path, qtype, block_bytes) -> None:
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    raw = np.zeros((2, block_bytes * (256 // block)), np.uint8)  # 2 rows of 256 values
    if qtype == Q.I32:
        raw = np.zeros((2, 256), np.int32)
        qtype = None  # the writer infers I32 from the dtype
    path = _write(tmp_path / "q.gguf", extra={"blk.0.ffn_up.weight": (raw, qtype)})
    msg = _refused(path, r"tensor 'blk\.0\.ffn_up\.weight'")
    name = "I32" if qtype is None else qtype.name
    assert f"GGML type {name}" in msg
    assert "supported types: " + ", ".join(SUPPORTED_TENSOR_TYPES) in msg


def test_every_supported_type_opens(tmp_path) -> None:
    rng = np.random.default_rng(1)
    extra = {}
    for name in SUPPORTED_TENSOR_TYPES:
        qtype = Q[name]
        block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        extra[f"t_{name}"] = (rng.integers(0, 255, (2, 256 // block * nbytes), dtype=np.uint8), qtype)
    gf = GGUFFile(_write(tmp_path / "all.gguf", extra=extra))
    assert {f"t_{n}" for n in SUPPORTED_TENSOR_TYPES} <= set(gf.tensors)


def test_unsupported_architecture_lists_supported(tmp_path) -> None:
    path = _write(tmp_path / "mamba.gguf", arch="mamba")
    gf = GGUFFile(path)  # the file itself is fine
    with pytest.raises(ValueError) as e:
        load_gguf_config(gf)
    msg = str(e.value)
    assert str(path) in msg and "'mamba'" in msg
    assert "supported: gemma3, gpt-oss, gpt2, llama, phi3, qwen2, qwen3, qwen3moe (Mistral, Mixtral" in msg


@pytest.mark.parametrize("kind", ["truncated", "bad_magic", "not_gguf"])
def test_cli_generate_prints_one_line_error(tmp_path, good, capsys, kind) -> None:
    from kvserve.entrypoints.cli import main

    data, reader = good
    path = tmp_path / "model.gguf"
    path.write_bytes({
        "truncated": data[: reader.tensors[0].data_offset + 5],
        "bad_magic": b"XXXX" + data[4:],
        "not_gguf": b"hello, world\n" * 3,
    }[kind])
    rc = main(["generate", "hi", "--model", str(path), "--dtype", "float32", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("kvserve: error: ") and str(path) in err
    assert "Traceback" not in err
