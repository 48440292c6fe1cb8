"""ggml's weight blocks as a grid plus codes: ggml chooses the block scales, another algorithm (GPTQ) the codes.

A tensor is quantized by ggml's own quantizer (ggml_quantize, optionally with an importance matrix), decode()
reads its per-group parameters and integer codes as a BlockGrid, a different algorithm picks new codes on
exactly that grid, and encode() writes them back into the same bytes with every scale and min untouched.

Conventions (the byte layouts are ggml's block structs in ggml-common.h, as gguf-py's gguf/quants.py reads them):

- A quantized [N, K] tensor is uint8 [N, K / block * type_size] (gguf.GGML_QUANT_SIZES); K must be a multiple of
  the type's block (32, or 256 for Q4_K, Q5_K, Q6_K, IQ4_XS). All fp16 fields and multi-byte words are little endian.
- weight[n, k] = scale[n, k // group] * values[codes[n, k]] + offset[n, k // group], in float32 and in that
  order, which is the order gguf-py's dequantize computes, so decode(raw).dequantize() equals it exactly.
- group (weights sharing one scale and offset): 32 for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL and for the
  sub-blocks of Q4_K, Q5_K, IQ4_XS; 16 for Q6_K.
- values, sorted ascending, and codes index them: Q4_0 -8..7, Q5_0 -16..15, Q8_0 -128..127, Q6_K -32..31
  (the stored unsigned code minus the type's bias; for Q8_0 the stored int8 plus 128); Q4_1, Q4_K 0..15 and
  Q5_1, Q5_K 0..31 (the stored code); IQ4_NL, IQ4_XS ggml's 16 non-uniform kvalues.
- offset: the min for Q4_1 / Q5_1 (m), -dmin * m for Q4_K / Q5_K (ggml subtracts it, and a - b == a + -b);
  -0.0 for symmetric types: the float additive identity (x + -0.0 is x bit for bit, where + 0.0 turns -0.0 into 0.0),
  so dequantize() matches gguf-py to the bit for every type.
- scale: d for the 32-blocks; d * sc from the 6-bit packed scales for Q4_K / Q5_K, d * int8 scale for Q6_K,
  d * (6-bit scale - 32) for IQ4_XS, each a float32 product as ggml computes it.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

__all__ = ["BlockGrid", "CODEC_TYPES", "decode", "encode", "ggml_quantize"]

QT = gguf.GGMLQuantizationType

_IQ4_KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # ggml's kvalues_iq4nl


@dataclass(frozen=True)
class BlockGrid:
    """Grid of a ggml [N, K] tensor: w[n, k] = scale[n, k // group] * values[codes[n, k]] + offset[n, k // group]."""

    codes: np.ndarray  # uint8 [N, K], index into values
    scale: np.ndarray  # float32 [N, K // group]
    offset: np.ndarray  # float32 [N, K // group] (-0.0 for symmetric types)
    values: np.ndarray  # float32 [n_levels], sorted ascending
    group: int  # weights sharing one (scale, offset)

    def dequantize(self) -> np.ndarray:
        """The float32 [N, K] weights the grid and codes stand for (what llama.cpp computes with)."""
        n, k = self.codes.shape
        w = self.values[self.codes].reshape(n, k // self.group, self.group)
        return (self.scale[:, :, None] * w + self.offset[:, :, None]).reshape(n, k)


# ---------------------------------------------------------------------------------------------
# Bit fields


def _unpack(data: np.ndarray, bits: int, run: int) -> np.ndarray:
    """The `bits`-wide fields of data [nb, bytes], low field first: field s of byte r * run + j is element
    (r * 8 // bits + s) * run + j, i.e. each run of bytes holds 8 // bits runs of consecutive elements."""
    (nb, size), per_byte = data.shape, 8 // bits
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    fields = (data.reshape(nb, size // run, run, 1) >> shifts) & np.uint8((1 << bits) - 1)  # [nb, rows, run, field]
    return fields.swapaxes(-1, -2).reshape(nb, size * per_byte)


def _pack(elements: np.ndarray, bits: int, run: int) -> np.ndarray:
    """The bytes [nb, bytes] that _unpack(bytes, bits, run) reads as elements [nb, n] (each below 2**bits)."""
    (nb, count), per_byte = elements.shape, 8 // bits
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    fields = elements.reshape(nb, count // (per_byte * run), per_byte, run).swapaxes(-1, -2)  # [nb, rows, run, field]
    return np.bitwise_or.reduce(fields << shifts, axis=-1).reshape(nb, count // per_byte)


@dataclass(frozen=True)
class _Plane:
    """Some bits of every code of a block: bits [shift, shift + bits) of the codes, stored from byte `at` of the
    block as _pack(codes >> shift & mask, bits, run) over `size` bytes."""

    at: int
    size: int
    bits: int
    run: int
    shift: int = 0


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 field at byte `at` of every block, as float32 [nb, 1]."""
    return np.ascontiguousarray(blocks[:, at:at + 2]).view(np.float16).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Per-type parameters: blocks [nb, type_size] -> (scale, offset) float32 [nb, block // group]


def _symmetric(scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scale and a zero offset: -0.0, which adds to any float without changing a bit (+0.0 would flip -0.0)."""
    return scale, np.full_like(scale, -0.0)


def _d(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0, Q5_0, Q8_0, IQ4_NL: fp16 d first."""
    return _symmetric(_f16(blocks, 0))


def _d_m(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_1, Q5_1: fp16 d, then fp16 m."""
    return _f16(blocks, 0), _f16(blocks, 2)


def _k_scale_min(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K, Q5_K: fp16 d, fp16 dmin, then 12 bytes of eight 6-bit scales sc and mins m (ggml's
    get_scale_min_k4): bytes 0-3 hold sc[0:4] and 4-7 hold m[0:4] in their low 6 bits; sc[4:8] and m[4:8] have
    their low 4 bits in the low / high nibble of bytes 8-11 and their top 2 bits in the top bits of bytes 0-3 / 4-7."""
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    s_lo, m_lo, mix = blocks[:, 4:8], blocks[:, 8:12], blocks[:, 12:16]
    sc = np.concatenate([s_lo & 63, (mix & 15) | (s_lo >> 6 << 4)], axis=1)
    m = np.concatenate([m_lo & 63, (mix >> 4) | (m_lo >> 6 << 4)], axis=1)
    return d * sc.astype(np.float32), -(dmin * m.astype(np.float32))


def _q6_k_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q6_K: 16 int8 scales at bytes 192-207, fp16 d at 208."""
    return _symmetric(_f16(blocks, 208) * blocks[:, 192:208].view(np.int8).astype(np.float32))


def _iq4_xs_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IQ4_XS: fp16 d, uint16 scales_h (2 high bits of scale j at bits 2j), 4 bytes scales_l (4 low bits of
    scale j in nibble j % 2 of byte j // 2); the 6-bit scales are stored plus 32."""
    low, high = _unpack(blocks[:, 4:8], 4, 1), _unpack(blocks[:, 2:4], 2, 1)
    ls = (low | high << 4).astype(np.int32) - 32
    return _symmetric(_f16(blocks, 0) * ls.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class _Codec:
    """One ggml type: its group, its values, how to read its parameters and where its codes lie."""

    group: int
    values: np.ndarray
    params: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    planes: tuple[_Plane, ...]
    flip: int = 0  # codes are the stored bits XOR flip (Q8_0: int8 + 128 = byte ^ 0x80)


def _levels(lo: int, hi: int) -> np.ndarray:
    return np.arange(lo, hi + 1, dtype=np.float32)


_IQ4 = np.array(_IQ4_KVALUES, dtype=np.float32)
# Nibble planes: 32-blocks keep element j in the low and j + 16 in the high nibble of byte j (run 16); Q4_K / Q5_K
# do the same per 64 weights (run 32) and Q6_K's ql per 128 weights (run 64). High bits: Q5_0 / Q5_1 qh is a
# little-endian uint32, bit j for element j (run 1); Q5_K qh byte j bit i is element 32i + j (run 32); Q6_K qh,
# per 128 weights, byte j bits 2s..2s+1 are element 32s + j (run 32).
_CODECS: dict[QT, _Codec] = {
    QT.Q4_0: _Codec(32, _levels(-8, 7), _d, (_Plane(2, 16, 4, 16),)),
    QT.Q4_1: _Codec(32, _levels(0, 15), _d_m, (_Plane(4, 16, 4, 16),)),
    QT.Q5_0: _Codec(32, _levels(-16, 15), _d, (_Plane(6, 16, 4, 16), _Plane(2, 4, 1, 1, shift=4))),
    QT.Q5_1: _Codec(32, _levels(0, 31), _d_m, (_Plane(8, 16, 4, 16), _Plane(4, 4, 1, 1, shift=4))),
    QT.Q8_0: _Codec(32, _levels(-128, 127), _d, (_Plane(2, 32, 8, 1),), flip=0x80),
    QT.Q4_K: _Codec(32, _levels(0, 15), _k_scale_min, (_Plane(16, 128, 4, 32),)),
    QT.Q5_K: _Codec(32, _levels(0, 31), _k_scale_min, (_Plane(48, 128, 4, 32), _Plane(16, 32, 1, 32, shift=4))),
    QT.Q6_K: _Codec(16, _levels(-32, 31), _q6_k_scales, (_Plane(0, 128, 4, 64), _Plane(128, 64, 2, 32, shift=4))),
    QT.IQ4_NL: _Codec(32, _IQ4, _d, (_Plane(2, 16, 4, 16),)),
    QT.IQ4_XS: _Codec(32, _IQ4, _iq4_xs_scales, (_Plane(8, 128, 4, 16),)),
}
CODEC_TYPES: tuple[QT, ...] = tuple(_CODECS)


def _codec(qtype: QT | int, k: int) -> tuple[QT, _Codec, int, int]:
    """The type, its codec, block size and block bytes; refuses types it does not know and K off its blocks."""
    qtype = QT(qtype)
    if qtype not in _CODECS:
        raise ValueError(f"ggml_codecs: {qtype.name} is not one of {', '.join(t.name for t in CODEC_TYPES)}")
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if k <= 0 or k % block:
        raise ValueError(f"{qtype.name}: rows of K={k} weights do not split into its blocks of {block}")
    return qtype, _CODECS[qtype], block, type_size


def _blocks(raw: np.ndarray, qtype: QT, k: int, block: int, type_size: int) -> np.ndarray:
    """raw uint8 [N, row bytes] as its blocks [N * K / block, type_size] (a view where raw is contiguous)."""
    row_bytes = k // block * type_size
    if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] != row_bytes:
        raise ValueError(f"{qtype.name}: expected uint8 [N, {row_bytes}] for rows of K={k}, got {raw.dtype} "
                         f"{list(raw.shape)}")
    return raw.reshape(raw.shape[0] * (k // block), type_size)


# ---------------------------------------------------------------------------------------------
# API


@lru_cache(maxsize=1)
def _ggml_lib() -> ctypes.CDLL:
    """ggml's base library as llama-cpp-python ships it (its quantizers cover types gguf-py cannot make)."""
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    return lib


def ggml_quantize(w: np.ndarray, qtype: QT | int, imatrix: np.ndarray | None = None) -> np.ndarray:
    """ggml's own quantizer of a float32 [N, K] matrix, with an optional importance matrix of K floats; returns
    uint8 [N, bytes per row] (ggml_quantize_chunk of llama-cpp-python's libggml-base.so: ggml picks the scales)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"ggml_quantize: expected a [N, K] matrix, got shape {list(w.shape)}")
    n, k = w.shape
    qtype, _, block, type_size = _codec(qtype, k)
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (k,):
            raise ValueError(f"ggml_quantize: the importance matrix must hold K={k} floats, got {list(imatrix.shape)}")
    out = np.empty((n, k // block * type_size), np.uint8)
    lib = _ggml_lib()
    lib.ggml_quantize_init(int(qtype))
    written = lib.ggml_quantize_chunk(int(qtype), w.ctypes.data, out.ctypes.data, 0, n, k,
                                      None if imatrix is None else imatrix.ctypes.data)
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes of {qtype.name}, expected {out.nbytes}")
    return out


def decode(raw: np.ndarray, qtype: QT | int, k: int) -> BlockGrid:
    """The grid and codes of ggml block bytes uint8 [N, row bytes] holding rows of k weights."""
    qtype, codec, block, type_size = _codec(qtype, k)
    blocks = _blocks(raw, qtype, k, block, type_size)
    n, groups = raw.shape[0], k // codec.group
    codes = np.zeros((blocks.shape[0], block), np.uint8)
    for p in codec.planes:
        codes |= _unpack(blocks[:, p.at:p.at + p.size], p.bits, p.run) << np.uint8(p.shift)
    scale, offset = codec.params(blocks)
    return BlockGrid(codes=(codes ^ np.uint8(codec.flip)).reshape(n, k),
                     scale=scale.astype(np.float32).reshape(n, groups),
                     offset=offset.astype(np.float32).reshape(n, groups),
                     values=codec.values.copy(), group=codec.group)


def encode(raw: np.ndarray, qtype: QT | int, codes: np.ndarray) -> np.ndarray:
    """raw with its codes replaced by `codes` (uint8 [N, K], indexes into the type's values); scales, mins and
    every other byte untouched, so the new codes lie on exactly the grid ggml chose."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"encode: expected codes [N, K], got shape {list(codes.shape)}")
    n, k = codes.shape
    qtype, codec, block, type_size = _codec(qtype, k)
    _blocks(raw, qtype, k, block, type_size)
    if raw.shape[0] != n:
        raise ValueError(f"{qtype.name}: {raw.shape[0]} rows of bytes but {n} rows of codes")
    if codes.size and (codes.min() < 0 or codes.max() >= len(codec.values)):
        raise ValueError(f"{qtype.name}: codes must lie in [0, {len(codec.values)}), got [{codes.min()}, "
                         f"{codes.max()}]")
    stored = codes.astype(np.uint8).reshape(n * (k // block), block) ^ np.uint8(codec.flip)
    out = np.array(raw, order="C")
    blocks = _blocks(out, qtype, k, block, type_size)  # a view: writing it writes out
    for p in codec.planes:
        bits = (stored >> np.uint8(p.shift)) & np.uint8((1 << p.bits) - 1)
        blocks[:, p.at:p.at + p.size] = _pack(bits, p.bits, p.run)
    return out
