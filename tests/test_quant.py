"""Tests of baseq_export.quant against an independent numpy reference written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from baseq_export import quant
from baseq_export.quant import gptq, qparams
from baseq_export.quant import (
    HessianAccumulator,
    QuantizedWeight,
    choose_qparams,
    dequantize,
    dequantize_weight,
    fake_quant_kv,
    fake_quant_per_token,
    gptq_quantize,
    pack_int4,
    quantize,
    rtn_quantize,
    unpack_int4,
)

# --------------------------------------------------------------------------------------
# Independent numpy reference (float32 arithmetic, numpy's round = half to even)
# --------------------------------------------------------------------------------------

F32 = np.float32


def np_fp16_ceil(s: np.ndarray) -> np.ndarray:
    """Smallest fp16 value >= s, within [2**-24, 65504]."""
    s = np.clip(s.astype(F32), F32(2.0**-24), F32(65504.0))
    h = s.astype(np.float16)
    up = np.nextafter(h, np.float16(np.inf))
    return np.where(h.astype(F32) < s, up, h).astype(F32)


def np_qparams(w: np.ndarray, bits: int, gs: int, symmetric: bool, clip: float):
    n, k = w.shape
    wg = w.astype(F32).reshape(n, k // gs, gs)
    qmax = 2**bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        amax = np.abs(wg).max(-1) * F32(clip)
        scale = np_fp16_ceil(amax / F32(half - 1))
        zero = np.full(scale.shape, half, dtype=np.uint8)
    else:
        xmin = np.minimum(wg.min(-1), F32(0)) * F32(clip)
        xmax = np.maximum(wg.max(-1), F32(0)) * F32(clip)
        scale = np_fp16_ceil((xmax - xmin) / F32(qmax))
        zero = np.clip(np.round(-xmin / scale), 0, qmax).astype(np.uint8)
    return scale, zero


def np_quant(w, scale, zero, bits, gs):
    n, k = w.shape
    wg = w.astype(F32).reshape(n, k // gs, gs)
    q = np.round(wg / scale[..., None]) + zero[..., None].astype(F32)
    return np.clip(q, 0, 2**bits - 1).astype(np.uint8).reshape(n, k)


def np_dequant(codes, scale, zero, gs):
    n, k = codes.shape
    cg = codes.astype(F32).reshape(n, k // gs, gs)
    return ((cg - zero[..., None].astype(F32)) * scale[..., None]).reshape(n, k)


def np_fake_quant_per_token(x: np.ndarray, bits: int, clip) -> np.ndarray:
    x = x.astype(F32)
    qmax = 2**bits - 1
    clip = np.asarray(clip, dtype=F32)
    xmin = x.min(-1, keepdims=True)
    xmax = x.max(-1, keepdims=True)
    r = xmax - xmin
    scale = np.maximum((r * clip) / F32(qmax), F32(1e-8))
    lo = (xmax + xmin) * F32(0.5) - (r * F32(0.5)) * clip
    zero = np.round(-lo / scale)
    q = np.clip(np.round(x / scale) + zero, 0, qmax)
    return ((q - zero) * scale).astype(F32)


def heavy_weight(n: int, k: int, seed: int) -> torch.Tensor:
    """Gaussian weights with a few outliers and a shifted (all-positive) row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, 3] = 0.9
    w[1] = w[1].abs() + 0.01
    w[2] = -w[2].abs()
    return w


GROUPS = [None, 32, 64, 128]


# --------------------------------------------------------------------------------------
# Weight quantizer primitives
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("clip", [1.0, 0.9])
def test_qparams_quantize_dequantize_match_numpy(bits, group_size, symmetric, clip):
    n, k = 16, 256
    w = heavy_weight(n, k, seed=bits * 7 + (group_size or 0))
    gs = group_size or k
    scale, zero = choose_qparams(w, bits, group_size, symmetric, clip)
    assert scale.dtype == torch.float32 and zero.dtype == torch.uint8
    assert scale.shape == (n, k // gs) and zero.shape == (n, k // gs)

    ref_scale, ref_zero = np_qparams(w.numpy(), bits, gs, symmetric, clip)
    np.testing.assert_array_equal(scale.numpy(), ref_scale)
    np.testing.assert_array_equal(zero.numpy(), ref_zero)

    qmax = 2**bits - 1
    # fp16-representable, positive, zero in range
    assert torch.equal(scale.half().float(), scale)
    assert bool((scale > 0).all())
    assert int(zero.max()) <= qmax
    if symmetric:
        assert bool((zero == 2 ** (bits - 1)).all())

    codes = quantize(w, scale, zero, bits, group_size)
    assert codes.dtype == torch.uint8 and codes.shape == w.shape
    assert int(codes.max()) <= qmax
    np.testing.assert_array_equal(codes.numpy(), np_quant(w.numpy(), ref_scale, ref_zero, bits, gs))

    deq = dequantize(codes, scale, zero, group_size)
    assert deq.dtype == torch.float32
    np.testing.assert_array_equal(deq.numpy(), np_dequant(codes.numpy(), ref_scale, ref_zero, gs))

    # error <= scale / 2 inside the clip range
    wg = w.reshape(n, k // gs, gs)
    if symmetric:
        amax = wg.abs().amax(-1, keepdim=True) * clip
        lo, hi = -amax, amax
    else:
        lo = wg.amin(-1, keepdim=True).clamp(max=0) * clip
        hi = wg.amax(-1, keepdim=True).clamp(min=0) * clip
    inside = (wg >= lo) & (wg <= hi)
    err = (deq.reshape(n, k // gs, gs) - wg).abs()
    bound = scale.unsqueeze(-1) / 2 * (1 + 1e-6)
    assert bool((err <= bound)[inside].all())
    if clip == 1.0:
        assert bool(inside.all())


def test_scale_guard_zero_and_tiny_groups():
    w = torch.zeros(4, 64)
    w[1, :] = 1e-12  # below the smallest fp16 subnormal
    w[2, ::2] = 3e-6  # fp16 subnormal range
    w[3, 5] = -1e-30
    for symmetric in (False, True):
        for bits in (4, 8):
            qw = rtn_quantize(w, bits=bits, group_size=32, symmetric=symmetric)
            qw.validate()
            assert bool((qw.scale >= 2.0**-24).all())
            deq = dequantize_weight(qw)
            assert bool(torch.isfinite(deq).all())
            assert torch.equal(deq[0], torch.zeros(64))  # all-zero rows are exact
            assert bool(((deq - w).abs() <= qw.scale.repeat_interleave(32, dim=1) / 2).all())


def test_fp16_ceil_never_rounds_down():
    s = torch.rand(10000) * 10.0 ** torch.randint(-9, 4, (10000,)).float()
    c = quant.fp16_ceil(s)
    assert bool((c >= s.clamp(min=2.0**-24)).all())
    assert torch.equal(c.half().float(), c)
    np.testing.assert_array_equal(c.numpy(), np_fp16_ceil(s.numpy()))


def test_quantize_group_size_checks():
    w = torch.randn(4, 96)
    with pytest.raises(ValueError):
        choose_qparams(w, 4, group_size=64)
    scale, zero = choose_qparams(w, 4, group_size=32)
    with pytest.raises(ValueError):
        quantize(w, scale, zero, 4, group_size=48)
    # group size inferred from the scale shape
    assert torch.equal(quantize(w, scale, zero, 4), quantize(w, scale, zero, 4, 32))


def test_rtn_quantize_and_quantized_weight():
    w = heavy_weight(8, 128, seed=1)
    qw = rtn_quantize(w, bits=4, group_size=64)
    assert isinstance(qw, QuantizedWeight)
    assert qw.group_size == 64 and qw.bits == 4 and qw.shape == (8, 128)
    qw.validate()
    ref_s, ref_z = np_qparams(w.numpy(), 4, 64, False, 1.0)
    np.testing.assert_array_equal(qw.codes.numpy(), np_quant(w.numpy(), ref_s, ref_z, 4, 64))
    assert torch.equal(dequantize_weight(qw), qw.dequantize())
    per_ch = rtn_quantize(w, bits=4)
    assert per_ch.group_size == 128 and per_ch.scale.shape == (8, 1)
    with pytest.raises(ValueError):
        QuantizedWeight(qw.codes, qw.scale[:, :1], qw.zero, 64, 4)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [None, 32])
def test_mse_clip_search_not_worse_than_rtn(symmetric, group_size):
    w = heavy_weight(16, 128, seed=5)
    base = rtn_quantize(w, 4, group_size, symmetric)
    searched = rtn_quantize(w, 4, group_size, symmetric, mse_clip_search=True)
    searched.validate()
    gs = group_size or 128

    def group_err(qw):
        return ((dequantize_weight(qw) - w) ** 2).reshape(16, -1, gs).sum(-1)

    assert bool((group_err(searched) <= group_err(base) + 1e-12).all())
    assert float(group_err(searched).sum()) < float(group_err(base).sum())


@pytest.mark.parametrize("symmetric, group_size, weighted", [(False, None, False), (False, 32, True), (True, 32, False)])
def test_mse_clip_search_is_the_best_ratio_per_group_numpy(symmetric, group_size, weighted):
    """The int grid's clip search (range found once, codes never stored) picks, for each group, the ratio of least
    weighted squared error, as a plain numpy loop over the ratios computes it."""
    w = heavy_weight(12, 128, seed=9)
    v = torch.rand(128, generator=torch.Generator().manual_seed(3)) if weighted else None
    scale, zero, _ = quant.search_weight_qparams(w, "int", 4, group_size, symmetric, importance=v)
    gs = group_size or 128
    wn = w.numpy().astype(F32)
    vn = np.ones(128, F32) if v is None else v.numpy()
    best_err = best = None
    for i in range(80):  # ratios 1, 0.99, ..., 0.21
        s, z = np_qparams(wn, 4, gs, symmetric, 1.0 - i / 100)
        err = (((np_dequant(np_quant(wn, s, z, 4, gs), s, z, gs) - wn) ** 2) * vn).reshape(12, -1, gs).sum(-1)
        if best is None:
            best_err, best = err, s
        best, best_err = np.where(err < best_err, s, best), np.minimum(err, best_err)
    got = quant.dequantize(quant.quantize(w, scale, zero, 4, gs), scale, zero, gs).numpy()
    np.testing.assert_allclose((((got - wn) ** 2) * vn).reshape(12, -1, gs).sum(-1), best_err, rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(scale.numpy(), best)


# --------------------------------------------------------------------------------------
# int4 packing
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 7, 32, 33])
def test_pack_unpack_round_trip(k):
    codes = torch.randint(0, 16, (3, 5, k), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (3, 5, (k + 1) // 2)
    c = codes.numpy().astype(np.int32)
    if k % 2:
        c = np.concatenate([c, np.zeros((3, 5, 1), np.int32)], -1)
    np.testing.assert_array_equal(packed.numpy(), (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8))
    assert torch.equal(unpack_int4(packed, k), codes)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError):
        pack_int4(torch.tensor([16], dtype=torch.uint8))
    with pytest.raises(TypeError):
        pack_int4(torch.tensor([1], dtype=torch.int32))


# --------------------------------------------------------------------------------------
# Activation / KV fake quantization
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("clip", [1.0, 0.88])
def test_fake_quant_per_token_matches_numpy(bits, clip):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 17, 64, generator=g) * 2 + torch.randn(3, 17, 1, generator=g)
    x[0, 0] += 10.0  # an all-positive token
    x[0, 1, 5] = 40.0  # an outlier
    out = fake_quant_per_token(x, bits, clip)
    ref = np_fake_quant_per_token(x.numpy(), bits, clip)
    np.testing.assert_array_equal(out.numpy(), ref)
    # at most 2**bits distinct values per token, error bounded inside the shrunk range
    xmin, xmax = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = (xmax - xmin) * clip / (2**bits - 1)
    mid, half = (xmax + xmin) / 2, (xmax - xmin) / 2 * clip
    inside = (x >= mid - half) & (x <= mid + half)
    err = (out - x).abs()
    assert bool((err <= scale * 1.0001)[inside].all())  # rounded zero point can cost up to half a step more


def test_fake_quant_tensor_clip_per_head_and_kv():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 9, 16, generator=g)
    clip = torch.tensor([1.0, 0.9, 0.8, 0.5])
    out = fake_quant_per_token(x, 4, clip.view(4, 1, 1))
    ref = np_fake_quant_per_token(x.numpy(), 4, clip.numpy().reshape(4, 1, 1))
    np.testing.assert_array_equal(out.numpy(), ref)
    assert torch.equal(fake_quant_kv(x, 4, clip), out)
    assert torch.equal(fake_quant_kv(x, 4, 0.9), fake_quant_per_token(x, 4, 0.9))
    with pytest.raises(ValueError):
        fake_quant_kv(x, 4, torch.ones(3))


@pytest.mark.parametrize("bits", [4, 8])
def test_fake_quant_constant_rows(bits):
    vals = torch.tensor([0.0, 1.0, -3.5, 1e-10, 123.456, -7e4, 0.1])
    x = vals[:, None].expand(7, 32).clone()
    for clip in (1.0, 0.7):
        out = fake_quant_per_token(x, bits, clip)
        np.testing.assert_array_equal(out.numpy(), np_fake_quant_per_token(x.numpy(), bits, clip))
        assert torch.allclose(out, x, rtol=1e-6, atol=1e-9)
    # fp16 input keeps dtype and value
    xh = x[[0, 1, 2, 3, 4, 6]].half()  # -7e4 is beyond fp16; the rest round-trip exactly
    outh = fake_quant_per_token(xh, bits)
    assert outh.dtype == torch.float16 and torch.equal(outh, xh)


def test_fake_quant_zero_size_and_identity():
    for shape in [(0, 8), (2, 0, 8), (3, 0)]:
        x = torch.randn(shape)
        out = fake_quant_per_token(x, 4)
        assert out.shape == x.shape
    x = torch.randn(4, 8)
    assert torch.equal(fake_quant_per_token(x, 16), x)
    assert torch.equal(fake_quant_per_token(x, None), x)
    assert fake_quant_kv(torch.randn(1, 2, 0, 4), 4, torch.ones(2)).shape == (1, 2, 0, 4)


def test_fake_quant_shift():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(5, 32, generator=g) + 3.0
    shift = torch.randn(32, generator=g)
    out = fake_quant_per_token(x, 4, 0.9, shift=shift)
    ref = np_fake_quant_per_token((x - shift).numpy(), 4, 0.9) + shift.numpy()
    np.testing.assert_array_equal(out.numpy(), ref.astype(np.float32))


def test_ste_gradients_reach_x_and_clip_with_identical_values():
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 4, 6, 16, generator=g)
    x = x0.clone().requires_grad_(True)
    clip = torch.full((4, 1, 1), 0.9, requires_grad=True)
    out = fake_quant_per_token(x, 4, clip)
    with torch.no_grad():
        fast = fake_quant_per_token(x0, 4, clip.detach())
    assert torch.equal(out.detach(), fast)
    target = torch.randn(out.shape, generator=g)
    ((out - target) ** 2).sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and float(x.grad.abs().sum()) > 0
    assert clip.grad is not None and bool((clip.grad != 0).all())
    # shift is learnable too
    shift = torch.zeros(16, requires_grad=True)
    fake_quant_per_token(x0, 4, 0.9, shift=shift).pow(2).sum().backward()
    assert shift.grad is not None and float(shift.grad.abs().sum()) > 0


# --------------------------------------------------------------------------------------
# GPTQ
# --------------------------------------------------------------------------------------


def correlated_layer(n: int = 64, k: int = 256, rows: int = 2048, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, k, generator=g) / math.sqrt(k)
    z = torch.randn(rows, k, generator=g)
    z[:, :8] *= 6.0  # a few strong directions, so act order matters
    x = z @ a
    w = torch.randn(n, k, generator=g) * 0.05
    return x, w


@pytest.fixture(scope="module")
def layer():
    x, w = correlated_layer()
    acc = HessianAccumulator(x.shape[1])
    for chunk in torch.split(x.reshape(4, -1, x.shape[1]), [1, 2, 1]):  # uneven 3-D batches
        acc.add(chunk)
    return x, w, acc.hessian


def test_hessian_accumulator_running_average():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(37, 12, generator=g, dtype=torch.float64)
    acc = HessianAccumulator(12)
    for part in (x[:5], x[5:6], x[6:6], x[6:]):
        acc.add(part)
    assert acc.nsamples == 37 and acc.hessian.dtype == torch.float64
    ref = 2.0 / 37 * (x.numpy().T @ x.numpy())
    np.testing.assert_allclose(acc.hessian.numpy(), ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        acc.add(torch.randn(2, 11))


@pytest.mark.parametrize("group_size", [None, 128])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_beats_rtn_on_output_error(layer, group_size, act_order, symmetric):
    x, w, h = layer
    rtn = rtn_quantize(w, 4, group_size, symmetric)
    gq = gptq_quantize(w, h, 4, group_size, symmetric, act_order=act_order, block_size=64)
    gq.validate()
    assert gq.group_size == (group_size or w.shape[1])
    # static groups: params are those of RTN on the original weights
    assert torch.equal(gq.scale, rtn.scale) and torch.equal(gq.zero, rtn.zero)
    ref = x @ w.T
    err_rtn = float((ref - x @ dequantize_weight(rtn).T).norm())
    err_gptq = float((ref - x @ dequantize_weight(gq).T).norm())
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_codes_are_what_error_feedback_used(layer, act_order):
    x, w, h = layer
    qw, used = gptq._gptq_run(w, h, 4, 64, False, 0.01, act_order, 128, False, 1.0)
    assert torch.equal(dequantize_weight(qw), used)
    # stored codes are consistent with the stored params
    s, z = qw.scale.numpy(), qw.zero.numpy()
    np.testing.assert_array_equal(dequantize_weight(qw).numpy(), np_dequant(qw.codes.numpy(), s, z, 64))
    assert int(qw.codes.max()) <= 15 and int(qw.zero.max()) <= 15


def test_gptq_in_place_inverse_equals_plain_linear_algebra(layer, monkeypatch):
    """The act-order Hessian is permuted, symmetrised and factored in its own memory; the result must be what the
    plain out-of-place chain gives on h[perm][:, perm] (torch reads its lower triangle), bit for bit, even though
    an accumulated Hessian is not exactly symmetric."""
    _, _, h = layer
    monkeypatch.setattr(gptq, "HESSIAN_ROWS", 37)  # several uneven slices, so the slicing itself is exercised
    assert not torch.equal(h, h.T)
    dead = torch.zeros(h.shape[0], dtype=torch.bool)
    dead[[3, 100]] = True  # inputs never active: zero rows and columns
    h = h.clone()
    h[dead] = 0.0
    h[:, dead] = 0.0
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    ref = h.clone()
    ref[dead, dead] = 1.0
    ref = ref[perm][:, perm]
    lam = 0.01 * float(torch.diagonal(ref).mean())
    plain = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(ref + lam * torch.eye(h.shape[0], dtype=h.dtype))), upper=True)
    got = gptq._inverse_hessian_upper(lambda: gptq._act_order_hessian_(h.clone(), perm, dead), 0.01)
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert torch.equal(got, plain.to(torch.float32))


@pytest.mark.parametrize("group_size, grid", [(None, "int"), (32, "q4_1")])
def test_gptq_scratch_hessian_gives_the_same_codes(layer, group_size, grid):
    """scratch=True factors the caller's Hessian in place (no 1 GB copy at 7B): same codes, and the buffer is used."""
    _, w, h = layer
    ref = gptq_quantize(w, h, 4, group_size, act_order=True, grid=grid)
    buf = h.clone()
    got = gptq_quantize(w, buf, 4, group_size, act_order=True, grid=grid, scratch=True)
    assert torch.equal(got.codes, ref.codes) and torch.equal(got.scale, ref.scale)
    assert not torch.equal(buf, h)  # it was the working memory


def test_gptq_mse_clip_and_8bit(layer):
    x, w, h = layer
    for bits in (4, 8):
        gq = gptq_quantize(w, h, bits, 32, mse_clip_search=True, act_order=True)
        gq.validate()
        rel = float((x @ (dequantize_weight(gq) - w).T).norm() / (x @ w.T).norm())
        assert rel < (0.1 if bits == 4 else 0.005)


def test_gptq_dead_input_column(layer):
    x, w, _ = layer
    x = x.clone()
    x[:, 7] = 0.0
    x[:, 200] = 0.0
    acc = HessianAccumulator(x.shape[1])
    acc.add(x)
    assert float(acc.hessian[7, 7]) == 0.0
    for act_order in (False, True):
        gq = gptq_quantize(w, acc.hessian, 4, 128, act_order=act_order)
        deq = dequantize_weight(gq)
        assert bool(torch.isfinite(deq).all())
        assert torch.equal(deq[:, 7], torch.zeros(w.shape[0]))
        assert torch.equal(deq[:, 200], torch.zeros(w.shape[0]))
        err = float((x @ (deq - w).T).norm() / (x @ w.T).norm())
        assert err < 0.1


def test_gptq_singular_hessian_and_dtype():
    # rank-deficient Hessian (fewer samples than K) and a half-precision weight
    g = torch.Generator().manual_seed(9)
    x = torch.randn(16, 64, generator=g)
    w = (torch.randn(8, 64, generator=g) * 0.05).half()
    acc = HessianAccumulator(64)
    acc.add(x)
    gq = gptq_quantize(w, acc.hessian, 4, 32)
    gq.validate()
    assert gq.codes.device == w.device and gq.scale.dtype == torch.float32
    assert bool(torch.isfinite(dequantize_weight(gq)).all())


def test_gptq_factor_shared_or_missing():
    """A Hessian factored once (gptq_factor) gives gptq_quantize's own codes; neither a Hessian nor a factor, or a
    factor of another width, is refused with an error that names the problem."""
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(256, 64, generator=g), torch.randn(12, 64, generator=g)
    acc = HessianAccumulator(64)
    acc.add(x)
    own = gptq_quantize(w, acc.hessian, 4, 32, mse_clip_search=True)
    shared = gptq_quantize(w, None, 4, 32, mse_clip_search=True, factor=quant.gptq_factor(acc.hessian))
    assert torch.equal(own.codes, shared.codes) and torch.equal(own.scale, shared.scale)
    with pytest.raises(ValueError, match="needs the layer's Hessian"):
        gptq_quantize(w, None, 4, 32)
    with pytest.raises(ValueError, match="does not match K=64"):
        gptq_quantize(w, None, 4, 32, factor=quant.gptq_factor(torch.eye(32)))


# --------------------------------------------------------------------------------------
# llama.cpp grids: q4_0 and q4_1 (blocks of 32)
# --------------------------------------------------------------------------------------


def np_fp16_floor(x: np.ndarray) -> np.ndarray:
    """Largest fp16 value <= x, within [-65504, 65504]."""
    x = np.clip(x.astype(F32), F32(-65504.0), F32(65504.0))
    h = x.astype(np.float16)
    down = np.nextafter(h, np.float16(-np.inf))
    return np.where(h.astype(F32) > x, down, h).astype(F32)


def np_q4_1(w: np.ndarray):
    """Independent RTN of the q4_1 grid: (codes, d, m, w_hat) from the conventions."""
    n, k = w.shape
    wg = w.astype(F32).reshape(n, k // 32, 32)
    m = np_fp16_floor(wg.min(-1))
    d = np_fp16_ceil((wg.max(-1) - m) / F32(15))
    q = np.clip(np.round((wg - m[..., None]) / d[..., None]), 0, 15)
    # one rounding of the exact value q*d + m (computed in float64, where it is exact)
    what = (q.astype(np.float64) * d[..., None].astype(np.float64) + m[..., None].astype(np.float64)).astype(F32)
    return q.astype(np.uint8).reshape(n, k), d, m, what.reshape(n, k)


def np_q4_0(w: np.ndarray):
    """Independent RTN of the q4_0 grid as llama.cpp's reference quantizer: d = -e / 8, e the largest-magnitude weight."""
    n, k = w.shape
    wg = w.astype(F32).reshape(n, k // 32, 32)
    idx = np.abs(wg).argmax(-1)
    e = np.take_along_axis(wg, idx[..., None], -1)[..., 0]
    mag = np_fp16_ceil(np.abs(e) / F32(8))
    d = np.where(e > 0, -mag, mag).astype(F32)
    q = np.clip(np.round(wg / d[..., None]) + 8, 0, 15)
    return q.astype(np.uint8).reshape(n, k), d, ((q - 8) * d[..., None]).astype(F32).reshape(n, k)


def grid_weight(n=24, k=128, seed=0) -> torch.Tensor:
    """heavy_weight plus blocks that stress the fp16 limits: constant, tiny, offset and all-zero blocks."""
    w = heavy_weight(n, k, seed)
    w[3, :32] = 0.123456  # constant block, not fp16-exact
    w[4, 32:64] = torch.linspace(1e-7, 3e-7, 32)  # fp16-subnormal range
    w[5, 64:96] = 0.5 + torch.linspace(-1e-4, 1e-4, 32)  # narrow block far from 0: m is not -zero*d
    w[6, 96:] = 0.0
    w[7, :32] = -w[7, :32].abs() - 0.3  # all-negative block, extreme negative
    return w


def test_q4_1_rtn_matches_numpy_and_covers_the_block():
    w = grid_weight()
    qw = quant.rtn_quantize(w, grid="q4_1")
    qw.validate()
    assert qw.grid == "q4_1" and qw.zero is None and qw.group_size == 32 and qw.minimum.dtype == torch.float32
    codes, d, m, what = np_q4_1(w.numpy())
    np.testing.assert_array_equal(qw.scale.numpy(), d)
    np.testing.assert_array_equal(qw.minimum.numpy(), m)
    np.testing.assert_array_equal(qw.codes.numpy(), codes)
    np.testing.assert_array_equal(qw.dequantize().numpy(), what)
    # m <= min and m + 15 d >= max: every weight within half a step
    err = (qw.dequantize() - w).abs().reshape(24, 4, 32)
    assert bool((err <= qw.scale.unsqueeze(-1) * 0.5 * (1 + 1e-6) + 1e-12).all())
    # the narrow offset block is far better than an integer zero point could do (the range must include 0 there)
    int_err = (quant.rtn_quantize(w, grid="int", group_size=32).dequantize() - w)[5, 64:96].abs().max()
    assert float(err[5, 2].max()) < 0.1 * float(int_err)


def test_q4_0_rtn_matches_llama_cpp_reference_rule():
    w = grid_weight(seed=3)
    qw = quant.rtn_quantize(w, grid="q4_0")
    qw.validate()
    codes, d, what = np_q4_0(w.numpy())
    np.testing.assert_array_equal(qw.scale.numpy(), d)
    assert bool((qw.zero == 8).all()) and bool((qw.scale < 0).any()) and bool((qw.scale > 0).any())
    np.testing.assert_array_equal(qw.codes.numpy(), codes)
    np.testing.assert_array_equal(qw.dequantize().numpy(), what)
    # the largest-magnitude weight of every block is on level -8 (code 0), where |d| is a normal fp16
    # (in the subnormal range fp16_ceil(|e| / 8) can be far above |e| / 8)
    wg = w.reshape(24, 4, 32)
    first_max = wg.abs().argmax(-1, keepdim=True)
    nonzero = wg.abs().amax(-1) > 8 * 2.0**-14
    assert bool((qw.codes.reshape(24, 4, 32).gather(-1, first_max).squeeze(-1)[nonzero] == 0).all())


@pytest.mark.parametrize("grid", ["q4_0", "q4_1"])
def test_ggml_blocks_dequantize_in_gguf_py_bit_for_bit(grid):
    """llama.cpp's block bytes of our weights, read by gguf-py's (independent) numpy dequantizer."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    w = grid_weight(seed=5)
    h = HessianAccumulator(128)
    h.add(torch.randn(256, 128, generator=torch.Generator().manual_seed(1)))
    for qw in (quant.rtn_quantize(w, grid=grid), quant.rtn_quantize(w, grid=grid, mse_clip_search=True),
               gptq_quantize(w, h.hessian, 4, 32, grid=grid, mse_clip_search=True)):
        blocks = quant.ggml_q4_blocks(qw)
        assert blocks.dtype == torch.uint8 and blocks.shape == (24, 4, 18 if grid == "q4_0" else 20)
        t = GGMLQuantizationType.Q4_0 if grid == "q4_0" else GGMLQuantizationType.Q4_1
        deq = gguf_dequantize(blocks.reshape(24, -1).numpy(), t)
        np.testing.assert_array_equal(deq, qw.dequantize().numpy())
        # nibble order: byte j of a block = code j (low) | code j+16 (high)
        c = qw.codes.numpy().reshape(24, 4, 32).astype(np.uint8)
        np.testing.assert_array_equal(blocks.numpy()[..., -16:], c[..., :16] | (c[..., 16:] << 4))
    with pytest.raises(ValueError, match="no llama.cpp"):
        quant.ggml_q4_blocks(quant.rtn_quantize(w, group_size=32))


@pytest.mark.parametrize("grid", ["q4_0", "q4_1"])
def test_grid_search_never_worse_than_rtn_and_fp16_exact(grid):
    w = heavy_weight(32, 256, seed=8)
    rtn = quant.rtn_quantize(w, grid=grid)
    searched = quant.rtn_quantize(w, grid=grid, mse_clip_search=True)
    searched.validate()

    def block_err(qw, v=None):
        e = (qw.dequantize() - w) ** 2
        return (e if v is None else e * v).reshape(32, -1, 32).sum(-1)

    assert bool((block_err(searched) <= block_err(rtn)).all())
    assert float(block_err(searched).sum()) < 0.9 * float(block_err(rtn).sum())
    # importance-weighted search minimises the weighted error, and beats the unweighted one on it
    v = torch.rand(256, generator=torch.Generator().manual_seed(2)) ** 4 * 10 + 0.01
    weighted = quant.rtn_quantize(w, grid=grid, mse_clip_search=True, importance=v)
    weighted.validate()
    assert bool((block_err(weighted, v) <= block_err(rtn, v)).all())
    assert float(block_err(weighted, v).sum()) < float(block_err(searched, v).sum())


@pytest.mark.parametrize("grid,symmetric", [("int", False), ("int", True), ("q4_1", False), ("q4_0", False)])
def test_clip_search_in_row_slices_equals_one_pass(grid, symmetric, monkeypatch):
    """A big table is searched a slice of rows at a time (SEARCH_ELEMENTS); rows are independent, so the
    qparams and codes equal one pass over the whole weight, bit for bit, with and without importance."""
    w = heavy_weight(37, 64, seed=11)
    v = torch.rand(64, generator=torch.Generator().manual_seed(3)) + 0.1
    whole = [quant.rtn_quantize(w, 4, 32, symmetric, mse_clip_search=True, grid=grid, importance=imp) for imp in (None, v)]
    monkeypatch.setattr(qparams, "SEARCH_ELEMENTS", 5 * 64)  # slices of 5 rows; the last one holds 2
    sliced = [quant.rtn_quantize(w, 4, 32, symmetric, mse_clip_search=True, grid=grid, importance=imp) for imp in (None, v)]
    for a, b in zip(whole, sliced):
        for name in ("codes", "scale", "zero", "minimum"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None and y is None) or torch.equal(x, y), name


def test_fit_q4_1_is_least_squares():
    w = heavy_weight(8, 64, seed=4)
    scale, minimum = quant.choose_qparams_q4_1(w, 0.8)
    codes = quantize(w, scale, None, 4, 32, minimum=minimum)
    d, m = quant.fit_q4_1(w, codes, scale, minimum)
    for r in range(8):
        for g in range(2):
            q = codes[r, g * 32:(g + 1) * 32].double().numpy()
            a = np.stack([q, np.ones(32)], 1)
            (d_ls, m_ls), *_ = np.linalg.lstsq(a, w[r, g * 32:(g + 1) * 32].double().numpy(), rcond=None)
            # fp16 rounding of the float32 solution: within one fp16 step of the float64 one
            for got, ref in ((float(d[r, g]), d_ls), (float(m[r, g]), m_ls)):
                ulp = float(np.spacing(np.float16(ref)))
                assert abs(got - ref) <= ulp, (got, ref)


@pytest.mark.parametrize("grid", ["q4_0", "q4_1"])
def test_gptq_on_llama_cpp_grids(layer, grid):
    x, w, h = layer
    rtn = quant.rtn_quantize(w, grid=grid, mse_clip_search=True)
    qw, used = gptq._gptq_run(w, h, 4, 32, False, 0.01, True, 128, True, 1.0, grid)
    qw.validate()
    assert qw.grid == grid
    # static blocks: GPTQ keeps the block params chosen from the original weights, and every column was
    # rounded with its block's fixed d (and m)
    assert torch.equal(qw.scale, rtn.scale)
    if grid == "q4_1":
        assert torch.equal(qw.minimum, rtn.minimum) and qw.zero is None
        expect = (qw.codes.double() * qw.scale.repeat_interleave(32, 1).double()
                  + qw.minimum.repeat_interleave(32, 1).double()).float()
    else:
        assert bool((qw.zero == 8).all())
        expect = (qw.codes.float() - 8) * qw.scale.repeat_interleave(32, 1)
    assert torch.equal(used, qw.dequantize()) and torch.equal(used, expect)
    ref = x @ w.T
    err_rtn = float((ref - x @ rtn.dequantize().T).norm())
    err_gptq = float((ref - x @ qw.dequantize().T).norm())
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)


def test_grid_format_checks():
    w = heavy_weight(4, 64, seed=1)
    with pytest.raises(ValueError, match="blocks of 32"):
        quant.rtn_quantize(w, group_size=64, grid="q4_1")
    with pytest.raises(ValueError, match="blocks of 32"):
        quant.rtn_quantize(w, bits=8, group_size=32, grid="q4_0")
    with pytest.raises(ValueError, match="unknown weight grid"):
        quant.rtn_quantize(w, group_size=32, grid="q5_1")
    qw = quant.rtn_quantize(w, grid="q4_1")
    with pytest.raises(TypeError, match="minimum"):
        QuantizedWeight(qw.codes, qw.scale, torch.zeros_like(qw.scale, dtype=torch.uint8), 32, 4, grid="q4_1")
    with pytest.raises(TypeError, match="zero points"):
        QuantizedWeight(qw.codes, qw.scale, None, 32, 4, minimum=qw.minimum, grid="int")
    bad = QuantizedWeight(qw.codes, qw.scale, None, 32, 4, minimum=qw.minimum + 1e-5, grid="q4_1")
    with pytest.raises(ValueError, match="minimums"):
        bad.validate()
    q0 = quant.rtn_quantize(w, grid="q4_0")
    with pytest.raises(ValueError, match="must all be 8"):
        QuantizedWeight(q0.codes, q0.scale, q0.zero + 1, 32, 4, grid="q4_0").validate()
    with pytest.raises(ValueError, match="positive"):  # negative scales only on the q4_0 grid
        QuantizedWeight(q0.codes, q0.scale, q0.zero, 32, 4).validate()
    with pytest.raises(ValueError, match="not both"):
        quantize(w, qw.scale, torch.zeros_like(qw.scale, dtype=torch.uint8), 4, 32, minimum=qw.minimum)


@pytest.mark.parametrize("rows, block, on_grid", [(1, 32, False), (5, 32, False), (3, 64, False), (6, 32, True)])
def test_int8_blocks_are_what_onnxruntime_int8_kernels_compute(rows, block, on_grid):
    """fake_quant_int8_blocks against a numpy re-statement, and against onnxruntime's MatMulNBits with
    accuracy_level 4 (its int8 kernels): x rounded this way times the dequantized 4-bit weight agrees with the
    kernel to float32 summation order (measured ~2e-7 of the output range), while float x is off by ~1e-2.
    on_grid: x on a coarse grid, so that x * (127 / max|x|) lands on many ties (one float32 division then,
    not a reciprocal and a product, or ties round the other way)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from baseq_export.quant import fake_quant_int8_blocks, pack_int4

    rng = np.random.default_rng(rows)
    k, n = 256, 96
    x = (rng.standard_normal((rows, k)) * rng.random(k) * 3).astype(np.float32)
    if on_grid:
        x = (np.rint(x * 4) * np.float32(0.2484)).astype(np.float32)
    x[0, :block] = 0  # an all-zero block stays zero
    xb = x.reshape(rows, k // block, block).astype(np.float64)
    amax = np.abs(xb).max(-1, keepdims=True)
    step = (amax / 127).astype(np.float32)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1).astype(np.float32), 0).astype(np.float32)
    want = (np.rint(xb.astype(np.float32) * inv) * step).reshape(rows, k)
    got = fake_quant_int8_blocks(torch.from_numpy(x), block).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    assert not got[0, :block].any()
    codes = rng.integers(0, 16, (n, k)).astype(np.uint8)
    zeros = rng.integers(0, 16, (n, k // block)).astype(np.uint8)
    scales = (rng.random((n, k // block)) * 0.02 + 0.001).astype(np.float32)
    packed = pack_int4(torch.from_numpy(codes)).numpy().reshape(n, k // block, block // 2)
    node = helper.make_node("MatMulNBits", ["x", "b", "s", "z"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=block, accuracy_level=4)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])],
                              [numpy_helper.from_array(packed, "b"), numpy_helper.from_array(scales.reshape(-1), "s"),
                               numpy_helper.from_array(pack_int4(torch.from_numpy(zeros)).numpy().reshape(-1), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    w = (codes - np.repeat(zeros, block, 1).astype(np.float64)) * np.repeat(scales, block, 1)
    span = np.abs(x.astype(np.float64) @ w.T).max()
    assert np.abs(y - got.astype(np.float64) @ w.T).max() < 1e-5 * span
    assert np.abs(y - x.astype(np.float64) @ w.T).max() > 1e-3 * span  # the kernel does round x (level 4 honoured)


def test_int8_block_rounding_passes_gradients_straight_through():
    """Training through the int8 head input (the end-to-end pass with --head-act-bits 8) needs the gradient of the
    rounding: straight through, every value that is not its block's max gets d out / d x = 1 (plain round gave 0,
    and the pass then made the model worse and was dropped). The values are the no-grad ones, bit for bit."""
    from baseq_export.quant import fake_quant_int8_blocks

    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(4), requires_grad=True)
    out = fake_quant_int8_blocks(x, 64)
    with torch.no_grad():
        assert torch.equal(out, fake_quant_int8_blocks(x, 64))
    out.sum().backward()
    blocks = x.detach().abs().reshape(3, 2, 64)
    not_max = (blocks < blocks.amax(-1, keepdim=True)).reshape(3, 128)
    torch.testing.assert_close(x.grad[not_max], torch.ones(int(not_max.sum())), rtol=1e-6, atol=1e-6)
