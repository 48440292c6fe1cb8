"""Rotational preprocessing (QuaRot-style), one function per transformation step.

Works on the canonical weight dict of models.base. Offline steps change weights so that the
float model computes the same function with rotated activations:
  fold_norms      RMSNorm gains into the linears that follow (needed before R1)
  rotate_r1       hidden-size rotation R1 = diag(signs) H on the residual stream
  rotate_r2       head_dim Hadamard on the v output / o input, per head
  fold_r4         the inverse of the online down_proj-input Hadamard into down_proj
Online steps (R3 on Q and K after RoPE, R4 before down_proj) are applied by `RotationHooks`.
"""

from __future__ import annotations

import dataclasses

import torch

from .hadamard import apply_hadamard
from .models.base import ModelConfig

IN_ATTN = ("q", "k", "v")
IN_MLP = ("gate", "up")


def fold_norms(cfg: ModelConfig, w: dict[str, torch.Tensor]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Scale the input columns of q/k/v, gate/up and lm_head by the preceding RMSNorm gain; drop the gains.

    Tied embeddings are untied: the head absorbs the final norm, the embedding does not.
    """
    w = dict(w)
    for i in range(cfg.num_layers):
        for norm, linears in (("attn_norm", IN_ATTN), ("mlp_norm", IN_MLP)):
            gain = w.pop(f"layers.{i}.{norm}", None)
            if gain is not None:
                for name in linears:
                    key = f"layers.{i}.{name}.weight"
                    w[key] = w[key] * gain
    gain = w.pop("norm", None)
    if gain is not None:
        w["lm_head"] = w["lm_head"] * gain
    return dataclasses.replace(cfg, tied_embeddings=False), w


def head_mix(embed: torch.Tensor, lm_head: torch.Tensor, tol: float = 1e-4) -> torch.Tensor | None:
    """M with lm_head = embed @ M, or None if the head is not such a product (a genuinely untied model).

    Folding the final norm gain g into a rotated tied head makes lm_head = E diag(g) R1 while the embedding
    is E R1: lm_head = (E R1)(R1^T diag(g) R1). With M ([hidden, hidden], least squares in float64, exact up
    to rounding) one 4-bit table serves the embedding and, after h -> h M^T, the head.
    """
    e, l = embed.to(torch.float64), lm_head.to(torch.float64)
    if e.shape != l.shape or e.shape[0] <= e.shape[1]:  # a square table spans everything: nothing to find
        return None
    m = torch.linalg.lstsq(e, l).solution
    if float((e @ m - l).norm() / l.norm().clamp_min(1e-30)) > tol:
        return None
    return m.to(torch.float32)


def random_signs(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A seeded vector of +-1: R1 = diag(signs) H is a random orthogonal Hadamard rotation."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(dtype)


def rotate_input_side(weight: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """W R1 for a layer reading the residual stream: its input x R1 then gives the same output."""
    return apply_hadamard(weight * signs.to(weight.dtype))


def rotate_output_side(weight: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """R1^T W for a layer writing the residual stream ([out, in] weight): outputs come out rotated."""
    return rotate_input_side(weight.T, signs).T.contiguous()


def rotate_r1(cfg: ModelConfig, w: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Rotate the residual stream by R1 = diag(signs) H (norms must be folded first)."""
    if any(k.endswith("_norm") or k == "norm" for k in w):
        raise ValueError("rotate_r1 needs fold_norms first: RMSNorm gains do not commute with a rotation")
    signs = random_signs(cfg.hidden_size, seed)
    w = dict(w)
    w["embed"] = rotate_input_side(w["embed"], signs)
    w["lm_head"] = rotate_input_side(w["lm_head"], signs)
    for i in range(cfg.num_layers):
        for name in IN_ATTN + IN_MLP:
            key = f"layers.{i}.{name}.weight"
            w[key] = rotate_input_side(w[key], signs)
        for name in ("o", "down"):
            key = f"layers.{i}.{name}.weight"
            w[key] = rotate_output_side(w[key], signs)
            if f"layers.{i}.{name}.bias" in w:
                w[f"layers.{i}.{name}.bias"] = rotate_input_side(w[f"layers.{i}.{name}.bias"], signs)
    return w


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
    rot = rot.to(torch.float64)
    w = dict(w)
    readers = ["embed", "lm_head"] + [f"layers.{i}.{n}.weight" for i in range(cfg.num_layers) for n in IN_ATTN + IN_MLP]
    for key in readers:
        w[key] = (w[key].to(torch.float64) @ rot).to(w[key].dtype)
    for i in range(cfg.num_layers):
        for name in ("o", "down"):
            for suffix, f in (("weight", lambda t: rot.T @ t), ("bias", lambda t: t @ rot)):
                key = f"layers.{i}.{name}.{suffix}"
                if key in w:
                    w[key] = f(w[key].to(torch.float64)).to(w[key].dtype)
    return w


def per_head_hadamard(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Apply H (head_dim) to each consecutive head_dim slice of the last dim."""
    shape = x.shape
    return apply_hadamard(x.reshape(*shape[:-1], shape[-1] // head_dim, head_dim)).reshape(shape)


def rotate_r2(cfg: ModelConfig, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-head Hadamard on v's output and o's input: attention output per head is rotated, o undoes it."""
    w = dict(w)
    for i in range(cfg.num_layers):
        v = f"layers.{i}.v"
        w[f"{v}.weight"] = per_head_hadamard(w[f"{v}.weight"].T, cfg.head_dim).T.contiguous()
        if f"{v}.bias" in w:
            w[f"{v}.bias"] = per_head_hadamard(w[f"{v}.bias"], cfg.head_dim)
        o = f"layers.{i}.o.weight"
        w[o] = per_head_hadamard(w[o], cfg.head_dim)
    return w


def fold_r4(cfg: ModelConfig, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """down_proj weight W -> W H, so that the online transform g -> g H before it keeps the output."""
    w = dict(w)
    for i in range(cfg.num_layers):
        key = f"layers.{i}.down.weight"
        w[key] = apply_hadamard(w[key])
    return w


def rotate_model(
    cfg: ModelConfig, w: dict[str, torch.Tensor], seed: int = 0, r4: bool = True
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """All offline steps: fold norms, R1, R2 and (if r4) fold R4. Run the result with RotationHooks
    (online R3 / R4; r4=False for runtimes without an online Hadamard before down_proj, e.g. llama.cpp:
    then every rotation is offline and the result runs with RotationHooks(r3=False, r4=False))."""
    cfg, w = fold_norms(cfg, w)
    w = rotate_r2(cfg, rotate_r1(cfg, w, seed))
    return cfg, (fold_r4(cfg, w) if r4 else w)


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
