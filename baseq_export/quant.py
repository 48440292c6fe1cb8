"""Quantizer primitives: one source of truth for every integer number format in the project.

The codes, scales and zero points produced here are what the artifact stores, what the
exporters write and what the reference forward reads.
"""

from __future__ import annotations

import torch


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
