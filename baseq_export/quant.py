"""Quantizer primitives: one source of truth for every integer number format in the project.

The codes, scales and zero points produced here are what the artifact stores, what the
exporters write and what the reference forward reads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
# GGUF Q4_1 stores d = scale and m = -zero * scale; m is not always fp16-exact (4-bit integer
# times an 11-bit mantissa), so the writer rounds it (relative error <= 2**-11).

FP16_TINY = 2.0**-24
"""Smallest positive fp16 value (subnormal); the floor for every weight scale."""

FP16_MAX = 65504.0
"""Largest finite fp16 value; the ceiling for every weight scale."""

ACT_SCALE_EPS = 1e-8
"""Floor of the per-token activation scale, so constant tokens quantize to themselves."""


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


# --------------------------------------------------------------------------------------
# Weight format
# --------------------------------------------------------------------------------------


@dataclass
class QuantizedWeight:
    """Quantized [N, K] weight: uint8 codes, fp16-exact scales and uint8 zero points per contiguous group."""

    codes: torch.Tensor  # uint8 [N, K], values in [0, 2**bits - 1]
    scale: torch.Tensor  # float32 [N, G], fp16-representable
    zero: torch.Tensor  # uint8 [N, G], values in [0, 2**bits - 1]
    group_size: int  # K for per-output-channel, else a divisor of K (32 / 64 / 128)
    bits: int

    def __post_init__(self) -> None:
        """Check dtypes and shapes (cheap; value ranges are checked by validate())."""
        _check_bits(self.bits)
        if self.codes.dtype != torch.uint8 or self.zero.dtype != torch.uint8:
            raise TypeError("QuantizedWeight: codes and zero must be uint8")
        if self.scale.dtype != torch.float32:
            raise TypeError("QuantizedWeight: scale must be float32")
        if self.codes.dim() != 2:
            raise ValueError("QuantizedWeight: codes must be [N, K]")
        n, k = self.codes.shape
        g = k // _resolve_group_size(k, self.group_size)
        if tuple(self.scale.shape) != (n, g) or tuple(self.zero.shape) != (n, g):
            raise ValueError(
                f"QuantizedWeight: scale {tuple(self.scale.shape)} / zero {tuple(self.zero.shape)}"
                f" must be [{n}, {g}] for codes [{n}, {k}] with group_size {self.group_size}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of the original weight."""
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    def validate(self) -> None:
        """Raise if any code / zero is out of range or any scale is not a positive fp16 value."""
        qmax = 2**self.bits - 1
        if self.codes.numel() and int(self.codes.max()) > qmax:
            raise ValueError("QuantizedWeight: code out of range")
        if self.zero.numel() and int(self.zero.max()) > qmax:
            raise ValueError("QuantizedWeight: zero point out of range")
        if not bool((self.scale > 0).all()) or not bool(
            (self.scale.to(torch.float16).to(torch.float32) == self.scale).all()
        ):
            raise ValueError("QuantizedWeight: scales must be positive and fp16-representable")

    def dequantize(self) -> torch.Tensor:
        """Float32 [N, K] weight the codes stand for."""
        return dequantize(self.codes, self.scale, self.zero, self.group_size)

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        """Copy to another device."""
        return replace(
            self, codes=self.codes.to(device), scale=self.scale.to(device), zero=self.zero.to(device)
        )


def dequantize_weight(qw: QuantizedWeight) -> torch.Tensor:
    """(codes - zero) * scale with groups along K, float32 [N, K]; exact in float32."""
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


def quantize(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int | None = None,
) -> torch.Tensor:
    """uint8 codes clamp(round(w / scale) + zero, 0, qmax), round half to even; scale / zero are [..., G]."""
    _check_bits(bits)
    k = w.shape[-1]
    gs = _infer_group_size(k, scale.shape[-1], group_size)
    wg = _grouped(w.detach().to(torch.float32), gs)
    q = torch.round(wg / scale.to(torch.float32).unsqueeze(-1)) + zero.to(torch.float32).unsqueeze(-1)
    return q.clamp(0, 2**bits - 1).to(torch.uint8).reshape(w.shape)


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int | None = None,
) -> torch.Tensor:
    """Float32 (codes - zero) * scale for codes [..., K] with scale / zero [..., G]."""
    k = codes.shape[-1]
    gs = _infer_group_size(k, scale.shape[-1], group_size)
    cg = _grouped(codes, gs).to(torch.float32)
    out = (cg - zero.to(torch.float32).unsqueeze(-1)) * scale.to(torch.float32).unsqueeze(-1)
    return out.reshape(codes.shape)


def mse_clip_search(
    w: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = False,
    grid: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row / group minimising sum |w - deq|^norm over clip ratios 1, 1 - 1/grid, ...

    Ratios go down to (but exclude) 1 - max_shrink, the grid GPTQ codebases use; ratio 1 is included.
    """
    _check_bits(bits)
    k = w.shape[-1]
    gs = _resolve_group_size(k, group_size)
    wf = w.detach().to(torch.float32)
    best_scale, best_zero = choose_qparams(wf, bits, gs, symmetric, 1.0)
    best_err = _group_err(wf, best_scale, best_zero, bits, gs, norm)
    for i in range(1, int(max_shrink * grid)):
        p = 1.0 - i / grid
        scale, zero = choose_qparams(wf, bits, gs, symmetric, p)
        err = _group_err(wf, scale, zero, bits, gs, norm)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _group_err(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, gs: int, norm: float
) -> torch.Tensor:
    """sum |w - deq(quant(w))|^norm per group, shape [..., G]."""
    deq = dequantize(quantize(w, scale, zero, bits, gs), scale, zero, gs)
    return _grouped((deq - w).abs().pow(norm), gs).sum(dim=-1)


def _weight_qparams(
    w: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    clip_ratio: float | torch.Tensor,
    mse_clip_search_: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed clip ratio or MSE-searched clip, shared by RTN and GPTQ."""
    if mse_clip_search_:
        return mse_clip_search(w, bits, group_size, symmetric)
    return choose_qparams(w, bits, group_size, symmetric, clip_ratio)


def rtn_quantize(
    w: torch.Tensor,
    bits: int = 4,
    group_size: int | None = None,
    symmetric: bool = False,
    clip_ratio: float = 1.0,
    mse_clip_search: bool = False,
) -> QuantizedWeight:
    """Round-to-nearest quantization of a [N, K] weight (baseline and fallback for GPTQ)."""
    if w.dim() != 2:
        raise ValueError(f"rtn_quantize expects a [N, K] weight, got {tuple(w.shape)}")
    gs = _resolve_group_size(w.shape[1], group_size)
    scale, zero = _weight_qparams(w, bits, gs, symmetric, clip_ratio, mse_clip_search)
    codes = quantize(w, scale, zero, bits, gs)
    return QuantizedWeight(codes=codes, scale=scale, zero=zero, group_size=gs, bits=bits)


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


def _inverse_hessian_upper(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp*mean(diag H)*I)^-1, raising damp tenfold on failure."""
    mean_diag = float(torch.diagonal(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(6):
        hd = h + (damp * 10**attempt) * mean_diag * eye
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper
    raise RuntimeError("gptq: Hessian is not positive definite even with heavy dampening")


def _gptq_run(
    w: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    damp: float,
    act_order: bool,
    block_size: int,
    mse_clip_search_: bool,
    clip_ratio: float,
) -> tuple[QuantizedWeight, torch.Tensor]:
    """GPTQ core; also returns the float32 [N, K] weights used in the error feedback (natural order)."""
    _check_bits(bits)
    if w.dim() != 2:
        raise ValueError(f"gptq_quantize expects a [N, K] weight, got {tuple(w.shape)}")
    n, k = w.shape
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"gptq_quantize: Hessian {tuple(hessian.shape)} does not match K={k}")
    gs = _resolve_group_size(k, group_size)
    device = w.device
    wf = w.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=device, dtype=torch.float64).clone()

    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    wf[:, dead] = 0.0

    # Static groups: every contiguous group's params come from the original weights.
    scale, zero = _weight_qparams(wf, bits, gs, symmetric, clip_ratio, mse_clip_search_)

    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    else:
        perm = torch.arange(k, device=device)
    wp = wf[:, perm].contiguous()
    h = h[perm][:, perm]
    col_group = perm // gs  # group of each permuted column
    hinv = _inverse_hessian_upper(h, damp).to(torch.float32)

    qmax = 2**bits - 1
    codes_p = torch.empty(n, k, dtype=torch.uint8, device=device)
    deq_p = torch.empty(n, k, dtype=torch.float32, device=device)
    scale_cols = scale[:, col_group]  # [N, K] in permuted order
    zero_cols = zero[:, col_group].to(torch.float32)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wp[:, i1:i2].clone()
        err1 = torch.empty_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            s = scale_cols[:, i1 + i]
            z = zero_cols[:, i1 + i]
            q = (torch.round(col / s) + z).clamp(0, qmax)
            dq = (q - z) * s  # identical arithmetic to dequantize()
            codes_p[:, i1 + i] = q.to(torch.uint8)
            deq_p[:, i1 + i] = dq
            e = (col - dq) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        wp[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    codes = torch.empty_like(codes_p)
    codes[:, perm] = codes_p
    deq = torch.empty_like(deq_p)
    deq[:, perm] = deq_p
    qw = QuantizedWeight(codes=codes, scale=scale, zero=zero, group_size=gs, bits=bits)
    return qw, deq


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    bits: int = 4,
    group_size: int | None = None,
    symmetric: bool = False,
    damp: float = 0.01,
    act_order: bool = True,
    block_size: int = 128,
    mse_clip_search: bool = False,
    clip_ratio: float = 1.0,
) -> QuantizedWeight:
    """GPTQ of a [N, K] weight with Hessian [K, K]; static contiguous groups so act_order stays exportable.

    Group params come up front from the original weights (dead columns zeroed); columns are
    then quantized in act order (descending diag H) with their own group's params.
    Dead inputs (diag H == 0) get weight 0 and diag 1; dampening adds damp * mean(diag H).
    """
    qw, _ = _gptq_run(
        w, hessian, bits, group_size, symmetric, damp, act_order, block_size,
        mse_clip_search, clip_ratio,
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
