"""Float arithmetic the number formats rely on: fp16-representable parameters and IEEE division by a constant."""

from __future__ import annotations

import torch

FP16_TINY = 2.0**-24
"""Smallest positive fp16 value (subnormal); the floor for every weight scale."""

FP16_MAX = 65504.0
"""Largest finite fp16 value; the ceiling for every weight scale."""


def true_div(a: torch.Tensor, c: float) -> torch.Tensor:
    """a / c as an IEEE division on every device (CUDA turns a / python_scalar into a * (1/c))."""
    return a / torch.tensor(c, dtype=a.dtype, device=a.device)


def fp16_ceil(s: torch.Tensor) -> torch.Tensor:
    """Round float32 scales UP to fp16 values in [2**-24, 65504]: storable as fp16, still cover the range."""
    s = s.to(torch.float32).clamp(min=FP16_TINY, max=FP16_MAX)
    h = s.to(torch.float16)
    up = (h.view(torch.int16) + 1).view(torch.float16)  # next fp16 above a positive finite h
    return torch.where(h.to(torch.float32) < s, up, h).to(torch.float32)


def fp16_floor(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values DOWN to fp16 values in [-65504, 65504] (a q4_1 minimum that stays below the block)."""
    x = x.to(torch.float32).clamp(min=-FP16_MAX, max=FP16_MAX)
    h = x.to(torch.float16)
    down = torch.nextafter(h, torch.full_like(h, -float("inf")))
    return torch.where(h.to(torch.float32) > x, down, h).to(torch.float32)


def fp16_round(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to the nearest fp16 value, clamped to [-65504, 65504] (searched / learned d and m)."""
    return x.to(torch.float32).clamp(min=-FP16_MAX, max=FP16_MAX).to(torch.float16).to(torch.float32)
