"""Quantizer primitives: one source of truth for every integer number format in the project.

The codes, scales and zero points produced here are what the artifact stores, what the
exporters write and what the reference forward reads.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import torch

from .memory import row_slices


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
# GGUF block bytes (ggml_q4_blocks, the one definition of llama.cpp's layout): per block of 32,
# fp16 d, [fp16 m for q4_1,] then 16 bytes; byte j holds element j in its low nibble and element
# j + 16 in its high nibble (not the even/odd pairs of pack_int4, which the artifact keeps).

FP16_TINY = 2.0**-24
"""Smallest positive fp16 value (subnormal); the floor for every weight scale."""

FP16_MAX = 65504.0
"""Largest finite fp16 value; the ceiling for every weight scale."""

ACT_SCALE_EPS = 1e-8
"""Floor of the per-token activation scale, so constant tokens quantize to themselves."""

WEIGHT_GRIDS = ("int", "q4_0", "q4_1")
"""Weight grids (see the conventions above); "int" is the default and the only one of other bit widths."""

GGML_BLOCK = 32
"""Weights per block of llama.cpp's Q4_0 / Q4_1: the group size of the q4_0 and q4_1 grids."""

Q4_0_ZERO = 8
"""The fixed zero point of the q4_0 grid: w_hat = (q - 8) * d."""


def _check_bits(bits: int) -> int:
    """Validate an integer bit width for the uint8 code formats (2..8)."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in [2, 8], got {bits!r}")
    return bits


def _resolve_group_size(k: int, group_size: int | None) -> int:
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
    if group_size is not None and _resolve_group_size(k, group_size) != inferred:
        raise ValueError(f"group_size {group_size} does not match {n_groups} groups over K={k}")
    return inferred


def _true_div(a: torch.Tensor, c: float) -> torch.Tensor:
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


def _check_grid(grid: str, bits: int, group_size: int | None) -> None:
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
        _check_bits(self.bits)
        _check_grid(self.grid, self.bits, self.group_size)
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
        g = k // _resolve_group_size(k, self.group_size)
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


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """View [..., K] as [..., K // group_size, group_size]."""
    return w.reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)


def choose_qparams(
    w: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = False,
    clip_ratio: float | torch.Tensor = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row / per-group (scale float32 [..., G], zero uint8 [..., G]) of w [..., K] (module conventions).

    clip_ratio is a float or a tensor broadcastable to [..., G] (used by the MSE clip search).
    """
    _check_bits(bits)
    k = w.shape[-1]
    gs = _resolve_group_size(k, group_size)
    qmax = 2**bits - 1
    wg = _grouped(w.detach().to(torch.float32), gs)
    if wg.numel() and not bool(torch.isfinite(wg).all()):
        raise ValueError("choose_qparams: weight has non-finite values")
    if isinstance(clip_ratio, torch.Tensor):
        clip_ratio = clip_ratio.to(device=wg.device, dtype=torch.float32)
    if symmetric:
        half = 2 ** (bits - 1)
        amax = wg.abs().amax(dim=-1) * clip_ratio
        scale = fp16_ceil(_true_div(amax, float(half - 1)))
        zero = torch.full_like(scale, half, dtype=torch.uint8)
        return scale, zero
    xmin = wg.amin(dim=-1).clamp(max=0.0) * clip_ratio
    xmax = wg.amax(dim=-1).clamp(min=0.0) * clip_ratio
    scale = fp16_ceil(_true_div(xmax - xmin, float(qmax)))
    zero = torch.round(-xmin / scale).clamp(0, qmax).to(torch.uint8)
    return scale, zero


def quant_values(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, qmax: int, minimum: torch.Tensor | None = None
) -> torch.Tensor:
    """Float codes of x for broadcastable params: the one rounding recipe of every grid (round half to even).

    int / q4_0: clamp(round(x / scale) + zero, 0, qmax);  q4_1: clamp(round((x - minimum) / scale), 0, qmax).
    """
    if minimum is not None:
        return torch.round((x - minimum) / scale).clamp(0, qmax)
    return (torch.round(x / scale) + zero).clamp(0, qmax)


def dequant_values(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, minimum: torch.Tensor | None = None
) -> torch.Tensor:
    """Float32 weights of float codes q: (q - zero) * scale, or q * scale + minimum on the q4_1 grid."""
    if minimum is not None:
        return q * scale + minimum
    return (q - zero) * scale


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
    _check_bits(bits)
    if (zero is None) == (minimum is None):
        raise ValueError("quantize: pass a zero point (int / q4_0 grids) or a minimum (q4_1 grid), not both")
    k = w.shape[-1]
    gs = _infer_group_size(k, scale.shape[-1], group_size)
    wg = _grouped(w.detach().to(torch.float32), gs)
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
    cg = _grouped(codes, gs).to(torch.float32)
    return dequant_values(cg, _expand(scale), _expand(zero), _expand(minimum)).reshape(codes.shape)


def _grouped_finite(w: torch.Tensor, gs: int, who: str) -> torch.Tensor:
    wg = _grouped(w.detach().to(torch.float32), gs)
    if wg.numel() and not bool(torch.isfinite(wg).all()):
        raise ValueError(f"{who}: weight has non-finite values")
    return wg


def choose_qparams_q4_1(w: torch.Tensor, clip_ratio: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, m) float32 [..., K/32] of the q4_1 grid for w [..., K]: the block's [min, max] shrunk by
    clip_ratio about its midpoint, m = fp16_floor(lo), d = fp16_ceil((hi - m) / 15)."""
    wg = _grouped_finite(w, GGML_BLOCK, "choose_qparams_q4_1")
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    if not (isinstance(clip_ratio, float) and clip_ratio == 1.0):
        if isinstance(clip_ratio, torch.Tensor):
            clip_ratio = clip_ratio.to(device=wg.device, dtype=torch.float32)
        mid, half = (lo + hi) * 0.5, (hi - lo) * 0.5 * clip_ratio
        lo, hi = mid - half, mid + half
    m = fp16_floor(lo)
    return fp16_ceil(_true_div(hi - m, 15.0)), m


def choose_qparams_q4_0(
    w: torch.Tensor, clip_ratio: float | torch.Tensor = 1.0, extreme_level: int = -8
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, zero = 8) [..., K/32] of the q4_0 grid: the block's largest-magnitude weight e (times clip_ratio)
    lands on level extreme_level (-8, llama.cpp's choice, or +7); |d| is rounded up to fp16, d may be negative."""
    if extreme_level not in (-8, 7):
        raise ValueError("choose_qparams_q4_0: extreme_level must be -8 or 7")
    wg = _grouped_finite(w, GGML_BLOCK, "choose_qparams_q4_0")
    e = wg.gather(-1, wg.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
    if isinstance(clip_ratio, torch.Tensor):
        clip_ratio = clip_ratio.to(device=wg.device, dtype=torch.float32)
    mag = fp16_ceil(_true_div(e.abs() * clip_ratio, float(abs(extreme_level))))
    positive = (e > 0) == (extreme_level > 0)  # sign of d that puts e on that level
    d = torch.where(positive, mag, -mag)
    return d, torch.full_like(d, Q4_0_ZERO, dtype=torch.uint8)


def _block_sums(w: torch.Tensor, levels: torch.Tensor, importance: torch.Tensor | None):
    """Per-block weighted sums (sum v, sum v l, sum v w, sum v l^2, sum v l w) for least-squares fits, float32
    (levels are small integers, so the level sums are exact)."""
    wg = _grouped(w.detach().to(torch.float32), GGML_BLOCK)
    lg = _grouped(levels, GGML_BLOCK).to(torch.float32)
    if importance is None:
        sv = torch.full(wg.shape[:-1], float(GGML_BLOCK), device=wg.device)
        return sv, lg.sum(-1), wg.sum(-1), (lg * lg).sum(-1), (lg * wg).sum(-1)
    v = _grouped(importance.to(wg), GGML_BLOCK)
    vl = v * lg
    return v.sum(-1).expand(wg.shape[:-1]), vl.sum(-1), (v * wg).sum(-1), (vl * lg).sum(-1), (vl * wg).sum(-1)


def fit_q4_1(
    w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares (d, m) per block for fixed codes, sum_j v_j (w_j - q_j d - m)^2 with v = importance [K]
    (ones if None), rounded to fp16 (d >= 2**-24); blocks whose codes are all equal keep (scale, minimum)."""
    sv, sq, sw, sqq, sqw = _block_sums(w, codes, importance)
    det = sv * sqq - sq * sq
    ok = det > 1e-6 * sv * sqq
    d = (sv * sqw - sq * sw) / torch.where(ok, det, torch.ones_like(det))
    m = (sw - d * sq) / sv
    ok &= d > 0
    d = fp16_round(d).clamp(min=FP16_TINY)
    return torch.where(ok, d, scale), torch.where(ok, fp16_round(m), minimum)


def fit_q4_0(
    w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, importance: torch.Tensor | None = None
) -> torch.Tensor:
    """Least-squares d per block for fixed q4_0 codes, sum_j v_j (w_j - (q_j - 8) d)^2, rounded to fp16
    (|d| >= 2**-24); blocks whose codes are all 8 keep their scale."""
    _, _, _, sll, slw = _block_sums(w, codes.to(torch.float32) - Q4_0_ZERO, importance)
    ok = sll > 0
    d = fp16_round(slw / torch.where(ok, sll, torch.ones_like(sll)))
    d = torch.where(d < 0, d.clamp(max=-FP16_TINY), d.clamp(min=FP16_TINY))
    return torch.where(ok, d, scale)


def choose_weight_qparams(
    w: torch.Tensor,
    grid: str = "int",
    bits: int = 4,
    group_size: int | None = None,
    symmetric: bool = False,
    clip_ratio: float | torch.Tensor = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(scale, zero, minimum) of any grid by round to nearest with a clip ratio (unused ones are None)."""
    k = w.shape[-1]
    _check_grid(grid, bits, group_size if group_size is not None else k)
    if grid == "q4_1":
        scale, minimum = choose_qparams_q4_1(w, clip_ratio)
        return scale, None, minimum
    if grid == "q4_0":
        return (*choose_qparams_q4_0(w, clip_ratio), None)
    return (*choose_qparams(w, bits, group_size, symmetric, clip_ratio), None)


def _candidates(w, grid, bits, gs, symmetric, ratios, refine, importance):
    """Candidate (scale, zero, minimum) of the clip search; the first is plain RTN."""
    for p in ratios:
        if grid == "q4_0":
            for level in (-8, 7):
                scale, zero = choose_qparams_q4_0(w, p, level)
                yield scale, zero, None
                for _ in range(refine):
                    scale = fit_q4_0(w, quantize(w, scale, zero, 4, gs), scale, importance)
                    yield scale, zero, None
        elif grid == "q4_1":
            scale, minimum = choose_qparams_q4_1(w, p)
            yield scale, None, minimum
            for _ in range(refine):
                codes = quantize(w, scale, None, 4, gs, minimum=minimum)
                scale, minimum = fit_q4_1(w, codes, scale, minimum, importance)
                yield scale, None, minimum
        else:
            yield (*choose_qparams(w, bits, gs, symmetric, p), None)


SEARCH_ELEMENTS = 2**21
"""A clip search works on slices of rows of about this many weights: its candidates' temporaries (several
copies of the weight each) stay small for a 50k-row embedding table."""


def search_weight_qparams(
    w: torch.Tensor,
    grid: str = "int",
    bits: int = 4,
    group_size: int | None = None,
    symmetric: bool = False,
    steps: int | None = None,
    max_shrink: float | None = None,
    norm: float = 2.0,
    importance: torch.Tensor | None = None,
    refine: int = 2,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(scale, zero, minimum) per group minimising sum_j v_j |w_j - w_hat_j|^norm (v = importance [K] or 1).

    Candidates: clip ratios 1, 1 - 1/steps, ... down to (excluding) 1 - max_shrink, each through
    choose_weight_qparams; q4_0 tries both signs of d (the extreme weight on level -8 or +7); the q4
    grids also try `refine` successive least-squares refits of d (and m) to each candidate's codes
    (fit_q4_0 / fit_q4_1). Plain RTN (ratio 1) is a candidate, so no group gets worse than RTN.
    Defaults: int 100 steps down to 0.2 (the GPTQ codebases' grid); q4 grids 20 steps down to 0.5
    with 2 refits (on Gaussian weights with outliers as good as 100 steps, at a tenth of the cost).
    """
    q4 = grid != "int"
    steps = steps if steps is not None else (20 if q4 else 100)
    max_shrink = max_shrink if max_shrink is not None else (0.5 if q4 else 0.8)
    _check_bits(bits)
    k = w.shape[-1]
    gs = _resolve_group_size(k, group_size)
    _check_grid(grid, bits, gs)
    wf = w.detach().to(torch.float32)
    if importance is not None:
        importance = importance.detach().to(device=wf.device, dtype=torch.float32)
        if importance.shape != (k,):
            raise ValueError(f"search_weight_qparams: importance must be [{k}], got {tuple(importance.shape)}")
    if wf.dim() == 2 and wf.numel() > SEARCH_ELEMENTS:  # rows are independent: a slice at a time (same numbers)
        parts = [search_weight_qparams(wf[part], grid, bits, gs, symmetric, steps, max_shrink, norm, importance, refine)
                 for part in row_slices(wf.shape[0], k, SEARCH_ELEMENTS)]
        return tuple(None if p[0] is None else torch.cat(p) for p in zip(*parts))
    ratios = [1.0] + [1.0 - i / steps for i in range(1, int(max_shrink * steps))]
    best = best_err = None
    for cand in _candidates(wf, grid, bits, gs, symmetric, ratios, refine, importance):
        err = _group_err(wf, *cand, bits, gs, norm, importance)
        if best is None:
            best, best_err = list(cand), err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = [None if b is None else torch.where(better, c, b) for b, c in zip(best, cand)]
    return tuple(best)


def mse_clip_search(
    w: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = False,
    grid: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of the int grid per row / group minimising sum |w - deq|^norm over clip ratios 1, 1 - 1/grid, ...

    Ratios go down to (but exclude) 1 - max_shrink, the grid GPTQ codebases use; ratio 1 is included.
    """
    scale, zero, _ = search_weight_qparams(w, "int", bits, group_size, symmetric, grid, max_shrink, norm)
    return scale, zero


def _group_err(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, minimum: torch.Tensor | None, bits: int, gs: int,
    norm: float, importance: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_j v_j |w_j - deq(quant(w))_j|^norm per group, shape [..., G]."""
    deq = dequantize(quantize(w, scale, zero, bits, gs, minimum), scale, zero, gs, minimum)
    e = (deq - w).abs().pow(norm)
    if importance is not None:
        e = e * importance
    return _grouped(e, gs).sum(dim=-1)


def _weight_qparams(
    w: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    clip_ratio: float | torch.Tensor,
    mse_clip_search_: bool,
    grid: str = "int",
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Fixed clip ratio or searched clip, shared by RTN and GPTQ: (scale, zero, minimum)."""
    if mse_clip_search_:
        return search_weight_qparams(w, grid, bits, group_size, symmetric, importance=importance)
    return choose_weight_qparams(w, grid, bits, group_size, symmetric, clip_ratio)


def _grid_group_size(k: int, group_size: int | None, grid: str) -> int:
    """group_size None means per output channel on the int grid and GGML_BLOCK on the q4 grids."""
    if group_size is None and grid != "int":
        group_size = GGML_BLOCK
    return _resolve_group_size(k, group_size)


def rtn_quantize(
    w: torch.Tensor,
    bits: int = 4,
    group_size: int | None = None,
    symmetric: bool = False,
    clip_ratio: float = 1.0,
    mse_clip_search: bool = False,
    grid: str = "int",
    importance: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Round-to-nearest quantization of a [N, K] weight on a grid (baseline and fallback for GPTQ)."""
    if w.dim() != 2:
        raise ValueError(f"rtn_quantize expects a [N, K] weight, got {tuple(w.shape)}")
    gs = _grid_group_size(w.shape[1], group_size, grid)
    scale, zero, minimum = _weight_qparams(w, bits, gs, symmetric, clip_ratio, mse_clip_search, grid, importance)
    codes = quantize(w, scale, zero, bits, gs, minimum)
    return QuantizedWeight(codes=codes, scale=scale, zero=zero, group_size=gs, bits=bits, minimum=minimum, grid=grid)


def ggml_q4_blocks(qw: QuantizedWeight) -> torch.Tensor:
    """llama.cpp's block bytes of a q4_0 / q4_1 weight: uint8 [N, K/32, 18 or 20] (see the conventions).

    Each block: fp16 d (little endian), fp16 m (q4_1 only), then 16 bytes, byte j = code j | code (j+16) << 4.
    """
    if qw.grid not in ("q4_0", "q4_1"):
        raise ValueError(f"ggml_q4_blocks: a {qw.grid} grid weight has no llama.cpp Q4 block form")
    n, k = qw.shape
    codes = qw.codes.reshape(n, k // GGML_BLOCK, GGML_BLOCK)
    qs = codes[..., :16] | (codes[..., 16:] << 4)
    parts = [qw.scale] + ([qw.minimum] if qw.grid == "q4_1" else [])
    if sys.byteorder != "little":
        raise RuntimeError("ggml_q4_blocks: GGUF is little endian; big-endian hosts are not supported")
    halves = [p.to(torch.float16).contiguous().view(torch.uint8).reshape(n, k // GGML_BLOCK, 2) for p in parts]
    return torch.cat(halves + [qs], dim=-1).contiguous()


# --------------------------------------------------------------------------------------
# GPTQ
# --------------------------------------------------------------------------------------


class HessianAccumulator:
    """Running H = 2/n * sum x^T x (float64) over all rows of every batch of layer inputs x [..., K]."""

    def __init__(self, k: int, device: torch.device | str | None = None) -> None:
        """Start from an empty [K, K] float64 Hessian on device."""
        self.k = k
        self.hessian = torch.zeros(k, k, dtype=torch.float64, device=device)
        self.nsamples = 0

    def add(self, x: torch.Tensor) -> None:
        """Fold in one batch; rows are the flattened leading dims of x."""
        if x.shape[-1] != self.k:
            raise ValueError(f"HessianAccumulator: expected last dim {self.k}, got {x.shape[-1]}")
        x = x.detach().reshape(-1, self.k).to(device=self.hessian.device, dtype=torch.float64)
        n = x.shape[0]
        if n == 0:
            return
        total = self.nsamples + n
        self.hessian.mul_(self.nsamples / total)
        self.hessian.addmm_(x.T, x, alpha=2.0 / total)
        self.nsamples = total


HESSIAN_ROWS = 1024  # rows of a [K, K] Hessian moved at a time when it is reordered in place


def _act_order_hessian_(h: torch.Tensor, perm: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """h[perm][:, perm] with dead (zero-diagonal) inputs' diagonal set to 1, computed in h's own memory and
    returned as a column-major view whose lower triangle is copied into its upper one: LAPACK then works in
    place (a 7B down_proj's Hessian is 1 GB) and reads the same lower triangle a copy would."""
    k = h.shape[0]
    h.diagonal()[dead] = 1.0
    for i in range(0, k, HESSIAN_ROWS):  # columns in act order, a slice of rows at a time
        h[i : i + HESSIAN_ROWS] = h[i : i + HESSIAN_ROWS].index_select(1, perm)
    ht = h.t()
    for i in range(0, k, HESSIAN_ROWS):  # then rows: the same step on the transposed view moves rows
        ht[i : i + HESSIAN_ROWS] = ht[i : i + HESSIAN_ROWS].index_select(1, perm)
    for i in range(0, k, HESSIAN_ROWS):  # lower triangle mirrored, so the column-major view holds the same matrix
        j = min(i + HESSIAN_ROWS, k)
        h[i:j, j:] = h[j:, i:j].t()
        block = h[i:j, i:j]
        block.copy_(block.tril() + block.tril(-1).t())
    return h.mT  # logical value h[perm][:, perm] (symmetrised from its lower triangle), column-major storage


def _float32_upper_in_place(u: torch.Tensor) -> torch.Tensor:
    """The upper-triangular float64 u (a column-major view, as LAPACK leaves it) as a row-major float32 matrix in
    the first half of u's own memory: no second [K, K] matrix (3.3 GB at a 70B down_proj). Result rows i:j read
    storage rows >= i only, and the rows written before them end at byte 4*K*i, inside storage row i/2."""
    k = u.shape[0]
    stored = u.mT  # row-major storage holding u^T (lower triangular)
    out = stored.reshape(-1).view(torch.float32)[: k * k].view(k, k)
    for i in range(0, k, HESSIAN_ROWS):
        j = min(k, i + HESSIAN_ROWS)
        rows = stored[i:, i:j].t().to(torch.float32)  # u[i:j, i:], read before its own rows are written
        out[i:j, i:] = rows
        out[i:j, :i] = 0.0
    return out


def _inverse_hessian_upper(make_h, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp*mean(diag H)*I)^-1 in float32, raising damp tenfold on failure.

    make_h() returns the [K, K] float64 matrix H to factor, column-major; the factorisation overwrites it
    (LAPACK works in place on column-major storage), so a retry asks for a fresh one."""
    mean_diag = None
    for attempt in range(6):
        h = make_h()
        if mean_diag is None:
            mean_diag = float(torch.diagonal(h).mean())
        h.diagonal().add_((damp * 10**attempt) * mean_diag)  # H + lambda I
        info = torch.empty((), dtype=torch.int32, device=h.device)
        torch.linalg.cholesky_ex(h, out=(h, info))
        if int(info) == 0:
            torch.cholesky_inverse(h, out=h)
            torch.linalg.cholesky_ex(h, upper=True, out=(h, info))
            if int(info) == 0:
                return _float32_upper_in_place(h)
        del h
    raise RuntimeError("gptq: Hessian is not positive definite even with heavy dampening")


@dataclass(frozen=True)
class GptqFactor:
    """What GPTQ derives from a [K, K] Hessian alone: diag H (dead inputs set to 1), the dead inputs, the
    column order and the upper Cholesky factor of the damped inverse in that order. Every row of a weight
    shares it, so slices of one table (gptq_head) factor the Hessian once."""

    diag: torch.Tensor  # float64 [K]
    dead: torch.Tensor  # bool [K]: diag H == 0, inputs that were never active
    perm: torch.Tensor  # [K] column order (descending diag H with act_order, else natural)
    hinv: torch.Tensor  # float32 [K, K] upper factor, rows and columns in perm's order


def gptq_factor(hessian: torch.Tensor, damp: float = 0.01, act_order: bool = True, device: torch.device | None = None,
                scratch: bool = False) -> GptqFactor:
    """Factor a GPTQ Hessian once: dead inputs (diag H == 0) get diag 1; dampening adds damp * mean(diag H).
    scratch: the (float64, same device) hessian is the caller's to lose: it is factored in place, not copied."""
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"gptq: the Hessian must be square [K, K], got {tuple(hessian.shape)}")
    device = hessian.device if device is None else torch.device(device)
    diag = torch.diagonal(hessian.detach()).to(device=device, dtype=torch.float64).clone()
    dead = diag == 0
    diag[dead] = 1.0  # a dead input (never active) gets diag 1 and weight 0
    k = diag.shape[0]
    perm = torch.argsort(diag, descending=True, stable=True) if act_order else torch.arange(k, device=device)
    in_place = scratch and hessian.dtype == torch.float64 and hessian.device == device
    attempts = 0

    def act_order_h() -> torch.Tensor:
        nonlocal attempts
        attempts += 1
        if not in_place:
            return _act_order_hessian_(hessian.detach().to(device=device, dtype=torch.float64).clone(), perm, dead)
        if attempts > 1:  # its only copy was factored in place by the failed attempt
            raise RuntimeError(f"gptq: the damped Hessian (damp={damp}) is not positive definite; with a "
                               "finite Hessian that takes a larger damp (settings.QuantSettings.damp)")
        return _act_order_hessian_(hessian.detach(), perm, dead)

    return GptqFactor(diag=diag, dead=dead, perm=perm, hinv=_inverse_hessian_upper(act_order_h, damp))


def _gptq_run(
    w: torch.Tensor,
    hessian: torch.Tensor | None,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    damp: float,
    act_order: bool,
    block_size: int,
    mse_clip_search_: bool,
    clip_ratio: float,
    grid: str = "int",
    weighted_clip: bool = False,
    scratch: bool = False,
    return_used: bool = True,
    factor: GptqFactor | None = None,
) -> tuple[QuantizedWeight, torch.Tensor | None]:
    """GPTQ core; also returns the float32 [N, K] weights used in the error feedback (natural order) when
    return_used. scratch: the (float64, same device) hessian may be overwritten, so no copy of it is made.
    factor: the Hessian already factored (gptq_factor; then hessian, damp, act_order and scratch are not read)."""
    _check_bits(bits)
    if w.dim() != 2:
        raise ValueError(f"gptq_quantize expects a [N, K] weight, got {tuple(w.shape)}")
    n, k = w.shape
    if factor is None and hessian is None:
        raise ValueError("gptq_quantize needs the layer's Hessian, or its factor from gptq_factor")
    h_shape = tuple(factor.hinv.shape) if factor is not None else tuple(hessian.shape)
    if h_shape != (k, k):
        raise ValueError(f"gptq_quantize: Hessian {h_shape} does not match K={k}")
    gs = _grid_group_size(k, group_size, grid)
    device = w.device
    if factor is None:
        factor = gptq_factor(hessian, damp, act_order, device, scratch)
    diag, dead, perm, hinv = factor.diag, factor.dead, factor.perm, factor.hinv
    wf = w.detach().to(torch.float32).clone()
    wf[:, dead] = 0.0

    # Static groups: every contiguous group's params come from the original weights (the clip search
    # weighted by diag H when weighted_clip); each column is then rounded with its block's fixed params.
    importance = diag.to(torch.float32) if weighted_clip else None
    scale, zero, minimum = _weight_qparams(wf, bits, gs, symmetric, clip_ratio, mse_clip_search_, grid, importance)

    wp = wf[:, perm].contiguous()
    del wf
    col_group = perm // gs  # group of each permuted column

    qmax = 2**bits - 1
    codes_p = torch.empty(n, k, dtype=torch.uint8, device=device)
    deq_p = torch.empty(n, k, dtype=torch.float32, device=device) if return_used else None
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wp[:, i1:i2].clone()
        err1 = torch.empty_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        groups = col_group[i1:i2]
        scale_cols = scale[:, groups]  # [N, block] in permuted order
        zero_cols = None if zero is None else zero[:, groups].to(torch.float32)
        min_cols = None if minimum is None else minimum[:, groups]
        for i in range(i2 - i1):
            col = w1[:, i]
            s = scale_cols[:, i]
            z = None if zero_cols is None else zero_cols[:, i]
            m = None if min_cols is None else min_cols[:, i]
            q = quant_values(col, s, z, qmax, m)
            dq = dequant_values(q, s, z, m)  # identical arithmetic to dequantize()
            codes_p[:, i1 + i] = q.to(torch.uint8)
            if deq_p is not None:
                deq_p[:, i1 + i] = dq
            e = (col - dq) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        wp[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    codes = torch.empty_like(codes_p)
    codes[:, perm] = codes_p
    deq = None
    if deq_p is not None:
        deq = torch.empty_like(deq_p)
        deq[:, perm] = deq_p
    qw = QuantizedWeight(codes=codes, scale=scale, zero=zero, group_size=gs, bits=bits, minimum=minimum, grid=grid)
    return qw, deq


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor | None,
    bits: int = 4,
    group_size: int | None = None,
    symmetric: bool = False,
    damp: float = 0.01,
    act_order: bool = True,
    block_size: int = 128,
    mse_clip_search: bool = False,
    clip_ratio: float = 1.0,
    grid: str = "int",
    weighted_clip: bool = False,
    scratch: bool = False,
    factor: GptqFactor | None = None,
) -> QuantizedWeight:
    """GPTQ of a [N, K] weight with Hessian [K, K] on a grid; static contiguous groups so act_order stays exportable.

    Group params come up front from the original weights (dead columns zeroed; with
    mse_clip_search, searched, weighted by diag H if weighted_clip); columns are then quantized in
    act order (descending diag H) with their own group's fixed params (q4_1: the block's d and m).
    Dead inputs (diag H == 0) get weight 0 and diag 1; dampening adds damp * mean(diag H).
    scratch: the hessian (float64) is the caller's to lose: it is factored in place instead of copied.
    factor: the Hessian already factored by gptq_factor (rows of one table in slices); hessian may then be None.
    """
    qw, _ = _gptq_run(
        w, hessian, bits, group_size, symmetric, damp, act_order, block_size,
        mse_clip_search, clip_ratio, grid, weighted_clip, scratch=scratch, return_used=False, factor=factor,
    )
    return qw


# --------------------------------------------------------------------------------------
# Activation / KV-cache fake quantization
# --------------------------------------------------------------------------------------


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
    scale = _true_div(rng * clip, float(qmax)).clamp(min=ACT_SCALE_EPS)
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
    out = torch.round(xb * inv) * (amax / INT8_BLOCK_QMAX)
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
