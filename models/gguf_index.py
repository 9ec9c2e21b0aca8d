"""The tensor index of a GGUF file, read in milliseconds: names, types, shapes and data views.

``gguf.GGUFReader`` parses every metadata value into numpy views, the tokenizer's ~100k strings
included, which takes about 4 s for the embedded SmolLM2 on this machine's CPU: on every worker
start, before a single weight is read. Loading weights needs only the tensor infos and two
metadata values (``general.architecture``, ``general.alignment``), so this reader skips every
other value by its length and maps the tensor data straight from the file. Config and tokenizer
still come from transformers' own GGUF reader (models/gguf_metadata_cache.py caches those).

Format (GGUF v2 and v3, little-endian): magic ``GGUF``, version u32, tensor count u64, metadata
count u64; each metadata entry is a key string (u64 length + UTF-8), a value type u32 and the
value; then each tensor's name string, dimension count u32, dimensions u64 (innermost first),
GGML type u32 and data offset u64; the data starts at the next multiple of the alignment.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
_STRING, _ARRAY = 8, 9
# Byte size of each fixed-size metadata value type (GGUFValueType).
_FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_SCALARS = {4: "<I", 5: "<i", 10: "<Q", 11: "<q"}  # the integer types an alignment may use
_UNQUANTIZED = {
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32, GGMLQuantizationType.I64: np.int64,
}


class GGUFFormatError(ValueError):
    """The file is not GGUF, or is cut short or inconsistent."""


@dataclass(frozen=True, slots=True)
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # GGML order: innermost dimension first
    data: np.ndarray  # a read-only view of the mapped file, as gguf.quants.dequantize takes it


@dataclass(frozen=True, slots=True)
class GGUFIndex:
    architecture: str | None  # general.architecture
    tensors: list[GGUFTensor]


class _Cursor:
    def __init__(self, buffer: mmap.mmap) -> None:
        self.buffer, self.offset = buffer, 0

    def unpack(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        if self.offset + size > len(self.buffer):
            raise GGUFFormatError(f"cut short at byte {self.offset}")
        (value,) = struct.unpack_from(fmt, self.buffer, self.offset)
        self.offset += size
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        raw = self.buffer[self.offset : self.offset + length]
        if len(raw) != length:
            raise GGUFFormatError(f"a string at byte {self.offset} runs past the end")
        self.offset += length
        return raw.decode("utf-8", errors="replace")

    def skip_value(self, value_type: int) -> None:
        if value_type == _STRING:
            length = self.unpack("<Q")  # first: `offset += unpack()` would add to the offset before it
            self.offset += length
        elif value_type == _ARRAY:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            if item_type in _FIXED_SIZES:
                self.offset += count * _FIXED_SIZES[item_type]
            else:
                for _ in range(count):
                    self.skip_value(item_type)
        elif value_type in _FIXED_SIZES:
            self.offset += _FIXED_SIZES[value_type]
        else:
            raise GGUFFormatError(f"unknown metadata value type {value_type} at byte {self.offset}")


def read_gguf_index(path: Path) -> GGUFIndex:
    """The tensors of the GGUF file at ``path``; their data stays mapped while any view lives."""
    with open(path, "rb") as file:
        buffer = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    cursor = _Cursor(buffer)
    if buffer[:4] != MAGIC:
        raise GGUFFormatError(f"no GGUF magic (starts with {bytes(buffer[:4])!r})")
    cursor.offset = 4
    version, num_tensors, num_fields = cursor.unpack("<I"), cursor.unpack("<Q"), cursor.unpack("<Q")
    if version not in (2, 3):
        raise GGUFFormatError(f"GGUF version {version} (this reader knows 2 and 3)")
    architecture, alignment = None, DEFAULT_ALIGNMENT
    for _ in range(num_fields):
        key, value_type = cursor.string(), cursor.unpack("<I")
        if key == "general.architecture" and value_type == _STRING:
            architecture = cursor.string()
        elif key == "general.alignment" and value_type in _SCALARS:
            alignment = cursor.unpack(_SCALARS[value_type])
        else:
            cursor.skip_value(value_type)
    infos = []
    for _ in range(num_tensors):
        name, num_dims = cursor.string(), cursor.unpack("<I")
        shape = tuple(cursor.unpack("<Q") for _ in range(num_dims))
        infos.append((name, GGMLQuantizationType(cursor.unpack("<I")), shape, cursor.unpack("<Q")))
    data_start = -(-cursor.offset // alignment) * alignment
    data = np.frombuffer(buffer, dtype=np.uint8)
    return GGUFIndex(architecture, [_tensor(data, data_start, *info) for info in infos])


def _tensor(data: np.ndarray, data_start: int, name: str, tensor_type: GGMLQuantizationType,
            shape: tuple[int, ...], offset: int) -> GGUFTensor:
    """One tensor's data as GGUFReader shapes it: numbers in the HF shape, quantized as byte rows."""
    block_size, type_size = GGML_QUANT_SIZES[tensor_type]
    num_elements = int(np.prod(shape, dtype=np.int64))
    num_bytes = num_elements * type_size // block_size
    start = data_start + offset
    if start + num_bytes > len(data):
        raise GGUFFormatError(f"tensor {name!r} runs past the end of the file")
    raw = data[start : start + num_bytes]
    dims = tuple(reversed(shape))
    if tensor_type in _UNQUANTIZED:
        return GGUFTensor(name, tensor_type, shape, raw.view(_UNQUANTIZED[tensor_type]).reshape(dims))
    return GGUFTensor(name, tensor_type, shape, raw.reshape(quant_shape_to_byte_shape(dims, tensor_type)))
