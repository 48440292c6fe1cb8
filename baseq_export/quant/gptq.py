"""GPTQ: the Hessian of a linear's inputs, its one-time factorisation, and the column-by-column rounding with
error feedback onto any weight grid (static contiguous groups, so act order stays exportable)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .qparams import grid_group_size, weight_qparams
from .weights import QuantizedWeight, check_bits, dequant_values, quant_values


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


def error_feedback(wp: torch.Tensor, hinv: torch.Tensor, block_size: int,
                   round_column: Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                   return_used: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GPTQ's column sweep over weights wp [N, K] already in the factor's column order (modified in place):
    round_column(i, column) gives column i's (uint8 codes, float32 values on the grid); each column's rounding
    error, scaled by the inverse Hessian factor hinv, is spread over the columns after it (lazily, block_size
    columns at a time). Returns the codes and, if return_used, the grid values, both in wp's column order."""
    n, k = wp.shape
    codes_p = torch.empty(n, k, dtype=torch.uint8, device=wp.device)
    deq_p = torch.empty(n, k, dtype=torch.float32, device=wp.device) if return_used else None
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wp[:, i1:i2].clone()
        err1 = torch.empty_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            q, dq = round_column(i1 + i, col)
            codes_p[:, i1 + i] = q
            if deq_p is not None:
                deq_p[:, i1 + i] = dq
            e = (col - dq) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        wp[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes_p, deq_p


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
    check_bits(bits)
    if w.dim() != 2:
        raise ValueError(f"gptq_quantize expects a [N, K] weight, got {tuple(w.shape)}")
    n, k = w.shape
    if factor is None and hessian is None:
        raise ValueError("gptq_quantize needs the layer's Hessian, or its factor from gptq_factor")
    h_shape = tuple(factor.hinv.shape) if factor is not None else tuple(hessian.shape)
    if h_shape != (k, k):
        raise ValueError(f"gptq_quantize: Hessian {h_shape} does not match K={k}")
    gs = grid_group_size(k, group_size, grid)
    device = w.device
    if factor is None:
        factor = gptq_factor(hessian, damp, act_order, device, scratch)
    diag, dead, perm, hinv = factor.diag, factor.dead, factor.perm, factor.hinv
    wf = w.detach().to(torch.float32).clone()
    wf[:, dead] = 0.0

    # Static groups: every contiguous group's params come from the original weights (the clip search
    # weighted by diag H when weighted_clip); each column is then rounded with its block's fixed params.
    importance = diag.to(torch.float32) if weighted_clip else None
    scale, zero, minimum = weight_qparams(wf, bits, gs, symmetric, clip_ratio, mse_clip_search_, grid, importance)

    wp = wf[:, perm].contiguous()
    del wf
    col_group = perm // gs  # group of each permuted column
    qmax = 2**bits - 1

    def round_column(i: int, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = col_group[i]
        s = scale[:, g]
        z = None if zero is None else zero[:, g].to(torch.float32)
        m = None if minimum is None else minimum[:, g]
        q = quant_values(col, s, z, qmax, m)
        return q.to(torch.uint8), dequant_values(q, s, z, m)  # identical arithmetic to dequantize()

    codes_p, deq_p = error_feedback(wp, hinv, block_size, round_column, return_used)
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
