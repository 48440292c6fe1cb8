"""Tests for baseq_export.hadamard: exact Llama-family sizes, fast transform, fallbacks."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch

from baseq_export.hadamard import (
    HadamardError,
    HadamardPlan,
    _paley1,
    _paley2,
    _quadratic_character,
    apply_hadamard,
    hadamard_matrix,
    plan_hadamard,
)

# Hidden / FFN / head sizes -> expected smallest dense factor m (n = m * 2^k, blocks == 1).
EXPECTED_M = {
    64: 1, 128: 1, 2048: 1, 4096: 1, 8192: 1,  # Sylvester only
    576: 36,  # Paley II q=17          SmolLM2-135M hidden
    896: 28,  # Paley I q=27 = 3^3     Qwen2.5-0.5B hidden
    960: 60,  # Paley I q=59           SmolLM2-360M hidden
    1536: 12, 3072: 12,  # Paley I q=11
    2560: 20, 5120: 20,  # Paley I q=19
    3584: 28, 14336: 28, 28672: 28,  # Paley I q=27
    4864: 76,  # Paley II q=37         Qwen2.5-0.5B FFN
    8960: 140,  # Paley I q=139        Qwen2.5-1.5B FFN
    11008: 344,  # Paley I q=343 = 7^3  Llama-2-7B / Qwen2.5-3B FFN
    13824: 108, 27648: 108,  # Paley I q=107
    18944: 148,  # Paley II q=73       Qwen2.5-7B FFN
}
FALLBACKS = {3776: (59, 64), 520: (5, 104), 156: (3, 52)}  # n -> (blocks, block size)
LARGEST = [11008, 13824, 14336, 18944, 27648, 28672]


def _quiet(fn, *args, **kwargs):
    """Call fn with warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("n", sorted(EXPECTED_M), ids=lambda n: f"{n}-exact-m{EXPECTED_M[n]}")
def test_model_sizes_are_exact_and_orthonormal(n: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exact size must not warn
        plan = plan_hadamard(n)
    assert (plan.n, plan.blocks, plan.m) == (n, 1, EXPECTED_M[n])
    assert plan.m * plan.pow2 == n and plan.pow2 & (plan.pow2 - 1) == 0
    if plan.small is not None:
        assert plan.small.dtype == torch.float64
        eye = torch.eye(plan.m, dtype=torch.float64)
        torch.testing.assert_close(plan.small @ plan.small.T, eye)
    if n <= 2048:  # dense H H^T
        h = hadamard_matrix(n)
        assert h.shape == (n, n) and h.dtype == torch.float64
        assert (h @ h.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-5
    else:  # rows of H from the fast transform; their Gram matrix is a principal block of H H^T
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(n))[:256]
        unit = torch.zeros(len(idx), n, dtype=torch.float64)
        unit[torch.arange(len(idx)), idx] = 1.0
        rows = apply_hadamard(unit)
        assert (rows @ rows.T - torch.eye(len(idx), dtype=torch.float64)).abs().max() < 1e-5
    print(f"n={n}: exact, m={plan.m}, pow2={plan.pow2}")


def test_plans_are_cached_and_frozen() -> None:
    plan = plan_hadamard(11008)
    assert isinstance(plan, HadamardPlan) and plan is plan_hadamard(11008)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.blocks = 2


def test_kron_order_is_small_outer() -> None:
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    sylvester4 = torch.kron(h2, h2)
    torch.testing.assert_close(hadamard_matrix(4) * 2, sylvester4)
    plan = plan_hadamard(48)  # 12 x 4
    torch.testing.assert_close(hadamard_matrix(48), torch.kron(plan.small, sylvester4 / 2))


DENSE_SUBSET = [1, 2, 4, 12, 24, 64, 576, 896, 960, 4096, 4864, 5120, 520, 3776]


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("n", DENSE_SUBSET)
def test_fast_transform_matches_dense(n: int, transpose: bool) -> None:
    g = torch.Generator().manual_seed(n)
    h = _quiet(hadamard_matrix, n)
    ref_h = h.T if transpose else h
    for shape in [(n,), (3, n), (2, 3, n)]:
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        y = _quiet(apply_hadamard, x, transpose=transpose)
        assert y.shape == x.shape and y.dtype == x.dtype
        torch.testing.assert_close(y, x @ ref_h, rtol=0, atol=1e-10)


@pytest.mark.parametrize("n", LARGEST)
def test_fast_transform_largest_sizes(n: int) -> None:
    """Reference x @ kron(A, S) by einsum (kron order checked above); no n x n matrix."""
    plan = plan_hadamard(n)
    s = hadamard_matrix(plan.pow2)
    a = plan.small
    x = torch.randn(2, 3, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    xs = x.reshape(2, 3, plan.m, plan.pow2)
    ref = torch.einsum("btij,ik,jl->btkl", xs, a, s).reshape(x.shape)
    ref_t = torch.einsum("btij,ki,jl->btkl", xs, a, s).reshape(x.shape)
    torch.testing.assert_close(apply_hadamard(x), ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(apply_hadamard(x, transpose=True), ref_t, rtol=0, atol=1e-10)


@pytest.mark.parametrize("n", [896, 11008, 520, 3776])
def test_transpose_inverts(n: int) -> None:
    x = torch.randn(4, 5, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = _quiet(apply_hadamard, x)
    torch.testing.assert_close(_quiet(apply_hadamard, y, transpose=True), x, rtol=0, atol=1e-10)
    back = _quiet(apply_hadamard, _quiet(apply_hadamard, x, True))
    torch.testing.assert_close(back, x, rtol=0, atol=1e-10)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # orthonormal: norms kept


@pytest.mark.parametrize("n", [576, 4096, 520])
@pytest.mark.parametrize("shape", [(0,), (0, 7), (3, 0)])
def test_zero_size_leading_dims(n: int, shape: tuple[int, ...]) -> None:
    x = torch.zeros(*shape, n, dtype=torch.float32)
    y = _quiet(apply_hadamard, x)
    assert y.shape == x.shape and y.dtype == x.dtype


def test_non_contiguous_input() -> None:
    x = torch.randn(896, 5, dtype=torch.float64).T  # last dim strided
    torch.testing.assert_close(apply_hadamard(x), x @ hadamard_matrix(896), rtol=0, atol=1e-10)


PALEY1_Q = [3, 7, 11, 19, 27, 43, 107, 139, 243, 343]  # 27 = 3^3, 243 = 3^5, 343 = 7^3
PALEY2_Q = [5, 9, 13, 17, 25, 37, 49, 73, 81, 125]  # 9, 25, 49, 81 = 3^4, 125 = 5^3


@pytest.mark.parametrize("q", PALEY1_Q)
def test_paley1_is_hadamard(q: int) -> None:
    h = _paley1(q).astype(np.int64)
    assert h.shape == (q + 1, q + 1) and set(np.unique(h)) == {-1, 1}
    assert (h @ h.T == (q + 1) * np.eye(q + 1, dtype=np.int64)).all()
    assert (h + h.T == 2 * np.eye(q + 1, dtype=np.int64)).all()  # skew Hadamard


@pytest.mark.parametrize("q", PALEY2_Q)
def test_paley2_is_hadamard(q: int) -> None:
    h = _paley2(q).astype(np.int64)
    order = 2 * (q + 1)
    assert h.shape == (order, order) and set(np.unique(h)) == {-1, 1}
    assert (h @ h.T == order * np.eye(order, dtype=np.int64)).all()


@pytest.mark.parametrize("q", [7, 11, 13, 9, 25, 27, 81, 343])
def test_quadratic_character(q: int) -> None:
    chi = _quadratic_character(q)
    assert chi[0] == 0
    assert (chi[1:] == 1).sum() == (chi[1:] == -1).sum() == (q - 1) // 2
    if q in (7, 11, 13):  # prime: Legendre symbol by Euler's criterion on integers
        legendre = [0] + [1 if pow(a, (q - 1) // 2, q) == 1 else -1 for a in range(1, q)]
        assert chi.tolist() == legendre


@pytest.mark.parametrize("q", [1, 5, 15, 21])
def test_paley1_rejects_bad_q(q: int) -> None:
    with pytest.raises(HadamardError, match=str(q)):
        _paley1(q)


@pytest.mark.parametrize("n", sorted(FALLBACKS))
def test_block_fallback_warns_and_is_block_diagonal(n: int) -> None:
    blocks, size = FALLBACKS[n]
    with pytest.warns(UserWarning, match=rf"n = {n}\b.*{blocks} blocks of size {size}\b"):
        plan = plan_hadamard(n)
    assert (plan.blocks, plan.m * plan.pow2) == (blocks, size)
    with pytest.warns(UserWarning, match=str(n)):
        h = hadamard_matrix(n)
    first = h[:size, :size]
    assert (first @ first.T - torch.eye(size, dtype=torch.float64)).abs().max() < 1e-5
    mask = torch.block_diag(*[torch.ones(size, size)] * blocks).bool()
    assert (h[~mask] == 0).all()
    for b in range(blocks):
        assert torch.equal(h[b * size : (b + 1) * size, b * size : (b + 1) * size], first)
    with pytest.warns(UserWarning, match=str(n)):
        apply_hadamard(torch.randn(2, n, dtype=torch.float64))


@pytest.mark.parametrize("n", [3, 7, 15, 999])
def test_odd_size_raises(n: int) -> None:
    with pytest.raises(HadamardError, match=rf"\b{n}\b"):
        plan_hadamard(n)
    with pytest.raises(HadamardError, match=rf"\b{n}\b"):
        apply_hadamard(torch.zeros(2, n))


def test_allow_blocks_false_raises() -> None:
    with pytest.raises(HadamardError, match=r"\b3776\b"):
        plan_hadamard(3776, allow_blocks=False)
    assert plan_hadamard(11008, allow_blocks=False).blocks == 1


def test_bad_inputs() -> None:
    assert issubclass(HadamardError, ValueError)
    with pytest.raises(HadamardError, match="0"):
        plan_hadamard(0)
    with pytest.raises(TypeError):
        apply_hadamard(torch.zeros(2, 8, dtype=torch.int64))


@pytest.mark.parametrize("n", [4864, 11008, 520])
def test_float32_keeps_dtype(n: int) -> None:
    x = torch.randn(3, 4, n, generator=torch.Generator().manual_seed(1))
    y = _quiet(apply_hadamard, x)
    assert y.dtype == torch.float32
    ref = _quiet(apply_hadamard, x.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_low_precision_keeps_dtype() -> None:
    x = torch.randn(2, 576)
    for dtype in (torch.bfloat16, torch.float16):
        y = apply_hadamard(x.to(dtype))
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), apply_hadamard(x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("n", [8, 24, 156])
def test_gradcheck(n: int, transpose: bool) -> None:
    x = torch.randn(2, 3, n, dtype=torch.float64, requires_grad=True)
    fn = lambda t: apply_hadamard(t, transpose=transpose)  # noqa: E731
    assert _quiet(torch.autograd.gradcheck, fn, (x,), fast_mode=n > 64)  # 156: 3 blocks of 52


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    for n in (896, 11008, 4096):
        x = torch.randn(3, n, dtype=torch.float64)
        y = apply_hadamard(x.cuda())
        assert y.device.type == "cuda"
        torch.testing.assert_close(y.cpu(), apply_hadamard(x), rtol=0, atol=1e-10)
        assert apply_hadamard(x.cuda().float()).dtype == torch.float32


def test_cache_filled_under_inference_mode_still_serves_autograd():
    """Evaluating (inference_mode) before training in one process must not poison the caches."""
    n = 480  # 60 x 8 (Paley I, q = 59): a size no other test builds first
    with torch.inference_mode():
        apply_hadamard(torch.randn(2, n, dtype=torch.float32))
    x = torch.randn(2, n, requires_grad=True)
    apply_hadamard(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
