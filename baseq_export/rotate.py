"""Rotational preprocessing (QuaRot-style), one function per transformation step.

Works on the canonical weight dict of models.base. Offline steps change weights so that the
float model computes the same function with rotated activations:
  fold_norms      RMSNorm gains into the linears that follow (needed before R1)
  rotate_r1       hidden-size rotation R1 = diag(signs) H on the residual stream
  rotate_r2       head_dim Hadamard on the v output / o input, per head
  fold_r4         the inverse of the online down_proj-input Hadamard into down_proj
Online steps (R3 on Q and K after RoPE, R4 before down_proj) are applied by `RotationHooks`.
A learned rotation of the residual stream on top of R1 (learn_rotation.py) is folded like R1: rotate_layer_residual.
"""

from __future__ import annotations

import dataclasses

import torch

from .hadamard import apply_hadamard
from .memory import row_slices
from .models.base import ModelConfig

IN_ATTN = ("q", "k", "v")
IN_MLP = ("gate", "up")


def fold_norms(cfg: ModelConfig, w: dict[str, torch.Tensor]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Scale the input columns of q/k/v, gate/up and lm_head by the preceding RMSNorm gain; drop the gains.

    Tied embeddings are untied: the head absorbs the final norm, the embedding does not.
    """
    return dataclasses.replace(cfg, tied_embeddings=False), fold_final_norm(per_layer(cfg, w, fold_layer_norms))


def fold_final_norm(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The final RMSNorm gain folded into lm_head's input columns; the gain dropped."""
    w = dict(w)
    gain = w.pop("norm", None)
    if gain is not None and "lm_head" in w:
        w["lm_head"] = w["lm_head"] * gain
    return w


def per_layer(cfg: ModelConfig, w: dict[str, torch.Tensor], step) -> dict[str, torch.Tensor]:
    """w with step(layer weights, names as models.base.layer_weights gives them) applied to every layer."""
    out = {k: v for k, v in w.items() if not k.startswith("layers.")}
    for i in range(cfg.num_layers):
        prefix = f"layers.{i}."
        out.update({prefix + k: v for k, v in step({k[len(prefix):]: v for k, v in w.items() if k.startswith(prefix)}).items()})
    return out


def fold_layer_norms(lw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One layer's RMSNorm gains folded into the input columns of q/k/v and gate/up; the gains dropped."""
    lw = dict(lw)
    for norm, linears in (("attn_norm", IN_ATTN), ("mlp_norm", IN_MLP)):
        gain = lw.pop(norm, None)
        if gain is not None:
            for name in linears:
                if f"{name}.weight" in lw:  # a part of a layer holds some of them
                    lw[f"{name}.weight"] = lw[f"{name}.weight"] * gain
    return lw


def head_mix(embed: torch.Tensor, lm_head: torch.Tensor, tol: float = 1e-4) -> torch.Tensor | None:
    """M with lm_head = embed @ M, or None if the head is not such a product (a genuinely untied model).

    Folding the final norm gain g into a rotated tied head makes lm_head = E diag(g) R1 while the embedding
    is E R1: lm_head = (E R1)(R1^T diag(g) R1). With M ([hidden, hidden], least squares in float64, exact up
    to rounding) one 4-bit table serves the embedding and, after h -> h M^T, the head. The least squares
    solve reads both tables in slices of rows (normal equations, then one refinement step on the residual),
    so no float64 copy of a 50k-row table is ever whole.
    """
    if embed.shape != lm_head.shape or embed.shape[0] <= embed.shape[1]:  # a square table spans everything
        return None
    parts = row_slices(*embed.shape, ROTATE_ELEMENTS)

    def rows(t: torch.Tensor):
        return (t[part].to(torch.float64) for part in parts)

    gram = cross = 0
    for e, l in zip(rows(embed), rows(lm_head)):
        gram, cross = gram + e.T @ e, cross + e.T @ l
    chol, info = torch.linalg.cholesky_ex(gram)
    if info:  # a rank-deficient table: no unique M through the normal equations
        return _head_mix_dense(embed, lm_head, tol)
    m = torch.cholesky_solve(cross, chol)
    m += torch.cholesky_solve(sum(e.T @ (l - e @ m) for e, l in zip(rows(embed), rows(lm_head))), chol)
    err = ref = 0.0
    for e, l in zip(rows(embed), rows(lm_head)):
        err, ref = err + float(((e @ m - l) ** 2).sum()), ref + float((l**2).sum())
    return m.to(torch.float32) if err**0.5 <= tol * max(ref**0.5, 1e-30) else None


def _head_mix_dense(embed: torch.Tensor, lm_head: torch.Tensor, tol: float) -> torch.Tensor | None:
    """head_mix by one dense least-squares solve (float64 copies of both tables), for a rank-deficient embedding."""
    e, l = embed.to(torch.float64), lm_head.to(torch.float64)
    m = torch.linalg.lstsq(e, l, driver="gelsd").solution  # SVD: the minimum-norm M of a rank-deficient table
    return m.to(torch.float32) if float((e @ m - l).norm() / l.norm().clamp_min(1e-30)) <= tol else None


def random_signs(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A seeded vector of +-1: R1 = diag(signs) H is a random orthogonal Hadamard rotation."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(dtype)


ROTATE_ELEMENTS = 2**21  # a rotation works on slices of rows of about this many entries (16 MB in float64)


def by_row_slices(fn, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """fn applied to slices of rows of weight, written into out (a new tensor unless given; it may be a view):
    a 7B down_proj or a 50k-row embedding never has whole-matrix float64 temporaries (every rotation here acts
    on rows separately)."""
    parts = row_slices(*weight.shape, ROTATE_ELEMENTS) if weight.dim() == 2 else [slice(None)]
    if len(parts) == 1:
        if out is None:
            return fn(weight)
        out.copy_(fn(weight))
        return out
    out = torch.empty_like(weight) if out is None else out
    for part in parts:
        out[part] = fn(weight[part])
    return out


def signed_hadamard(signs: torch.Tensor):
    """The row map x -> (x * signs) H, i.e. x R1 for R1 = diag(signs) H."""
    return lambda x: apply_hadamard(x * signs.to(x.dtype))


def rotate_input_side(weight: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """W R1 for a layer reading the residual stream: its input x R1 then gives the same output."""
    return by_row_slices(signed_hadamard(signs), weight)


def rotate_output_side(weight: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """R1^T W for a layer writing the residual stream ([out, in] weight): outputs come out rotated."""
    if weight.dim() != 2:
        return rotate_input_side(weight.T, signs).T.contiguous()
    out = torch.empty_like(weight, memory_format=torch.contiguous_format)
    by_row_slices(signed_hadamard(signs), weight.T, out=out.T)
    return out


def rotate_r1(cfg: ModelConfig, w: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Rotate the residual stream by R1 = diag(signs) H (norms must be folded first)."""
    if any(k.endswith("_norm") or k == "norm" for k in w):
        raise ValueError("rotate_r1 needs fold_norms first: RMSNorm gains do not commute with a rotation")
    signs = random_signs(cfg.hidden_size, seed)
    return rotate_head_r1(per_layer(cfg, w, lambda lw: rotate_layer_r1(lw, signs)), signs)


def rotate_head_r1(w: dict[str, torch.Tensor], signs: torch.Tensor) -> dict[str, torch.Tensor]:
    """R1 on the embedding and lm_head (both read the residual stream's basis)."""
    return {**w, **{k: rotate_input_side(w[k], signs) for k in ("embed", "lm_head") if k in w}}


def rotate_layer_r1(lw: dict[str, torch.Tensor], signs: torch.Tensor) -> dict[str, torch.Tensor]:
    """R1 on one (norm-folded) layer, or on some of its linears: readers of the residual stream W R1, writers
    R1^T W and their biases."""
    lw = dict(lw)
    for name in IN_ATTN + IN_MLP:
        if f"{name}.weight" in lw:
            lw[f"{name}.weight"] = rotate_input_side(lw[f"{name}.weight"], signs)
    for name in ("o", "down"):
        if f"{name}.weight" not in lw:
            continue
        lw[f"{name}.weight"] = rotate_output_side(lw[f"{name}.weight"], signs)
        if f"{name}.bias" in lw:
            lw[f"{name}.bias"] = rotate_input_side(lw[f"{name}.bias"], signs)
    return lw


def random_orthogonal(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A seeded Haar-random orthogonal [n, n] matrix (QR of a Gaussian matrix, signs fixed by R's diagonal);
    dense, unlike R1, so its products carry no Hadamard structure."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)


def rotate_residual(cfg: ModelConfig, w: dict[str, torch.Tensor], rot: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rotate the residual stream by any orthogonal [d, d] matrix (rotate_r1 with a dense rot instead of
    diag(signs) H): readers W -> W rot, writers W -> rot^T W and their biases b -> b rot. Norms must be folded."""
    if any(k.endswith("_norm") or k == "norm" for k in w):
        raise ValueError("rotate_residual needs fold_norms first: RMSNorm gains do not commute with a rotation")
    w = per_layer(cfg, w, lambda lw: rotate_layer_residual(lw, rot))
    return {**w, **{k: rotate_table_residual(w[k], rot) for k in ("embed", "lm_head") if k in w}}


def rotate_table_residual(table: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """An embedding or head table (rows read the residual stream) times rot, in float64, a slice of rows at a time."""
    rot = rot.to(torch.float64)
    return by_row_slices(lambda t: (t.to(torch.float64) @ rot).to(table.dtype), table)


def rotate_layer_residual(lw: dict[str, torch.Tensor], rot: torch.Tensor) -> dict[str, torch.Tensor]:
    """rotate_residual on one (norm-folded) layer or part of one: readers of the residual stream W rot, writers
    rot^T W and their biases b rot, in float64."""
    rot = rot.to(torch.float64)
    lw = dict(lw)
    for name in IN_ATTN + IN_MLP:
        if f"{name}.weight" in lw:
            lw[f"{name}.weight"] = rotate_table_residual(lw[f"{name}.weight"], rot)
    for name in ("o", "down"):
        if f"{name}.weight" in lw:
            t = lw[f"{name}.weight"]
            lw[f"{name}.weight"] = (rot.T @ t.to(torch.float64)).to(t.dtype)
        if f"{name}.bias" in lw:
            lw[f"{name}.bias"] = rotate_table_residual(lw[f"{name}.bias"], rot)
    return lw


def per_head_hadamard(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Apply H (head_dim) to each consecutive head_dim slice of the last dim."""
    shape = x.shape
    return apply_hadamard(x.reshape(*shape[:-1], shape[-1] // head_dim, head_dim)).reshape(shape)


def rotate_r2(cfg: ModelConfig, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-head Hadamard on v's output and o's input: attention output per head is rotated, o undoes it."""
    return per_layer(cfg, w, lambda lw: rotate_layer_r2(lw, cfg.head_dim))


def rotate_layer_r2(lw: dict[str, torch.Tensor], head_dim: int) -> dict[str, torch.Tensor]:
    """R2 on one layer (or the part of it given): per-head Hadamard on v's output rows (and bias) and on o's
    input columns."""
    lw = dict(lw)
    if "v.weight" in lw:
        lw["v.weight"] = per_head_hadamard(lw["v.weight"].T, head_dim).T.contiguous()
    if "v.bias" in lw:
        lw["v.bias"] = per_head_hadamard(lw["v.bias"], head_dim)
    if "o.weight" in lw:
        lw["o.weight"] = per_head_hadamard(lw["o.weight"], head_dim)
    return lw


def fold_r4(cfg: ModelConfig, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """down_proj weight W -> W H, so that the online transform g -> g H before it keeps the output."""
    return per_layer(cfg, w, fold_layer_r4)


def fold_layer_r4(lw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One layer's down_proj W -> W H (the inverse of the online Hadamard before it); a part of a layer
    without down_proj is returned as it is."""
    return {**lw, "down.weight": by_row_slices(apply_hadamard, lw["down.weight"])} if "down.weight" in lw else dict(lw)


def rotate_model(
    cfg: ModelConfig, w: dict[str, torch.Tensor], seed: int = 0, r4: bool = True
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """All offline steps: fold norms, R1, R2 and (if r4) fold R4. Run the result with RotationHooks
    (online R3 / R4; r4=False for runtimes without an online Hadamard before down_proj, e.g. llama.cpp:
    then every rotation is offline and the result runs with RotationHooks(r3=False, r4=False))."""
    cfg, w = fold_norms(cfg, w)
    w = rotate_r2(cfg, rotate_r1(cfg, w, seed))
    return cfg, (fold_r4(cfg, w) if r4 else w)


def rotate_layer(cfg: ModelConfig, lw: dict[str, torch.Tensor], seed: int = 0, r4: bool = True) -> dict[str, torch.Tensor]:
    """rotate_model's steps on one block's weights alone (names as models.base.layer_weights gives them), the
    same numbers: a model larger than memory is rotated a block at a time. Each step acts on every linear
    separately, so lw may also be one linear (its weight, bias and the norm gain before it)."""
    lw = rotate_layer_r2(rotate_layer_r1(fold_layer_norms(lw), random_signs(cfg.hidden_size, seed)), cfg.head_dim)
    return fold_layer_r4(lw) if r4 else lw


def rotate_layer_dense(cfg: ModelConfig, lw: dict[str, torch.Tensor], rot: torch.Tensor, r4: bool = True) -> dict[str, torch.Tensor]:
    """rotate_layer with a dense orthogonal rot [d, d] of the residual stream in place of R1 (R1 times a learned
    rotation, multiplied out once): one product per linear instead of R1's transform and then a second product."""
    lw = rotate_layer_r2(rotate_layer_residual(fold_layer_norms(lw), rot), cfg.head_dim)
    return fold_layer_r4(lw) if r4 else lw


def rotate_outside_layers(cfg: ModelConfig, w: dict[str, torch.Tensor], seed: int = 0) -> tuple[ModelConfig, dict]:
    """rotate_model's steps on the tensors outside the blocks (embed, lm_head, norm, rope.inv_freq)."""
    return (dataclasses.replace(cfg, tied_embeddings=False),
            rotate_head_r1(fold_final_norm(w), random_signs(cfg.hidden_size, seed)))


class RotationHooks:
    """Online transforms of a rotated model: R4 (Hadamard of down_proj's input), R3 (Q and K after RoPE)."""

    def __init__(self, r3: bool = True, r4: bool = True):
        self.r3, self.r4 = r3, r4

    def act(self, layer: int, site: str, x: torch.Tensor) -> torch.Tensor:
        return apply_hadamard(x) if self.r4 and site == "down_in" else x

    def qk(self, layer, q, k):
        return (apply_hadamard(q), apply_hadamard(k)) if self.r3 else (q, k)

    def kv(self, layer, k, v):
        return k, v

    def head_in(self, x):
        return x
