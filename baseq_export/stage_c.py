"""BASE-Q stage C for one block: with the GPTQ weights frozen, learn per activation site a per-channel gain
(asymmetric scaling), a per-channel shift (bias correction) and a clip (LAC, clip = sigmoid(beta)); K and V get a
clip per head. Loss: the block's output on the quantized stream against the FP block's output on the FP stream.

The training forward is the artifact's reference forward with its tensors made learnable: the gain of attn_in /
mlp_in is the RMSNorm weight, `+ shift` lives in the next linear's bias (bias + W_q shift), so folding is just
detaching (the folded artifact computes the same thing).
"""

from __future__ import annotations

import math

import torch

from .blocks import TapHooks, run_block
from .models.base import ACT_SITES, NORM_OF_SITE, SITE_LINEARS, ModelConfig, site_width
from .artifact_tensors import KV_SITES, linear_tensors
from .reference import QuantHooks
from .settings import BaseqSettings


def init_params(cfg: ModelConfig, b: BaseqSettings, site_means: dict[str, torch.Tensor] | None,
                device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Stage C's learnable tensors of one block at their starting values (gain 1, shift 0, LAC beta)."""
    beta = math.log(b.clip_init / (1 - b.clip_init))
    p = {}
    for site in ACT_SITES:
        n = site_width(cfg, site)
        p[f"{site}.gain"] = torch.ones(n, device=device)
        p[f"{site}.shift"] = site_means[site].clone() if site_means is not None else torch.zeros(n, device=device)
        p[f"{site}.beta"] = torch.full((1,), beta, device=device)
    for site in KV_SITES:
        p[f"{site}.beta"] = torch.full((cfg.num_kv_heads, 1, 1), beta, device=device)
    return p


def fold_block(qlw: dict[str, torch.Tensor], params: dict[str, torch.Tensor], layer: int) -> tuple[dict, dict]:
    """(layer weights, online params) that the reference forward uses, from the learnable tensors.

    Differentiable in params, so training and the folded artifact share this one computation.
    """
    lw = dict(qlw)
    online = {}
    for site, linears in SITE_LINEARS.items():
        gain, shift = params[f"{site}.gain"], params[f"{site}.shift"]
        if site in NORM_OF_SITE:
            lw[NORM_OF_SITE[site]] = gain
        else:
            online[f"layers.{layer}.{site}.gain"] = gain
        online[f"layers.{layer}.{site}.shift"] = shift
        online[f"layers.{layer}.{site}.clip"] = torch.sigmoid(params[f"{site}.beta"])
        for name in linears:
            w = qlw[f"{name}.weight"]
            log_scale = params.get(f"{name}.log_wscale")  # learn_weight_scale: rows of the weight stretched
            if log_scale is not None:
                w = lw[f"{name}.weight"] = w * log_scale.exp()[:, None]
            base = qlw.get(f"{name}.bias")
            lw[f"{name}.bias"] = w @ shift + (base if base is not None else 0.0)
    for site in KV_SITES:
        online[f"layers.{layer}.{site}.clip"] = torch.sigmoid(params[f"{site}.beta"])
    return lw, online


def block_tensors(qweights: dict, lw: dict, online: dict, layer: int) -> dict[str, torch.Tensor]:
    """Artifact tensors of one calibrated block."""
    out = {k: v.detach().clone() for k, v in online.items()}
    for name, qw in qweights.items():
        out.update(linear_tensors(f"layers.{layer}.{name}", qw, lw[f"{name}.bias"].detach()))
    for norm in NORM_OF_SITE.values():
        out[f"layers.{layer}.{norm}"] = lw[norm].detach().clone()
    return out


def block_from_tensors(tensors: dict, qweights_deq: dict, layer: int) -> tuple[dict, dict]:
    """(layer weights, online params) of a finished block, as the reference forward reads them."""
    prefix = f"layers.{layer}."
    lw = dict(qweights_deq)
    online = {}
    for k, v in tensors.items():
        name = k[len(prefix):]
        if name.split(".")[0] in ACT_SITES + KV_SITES:
            online[k] = v
        elif name.endswith(".bias") or name in NORM_OF_SITE.values():
            lw[name] = v
    return lw, online


def fit(groups: list[dict], loss_of, n: int, b: BaseqSettings, epochs: int, seed: int, bar=None, layer: int = 0) -> None:
    """AdamW + cosine schedule over `epochs` shuffled passes of n windows in batches of b.batch_size;
    loss_of(window indices) -> the loss of that batch."""
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    steps_per_epoch = math.ceil(n / b.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for s in range(steps_per_epoch):
            loss = loss_of(order[s * b.batch_size : (s + 1) * b.batch_size])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if bar is not None:
                bar.set_postfix(block=layer, loss=f"{loss.item():.3g}")


def online_groups(params: dict[str, torch.Tensor], b: BaseqSettings,
                  kinds=("gain", "shift", "beta", "log_wscale")) -> list[dict]:
    """Optimizer groups of stage C's tensors of the given kinds that b learns (the others get no gradient)."""
    groups = []
    for kind, lr, on in (("gain", b.lr_gain, b.learn_gain), ("shift", b.lr_shift, b.learn_shift), ("beta", b.lr_clip, b.learn_clip),
                         ("log_wscale", b.lr_weight_scale, b.learn_weight_scale)):
        on = on and kind in kinds
        tensors = [v for k, v in params.items() if k.endswith("." + kind)]
        for t in tensors:
            t.requires_grad_(on)
        if on:
            groups.append({"params": tensors, "lr": lr})
    return groups


LOSSES = ("mse", "token")


def output_loss(out: torch.Tensor, y: torch.Tensor, loss: str = "mse") -> torch.Tensor:
    """Distance of a block's outputs to the FP outputs y [n, T, d]: the MSE, or ("token") the mean over tokens of
    each token's squared error over its target's mean square. From block 11 of the default model on, an
    attention-sink token's residual stream is ~1800x the others' in squared norm and makes ~70% of the MSE."""
    if loss == "mse":
        return torch.nn.functional.mse_loss(out, y)
    return ((out - y).pow(2).mean(-1) / y.pow(2).mean(-1).clamp_min(torch.finfo(y.dtype).tiny)).mean()


def folded_mse(cfg, qlw: dict, params: dict, layer: int, x, y, quant_cfg: dict, rope, chunk: int = 8,
               loss: str = "mse") -> torch.Tensor:
    """The training loss (output_loss) of the block with params folded in (fold_block), on x, to the FP outputs y."""
    lw, online = fold_block(qlw, params, layer)
    return output_loss(run_block(cfg, lw, layer, x, QuantHooks(quant_cfg, online), rope, chunk), y, loss)


def train_block(cfg, qlw, layer, x, y, quant_cfg, b: BaseqSettings, rope, params, seed: int, bar=None) -> dict:
    """Stage C for one block: AdamW + cosine schedule on the MSE to the FP block output."""
    groups = online_groups(params, b)
    if not groups:
        return params

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        return folded_mse(cfg, qlw, params, layer, x[idx], y[idx], quant_cfg, rope, b.batch_size, b.loss)

    fit(groups, loss_of, x.shape[0], b, b.epochs, seed, bar, layer)
    for t in params.values():
        t.requires_grad_(False)
    return params


def block_loss(cfg, lw, layer, x, y, hooks, rope, loss: str = "mse") -> float:
    with torch.no_grad():
        return float(output_loss(run_block(cfg, lw, layer, x, hooks, rope), y, loss))


def site_means(cfg, qlw, layer, h, hooks, rope) -> dict[str, torch.Tensor]:
    """Per-channel token means of each activation site's input (the 'mean' shift start)."""
    sums: dict[str, torch.Tensor] = {}

    def add(site: str, x: torch.Tensor) -> None:
        sums[site] = sums.get(site, 0) + x.reshape(-1, x.shape[-1]).sum(0)

    run_block(cfg, qlw, layer, h, TapHooks(hooks, add), rope)
    n = h.shape[0] * h.shape[1]
    return {k: v / n for k, v in sums.items()}
