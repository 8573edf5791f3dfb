"""kvserve's GGUF reader: one bounds-checked pass over the header of a memory-mapped file.

The `gguf` package's `GGUFReader` builds a few numpy objects per metadata array element (two per
vocabulary string), which costs seconds and ~160 MB for a 49k-token vocabulary. This reader walks
the header once with `struct` on an `mmap` of the file and builds only:

- metadata: scalars as Python values, arrays of numbers as one read-only numpy view each, arrays
  of strings as a `StringArray` that remembers where its bytes are and decodes them on request;
- tensor infos and data: a `GGUFTensor` per tensor whose `.data` is a numpy view of the one
  memory map (nothing is read or copied until someone touches it).

Every failure (cut short, corrupt count, unknown type, unsupported tensor type, tensor data past
the end) is a ValueError naming the path and the byte offset or tensor where the file breaks.

Layout (GGUF v2/v3, all little-endian unless the version reads byte-swapped): magic "GGUF",
uint32 version, uint64 tensor count, uint64 metadata count, the metadata entries (string key,
uint32 value type, value), the tensor infos (string name, uint32 n_dims, uint64 dims ne0 first,
uint32 GGML type, uint64 offset), padding to `general.alignment` (default 32), tensor data.
Strings are a uint64 byte length and UTF-8 bytes; arrays are a uint32 element type, a uint64
count and the elements.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import enum

import numpy as np


class GGMLQuantizationType(enum.IntEnum):
    """GGML tensor type ids, as `gguf.GGMLQuantizationType` numbers them (an IntEnum: members of
    either compare and hash equal). Kept here because importing the `gguf` package costs 0.2 to
    0.6 s of start-up on a 2-core machine; tests/models/test_gguf_reader.py checks both tables
    against the package."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39


_Q = GGMLQuantizationType
# type -> (values per block, bytes per block), as gguf.GGML_QUANT_SIZES.
GGML_QUANT_SIZES: dict[GGMLQuantizationType, tuple[int, int]] = {
    _Q.F32: (1, 4), _Q.F16: (1, 2), _Q.Q4_0: (32, 18), _Q.Q4_1: (32, 20), _Q.Q5_0: (32, 22),
    _Q.Q5_1: (32, 24), _Q.Q8_0: (32, 34), _Q.Q8_1: (32, 40), _Q.Q2_K: (256, 84), _Q.Q3_K: (256, 110),
    _Q.Q4_K: (256, 144), _Q.Q5_K: (256, 176), _Q.Q6_K: (256, 210), _Q.Q8_K: (256, 292),
    _Q.IQ2_XXS: (256, 66), _Q.IQ2_XS: (256, 74), _Q.IQ3_XXS: (256, 98), _Q.IQ1_S: (256, 50),
    _Q.IQ4_NL: (32, 18), _Q.IQ3_S: (256, 110), _Q.IQ2_S: (256, 82), _Q.IQ4_XS: (256, 136),
    _Q.I8: (1, 1), _Q.I16: (1, 2), _Q.I32: (1, 4), _Q.I64: (1, 8), _Q.F64: (1, 8), _Q.IQ1_M: (256, 56),
    _Q.BF16: (1, 2), _Q.TQ1_0: (256, 54), _Q.TQ2_0: (256, 66), _Q.MXFP4: (32, 17),
}

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ARRAY_DEPTH = 4

# GGUF value type ids (gguf.GGUFValueType) -> struct/numpy codes of the fixed-size scalars.
_SCALAR_CODES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
FLOAT32, STRING, ARRAY = 6, 8, 9
_INTEGER_TYPES = (0, 1, 2, 3, 4, 5, 10, 11)
# Smallest encodings, to tell whether a count can fit in the rest of the file at all.
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, a one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset

# Element dtypes of the unblocked tensor types (the rest are exposed as their block bytes).
_PLAIN_DTYPES = {
    GGMLQuantizationType.F32: "f4", GGMLQuantizationType.F16: "f2", GGMLQuantizationType.F64: "f8",
    GGMLQuantizationType.I8: "i1", GGMLQuantizationType.I16: "i2", GGMLQuantizationType.I32: "i4",
    GGMLQuantizationType.I64: "i8",
}


class StringArray:
    """A metadata array of strings, decoded only when asked (`tolist()`); `len()` is free."""

    __slots__ = ("_buf", "_start", "_count", "_len")

    def __init__(self, buf: mmap.mmap, start: int, count: int, length: struct.Struct) -> None:
        self._buf, self._start, self._count, self._len = buf, start, count, length

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"StringArray({self._count} strings at byte offset {self._start})"

    def tolist(self, limit: int | None = None) -> list[str]:
        """The strings (the first `limit` of them, when given)."""
        # One bytes slice and one decode per item: the header walk already checked every bound.
        buf, pos, unpack = self._buf, self._start, self._len.unpack_from
        count = self._count if limit is None else min(limit, self._count)
        out: list[str] = [""] * count
        for i in range(count):
            (n,) = unpack(buf, pos)
            pos += 8
            out[i] = buf[pos : pos + n].decode("utf-8")
            pos += n
        return out


@dataclass(slots=True)
class GGUFField:
    """One metadata entry. `value`: int/float/bool/str for scalars, a read-only numpy view for an
    array of numbers, a `StringArray` for an array of strings, a list for nested arrays."""

    name: str
    offset: int  # where the entry (its key) starts
    type: int  # GGUF value type id
    elem_type: int | None  # for arrays: the element type id
    value: Any


@dataclass(slots=True)
class GGUFTensor:
    """One tensor. `shape` lists GGUF dims, ne0 (innermost) first, like gguf's ReaderTensor;
    `data` is a read-only view of the file: typed [.., ne1, ne0] for F32/F16/F64/BF16 (BF16 as
    little-endian uint16) and the integer types, uint8 [.., ne1, row_bytes] for block types."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray  # uint64 [n_dims]
    n_elements: int
    n_bytes: int
    data_offset: int  # absolute byte offset of the data in the file
    data: np.ndarray


@dataclass(slots=True)
class GGUFContents:
    path: Path
    version: int
    byte_order: str  # "<" or ">"
    alignment: int
    data_offset: int  # where the (aligned) tensor data section starts
    fields: dict[str, GGUFField]
    tensors: dict[str, GGUFTensor]  # in file order


class _Cursor:
    """Bounds-checked reads from a GGUF file's bytes; every failure names the path and the byte
    offset where it happened."""

    def __init__(self, path: Path, buf: mmap.mmap, size: int) -> None:
        self.path, self.buf, self.size = path, buf, size
        self.pos = 0
        self.set_endian("<")

    def set_endian(self, endian: str) -> None:
        self.endian = endian
        self.u32, self.u64 = struct.Struct(endian + "I"), struct.Struct(endian + "Q")

    def fail(self, what: str, at: int | None = None) -> ValueError:
        return ValueError(f"{self.path}: corrupt GGUF at byte offset {self.pos if at is None else at}: {what}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise ValueError(
                f"{self.path}: GGUF file is cut short: {what} at byte offset {self.pos} needs {n} "
                f"bytes, but the file ends at byte {self.size}"
            )

    def uint32(self, what: str) -> int:
        self.need(4, what)
        (v,) = self.u32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def uint64(self, what: str) -> int:
        self.need(8, what)
        (v,) = self.u64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def scalar(self, code: str, what: str) -> Any:
        n = struct.calcsize(code)
        self.need(n, what)
        (v,) = struct.unpack_from(self.endian + code, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.uint64(f"length of {what}")
        self.need(n, what)
        raw = self.buf[self.pos : self.pos + n]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not valid UTF-8 ({e.reason})", self.pos + e.start) from None
        self.pos += n
        return text

    def skip_strings(self, count: int, what: str) -> None:
        """Step over `count` strings (the hot loop of a vocabulary: no per-item objects)."""
        buf, size, pos, unpack = self.buf, self.size, self.pos, self.u64.unpack_from
        for i in range(count):
            if size - pos < 8:
                self.pos = pos
                self.need(8, f"length of {what}[{i}]")
            (n,) = unpack(buf, pos)
            pos += 8
            if n > size - pos:
                self.pos = pos
                self.need(n, f"{what}[{i}]")
            pos += n
        self.pos = pos

    def value(self, vtype: int, what: str, base: np.ndarray, depth: int = 0) -> tuple[Any, int | None]:
        """Read one metadata value; returns it and, for arrays, the element type."""
        code = _SCALAR_CODES.get(vtype)
        if code is not None:
            return self.scalar(code, what), None
        if vtype == STRING:
            return self.string(what), None
        if vtype != ARRAY or depth >= _MAX_ARRAY_DEPTH:
            raise self.fail(f"{what} has unknown value type {vtype}", self.pos - 4)
        at = self.pos
        etype = self.uint32(f"element type of {what}")
        count = self.uint64(f"length of {what}")
        code = _SCALAR_CODES.get(etype)
        if code is not None:
            dtype = np.dtype(self.endian + code)
            if count > (self.size - self.pos) // dtype.itemsize:
                self.need(count * dtype.itemsize, f"{count} elements of {what}")
            start, self.pos = self.pos, self.pos + count * dtype.itemsize
            return base[start : self.pos].view(dtype), etype
        if etype not in (STRING, ARRAY):
            raise self.fail(f"{what} has unknown element type {etype}", at)
        if count > (self.size - self.pos) // 8:  # each element starts with 8 bytes
            raise self.fail(f"{what} claims {count} elements, more than the rest of the file "
                            "can hold (cut short, or a corrupt count)", at)
        if etype == STRING:
            start = self.pos
            self.skip_strings(count, what)
            return StringArray(self.buf, start, count, self.u64), etype
        # Arrays of arrays (no real file has them) become plain nested lists.
        items = []
        for i in range(count):
            inner, _ = self.value(ARRAY, f"{what}[{i}]", base, depth + 1)
            items.append(inner if isinstance(inner, list) else inner.tolist())
        return items, etype


def read_gguf(path: str | Path, supported_types: Collection[str] | None = None) -> GGUFContents:
    """Parse a GGUF file's header and map its tensors. `supported_types` (GGML type names) limits
    the tensor types accepted; any other (or an unknown type id) is refused naming the tensor."""
    path = Path(path)
    size = path.stat().st_size
    if size < 24:
        with open(path, "rb") as f:
            head = f.read(4)
        if len(head) == 4 and head != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file (starts with {head!r}, not b'GGUF')")
        raise ValueError(
            f"{path}: GGUF file is cut short: the 24-byte header at byte offset 0 needs 24 bytes, "
            f"but the file ends at byte {size}"
        )
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _walk(_Cursor(path, buf, size), supported_types)
    except BaseException:
        try:
            buf.close()
        except BufferError:  # a view made before the failure still holds it; the GC closes it
            pass
        raise


def _walk(c: _Cursor, supported_types: Collection[str] | None) -> GGUFContents:
    magic = c.buf[0:4]
    if magic != GGUF_MAGIC:
        raise ValueError(f"{c.path} is not a GGUF file (starts with {magic!r}, not b'GGUF')")
    c.pos = 4
    version = c.uint32("version")
    swapped = struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in SUPPORTED_VERSIONS and swapped in SUPPORTED_VERSIONS:
        c.set_endian(">")  # a big-endian file
        version = swapped
    if version not in SUPPORTED_VERSIONS:
        raise c.fail(f"GGUF version {version} is not supported (supported: 2, 3)", 4)
    n_tensors = c.uint64("tensor count")
    n_kv = c.uint64("metadata count")
    rest = c.size - c.pos
    if n_kv > rest // _MIN_KV_BYTES or n_tensors > rest // _MIN_TENSOR_INFO_BYTES or (
        n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > rest
    ):
        raise c.fail(
            f"{n_tensors} tensors and {n_kv} metadata entries (header counts at byte offsets 8 and "
            f"16) cannot fit in a file of {c.size} bytes (cut short, or a corrupt header)", 8
        )

    base = np.frombuffer(c.buf, dtype=np.uint8)  # every view below is a slice of this one map
    fields: dict[str, GGUFField] = {}
    alignment = DEFAULT_ALIGNMENT
    for i in range(n_kv):
        at = c.pos
        key = c.string(f"key of metadata entry {i}")
        if key in fields:
            raise c.fail(f"duplicate metadata key {key!r} (first at byte offset {fields[key].offset})", at)
        vtype = c.uint32(f"value type of {key!r}")
        value, etype = c.value(vtype, f"metadata {key!r}", base)
        if key == "general.alignment":
            if vtype not in _INTEGER_TYPES or value <= 0 or value & (value - 1):
                raise c.fail(f"general.alignment must be a power of two (got {value!r})", at)
            alignment = value
        fields[key] = GGUFField(key, at, vtype, etype, value)

    allowed = supported_types if supported_types is not None else [t.name for t in GGML_QUANT_SIZES]
    infos: list[tuple[int, str, list[int], GGMLQuantizationType, int]] = []
    names: set[str] = set()
    for i in range(n_tensors):
        at = c.pos
        name = c.string(f"name of tensor {i}")
        if name in names:
            raise c.fail(f"duplicate tensor name {name!r}", at)
        names.add(name)
        n_dims = c.uint32(f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise c.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)", c.pos - 4)
        dims = [c.uint64(f"shape of tensor {name!r}") for _ in range(n_dims)]
        type_id = c.uint32(f"type of tensor {name!r}")
        offset = c.uint64(f"data offset of tensor {name!r}")
        try:
            ggml_type = GGMLQuantizationType(type_id)
            type_name = ggml_type.name if ggml_type in GGML_QUANT_SIZES else f"unsized type {ggml_type.name}"
        except ValueError:
            type_name = f"unknown type id {type_id}"
        if type_name not in allowed:
            raise ValueError(
                f"{c.path}: tensor {name!r} has GGML type {type_name}, which kvserve does not "
                f"support; supported types: {', '.join(allowed)}"
            )
        block, _ = GGML_QUANT_SIZES[ggml_type]
        if dims[0] % block:
            raise c.fail(f"tensor {name!r} rows of {dims[0]} values are not whole {block}-value "
                         f"{type_name} blocks", at)
        infos.append((at, name, dims, ggml_type, offset))

    data_offset = -(-c.pos // alignment) * alignment
    tensors: dict[str, GGUFTensor] = {}
    for at, name, dims, ggml_type, offset in infos:
        block, block_bytes = GGML_QUANT_SIZES[ggml_type]
        n_elements = math.prod(dims)
        n_bytes = n_elements // block * block_bytes
        start = data_offset + offset
        if start + n_bytes > c.size:
            raise ValueError(
                f"{c.path}: tensor {name!r} data at byte offsets {start}..{start + n_bytes} lies past "
                f"the end of the file ({c.size} bytes): cut short, or a corrupt tensor offset"
            )
        raw = base[start : start + n_bytes]
        np_dims = [int(d) for d in reversed(dims)]  # numpy order: ne0 (innermost) last
        if ggml_type in _PLAIN_DTYPES:
            data = raw.view(np.dtype(c.endian + _PLAIN_DTYPES[ggml_type]))
        elif ggml_type == GGMLQuantizationType.BF16:
            # Writers hand BF16 over as raw bytes, which no writer byte-swaps.
            data = raw.view(np.dtype("<u2"))
        else:
            np_dims[-1] = np_dims[-1] // block * block_bytes
            data = raw
        tensors[name] = GGUFTensor(
            name, ggml_type, np.array(dims, dtype=np.uint64), n_elements, n_bytes, start,
            data.reshape(np_dims),
        )
    return GGUFContents(c.path, version, c.endian, alignment, data_offset, fields, tensors)
