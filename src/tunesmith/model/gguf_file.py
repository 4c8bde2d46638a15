"""Read a GGUF file: its metadata as plain Python values and its tensors dequantized to float32.

Layout (little-endian, versions 2 and 3):
    "GGUF" · u32 version · u64 tensor_count · u64 kv_count
    kv_count    x (string key, u32 value_type, value)
    tensor_count x (string name, u32 n_dims, n_dims x u64 ne, u32 ggml_type, u64 offset)
    zero padding to `general.alignment` (default 32) · tensor data (each offset relative to here)
A string is u64 length + UTF-8 bytes; an array is u32 item type + u64 count + items. `ne` lists dimensions
innermost first, so a (rows, cols) matrix is stored as ne = [cols, rows].

Why not gguf.GGUFReader: it builds a numpy memmap view for every scalar and every string, which costs 4.5 s for
SmolLM2's 49k tokens + 48k merges on 2 CPU cores; struct over one mmap reads the same metadata in ~0.1 s.
The types small chat models ship (F32/F16/BF16/Q8_0/Q4_0/Q4_1) are dequantized here, whole blocks at a time
(0.5 s for SmolLM2 against 1.6 s in gguf.quants, which splits every tensor into 16-row groups); every other type
goes through gguf.quants. Both give bit-identical floats (same fp32 ops in the same order; tests/test_model.py
compares them).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tunesmith.errors import UserError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF value types: 0..12 -> struct format of a scalar (8 = string and 9 = array are read separately).
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9

# ggml type ids dequantized here (gguf.constants.GGMLQuantizationType numbers them the same).
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # torch order, outermost first (ne reversed)
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int


class GGUFFile:
    """`metadata`: key -> int/float/bool/str or list of them; `tensors`: name -> GGUFTensor, in file order."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                # ACCESS_COPY: a private, writable mapping, so torch.from_numpy on views of it does not warn.
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
            raise UserError(f"{self.path}: cannot read this GGUF file ({e}).")
        try:
            self._parse()
        except (struct.error, IndexError, ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{self.path}: not a valid GGUF file, or truncated ({type(e).__name__}: {e}).")

    def _parse(self) -> None:
        mm = self._mm
        if mm[:4] != GGUF_MAGIC:
            raise UserError(f"{self.path}: not a GGUF file (it does not start with 'GGUF').")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
        if version & 0xFFFF == 0:
            raise UserError(f"{self.path}: a big-endian GGUF file; tunesmith reads little-endian GGUF only.")
        if version not in (2, 3):
            raise UserError(f"{self.path}: GGUF version {version} is not supported (versions 2 and 3 are).")
        self.version = version
        self._off = 24
        self.metadata: dict = {}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = struct.unpack_from("<I", mm, self._off)
            self._off += 4
            self.metadata[key] = self._value(vtype)
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = struct.unpack_from("<I", mm, self._off)
            ne = struct.unpack_from(f"<{n_dims}Q", mm, self._off + 4)
            ggml_type, offset = struct.unpack_from("<IQ", mm, self._off + 4 + 8 * n_dims)
            self._off += 4 + 8 * n_dims + 12
            infos.append((name, ne, ggml_type, offset))
        align = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = -(-self._off // align) * align
        self.tensors: dict[str, GGUFTensor] = {}
        for name, ne, ggml_type, offset in infos:
            t = GGUFTensor(name, tuple(int(d) for d in reversed(ne)), ggml_type, data_start + offset,
                           _nbytes(ne, ggml_type))
            if t.offset + t.nbytes > len(mm):
                raise UserError(f"{self.path}: tensor '{name}' ends past the end of the file; the file is "
                                f"truncated (re-download or re-export it).")
            self.tensors[name] = t

    def _string(self) -> str:
        (n,) = struct.unpack_from("<Q", self._mm, self._off)
        start = self._off + 8
        self._off = start + n
        if self._off > len(self._mm):
            raise ValueError("string runs past the end of the file")
        return self._mm[start : self._off].decode("utf-8", errors="replace")

    def _value(self, vtype: int):
        mm = self._mm
        if vtype == _STRING:
            return self._string()
        if vtype in _SCALAR:
            fmt = _SCALAR[vtype]
            (v,) = struct.unpack_from(fmt, mm, self._off)
            self._off += struct.calcsize(fmt)
            return v
        if vtype == _ARRAY:
            itype, count = struct.unpack_from("<IQ", mm, self._off)
            self._off += 12
            if itype == _STRING:  # the hot loop: 49k tokens + 48k merges in SmolLM2
                out = []
                off = self._off
                unpack = struct.Struct("<Q").unpack_from
                for _ in range(count):
                    (n,) = unpack(mm, off)
                    out.append(mm[off + 8 : off + 8 + n].decode("utf-8", errors="replace"))
                    off += 8 + n
                if off > len(mm):
                    raise ValueError("a string array runs past the end of the file")
                self._off = off
                return out
            if itype in _NUMPY:
                arr = np.frombuffer(mm, dtype=_NUMPY[itype], count=count, offset=self._off)
                self._off += arr.nbytes
                return arr.tolist()
            return [self._value(itype) for _ in range(count)]  # arrays of arrays
        raise ValueError(f"unknown GGUF value type {vtype}")

    def read(self, name: str) -> torch.Tensor:
        """The tensor dequantized to a new float32 tensor of shape `tensors[name].shape`."""
        t = self.tensors[name]
        raw = np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)
        try:
            return dequantize(raw, t.ggml_type, t.shape)
        except NotImplementedError as e:
            raise UserError(f"{self.path}: tensor '{name}' is stored as {e}, which tunesmith cannot dequantize; "
                            f"use an F16/BF16/Q8_0/Q4_0/Q4_1/K-quant GGUF file.")


def _nbytes(ne, ggml_type: int) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise ValueError(f"unknown ggml tensor type {ggml_type}")
    n = int(np.prod(ne, dtype=np.int64)) if ne else 1
    return n // block * size


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """raw: the tensor's bytes (uint8, 1-D) -> a new float32 tensor of `shape` (never a view of the file).

    NotImplementedError(type name) for a type neither this module nor gguf.quants can dequantize."""
    n = int(np.prod(shape, dtype=np.int64))
    if ggml_type in (F32, F16, BF16):
        src = torch.from_numpy(raw).view({F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16}[ggml_type])
        return torch.from_numpy(np.empty(n, dtype=np.float32)).copy_(src).reshape(shape)
    if ggml_type in _BLOCK_BYTES:
        blocks = raw.reshape(-1, _BLOCK_BYTES[ggml_type])  # (n_blocks, bytes per block of 32 values)
        out = np.empty((blocks.shape[0], 32), dtype=np.float32)
        # numpy, 16k blocks (2 MB of fp32) per step: single-threaded and cache-sized. torch's two-thread
        # elementwise ops took 12 s here for SmolLM2 when another process kept the 2 cores busy (0.5 s this way).
        for i in range(0, blocks.shape[0], 1 << 14):
            _DEQUANT[ggml_type](blocks[i : i + (1 << 14)], out[i : i + (1 << 14)])
        return torch.from_numpy(out).reshape(shape)
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType(ggml_type)  # a valid id: GGUFFile checked it when sizing the tensor
    try:
        deq = quants.dequantize(raw, qtype)
    except NotImplementedError:
        raise NotImplementedError(qtype.name)
    return torch.from_numpy(np.array(deq, dtype=np.float32)).reshape(shape)


def _f16(two_bytes: np.ndarray) -> np.ndarray:
    """(n_blocks, 2) uint8 -> (n_blocks, 1) float32 from the little-endian float16 they hold."""
    return two_bytes.copy().view(np.float16).astype(np.float32)


def _q8_0(b: np.ndarray, out: np.ndarray) -> None:
    """Block: f16 scale d, 32 x int8 q;  x = q * d."""
    np.multiply(b[:, 2:].view(np.int8), _f16(b[:, :2]), out=out)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) bytes -> (n, 32) uint8 values: low nibbles are x[0:16], high nibbles x[16:32] (ggml's Q4 layout).
    Kept in uint8 so the cast to float happens inside the multiply (casting into a float slice is 30% slower)."""
    q = np.empty((qs.shape[0], 32), dtype=np.uint8)
    np.bitwise_and(qs, 0x0F, out=q[:, :16])
    np.right_shift(qs, 4, out=q[:, 16:])
    return q


def _q4_0(b: np.ndarray, out: np.ndarray) -> None:
    """Block: f16 d, 16 bytes of nibbles;  x = (q - 8) * d."""
    q = _nibbles(b[:, 2:]).view(np.int8)
    q -= 8
    np.multiply(q, _f16(b[:, :2]), out=out)


def _q4_1(b: np.ndarray, out: np.ndarray) -> None:
    """Block: f16 d, f16 min m, 16 bytes of nibbles;  x = q * d + m."""
    np.multiply(_nibbles(b[:, 4:]), _f16(b[:, :2]), out=out)
    out += _f16(b[:, 2:4])


_BLOCK_BYTES = {Q8_0: 34, Q4_0: 18, Q4_1: 20}
_DEQUANT = {Q8_0: _q8_0, Q4_0: _q4_0, Q4_1: _q4_1}
