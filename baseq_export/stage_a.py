"""BASE-Q stage A: learned function-preserving transforms of one block's float weights, before GPTQ.

Three transforms, each exact in full precision (the block computes the same function), chosen so that the
4-bit weights and the 4-bit activations and V cache after them lose less:
  v/o pair      per KV head h, M_h = diag(s_h) R_h^T on v's output rows (and bias) and M_h^-1 = R_h diag(1/s_h)
                on the o_proj input columns of every query head reading KV head h; R_h = Cayley(P_h - P_h^T)
                is orthogonal, so the V cache and o_proj's input see rescaled, rotated heads.
  up/down pair  s on up_proj's output rows (and bias) and 1/s on down_proj's input, before the online R4
                Hadamard: the down_proj site quantizes (g * s) H, and W_down -> ((W_down H^T) / s) H.
Trained on the block-output MSE to the full-precision block with every linear fake-quantized to INT4 by RTN
(straight-through gradient) and the activation sites' shift and clip (LAC) learned with them, the same
forward as stage C. The transforms are then folded into the float weights that GPTQ quantizes; the artifact
holds no new tensor (the exporters and the reference forward read ordinary weights).
"""

from __future__ import annotations

import torch

from .hadamard import apply_hadamard
from .models.base import LINEARS, ModelConfig
from .quant import rtn_quantize
from .settings import BaseqSettings, QuantSettings
from .stage_c import fit, folded_mse, init_params, online_groups, site_means

TRANSFORMED = ("v", "o", "up", "down")  # the linears stage A changes; q, k and gate keep their weights


def init_transform(cfg: ModelConfig, scales: bool = True, rotation: bool = True,
                   device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Stage A's learnable tensors at the identity: log-scales 0, skew generators 0 (R = I)."""
    t = {}
    if scales:
        t["vo.log_scale"] = torch.zeros(cfg.num_kv_heads, cfg.head_dim, device=device)
        t["down.log_scale"] = torch.zeros(cfg.intermediate_size, device=device)
    if rotation:
        t["vo.skew"] = torch.zeros(cfg.num_kv_heads, cfg.head_dim, cfg.head_dim, device=device)
    return t


def cayley(p: torch.Tensor) -> torch.Tensor:
    """An orthogonal matrix per leading index from an unconstrained square p: (I + A)^-1 (I - A), A = p - p^T."""
    a = p - p.transpose(-1, -2)
    eye = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device).expand_as(p)
    return torch.linalg.solve(eye + a, eye - a)


def transform_vo(lw: dict[str, torch.Tensor], t: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """v rows -> M_h v_h and o columns -> o_j M_h^-1 for M_h = diag(s_h) R_h^T (see the module docstring)."""
    kvh, hd, groups = cfg.num_kv_heads, cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    dtype = lw["v.weight"].dtype
    s = t["vo.log_scale"].exp().to(dtype) if "vo.log_scale" in t else torch.ones(kvh, hd, dtype=dtype)
    r = cayley(t["vo.skew"].to(dtype)) if "vo.skew" in t else torch.eye(hd, dtype=dtype).expand(kvh, hd, hd)
    m = s[:, :, None] * r.transpose(-1, -2)  # [kvh, hd, hd]
    m_inv = r / s[:, None, :]
    out = dict(lw)
    out["v.weight"] = (m @ lw["v.weight"].reshape(kvh, hd, -1)).reshape(kvh * hd, -1)
    if "v.bias" in lw:
        out["v.bias"] = (m @ lw["v.bias"].reshape(kvh, hd, 1)).reshape(-1)
    wo = lw["o.weight"].reshape(lw["o.weight"].shape[0], kvh, groups, hd)  # query head j reads KV head j // groups
    out["o.weight"] = torch.einsum("dhge,hef->dhgf", wo, m_inv).reshape(wo.shape[0], -1)
    return out


def transform_up_down(lw: dict[str, torch.Tensor], t: dict[str, torch.Tensor], r4: bool) -> dict[str, torch.Tensor]:
    """up rows -> s * up, down -> down / s on its (pre-R4) input: the SwiGLU product is scaled by s."""
    s = t["down.log_scale"].exp().to(lw["up.weight"].dtype)
    out = dict(lw)
    out["up.weight"] = lw["up.weight"] * s[:, None]
    if "up.bias" in lw:
        out["up.bias"] = lw["up.bias"] * s
    down = lw["down.weight"]
    out["down.weight"] = apply_hadamard(apply_hadamard(down, transpose=True) / s) if r4 else down / s
    return out


def transform_block(lw: dict[str, torch.Tensor], t: dict[str, torch.Tensor], cfg: ModelConfig,
                    r4: bool = True) -> dict[str, torch.Tensor]:
    """The block's weights under stage A's transforms t (differentiable in t; the identity for an empty t)."""
    if "vo.log_scale" in t or "vo.skew" in t:
        lw = transform_vo(lw, t, cfg)
    if "down.log_scale" in t:
        lw = transform_up_down(lw, t, r4)
    return lw


def ste_weight(w: torch.Tensor, group_size: int | None, symmetric: bool, grid: str) -> torch.Tensor:
    """w fake-quantized to 4 bits by RTN on the artifact's grid, with the identity gradient (straight-through)."""
    deq = rtn_quantize(w.detach(), 4, group_size, symmetric, grid=grid).dequantize().to(w.dtype)
    return w + (deq - w).detach()


def train_stage_a(cfg, fp_lw, layer, x, y, quant_cfg, q: QuantSettings, b: BaseqSettings, rope, fp_hooks,
                  seed: int, bar=None) -> tuple[dict, dict]:
    """Stage A for one block: (its float weights with the learned transforms folded in, a log entry). Trained
    with every linear RTN fake-quantized (straight-through) and the sites' shift and clip learned alongside
    (started as stage C starts, from the RTN block's site means); kept only if the block's MSE with RTN weights
    drops (else the weights are returned unchanged). fp_hooks: the FP block's online rotations (R4)."""
    r4 = fp_hooks.r4
    t = init_transform(cfg, b.stage_a_scales, b.stage_a_rotation, x.device)
    if not t:
        return fp_lw, {}

    def rtn(w: torch.Tensor) -> torch.Tensor:
        return ste_weight(w, q.group_size, q.symmetric, q.weight_grid)

    fixed = {f"{n}.weight": rtn(fp_lw[f"{n}.weight"]) for n in LINEARS if n not in TRANSFORMED}

    def weights() -> dict:
        tw = transform_block(fp_lw, t, cfg, r4)
        return {k: fixed.get(k, rtn(v) if k.endswith(".weight") else v) for k, v in tw.items()}

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        return folded_mse(cfg, weights(), params, layer, x[idx], y[idx], quant_cfg, rope, b.batch_size, b.loss)

    def mse() -> float:
        with torch.no_grad():
            return float(folded_mse(cfg, weights(), params, layer, x, y, quant_cfg, rope, loss=b.loss))

    with torch.no_grad():
        means = site_means(cfg, weights(), layer, x, fp_hooks, rope) if b.shift_init == "mean" else None
    params = init_params(cfg, b, means, x.device)
    before = mse()
    for v in t.values():
        v.requires_grad_(True)
    groups = [{"params": [v for k, v in t.items() if k.endswith("log_scale")], "lr": b.lr_stage_a_scale},
              {"params": [v for k, v in t.items() if k.endswith("skew")], "lr": b.lr_stage_a_rotation}]
    groups = [g for g in groups if g["params"]] + online_groups(params, b, kinds=("shift", "beta"))
    fit(groups, loss_of, x.shape[0], b, b.stage_a_epochs, seed, bar, layer)
    for v in [*t.values(), *params.values()]:
        v.requires_grad_(False)
    after = mse()  # stage A's shift and clip only shape the transforms: stage C starts afresh after GPTQ
    entry = {"mse_stage_a_start": before, "mse_stage_a": after, "stage_a": "trained" if after < before else "untrained"}
    if not after < before:
        return fp_lw, entry
    with torch.no_grad():
        return transform_block(fp_lw, t, cfg, r4), entry
