"""quant.ggml_codecs: ggml's block bytes read as grid + codes and written back, checked against gguf-py and ggml."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from baseq_export.quant.ggml_codecs import CODEC_TYPES, decode, encode, ggml_quantize

QT = gguf.GGMLQuantizationType
SUPER = (QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_XS)  # 256-weight super-blocks
GROUPS = {t: 16 if t == QT.Q6_K else 32 for t in CODEC_TYPES}
LEVELS = {QT.Q4_0: (-8, 7), QT.Q4_1: (0, 15), QT.Q5_0: (-16, 15), QT.Q5_1: (0, 31), QT.Q8_0: (-128, 127),
          QT.Q4_K: (0, 15), QT.Q5_K: (0, 31), QT.Q6_K: (-32, 31)}


def row_len(qtype: QT) -> int:
    """K = 3 blocks of 256 for super-block types, 18 blocks of 32 for the others."""
    return 256 * 3 if qtype in SUPER else 32 * 18


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def matrix(k: int, seed: int, n: int = 12) -> np.ndarray:  # n >= 3
    """Rows of different magnitudes with outliers, an all-zero row and a constant run (blocks of one value)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)) * np.exp(rng.normal(0, 1, (n, 1)))
    w[rng.random((n, k)) < 0.01] *= 8
    w[1] = 0
    w[2, :64] = 0.25
    return w.astype(np.float32)


def imatrix(k: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(k) ** 2 * 10 + 0.01).astype(np.float32)


def by_hand(scale: np.ndarray, values: np.ndarray, codes: np.ndarray, offset: np.ndarray, group: int) -> np.ndarray:
    """scale * values[codes] + offset, each group's parameters repeated over its weights."""
    return np.repeat(scale, group, axis=1) * values[codes] + np.repeat(offset, group, axis=1)


@pytest.mark.parametrize("use_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("qtype", CODEC_TYPES, ids=lambda t: t.name)
def test_decode_matches_gguf_py_bitwise(qtype, use_imatrix):
    k = row_len(qtype)
    w = matrix(k, seed=int(qtype))
    raw = ggml_quantize(w, qtype, imatrix(k, 7) if use_imatrix else None)
    assert raw.shape == (w.shape[0], k // gguf.GGML_QUANT_SIZES[qtype][0] * gguf.GGML_QUANT_SIZES[qtype][1])
    grid = decode(raw, qtype, k)
    group = GROUPS[qtype]
    assert grid.group == group and grid.codes.shape == w.shape and grid.codes.dtype == np.uint8
    assert grid.scale.shape == grid.offset.shape == (w.shape[0], k // group)
    assert grid.scale.dtype == grid.offset.dtype == grid.values.dtype == np.float32
    assert int(grid.codes.max()) < len(grid.values) and np.all(np.diff(grid.values) > 0)
    # Bit for bit, signed zeros included: the same float32 operations in the same order as gguf-py.
    np.testing.assert_array_equal(bits(grid.dequantize()), bits(gguf.quants.dequantize(raw, qtype)))
    assert np.abs(grid.dequantize() - w).max() < 0.5 * np.abs(w).max()  # it is a quantization of w


@pytest.mark.parametrize("qtype", CODEC_TYPES, ids=lambda t: t.name)
def test_values(qtype):
    k = row_len(qtype)
    grid = decode(ggml_quantize(matrix(k, 0), qtype), qtype, k)
    if qtype in LEVELS:
        lo, hi = LEVELS[qtype]
        np.testing.assert_array_equal(grid.values, np.arange(lo, hi + 1, dtype=np.float32))
    else:  # IQ4_NL, IQ4_XS: ggml's kvalues_iq4nl
        np.testing.assert_array_equal(grid.values, np.array(gguf.quants.IQ4_NL.kvalues, np.float32))
    if qtype not in (QT.Q4_1, QT.Q5_1, QT.Q4_K, QT.Q5_K):
        assert np.all(grid.offset == 0) and np.all(np.signbit(grid.offset))  # symmetric: -0.0


@pytest.mark.parametrize("qtype", CODEC_TYPES, ids=lambda t: t.name)
def test_encode_own_codes_is_identity(qtype):
    k = row_len(qtype)
    raw = ggml_quantize(matrix(k, seed=3), qtype, imatrix(k, 3))
    np.testing.assert_array_equal(encode(raw, qtype, decode(raw, qtype, k).codes), raw)


@pytest.mark.parametrize("qtype", CODEC_TYPES, ids=lambda t: t.name)
def test_random_codes_round_trip_on_the_same_grid(qtype):
    k = row_len(qtype)
    raw = ggml_quantize(matrix(k, seed=4), qtype)
    grid = decode(raw, qtype, k)
    codes = np.random.default_rng(5).integers(0, len(grid.values), grid.codes.shape).astype(np.uint8)
    new = encode(raw, qtype, codes)
    assert new.shape == raw.shape and new.dtype == np.uint8 and not np.array_equal(new, raw)
    back = decode(new, qtype, k)
    np.testing.assert_array_equal(back.codes, codes)
    np.testing.assert_array_equal(bits(back.scale), bits(grid.scale))
    np.testing.assert_array_equal(bits(back.offset), bits(grid.offset))
    # gguf-py reads the new bytes as the grid's parameters applied to the new codes.
    expect = by_hand(grid.scale, grid.values, codes, grid.offset, grid.group)
    np.testing.assert_array_equal(bits(gguf.quants.dequantize(new, qtype)), bits(expect))


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0], ids=lambda t: t.name)
def test_ggml_quantize_is_ggml_reference_rounding(qtype):
    """Without an importance matrix ggml rounds these types by its reference code, which gguf-py reproduces."""
    w = matrix(row_len(qtype), seed=6)
    np.testing.assert_array_equal(ggml_quantize(w, qtype), gguf.quants.quantize(w, qtype))


@pytest.mark.parametrize("qtype", [t for t in CODEC_TYPES if t != QT.Q8_0], ids=lambda t: t.name)
def test_imatrix_reaches_ggml(qtype):
    """Weighting a few columns heavily lowers their error (ggml's Q8_0 ignores the importance matrix)."""
    k = row_len(qtype)
    w = matrix(k, seed=8, n=64)
    cols = np.arange(5, k, 41)[:12]
    weights = np.ones(k, np.float32)
    weights[cols] = 1e4

    def err(raw):
        return float(((gguf.quants.dequantize(raw, qtype) - w)[:, cols] ** 2).mean())

    assert err(ggml_quantize(w, qtype, weights)) < 0.5 * err(ggml_quantize(w, qtype))


@pytest.mark.parametrize("qtype, k", [(QT.Q4_0, 100), (QT.Q8_0, 48), (QT.Q4_K, 288), (QT.IQ4_XS, 32)])
def test_refuses_k_off_the_block(qtype, k):
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    match = rf"{qtype.name}.*K={k}.*{block}"
    with pytest.raises(ValueError, match=match):
        ggml_quantize(np.zeros((2, k), np.float32), qtype)
    with pytest.raises(ValueError, match=match):
        decode(np.zeros((2, 18), np.uint8), qtype, k)
    with pytest.raises(ValueError, match=match):
        encode(np.zeros((2, 18), np.uint8), qtype, np.zeros((2, k), np.uint8))


def test_refuses_bad_bytes_and_codes():
    k = 64
    raw = ggml_quantize(matrix(k, 9), QT.Q4_0)
    with pytest.raises(ValueError, match="Q4_0"):
        decode(raw[:, :-1], QT.Q4_0, k)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        encode(raw, QT.Q4_0, np.full(raw.shape[:1] + (k,), 16, np.uint8))
    with pytest.raises(ValueError, match="Q2_K"):
        decode(raw, QT.Q2_K, k)


def test_no_rows():
    grid = decode(np.zeros((0, 144), np.uint8), QT.Q4_K, 256)
    assert grid.codes.shape == (0, 256) and grid.scale.shape == (0, 8) and grid.dequantize().shape == (0, 256)
    assert encode(np.zeros((0, 144), np.uint8), QT.Q4_K, grid.codes).shape == (0, 144)
