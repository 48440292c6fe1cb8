"""Activation and KV-cache quantizers: per-token asymmetric fake quant (with a learnable clip and shift), its
integer form, the int8 blocks of onnxruntime's accuracy-level-4 kernels, and the per-head KV quantizer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .floats import true_div

ACT_SCALE_EPS = 1e-8
"""Floor of the per-token activation scale, so constant tokens quantize to themselves."""


def _round_ste(v: torch.Tensor) -> torch.Tensor:
    """round half to even in the forward, identity gradient (value identical to torch.round)."""
    return v + (torch.round(v) - v).detach()


def per_token_qparams(
    x: torch.Tensor, bits: int, clip: float | torch.Tensor = 1.0, ste: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 (scale, zero) [..., 1] of fake_quant_per_token's per-token quantizer (zero not clamped)."""
    qmax = 2**bits - 1
    xf = x.to(torch.float32)
    xmin = xf.amin(dim=-1, keepdim=True)
    xmax = xf.amax(dim=-1, keepdim=True)
    if isinstance(clip, torch.Tensor):
        clip = clip.to(device=xf.device, dtype=torch.float32)
    rng = xmax - xmin
    scale = true_div(rng * clip, float(qmax)).clamp(min=ACT_SCALE_EPS)
    lo = (xmax + xmin) * 0.5 - (rng * 0.5) * clip
    rnd = _round_ste if ste else torch.round
    zero = rnd(-lo / scale)
    return scale, zero


def fake_quant_per_token(
    x: torch.Tensor,
    bits: int | None,
    clip: float | torch.Tensor = 1.0,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """Asymmetric per-token (last dim) fake quant with a learnable clip and straight-through rounding.

    Exact recipe (float32, IEEE ops, round = half to even; reductions over the last dim):
        x'    = x - shift                                  (if shift is given)
        xmin  = min(x'),  xmax = max(x'),  r = xmax - xmin  (0 is NOT forced into the range)
        scale = max((r * clip) / qmax, 1e-8)               qmax = 2**bits - 1, true division
        lo    = (xmax + xmin) * 0.5 - (r * 0.5) * clip     (range shrunk about its midpoint)
        zero  = round(-lo / scale)                          (not clamped; may leave [0, qmax])
        q     = clamp(round(x' / scale) + zero, 0, qmax)
        out   = (q - zero) * scale  (+ shift), cast back to x.dtype
    clip is a float or a tensor broadcastable to x[..., :1] (e.g. one value per head).
    bits None or >= 16 returns x unchanged. Constant tokens come back equal to the input up
    to float32 rounding (scale hits the 1e-8 floor and q - zero = round(x'/1e-8)).
    Rounding uses a straight-through estimator when autograd is recording, so gradients
    reach x, clip and shift; otherwise plain torch.round (identical values).
    """
    if bits is None or bits >= 16:
        return x
    if not 1 <= bits <= 8:
        raise ValueError(f"fake_quant_per_token: bits must be in [1, 8] or None/16, got {bits}")
    if x.numel() == 0:
        return x.clone()
    qmax = 2**bits - 1
    xf = x.to(torch.float32)
    if shift is not None:
        xf = xf - shift.to(device=xf.device, dtype=torch.float32)
    ste = torch.is_grad_enabled() and (
        xf.requires_grad or (isinstance(clip, torch.Tensor) and clip.requires_grad)
    )  # xf carries shift's requires_grad
    scale, zero = per_token_qparams(xf, bits, clip, ste=ste)
    rnd = _round_ste if ste else torch.round
    q = (rnd(xf / scale) + zero).clamp(0, qmax)
    out = (q - zero) * scale
    if shift is not None:
        out = out + shift.to(device=out.device, dtype=torch.float32)
    return out.to(x.dtype)


@dataclass
class IntActivation:
    """A per-token quantized activation as integers: levels = q - zero (integer-valued float32) and
    scale [..., 1]; it stands for levels * scale. A linear on it is an integer matmul, exact in
    any summation order (see models.base.linear)."""

    levels: torch.Tensor
    scale: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """levels * scale in float32: the value fake_quant_per_token returns."""
        return self.levels * self.scale


def quantize_per_token(x: torch.Tensor, bits: int, clip: float | torch.Tensor = 1.0) -> IntActivation:
    """fake_quant_per_token's quantizer (no shift, no gradient) with its levels and scale kept apart."""
    if not 1 <= bits <= 8:
        raise ValueError(f"quantize_per_token: bits must be in [1, 8], got {bits}")
    xf = x.to(torch.float32)
    if xf.numel() == 0:
        return IntActivation(xf.clone(), xf.new_ones(*xf.shape[:-1], 1))
    scale, zero = per_token_qparams(xf, bits, clip)
    q = (torch.round(xf / scale) + zero).clamp(0, 2**bits - 1)
    return IntActivation(q - zero, scale)


INT8_BLOCK_QMAX = 127
"""Largest level of the symmetric int8 block quantizer (fake_quant_int8_blocks)."""


def fake_quant_int8_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """x rounded as onnxruntime's MatMulNBits with accuracy_level 4 (its int8 kernels) rounds its input:
    per contiguous block of `block` values along the last dim, symmetric int8 with step max|x| / 127,
    q = round(x * (127 / max|x|)) (half to even), value q * step; an all-zero block stays zero.
    (Measured against onnxruntime's kernels: the products then agree to float32 summation order.)"""
    k = x.shape[-1]
    if k % block:
        raise ValueError(f"fake_quant_int8_blocks: last dim {k} is not a multiple of the block {block}")
    xf = x.to(torch.float32)
    xb = xf.reshape(*xf.shape[:-1], k // block, block)
    amax = xb.abs().amax(-1, keepdim=True)
    # 127 / max|x| as one float32 division (a python number over a tensor would be reciprocal, then product)
    inv = torch.where(amax > 0, torch.full_like(amax, INT8_BLOCK_QMAX) / amax, torch.zeros_like(amax))
    rnd = _round_ste if torch.is_grad_enabled() and xb.requires_grad else torch.round  # gradients reach x (the
    # end-to-end pass trains through the int8 head input; plain round's gradient is 0 and only the block max moved)
    out = rnd(xb * inv) * (amax / INT8_BLOCK_QMAX)
    return out.reshape(xf.shape).to(x.dtype)


def fake_quant_kv(
    x: torch.Tensor, bits: int | None, clip: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """KV-cache fake quant of x [B, heads, T, head_dim] per token and head; clip is a float or [heads]."""
    if isinstance(clip, torch.Tensor) and clip.dim() == 1:
        if x.dim() != 4 or clip.shape[0] != x.shape[1]:
            raise ValueError(
                f"fake_quant_kv: clip {tuple(clip.shape)} does not match heads of {tuple(x.shape)}"
            )
        clip = clip.reshape(-1, 1, 1)
    return fake_quant_per_token(x, bits, clip)
