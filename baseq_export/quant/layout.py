"""Byte layouts: the one Python definition of every packed format that the artifact, the exporters and the C++ ops share.

Conventions (the C++ readers in runtime_ops/ follow them; tests/test_layout.py checks that they agree):

- int4 nibbles (pack_int4): two 4-bit codes per byte along the last dim, element 2i in the low nibble
  and element 2i + 1 in the high nibble; an odd count is padded with a zero nibble. The artifact's
  `qweight`, baseq.IntLinear's B input (runtime_ops/int_linear_pack.h) and the packed KV rows use it.
- MatMulNBits (matmul_nbits_bytes): com.microsoft.MatMulNBits' B is uint8 [N, K / block, block / 2], each
  row nibble-packed as above and split into blocks; its zero_points are uint8 [N, ceil(blocks / 2)], the
  [N, blocks] zero points nibble-packed the same way (an odd block count padded with 0).
- GGUF Q4_0 / Q4_1 (ggml_q4_blocks): per block of GGML_BLOCK = 32 weights, fp16 d (little endian),
  fp16 m (Q4_1 only), then 16 bytes; byte j holds element j in its low nibble and element j + 16 in its
  high nibble (not the even/odd pairs of pack_int4, which the artifact keeps).
- Packed KV-cache row (pack_kv_rows): one token of one head, head_dim / 2 bytes of codes nibble-packed
  as pack_int4, then the float32 scale and the float32 zero point as raw little-endian bytes, so
  packed_kv_row_width(head_dim) = head_dim // 2 + KV_ROW_TAIL (runtime_ops/kv_rows.h, PackedRowWidth); the row
  stands for (code - zero) * scale in float32.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .weights import QuantizedWeight

GGML_BLOCK = 32
"""Weights per block of llama.cpp's Q4_0 / Q4_1: the group size of the q4_0 and q4_1 grids."""

_FLOAT32_BYTES = 4

KV_ROW_TAIL = 2 * _FLOAT32_BYTES
"""Bytes after a packed KV row's codes: its float32 scale, then its float32 zero point."""


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes in [0, 15] along the last dim, two per byte, low nibble = even element.

    This is the byte layout of onnxruntime's MatMulNBits B input; an odd last dim is padded
    with a zero nibble.
    """
    if codes.dtype != torch.uint8:
        raise TypeError(f"pack_int4 expects uint8 codes, got {codes.dtype}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError("pack_int4: codes must lie in [0, 15]")
    k = codes.shape[-1]
    if k % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    low = codes[..., 0::2]
    high = codes[..., 1::2]
    return (low | (high << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of pack_int4: uint8 [..., ceil(k/2)] -> uint8 codes [..., k]."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 expects uint8, got {packed.dtype}")
    if packed.shape[-1] != (k + 1) // 2:
        raise ValueError(f"unpack_int4: last dim {packed.shape[-1]} does not hold {k} codes")
    low = packed & 0x0F
    high = packed >> 4
    out = torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], -1)
    return out[..., :k].contiguous()


def matmul_nbits_bytes(codes: torch.Tensor, zero: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B uint8 [N, K/block, block/2], zero_points uint8 [N, ceil(G/2)]) of MatMulNBits for codes [N, K], zero [N, G]."""
    n, k = codes.shape
    if block <= 0 or block % 2 or k % block:
        raise ValueError(f"matmul_nbits_bytes: K={k} is not a whole number of even blocks of {block}")
    return pack_int4(codes).reshape(n, k // block, block // 2), pack_int4(zero)


def _little_endian_bytes(t: torch.Tensor, dtype: torch.dtype, who: str) -> torch.Tensor:
    """t cast to dtype, its raw bytes as uint8 [..., itemsize] (every stored format here is little endian)."""
    if sys.byteorder != "little":
        raise RuntimeError(f"{who}: the stored byte layouts are little endian; big-endian hosts are not supported")
    return t.to(dtype).contiguous().view(torch.uint8)


def ggml_q4_blocks(qw: QuantizedWeight) -> torch.Tensor:
    """llama.cpp's block bytes of a q4_0 / q4_1 weight: uint8 [N, K/32, 18 or 20] (see the conventions).

    Each block: fp16 d (little endian), fp16 m (q4_1 only), then 16 bytes, byte j = code j | code (j+16) << 4.
    """
    if qw.grid not in ("q4_0", "q4_1"):
        raise ValueError(f"ggml_q4_blocks: a {qw.grid} grid weight has no llama.cpp Q4 block form")
    n, k = qw.shape
    half = GGML_BLOCK // 2
    codes = qw.codes.reshape(n, k // GGML_BLOCK, GGML_BLOCK)
    qs = codes[..., :half] | (codes[..., half:] << 4)
    parts = [qw.scale] + ([qw.minimum] if qw.grid == "q4_1" else [])
    halves = [_little_endian_bytes(p, torch.float16, "ggml_q4_blocks").reshape(n, k // GGML_BLOCK, 2) for p in parts]
    return torch.cat(halves + [qs], dim=-1).contiguous()


def packed_kv_row_width(head_dim: int) -> int:
    """Bytes of one packed KV-cache row: head_dim / 2 of codes, then the scale and zero point."""
    return head_dim // 2 + KV_ROW_TAIL


def pack_kv_rows(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Packed KV rows uint8 [..., packed_kv_row_width(hd)] of 4-bit codes [..., hd] and float32 scale / zero [..., 1]."""
    hd = codes.shape[-1]
    if hd % 2:
        raise ValueError(f"pack_kv_rows: head_dim {hd} must be even")
    tail = [_little_endian_bytes(p.expand(*codes.shape[:-1], 1), torch.float32, "pack_kv_rows").reshape(
        *codes.shape[:-1], _FLOAT32_BYTES) for p in (scale, zero)]
    return torch.cat([pack_int4(codes)] + tail, dim=-1)


def unpack_kv_rows(packed: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 [..., hd], scale float32 [..., 1], zero float32 [..., 1]) of packed KV rows."""
    if packed.dtype != torch.uint8 or packed.shape[-1] != packed_kv_row_width(head_dim):
        raise ValueError(f"unpack_kv_rows: rows of {packed.shape[-1]} {packed.dtype} are not packed rows of "
                         f"head_dim {head_dim} ({packed_kv_row_width(head_dim)} uint8)")
    body = head_dim // 2
    codes = unpack_int4(packed[..., :body].contiguous(), head_dim)
    scale, zero = (packed[..., at:at + _FLOAT32_BYTES].contiguous().view(torch.float32)
                   for at in (body, body + _FLOAT32_BYTES))
    return codes, scale, zero


def dequantize_kv_rows(packed: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Float32 values [..., hd] of packed KV rows: (code - zero) * scale."""
    codes, scale, zero = unpack_kv_rows(packed, head_dim)
    return (codes.to(torch.float32) - zero) * scale
