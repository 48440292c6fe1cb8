"""Choosing a grid's parameters: round to nearest per grid, least-squares refits, the clip search, and RTN.

Every function returns parameters of the format in weights.py (fp16-representable scales, integer
zero points or q4_1 minimums); rtn_quantize turns them into a QuantizedWeight.
"""

from __future__ import annotations

import torch

from ..memory import row_slices
from .floats import FP16_TINY, fp16_ceil, fp16_floor, fp16_round, true_div
from .layout import GGML_BLOCK
from .weights import (Q4_0_ZERO, QuantizedWeight, _expand, check_bits, check_grid, dequant_values, grouped,
                      quant_values, quantize, resolve_group_size)


def _grouped_finite(w: torch.Tensor, gs: int, who: str) -> torch.Tensor:
    """w [..., K] as float32 groups [..., G, gs], refusing non-finite weights (who names the caller)."""
    wg = grouped(w.detach().to(torch.float32), gs)
    if wg.numel() and not bool(torch.isfinite(wg).all()):
        raise ValueError(f"{who}: weight has non-finite values")
    return wg


def choose_qparams(
    w: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = False,
    clip_ratio: float | torch.Tensor = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row / per-group (scale float32 [..., G], zero uint8 [..., G]) of w [..., K] (the conventions in weights.py).

    clip_ratio is a float or a tensor broadcastable to [..., G] (used by the MSE clip search).
    """
    check_bits(bits)
    k = w.shape[-1]
    gs = resolve_group_size(k, group_size)
    wg = _grouped_finite(w, gs, "choose_qparams")
    return _int_qparams(_int_bounds(wg, symmetric), bits, symmetric, clip_ratio)


def _int_bounds(wg: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group range of grouped weights [..., G, gs] that the int grid spans: (min clamped <= 0, max clamped
    >= 0), or (0, max |w|) when symmetric. Computed once per weight; every clip ratio scales it."""
    if symmetric:
        amax = wg.abs().amax(dim=-1)
        return torch.zeros_like(amax), amax
    return wg.amin(dim=-1).clamp(max=0.0), wg.amax(dim=-1).clamp(min=0.0)


def _int_qparams(bounds: tuple[torch.Tensor, torch.Tensor], bits: int, symmetric: bool,
                 clip_ratio: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of the int grid for the range _int_bounds gave, shrunk by clip_ratio."""
    lo, hi = bounds
    if isinstance(clip_ratio, torch.Tensor):
        clip_ratio = clip_ratio.to(device=hi.device, dtype=torch.float32)
    if symmetric:
        half = 2 ** (bits - 1)
        scale = fp16_ceil(true_div(hi * clip_ratio, float(half - 1)))
        return scale, torch.full_like(scale, half, dtype=torch.uint8)
    qmax = 2**bits - 1
    xmin, xmax = lo * clip_ratio, hi * clip_ratio
    scale = fp16_ceil(true_div(xmax - xmin, float(qmax)))
    zero = torch.round(-xmin / scale).clamp(0, qmax).to(torch.uint8)
    return scale, zero


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
    return fp16_ceil(true_div(hi - m, 15.0)), m


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
    mag = fp16_ceil(true_div(e.abs() * clip_ratio, float(abs(extreme_level))))
    positive = (e > 0) == (extreme_level > 0)  # sign of d that puts e on that level
    d = torch.where(positive, mag, -mag)
    return d, torch.full_like(d, Q4_0_ZERO, dtype=torch.uint8)


def _block_sums(w: torch.Tensor, levels: torch.Tensor, importance: torch.Tensor | None):
    """Per-block weighted sums (sum v, sum v l, sum v w, sum v l^2, sum v l w) for least-squares fits, float32
    (levels are small integers, so the level sums are exact)."""
    wg = grouped(w.detach().to(torch.float32), GGML_BLOCK)
    lg = grouped(levels, GGML_BLOCK).to(torch.float32)
    if importance is None:
        sv = torch.full(wg.shape[:-1], float(GGML_BLOCK), device=wg.device)
        return sv, lg.sum(-1), wg.sum(-1), (lg * lg).sum(-1), (lg * wg).sum(-1)
    v = grouped(importance.to(wg), GGML_BLOCK)
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
    check_grid(grid, bits, group_size if group_size is not None else k)
    if grid == "q4_1":
        scale, minimum = choose_qparams_q4_1(w, clip_ratio)
        return scale, None, minimum
    if grid == "q4_0":
        return (*choose_qparams_q4_0(w, clip_ratio), None)
    return (*choose_qparams(w, bits, group_size, symmetric, clip_ratio), None)


def _candidates(w, grid, bits, gs, symmetric, ratios, refine, importance):
    """Candidate (scale, zero, minimum) of the clip search; the first is plain RTN."""
    if grid == "int":  # the range is the same for every ratio: found once
        bounds = _int_bounds(_grouped_finite(w, gs, "search_weight_qparams"), symmetric)
        for p in ratios:
            yield (*_int_qparams(bounds, bits, symmetric, p), None)
        return
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
    check_bits(bits)
    k = w.shape[-1]
    gs = resolve_group_size(k, group_size)
    check_grid(grid, bits, gs)
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
    wg = grouped(wf, gs)
    vg = None if importance is None else grouped(importance, gs)
    best = best_err = None
    for cand in _candidates(wf, grid, bits, gs, symmetric, ratios, refine, importance):
        err = _grouped_err(wg, *cand, 2**bits - 1, norm, vg)
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


def _grouped_err(
    wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, minimum: torch.Tensor | None, qmax: int,
    norm: float, vg: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_j v_j |w_j - deq(quant(w))_j|^norm per group [..., G] of grouped float32 weights wg [..., G, gs] (vg:
    the importance grouped alike, or None): quantize then dequantize's numbers, without the uint8 codes between."""
    sc, zr, mn = _expand(scale), _expand(zero), _expand(minimum)
    d = dequant_values(quant_values(wg, sc, zr, qmax, mn), sc, zr, mn, in_place=True).sub_(wg)
    e = d.mul_(d) if norm == 2.0 else d.abs_().pow_(norm)
    if vg is not None:
        e = e.mul_(vg)
    return e.sum(dim=-1)


def weight_qparams(
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


def grid_group_size(k: int, group_size: int | None, grid: str) -> int:
    """group_size None means per output channel on the int grid and GGML_BLOCK on the q4 grids."""
    if group_size is None and grid != "int":
        group_size = GGML_BLOCK
    return resolve_group_size(k, group_size)


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
    gs = grid_group_size(w.shape[1], group_size, grid)
    scale, zero, minimum = weight_qparams(w, bits, gs, symmetric, clip_ratio, mse_clip_search, grid, importance)
    codes = quantize(w, scale, zero, bits, gs, minimum)
    return QuantizedWeight(codes=codes, scale=scale, zero=zero, group_size=gs, bits=bits, minimum=minimum, grid=grid)
