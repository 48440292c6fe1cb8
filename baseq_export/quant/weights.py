"""The weight number format: QuantizedWeight on its grids, and the one rounding recipe that maps weights to codes.

The codes, scales and zero points defined here are what the artifact stores, what the exporters
write and what the reference forward reads; their byte layouts are in layout.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .floats import FP16_TINY, fp16_round
from .layout import GGML_BLOCK

# --------------------------------------------------------------------------------------
# Conventions (read by the exporters and by the C++ / ONNX re-implementations)
# --------------------------------------------------------------------------------------
#
# Weights are quantized per output row (group_size = K) or per contiguous group of
# `group_size` input columns, with unsigned codes q in [0, qmax], qmax = 2**bits - 1:
#
#     w_hat = (q - zero) * scale
#
#     scale : float32, every value exactly representable in fp16, 2**-24 <= scale <= 65504
#     zero  : uint8 integer zero point in [0, qmax]
#     q     = clamp(round(w / scale) + zero, 0, qmax)       round = half to even
#
# Asymmetric:  xmin = min(min(w), 0) * clip,  xmax = max(max(w), 0) * clip
#              scale = fp16_ceil((xmax - xmin) / qmax),  zero = clamp(round(-xmin / scale), 0, qmax)
# Symmetric:   zero = 2**(bits-1) (8 for 4-bit)
#              scale = fp16_ceil(max|w| * clip / (2**(bits-1) - 1))   (max|w| / 7 for 4-bit)
#              so [-max|w|, +max|w|] maps onto codes [1, 15] (4-bit) unclipped; code 0 (= -8)
#              is only reached when GPTQ's error feedback pushes a weight past the range.
#
# fp16_ceil rounds up to the next fp16 value (never down), so the grid always covers the
# range and the RTN error is at most scale / 2 inside the clip range; the lower bound
# 2**-24 (smallest fp16 subnormal) keeps all-zero groups at a positive, finite scale.
#
# ONNX MatMulNBits stores codes (packed with pack_int4), scale [N, G] and zero [N, G] as is.
# GGUF Q4_1 can hold this grid as d = scale and m = -zero * scale, but m is not always fp16-exact
# (4-bit integer times an 11-bit mantissa); the "q4_1" grid below avoids that rounding.
#
# Weight grids (QuantizedWeight.grid, the artifact's quant config key "weight_grid"):
#
#   "int"   the format above.
#   "q4_0"  llama.cpp's Q4_0: bits 4, blocks of GGML_BLOCK = 32 columns, w_hat = (q - 8) * d with
#           fp16 d. Held in the int format as zero = 8 and scale = d, except that d may be
#           NEGATIVE (as in llama.cpp's own quantizer): the block's largest-magnitude weight can
#           then take the level -8 d whichever its sign. RTN: d = -e / 8 for the block's
#           largest-magnitude weight e (|d| rounded up to fp16), so e gets code 0 and the other
#           side is clipped at 7 |d|.
#   "q4_1"  llama.cpp's Q4_1: bits 4, blocks of 32, w_hat = q * d + m, fp16 d > 0 and fp16 m
#           (scale = d, minimum = m, no zero point; 0 need not lie in the range):
#               q     = clamp(round((w - m) / d), 0, 15)
#               w_hat = fl32(q * d + m)
#           q * d is exact in float32 (an 11-bit d times a 4-bit q), so w_hat has exactly one
#           rounding: the same float32 with or without a fused multiply-add, and the value of
#           gguf-py's numpy dequantize. RTN: m = fp16_floor(min w), d = fp16_ceil((max w - m) / 15),
#           so [m, m + 15 d] covers the block.
#
# Byte layouts (nibble packing, MatMulNBits, GGUF blocks, packed KV rows): layout.py.

WEIGHT_GRIDS = ("int", "q4_0", "q4_1")
"""Weight grids (see the conventions above); "int" is the default and the only one of other bit widths."""

Q4_0_ZERO = 8
"""The fixed zero point of the q4_0 grid: w_hat = (q - 8) * d."""


def check_bits(bits: int) -> int:
    """Validate an integer bit width for the uint8 code formats (2..8)."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in [2, 8], got {bits!r}")
    return bits


def resolve_group_size(k: int, group_size: int | None) -> int:
    """Turn group_size=None into K (one group per row) and check that it divides K."""
    if group_size is None:
        return k
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group_size {group_size} must be positive and divide K={k}")
    return group_size


def _infer_group_size(k: int, n_groups: int, group_size: int | None) -> int:
    """Group size from the scale shape (K // G), checked against an explicit group_size."""
    if n_groups <= 0 or k % n_groups:
        raise ValueError(f"{n_groups} groups do not divide K={k}")
    inferred = k // n_groups
    if group_size is not None and resolve_group_size(k, group_size) != inferred:
        raise ValueError(f"group_size {group_size} does not match {n_groups} groups over K={k}")
    return inferred


def check_grid(grid: str, bits: int, group_size: int | None) -> None:
    """The q4 grids are 4-bit blocks of GGML_BLOCK; the int grid takes any bits / group size."""
    if grid not in WEIGHT_GRIDS:
        raise ValueError(f"unknown weight grid {grid!r}; choose one of {', '.join(WEIGHT_GRIDS)}")
    if grid != "int" and (bits != 4 or group_size != GGML_BLOCK):
        raise ValueError(f"the {grid} grid is 4-bit in blocks of {GGML_BLOCK}, got bits {bits}, group size {group_size}")


# --------------------------------------------------------------------------------------
# Weight format
# --------------------------------------------------------------------------------------


@dataclass
class QuantizedWeight:
    """Quantized [N, K] weight: uint8 codes and fp16-exact parameters per contiguous group, on one grid.

    grid "int" / "q4_0": w_hat = (codes - zero) * scale; grid "q4_1": w_hat = codes * scale + minimum
    (zero is None). See the conventions above.
    """

    codes: torch.Tensor  # uint8 [N, K], values in [0, 2**bits - 1]
    scale: torch.Tensor  # float32 [N, G], fp16-representable (q4_0: may be negative)
    zero: torch.Tensor | None  # uint8 [N, G], values in [0, 2**bits - 1]; None on the q4_1 grid
    group_size: int  # K for per-output-channel, else a divisor of K (32 / 64 / 128)
    bits: int
    minimum: torch.Tensor | None = None  # float32 [N, G], fp16-representable: the q4_1 grid's m
    grid: str = "int"

    def __post_init__(self) -> None:
        """Check dtypes and shapes (cheap; value ranges are checked by validate())."""
        check_bits(self.bits)
        check_grid(self.grid, self.bits, self.group_size)
        if self.codes.dtype != torch.uint8:
            raise TypeError("QuantizedWeight: codes must be uint8")
        if self.scale.dtype != torch.float32:
            raise TypeError("QuantizedWeight: scale must be float32")
        if self.grid == "q4_1":
            if self.zero is not None or self.minimum is None or self.minimum.dtype != torch.float32:
                raise TypeError("QuantizedWeight: the q4_1 grid has a float32 minimum and no zero point")
        elif self.minimum is not None or self.zero is None or self.zero.dtype != torch.uint8:
            raise TypeError(f"QuantizedWeight: the {self.grid} grid has uint8 zero points and no minimum")
        if self.codes.dim() != 2:
            raise ValueError("QuantizedWeight: codes must be [N, K]")
        n, k = self.codes.shape
        g = k // resolve_group_size(k, self.group_size)
        offset = self.minimum if self.grid == "q4_1" else self.zero
        if tuple(self.scale.shape) != (n, g) or tuple(offset.shape) != (n, g):
            raise ValueError(
                f"QuantizedWeight: scale {tuple(self.scale.shape)} / {'minimum' if self.grid == 'q4_1' else 'zero'} "
                f"{tuple(offset.shape)} must be [{n}, {g}] for codes [{n}, {k}] with group_size {self.group_size}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of the original weight."""
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    def validate(self) -> None:
        """Raise if any code / zero is out of range or any scale / minimum is not an allowed fp16 value."""
        qmax = 2**self.bits - 1
        if self.codes.numel() and int(self.codes.max()) > qmax:
            raise ValueError("QuantizedWeight: code out of range")
        if self.zero is not None and self.zero.numel() and int(self.zero.max()) > qmax:
            raise ValueError("QuantizedWeight: zero point out of range")
        if self.grid == "q4_0" and not bool((self.zero == Q4_0_ZERO).all()):
            raise ValueError(f"QuantizedWeight: q4_0 zero points must all be {Q4_0_ZERO}")

        def fp16_exact(t: torch.Tensor) -> bool:
            return bool(torch.isfinite(t).all()) and bool((t.to(torch.float16).to(torch.float32) == t).all())

        sign_ok = (self.scale != 0).all() if self.grid == "q4_0" else (self.scale > 0).all()
        if not bool(sign_ok) or not fp16_exact(self.scale):
            raise ValueError("QuantizedWeight: scales must be fp16-representable and positive (q4_0: nonzero)")
        if self.minimum is not None and not fp16_exact(self.minimum):
            raise ValueError("QuantizedWeight: q4_1 minimums must be fp16-representable")

    def dequantize(self) -> torch.Tensor:
        """Float32 [N, K] weight the codes stand for."""
        return dequantize(self.codes, self.scale, self.zero, self.group_size, minimum=self.minimum)

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        """Copy to another device."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, codes=self.codes.to(device), scale=self.scale.to(device), zero=move(self.zero),
                       minimum=move(self.minimum))


def rescale_rows(qw: QuantizedWeight, multiplier: torch.Tensor) -> QuantizedWeight:
    """qw with each output row's scales (and q4_1 minimums) times multiplier [N], rounded to fp16: the same codes and
    zero points on a stretched grid (BASE-Q's learned weight scales). A scale keeps its sign and stays >= 2**-24."""
    mult = multiplier.detach().to(torch.float32).reshape(-1, 1)
    scale = fp16_round(qw.scale * mult)
    scale = torch.where(scale.abs() < FP16_TINY, FP16_TINY * torch.sign(qw.scale), scale)
    minimum = None if qw.minimum is None else fp16_round(qw.minimum * mult)
    return replace(qw, scale=scale, minimum=minimum)


def dequantize_weight(qw: QuantizedWeight) -> torch.Tensor:
    """The float32 [N, K] weight of qw on its grid (groups along K)."""
    return qw.dequantize()


# --------------------------------------------------------------------------------------
# Quantizer primitives
# --------------------------------------------------------------------------------------


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """View [..., K] as [..., K // group_size, group_size]."""
    return w.reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)


def quant_values(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, qmax: int, minimum: torch.Tensor | None = None
) -> torch.Tensor:
    """Float codes of x for broadcastable params: the one rounding recipe of every grid (round half to even).

    int / q4_0: clamp(round(x / scale) + zero, 0, qmax);  q4_1: clamp(round((x - minimum) / scale), 0, qmax).
    """
    if minimum is not None:
        return torch.sub(x, minimum).div_(scale).round_().clamp_(0, qmax)  # in place on its own temporary
    return torch.div(x, scale).round_().add_(zero).clamp_(0, qmax)


def dequant_values(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, minimum: torch.Tensor | None = None,
    in_place: bool = False,
) -> torch.Tensor:
    """Float32 weights of float codes q: (q - zero) * scale, or q * scale + minimum on the q4_1 grid. in_place:
    overwrite q (a temporary of the caller's of the result's shape), the same numbers without a new tensor."""
    if minimum is not None:
        return q.mul_(scale).add_(minimum) if in_place else q * scale + minimum
    return q.sub_(zero).mul_(scale) if in_place else (q - zero) * scale


def _expand(t: torch.Tensor | None) -> torch.Tensor | None:
    """A per-group param [..., G] as float32 [..., G, 1], to broadcast over a grouped weight."""
    return None if t is None else t.to(torch.float32).unsqueeze(-1)


def quantize(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    group_size: int | None = None,
    minimum: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 codes of w [..., K] with params [..., G] (quant_values); pass minimum (and zero None) for q4_1."""
    check_bits(bits)
    if (zero is None) == (minimum is None):
        raise ValueError("quantize: pass a zero point (int / q4_0 grids) or a minimum (q4_1 grid), not both")
    k = w.shape[-1]
    gs = _infer_group_size(k, scale.shape[-1], group_size)
    wg = grouped(w.detach().to(torch.float32), gs)
    q = quant_values(wg, _expand(scale), _expand(zero), 2**bits - 1, _expand(minimum))
    return q.to(torch.uint8).reshape(w.shape)


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    group_size: int | None = None,
    minimum: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float32 weights of codes [..., K] with params [..., G] (dequant_values)."""
    if (zero is None) == (minimum is None):
        raise ValueError("dequantize: pass a zero point (int / q4_0 grids) or a minimum (q4_1 grid), not both")
    k = codes.shape[-1]
    gs = _infer_group_size(k, scale.shape[-1], group_size)
    cg = grouped(codes, gs).to(torch.float32)
    return dequant_values(cg, _expand(scale), _expand(zero), _expand(minimum)).reshape(codes.shape)


