"""Blockwise tuning of a weight-only model: BASE-Q's blockwise idea for what llama.cpp can hold.

Per block: GPTQ on the settings' weight grid, then with the codes fixed learn the per-block d (and m) and a
per-linear output bias against the FP block's output, on the quantized stream (blocks.walk_blocks).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch

from .blocks import Block, TapHooks, dequantized_linears, open_workdir, run_block, walk_blocks
from .gptq_model import float_tensors, gptq_hessians, round_layer
from .learn_rotation import block_weights
from .models import LoadedModel, source_info
from .models.base import IDENTITY, LINEARS, SITE_LINEARS
from .artifact import Artifact
from .artifact_tensors import linear_tensors
from .tensor_files import TensorStore
from .quant import FP16_TINY, QuantizedWeight, dequant_values, fp16_round
from .rotate import RotationHooks
from .settings import BASEQ, W4A16, QuantSettings


BIAS_LINEARS = ("q", "k", "v", "o", "gate", "up", "down")
"""Linears that get a learned output bias: all seven, since llama.cpp's llama graph loads an optional bias on
each (attn_q/k/v/output, ffn_gate/up/down; checked with the llama-cpp-python 0.3.36 build: a GGUF with
ffn_gate/ffn_up biases loads and its logits follow them)."""


@dataclass(frozen=True)
class TuneSettings:
    """Budget and switches of the weight-only blockwise tuning (tune_blocks)."""

    nsamples: int = 64  # tuning windows: the first nsamples calibration windows ...
    ctx: int = 256  # ... cut to their first ctx tokens (causal: the same activations as the full windows)
    nval: int = 16  # the next nval windows (same cut) choose, per block, between GPTQ / mean bias / trained
    epochs: int = 3
    batch_size: int = 4
    lr_scale: float = 5e-4  # AdamW on the relative change of d, and on m in units of d
    lr_bias: float = 1e-2  # AdamW on the bias in units of the linear's RMS output error after GPTQ
    learn_scale: bool = True  # per-block d (and m on q4_1): learned weight clipping, codes fixed
    learn_bias: bool = True  # per-linear output bias on BIAS_LINEARS
    bias_init: str = "mean"  # "mean": (W - W_q) E[x], the mean output error the rounding leaves; "zero"

    def __post_init__(self):
        if self.bias_init not in ("mean", "zero"):
            raise ValueError(f"bias_init must be 'mean' or 'zero', got {self.bias_init!r}")


def _ste_fp16(x: torch.Tensor) -> torch.Tensor:
    """x rounded to fp16 in the forward (what the artifact stores), identity gradient."""
    return x + (fp16_round(x) - x).detach()


def _tuned_params(qw: QuantizedWeight, p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(d, m) of one linear from its learnable relative changes: d = fp16(d0 (1 + a)), m = fp16(m0 + d0 b)."""
    d0 = qw.scale
    d = _ste_fp16(d0 * (1 + p["a"]).clamp(min=1e-2))
    if qw.grid == "q4_1":
        return d.clamp(min=FP16_TINY), _ste_fp16(qw.minimum + d0 * p["b"])
    return d, None


def _tuned_weight(qw: QuantizedWeight, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 weight of fixed codes with learnable (d, m): the grid's own dequantization, differentiable."""
    d, m = _tuned_params(qw, p)
    n, k = qw.shape
    cg = qw.codes.reshape(n, -1, qw.group_size).to(torch.float32)
    z = None if qw.zero is None else qw.zero.to(torch.float32).unsqueeze(-1)
    return dequant_values(cg, d.unsqueeze(-1), z, None if m is None else m.unsqueeze(-1)).reshape(n, k)


def _tuned_layer(qweights: dict[str, QuantizedWeight], params: dict, base_bias: dict) -> dict[str, torch.Tensor]:
    """Layer weights for block_forward from the learnable parameters (training and the saved artifact share it)."""
    lw = {}
    for name, qw in qweights.items():
        lw[f"{name}.weight"] = _tuned_weight(qw, params[name])
        bias = _bias(params[name]) if "bias0" in params[name] else base_bias.get(name)
        if bias is not None:
            lw[f"{name}.bias"] = bias
    return lw


def _frozen(qweights: dict[str, QuantizedWeight], params: dict, base_bias: dict) -> dict[str, tuple[QuantizedWeight, torch.Tensor | None]]:
    """(QuantizedWeight with the learned fp16 d / m, bias) per linear: exactly what _tuned_layer computed."""
    out = {}
    with torch.no_grad():
        for name, qw in qweights.items():
            d, m = _tuned_params(qw, params[name])
            new = dataclasses.replace(qw, scale=d.detach().clone(), minimum=None if m is None else m.detach().clone())
            new.validate()
            bias = _bias(params[name]) if "bias0" in params[name] else base_bias.get(name)
            out[name] = (new, None if bias is None else bias.detach().clone())
    return out


def _init_tune_params(cfg, qweights, fp_lw, layer, x, hooks, rope, t: TuneSettings, hessians: dict) -> dict:
    """Starting point: d, m as GPTQ left them (a = b = 0); biases of BIAS_LINEARS at the mean-error correction,
    learned in units of each output channel's RMS error after GPTQ (sqrt(diag(dW H dW^T) / 2), H = 2 E[x x^T])."""
    params = {name: {"a": torch.zeros_like(qw.scale), "b": torch.zeros_like(qw.scale)} for name, qw in qweights.items()}
    if not t.learn_bias and t.bias_init == "zero":
        return params
    means: dict[str, torch.Tensor] = {}
    if t.bias_init == "mean":
        qlw = {**{f"{n}.weight": qw.dequantize() for n, qw in qweights.items()},
               **{k: v for k, v in fp_lw.items() if k.endswith(".bias")}}

        def add(site: str, v: torch.Tensor) -> None:
            means[site] = means.get(site, 0) + v.reshape(-1, v.shape[-1]).to(torch.float64).sum(0)

        run_block(cfg, qlw, layer, x, TapHooks(hooks, add), rope)
    n_tok = x.shape[0] * x.shape[1]
    for site, names in SITE_LINEARS.items():
        for name in names:
            if name not in BIAS_LINEARS:
                continue
            base = fp_lw.get(f"{name}.bias")
            bias = torch.zeros(qweights[name].shape[0], device=x.device) if base is None else base.clone().to(torch.float32)
            err = fp_lw[f"{name}.weight"].to(torch.float64) - qweights[name].dequantize().to(torch.float64)
            if site in means:
                bias = bias + (err @ (means[site] / n_tok)).to(torch.float32)
            h = hessians[site].hessian.to(torch.float64)
            unit = (((err @ h) * err).sum(1) / 2).clamp(min=0).sqrt().to(torch.float32)
            params[name]["bias0"] = bias
            params[name]["c"] = torch.zeros_like(bias)
            params[name]["unit"] = unit.clamp(min=1e-12)
    return params


def _bias(p: dict) -> torch.Tensor | None:
    """The bias of one linear: its start plus the learnable c in units of the linear's RMS output error."""
    return None if "bias0" not in p else p["bias0"] + p["unit"] * p["c"]


def _train(cfg, qweights, params, base_bias, layer, x, y, hooks, rope, t: TuneSettings, seed: int) -> None:
    """AdamW (no weight decay) + cosine schedule on the block-output MSE; updates params in place."""
    groups = []
    if t.learn_scale:
        groups.append({"params": [p[k] for p in params.values() for k in ("a", "b")], "lr": t.lr_scale})
    if t.learn_bias:
        groups.append({"params": [p["c"] for p in params.values() if "c" in p], "lr": t.lr_bias})
    if not groups:
        return
    for g in groups:
        for v in g["params"]:
            v.requires_grad_(True)
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    steps = math.ceil(x.shape[0] / t.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, t.epochs * steps)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(t.epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        for s in range(steps):
            idx = order[s * t.batch_size:(s + 1) * t.batch_size]
            out = run_block(cfg, _tuned_layer(qweights, params, base_bias), layer, x[idx], hooks, rope, chunk=t.batch_size)
            loss = torch.nn.functional.mse_loss(out, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    for p in params.values():
        for v in p.values():
            v.requires_grad_(False)


def _block_mse(cfg, lw, layer, x, y, hooks, rope) -> float:
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(run_block(cfg, lw, layer, x, hooks, rope), y))


@torch.no_grad()
def tune_blocks(
    model: LoadedModel, settings: QuantSettings, calib: torch.Tensor, tune: TuneSettings | None = None,
    workdir: str | None = None, device: torch.device | None = None,
) -> Artifact:
    """Weight-only blockwise tuning: per block, GPTQ on settings.weight_grid, then with the codes fixed learn
    the per-block d (and m) and a per-linear output bias on BIAS_LINEARS (started at the mean output error
    GPTQ leaves) against the FP block's output (MSE), on the quantized stream. A block keeps the best of
    GPTQ, GPTQ + mean bias and the trained parameters by its MSE on the tuning windows.

    Resumable with `workdir`: each finished block is saved there and replayed on a rerun with the same settings.
    """
    if settings.bits != W4A16:
        raise ValueError("blockwise weight tuning is for the weight-only profile (bits w4a16)")
    if settings.method == BASEQ:
        raise ValueError("blockwise weight tuning takes a rtn / gptq / quarot-* method, not baseq")
    t = tune or TuneSettings()
    t_start = time.time()
    torch.manual_seed(settings.seed)
    src = block_weights(model, settings, calib, device)
    cfg = src.config
    hooks = RotationHooks(r3=False, r4=settings.r4) if settings.rotated else IDENTITY
    quant = dict(settings.quant_config(), tune=dataclasses.asdict(t))
    work = open_workdir(workdir, model, calib, settings, t)

    def step(b: Block) -> tuple[dict, dict]:
        i, fp_lw, h_q, y = b.layer, b.weights, b.h_q, b.y
        rope_t = tuple(r[: t.ctx] for r in b.rope)
        hessians = gptq_hessians(cfg, fp_lw, i, h_q, hooks, b.rope)
        qweights = round_layer(fp_lw, settings, hessians)
        base_bias = {n: fp_lw[f"{n}.bias"] for n in qweights if f"{n}.bias" in fp_lw}
        x, yt = h_q[: t.nsamples, : t.ctx], y[: t.nsamples, : t.ctx]
        xv, yv = h_q[t.nsamples : t.nsamples + t.nval, : t.ctx], y[t.nsamples : t.nsamples + t.nval, : t.ctx]
        zero = {n: {"a": torch.zeros_like(qw.scale), "b": torch.zeros_like(qw.scale)} for n, qw in qweights.items()}
        start = _init_tune_params(cfg, qweights, fp_lw, i, x, hooks, rope_t, t, hessians)
        del hessians
        cands = {"gptq": zero, "gptq+mean-bias": start}
        with torch.enable_grad():
            trained = {n: {k: v.clone() for k, v in p.items()} for n, p in start.items()}
            _train(cfg, qweights, trained, base_bias, i, x, yt, hooks, rope_t, t, settings.seed + i)
        cands["trained"] = trained
        fit = {k: _block_mse(cfg, _tuned_layer(qweights, p, base_bias), i, x, yt, hooks, rope_t) for k, p in cands.items()}
        val = fit if xv.shape[0] == 0 else {
            k: _block_mse(cfg, _tuned_layer(qweights, p, base_bias), i, xv, yv, hooks, rope_t) for k, p in cands.items()}
        kept = min(val, key=val.get)
        losses = {**{f"fit_{k}": v for k, v in fit.items()}, **{f"val_{k}": v for k, v in val.items()}}
        bt = {}
        for name, (qw, bias) in _frozen(qweights, cands[kept], base_bias).items():
            bt.update(linear_tensors(f"layers.{i}.{name}", qw, bias))
        return bt, {"block": i, **{f"mse_{k}": v for k, v in losses.items()}, "kept": kept,
                    "seconds": round(time.time() - b.started, 2)}

    def advance(layer: int, bt: dict, fp_lw: dict) -> tuple[dict, object]:
        """The stored linears alone (weights and biases): a rotated model's norms are folded into them."""
        biases = {f"{n}.bias": bt[f"layers.{layer}.{n}.bias"] for n in LINEARS if f"layers.{layer}.{n}.bias" in bt}
        return {**dequantized_linears(bt, cfg, layer, settings.group_size), **biases}, hooks

    tensors = TensorStore(work)
    walk = walk_blocks(src, calib, step, advance, tensors, work, hooks, f"tune {settings.weight_grid}",
                       lambda i, e: dict(block=i, kept=e["kept"]))
    tensors.put(float_tensors(cfg, src.outside_and_norms(), settings, online=False, head_inputs=walk.h_q), "outside.safetensors")
    return Artifact(
        model=cfg.to_dict(), quant=quant, tensors=tensors, source=source_info(model),
        calibration={"seed": settings.seed, "windows": list(calib.shape), "blocks": walk.log, "seconds": round(time.time() - t_start, 1)},
    )
