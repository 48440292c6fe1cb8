"""Orthonormal Hadamard matrices built at run time, and a fast transform in PyTorch.

A size n is written n = 2^k * m. The 2^k factor is a Sylvester matrix, applied with
butterflies; the m factor is a small dense Hadamard matrix built from Paley I
(q = 3 mod 4, order q + 1), Paley II (q = 1 mod 4, order 2(q + 1)), for q a prime or a
prime power, and Kronecker products of these. The smallest buildable m is chosen.

Index convention: a block of size b = m * p (p = 2^k) is kron(small, H_p), so the element
index inside a block is i = a * p + c with a < m, c < p (torch.kron's order). A size with no
exact construction may use block_diag of equal Hadamard blocks (with a warning).
"""

from __future__ import annotations

import functools
import math
import operator
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

Recipe = tuple  # ("sylvester", m) | ("paley1", q) | ("paley2", q) | ("kron", a, b)


class HadamardError(ValueError):
    """Raised when no Hadamard matrix (exact or block-diagonal) of the asked size can be built."""


@dataclass(frozen=True)
class HadamardPlan:
    """Recipe for H(n): block_diag of `blocks` copies of kron(small, Sylvester(pow2)/sqrt(pow2))."""

    n: int
    blocks: int
    pow2: int
    small: torch.Tensor | None = field(compare=False)  # orthonormal m x m float64, None if m == 1

    @property
    def m(self) -> int:
        """Order of the dense factor (1 when the block is a pure Sylvester matrix)."""
        return 1 if self.small is None else self.small.shape[0]


# ---------------------------------------------------------------- finite fields GF(p^k)


def _prime_power(q: int) -> tuple[int, int] | None:
    """Return (p, k) with q == p**k and p prime, or None; needed to pick a finite field."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)  # smallest prime factor
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _mulmod(a: np.ndarray, b: np.ndarray, f: np.ndarray, p: int) -> np.ndarray:
    """Multiply rows of coefficient arrays (N, k) modulo the monic degree-k polynomial f and p."""
    k = len(f) - 1
    prod = np.zeros((a.shape[0], 2 * k - 1), dtype=np.int64)
    for i in range(k):
        prod[:, i : i + k] += a[:, i : i + 1] * b
    prod %= p
    for d in range(2 * k - 2, k - 1, -1):  # x^d = x^(d-k) x^k, x^k = -(f_0 + ... + f_(k-1) x^(k-1))
        prod[:, d - k : d] = (prod[:, d - k : d] - prod[:, d : d + 1] * f[:k]) % p
    return prod[:, :k]


def _powmod(a: np.ndarray, e: int, f: np.ndarray, p: int) -> np.ndarray:
    """Raise every row of a to the power e in GF(p)[x] / f by square-and-multiply."""
    out = np.zeros_like(a)
    out[:, 0] = 1
    while e:
        if e & 1:
            out = _mulmod(out, a, f, p)
        a = _mulmod(a, a, f, p)
        e >>= 1
    return out


def _digits(q: int, p: int, k: int) -> np.ndarray:
    """Coefficient rows (q, k) of all field elements: e's coefficients are its base-p digits."""
    return (np.arange(q)[:, None] // p ** np.arange(k)) % p


@functools.lru_cache(maxsize=None)
def _quadratic_character(q: int) -> np.ndarray:
    """chi[e] in {0, 1, -1} for each e in GF(q), q an odd prime power (Euler's criterion)."""
    p, k = _prime_power(q)
    elems = _digits(q, p, k)
    for coeffs in range(p ** k):  # monic f = x^k + sum c_i x^i; first one that makes a field
        f = np.append((coeffs // p ** np.arange(k)) % p, 1)
        if k > 1 and f[0] == 0:
            continue
        h = _powmod(elems, (q - 1) // 2, f, p)  # Euler: a^((q-1)/2) = +1 or -1 in a field
        # h^2 = a^(q-1) = 1 for all a != 0 iff every a != 0 is a unit, i.e. iff f is irreducible
        if np.all(_mulmod(h, h, f, p)[1:] == np.eye(1, k, dtype=np.int64)):
            chi = np.where(h[:, 0] == 1, 1, -1).astype(np.int8)
            chi[0] = 0
            return chi
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # cannot happen


def _jacobsthal(q: int) -> np.ndarray:
    """Jacobsthal matrix Q[a, b] = chi(a - b) over GF(q) (int8), the core of both Paley matrices."""
    p, k = _prime_power(q)
    elems = _digits(q, p, k).astype(np.int32)
    code = np.zeros((q, q), dtype=np.int32)
    for i in range(k):  # encode the coefficient-wise difference a - b back to an element index
        code += (np.subtract.outer(elems[:, i], elems[:, i]) % p) * p ** i
    return _quadratic_character(q)[code]


def _paley1(q: int) -> np.ndarray:
    """Paley I Hadamard matrix (entries +-1) of order q + 1, for a prime power q = 3 mod 4."""
    if q % 4 != 3 or _prime_power(q) is None:
        raise HadamardError(f"Paley I needs a prime power q = 3 mod 4, got q = {q}")
    h = np.eye(q + 1, dtype=np.int8)
    h[0, 1:], h[1:, 0], h[1:, 1:] = 1, -1, _jacobsthal(q) + np.eye(q, dtype=np.int8)
    return h  # I + S with S = [[0, 1], [-1, Q]] the skew conference matrix


def _paley2(q: int) -> np.ndarray:
    """Paley II Hadamard matrix (entries +-1) of order 2(q + 1), for a prime power q = 1 mod 4."""
    if q % 4 != 1 or _prime_power(q) is None:
        raise HadamardError(f"Paley II needs a prime power q = 1 mod 4, got q = {q}")
    c = np.zeros((q + 1, q + 1), dtype=np.int8)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)  # symmetric conference matrix
    one = np.array([[1, 1], [1, -1]], dtype=np.int8)  # replaces each +-1 entry of c
    zero = np.array([[1, -1], [-1, -1]], dtype=np.int8)  # replaces each 0 (the diagonal)
    return np.kron(c, one) + np.kron(np.eye(q + 1, dtype=np.int8), zero)


# ---------------------------------------------------------------- choosing a construction


def _sylvester(p: int) -> np.ndarray:
    """Sylvester Hadamard matrix (entries +-1) of order p = 2^k: H_2p = kron(H_2, H_p)."""
    h = np.ones((1, 1), dtype=np.int8)
    while h.shape[0] < p:
        h = np.kron(np.array([[1, 1], [1, -1]], dtype=np.int8), h)
    return h


@functools.lru_cache(maxsize=None)
def _recipe(m: int) -> Recipe | None:
    """A way to build an m x m Hadamard matrix from Sylvester, Paley I/II and Kronecker, or None."""
    if m & (m - 1) == 0:
        return ("sylvester", m)
    if m % 4:
        return None
    if (m - 1) % 4 == 3 and _prime_power(m - 1):
        return ("paley1", m - 1)
    if (m // 2 - 1) % 4 == 1 and _prime_power(m // 2 - 1):
        return ("paley2", m // 2 - 1)
    for a in range(2, math.isqrt(m) + 1):
        if m % a == 0 and _recipe(a) and _recipe(m // a):
            return ("kron", a, m // a)
    return None


def _build(recipe: Recipe) -> np.ndarray:
    """The +-1 matrix described by a recipe."""
    kind = recipe[0]
    if kind == "sylvester":
        return _sylvester(recipe[1])
    if kind == "paley1":
        return _paley1(recipe[1])
    if kind == "paley2":
        return _paley2(recipe[1])
    return np.kron(_build(_recipe(recipe[1])), _build(_recipe(recipe[2])))


def _exact_split(n: int) -> tuple[int, int] | None:
    """(pow2, m) with n = pow2 * m and m the smallest buildable dense order, or None."""
    pow2 = n & -n
    m = n // pow2
    while pow2 >= 1:
        if _recipe(m) is not None:
            return pow2, m
        pow2, m = pow2 // 2, m * 2
    return None


@functools.lru_cache(maxsize=None)
def _plan(n: int) -> HadamardPlan:
    """Cached plan for n (may be block-diagonal); raises HadamardError if nothing fits."""
    if n < 1 or (n > 1 and n % 2):  # Hadamard orders are 1, 2 or multiples of 4
        raise HadamardError(f"no Hadamard matrix of size n = {n}, exact or block-diagonal")
    divisors = (n // d for d in range(1, n + 1) if n % d == 0)  # n, then smaller blocks
    block = next(b for b in divisors if _exact_split(b) is not None)  # stops at 2 at the latest
    pow2, m = _exact_split(block)
    small = None
    if m > 1:
        with torch.inference_mode(False):  # cached: must stay usable by autograd later
            small = torch.from_numpy(_build(_recipe(m)).astype(np.float64) / math.sqrt(m))
    return HadamardPlan(n=n, blocks=n // block, pow2=pow2, small=small)


def plan_hadamard(n: int, allow_blocks: bool = True) -> HadamardPlan:
    """Pick the construction for size n (smallest dense factor; block-diagonal fallback warns)."""
    n = operator.index(n)
    plan = _plan(n)
    if plan.blocks > 1:
        block = n // plan.blocks
        if not allow_blocks:
            raise HadamardError(
                f"no exact Hadamard matrix of size n = {n} (largest buildable block is {block})"
            )
        warnings.warn(
            f"no exact Hadamard matrix of size n = {n}; using a block-diagonal one with "
            f"{plan.blocks} blocks of size {block}",
            stacklevel=2,
        )
    return plan


# ---------------------------------------------------------------- dense matrix and fast transform


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Dense orthonormal n x n matrix of plan_hadamard(n), the reference for apply_hadamard."""
    plan = plan_hadamard(n)
    block = torch.from_numpy(_sylvester(plan.pow2).astype(np.float64) / math.sqrt(plan.pow2))
    if plan.small is not None:
        block = torch.kron(plan.small, block)
    return torch.kron(torch.eye(plan.blocks, dtype=torch.float64), block).to(dtype)


@functools.lru_cache(maxsize=64)
def _small_on(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """plan.small cast to x's dtype and device once, not on every call."""
    with torch.inference_mode(False):  # cached: a tensor made under inference_mode would break training later
        return _plan(n).small.to(device=device, dtype=dtype).clone()


def _butterfly(x: torch.Tensor) -> torch.Tensor:
    """x @ H_p (unnormalised Sylvester, p = x.shape[-1] a power of two) by log2(p) add/sub steps."""
    p = x.shape[-1]
    rows = x.numel() // p
    y = x.reshape(rows, p)
    h = 1
    while h < p:  # step h applies H_2 on index bit log2(h)
        y = y.reshape(rows, p // (2 * h), 2, h)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(x.shape)


def apply_hadamard(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """x @ H (or x @ H.T) along the last dim, fast: butterflies for 2^k and a small matmul for m."""
    if not x.is_floating_point():
        raise TypeError(f"apply_hadamard expects a floating-point tensor, got {x.dtype}")
    n = x.shape[-1]
    plan = plan_hadamard(n)
    lead = x.shape[:-1]
    y = x.reshape(*lead, plan.blocks, plan.m, plan.pow2)
    y = _butterfly(y * (1.0 / math.sqrt(plan.pow2)))  # scale first: no overflow in low precision
    if plan.small is not None:
        small = _small_on(n, x.dtype, x.device)
        # block = kron(A, S): x_block (m, p) -> A^T X S; for H.T use A in place of A^T (S symmetric)
        y = torch.matmul(small if transpose else small.mT, y)
    return y.reshape(x.shape)
