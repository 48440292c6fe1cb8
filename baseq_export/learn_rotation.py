"""A learned rotation of the residual stream on top of R1 (SpinQuant's idea, fitted per site instead of end to end).

R1 = diag(signs) H is drawn from the seed; this module learns an orthogonal Q (Cayley map of a skew matrix, started
at the identity) so that the model rotated by R1 Q loses less at the two quantizers R1 shapes: the RMSNorm outputs
that q/k/v (attn_in) and gate/up (mlp_in) read. Per site the loss is the error the per-token quantizer leaves in
the outputs of the linears that read it, relative to those outputs:

    E = fq(X Q) Q^T - X,   loss = tr(E G E^T) / tr(X G X^T),   G = W^T W  (W: the site's linears stacked)

averaged over every such site of every block, X being the site's inputs in the full-precision model on the
calibration windows (a sample of their tokens). Q is folded into the weights like R1 (readers W Q, writers Q^T W:
rotate.rotate_layer_residual), so the artifact and the runtimes need nothing new. block_weights gives every method
the model's blocks as its settings rotate them, with this rotation when they ask for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .blocks import BlockWeights, TapHooks, calib_rope, run_block
from .models import LoadedModel
from .models.base import SITE_LINEARS
from .quant import fake_quant_per_token
from .rotate import RotationHooks, fold_layer_norms, random_signs, signed_hadamard
from .settings import BITS_PRESETS, QuantSettings
from .stage_a import cayley

RESIDUAL_SITES = ("attn_in", "mlp_in")
"""The activation sites whose basis is the residual stream's (RMSNorm outputs): the ones R1 rotates."""


@dataclass(frozen=True)
class RotationFit:
    """Budget of the learned rotation (steps of Adam on the Cayley generator, cosine schedule)."""

    steps: int
    lr: float = 1e-3
    batch_tokens: int = 256  # token rows per site per step
    sample_tokens: int = 4096  # token rows kept per site from the calibration windows
    center: bool = True  # quantize x Q - mean(x) Q, as BASE-Q's shift (started at the mean) will
    max_sample_bytes: int = 768 * 2**20  # samples and Gram matrices held: past it, sites spread evenly over depth


def sampled_sites(n_sites: int, d: int, rows: int, max_bytes: int) -> list[int]:
    """Which of n_sites (in forward order) to sample: all of them if their rows and Gram matrices (float32) fit in
    max_bytes, else as many as fit, spread evenly over the depth (a 7B model's 64 sites would need 8.6 GB)."""
    fit = max(1, max_bytes // (4 * (rows * d + d * d)))
    if fit >= n_sites:
        return list(range(n_sites))
    return sorted({round(i * (n_sites - 1) / max(fit - 1, 1)) for i in range(fit)})


@dataclass
class SiteSample:
    """One residual-reading site's inputs (a sample of token rows) and the Gram matrix of its linears."""

    x: torch.Tensor  # [tokens, d]
    gram: torch.Tensor  # [d, d] = W^T W
    mean: torch.Tensor | None = None  # [d]: the site's per-channel mean over every calibration token
    ref: torch.Tensor = field(init=False)  # [tokens]: x G x^T per row, the error's scale (derived from x and gram)

    def __post_init__(self):
        self.ref = ((self.x @ self.gram) * self.x).sum(-1).clamp_min(1e-30)


def site_gram(lw: dict[str, torch.Tensor], site: str) -> torch.Tensor:
    """W^T W for the linears reading `site` (their weights stacked by rows), in float32."""
    w = torch.cat([lw[f"{name}.weight"] for name in SITE_LINEARS[site]]).to(torch.float32)
    return w.T @ w


def token_sample(n_tokens: int, keep: int, seed: int, device: torch.device | None = None) -> torch.Tensor:
    """Indices of `keep` token rows out of n_tokens (all of them if keep >= n_tokens), seeded."""
    if keep >= n_tokens:
        return torch.arange(n_tokens, device=device)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n_tokens, generator=gen)[:keep].sort().values.to(device)


def weighted_error(x: torch.Tensor, q: torch.Tensor, gram: torch.Tensor, bits: int, clip: float,
                   mean: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, the squared error the per-token quantizer in the basis x Q (less mean Q, added back, if given)
    leaves in x W^T: e G e^T."""
    shift = 0.0 if mean is None else mean @ q
    e = (fake_quant_per_token(x @ q - shift, bits, clip) + shift) @ q.T - x
    return ((e @ gram) * e).sum(-1)


def rotation_loss(samples: list[SiteSample], q: torch.Tensor, rows: torch.Tensor, bits: int, clip: float,
                  center: bool = False) -> torch.Tensor:
    """The mean over sites of the relative weighted error on the given token rows (center: less each site's mean)."""
    total = 0.0
    for s in samples:
        err = weighted_error(s.x[rows], q, s.gram, bits, clip, s.mean if center else None)
        total = total + err.sum() / s.ref[rows].sum()
    return total / len(samples)


def learn_residual_rotation(samples: list[SiteSample], fit: RotationFit, bits: int, clip: float, seed: int) -> torch.Tensor:
    """The orthogonal Q [d, d] (float64) that lowers rotation_loss, from Adam on a Cayley generator started at 0
    (Q = I); the result is never worse on the sample than I: if training does not lower the loss, I is returned."""
    if not samples:
        raise ValueError("learn_residual_rotation needs at least one site sample")
    if fit.steps < 1:
        raise ValueError(f"learn_residual_rotation needs at least one step, got {fit.steps}")
    d, n = samples[0].x.shape[1], samples[0].x.shape[0]
    device = samples[0].x.device
    gen = torch.Generator().manual_seed(seed)
    p = torch.zeros(d, d, device=device, requires_grad=True)
    opt = torch.optim.Adam([p], lr=fit.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / fit.steps)))
    bar = tqdm(range(fit.steps), desc="learn R1", unit="step", leave=False)
    with torch.enable_grad():
        for _ in bar:
            rows = torch.randint(0, n, (min(fit.batch_tokens, n),), generator=gen).to(device)
            loss = rotation_loss(samples, cayley(p), rows, bits, clip, fit.center)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.5f}")
    with torch.no_grad():
        q = cayley(p.detach().to(torch.float64))
        every = torch.arange(n, device=device)
        before = rotation_loss(samples, torch.eye(d, device=device), every, bits, clip, fit.center)
        after = rotation_loss(samples, q.to(torch.float32), every, bits, clip, fit.center)
    return q if after < before else torch.eye(d, dtype=torch.float64, device=device)


def residual_site_samples(src: BlockWeights, calib: torch.Tensor, fit: RotationFit, seed: int) -> list[SiteSample]:
    """The blocks' attn_in / mlp_in inputs in the full-precision model rotated by src's R1 on the calibration
    windows, the same seeded sample of token rows at each, with the Gram matrix of the linears reading them (every
    site, or as many as fit.max_sample_bytes holds, spread over the depth).

    The pass runs the unrotated model with its norm gains folded and rotates what it keeps: a site's input there
    is x with x R1 the rotated model's (RMSNorm commutes with R1; R2 and R4 change nothing a block outputs), and
    its Gram matrix G gives R1^T G R1. Rotating every block's weights instead took 17.5 s a block at 7B dims."""
    plain = BlockWeights(src.model, rotated=False, device=src.device)
    cfg = plain.config
    to_r1 = signed_hadamard(random_signs(cfg.hidden_size, src.seed))  # row map x -> x R1
    hooks = RotationHooks(r3=False, r4=False)
    h = torch.nn.functional.embedding(calib.to(src.device), plain.embed())
    rope = calib_rope(cfg, plain.outside, h)
    rows = token_sample(h.shape[0] * h.shape[1], fit.sample_tokens, seed, src.device)
    keep = set(sampled_sites(len(RESIDUAL_SITES) * cfg.num_layers, cfg.hidden_size, rows.numel(), fit.max_sample_bytes))
    samples = []
    for i in tqdm(range(cfg.num_layers), desc="R1 samples", unit="block", leave=False):
        lw = fold_layer_norms(plain.layer(i))
        sites = [s for j, s in enumerate(RESIDUAL_SITES) if i * len(RESIDUAL_SITES) + j in keep]
        taps: dict[str, list[torch.Tensor]] = {site: [] for site in sites}
        tap = TapHooks(hooks, lambda site, x: taps[site].append(x.reshape(-1, x.shape[-1])) if site in taps else None)
        h = run_block(cfg, lw, i, h, tap, rope)
        for site in sites:
            x = torch.cat(taps[site])
            gram = to_r1(to_r1(site_gram(lw, site)).T)  # R1^T G R1 (G symmetric: (G R1)^T = R1^T G)
            samples.append(SiteSample(to_r1(x[rows]), gram, to_r1(x.mean(0))))
    return samples


def learned_residual(model: LoadedModel, settings: QuantSettings, calib: torch.Tensor | None,
                     device: torch.device | None = None) -> torch.Tensor | None:
    """The learned rotation on top of the settings' R1 (learn_rotation.py), or None when settings.r1_steps is 0."""
    if not settings.r1_steps:
        return None
    if calib is None:
        raise ValueError("a learned R1 rotation needs calibration windows")
    fit = RotationFit(settings.r1_steps)
    samples = residual_site_samples(BlockWeights(model, True, settings.seed, settings.r4, device), calib, fit, settings.seed)
    a_bits = BITS_PRESETS[settings.bits][1]
    return learn_residual_rotation(samples, fit, a_bits, settings.a_clip, settings.seed).cpu()


def block_weights(model: LoadedModel, settings: QuantSettings, calib: torch.Tensor | None,
                  device: torch.device | None = None, r4: bool | None = None,
                  residual: torch.Tensor | None = None) -> BlockWeights:
    """BlockWeights as the settings rotate the model (R1 times the learned rotation when settings.r1_steps; a
    residual given is used as it is, e.g. one a resumed run saved)."""
    if residual is None:
        residual = learned_residual(model, settings, calib, device)
    return BlockWeights(model, settings.rotated, settings.seed, settings.r4 if r4 is None else r4, device, residual)
