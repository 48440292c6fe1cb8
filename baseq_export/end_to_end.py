"""End-to-end tuning of a calibrated artifact's quantizer parameters (after BASE-Q's blockwise stage C).

Stage C fits each block's gains, shifts and clips to that block's FP output; errors that add up over the
depth are seen by none of those fits. This pass trains the same tensors of every block at once on the KL
divergence of the whole quantized model's next-token distribution to the FP model's, on the calibration
windows, with the weight codes frozen. The teacher is the FP blocks' last hidden states through the
artifact's own final norm and head, so nothing but these tensors changes and the artifact keeps its format:
  gain   the RMSNorm weight of attn_in / mlp_in, the online gain of o_in / down_in
  shift  the online shift of every site, whose `+ shift` stays folded into the next linears' biases
         (bias = bias_start + W_q (shift - shift_start), W_q the dequantized weight)
  clip   every activation site's and each KV head's clip, learned as a logit (clip = sigmoid(beta))
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from torch.utils.checkpoint import checkpoint

from .models.base import NORM_OF_SITE, SITE_LINEARS, ModelConfig, block_forward, forward, head_logits, layer_weights
from .blocks import block_bytes
from .memory import available_memory
from .artifact import Artifact
from .artifact_tensors import KV_SITES
from .reference import reference_model

CLIP_EPS = 1e-4  # a stored clip is kept inside [eps, 1 - eps] before its logit (torch.logit) is taken


@dataclass(frozen=True)
class EndToEndFit:
    """Budget and learning rates of the end-to-end pass (AdamW, cosine schedule, one window a step)."""

    epochs: int
    lr_gain: float = 1e-3
    lr_shift: float = 1e-3
    lr_clip: float = 1e-2
    check_windows: int = 8  # windows on which the KL is measured before and after (the pass is kept only if it drops)


HELD_BLOCK_BYTES = 2**30
"""Where free memory is not known, the pass holds every dequantized float32 block up to this many bytes."""


def end_to_end_bytes(cfg: ModelConfig, held: bool = True) -> int:
    """About what the pass holds: the dequantized float32 weights it keeps (every block, or two at a time) and the
    tables, twice over (its activations and gradients on one window are of the same order)."""
    tables = 4 * cfg.vocab_size * cfg.hidden_size * (1 if cfg.tied_embeddings else 2)
    return 2 * (block_bytes(cfg) * (cfg.num_layers if held else 2) + tables)


def holds_blocks(cfg: ModelConfig, free: int | None = None) -> bool:
    """Whether the pass holds every dequantized block: where that fits in free memory (default: what the system
    has now). Otherwise it dequantizes a block when it runs and runs it again for the backward (activation
    checkpointing): one block's weights held, the same numbers bit for bit, slower (each step dequantizes every
    block twice: 4x the pass's time at 7B dims)."""
    free = available_memory() if free is None else free
    if free is None:
        return block_bytes(cfg) * cfg.num_layers <= HELD_BLOCK_BYTES
    return end_to_end_bytes(cfg, held=True) <= free


class TunableArtifact:
    """An artifact's float reference forward with its gains, shifts and clips as leaf tensors to train.

    weights / online: the reference forward's tensors (exact=False) as the artifact holds them, which stay as they
    are (online's shifts are where the trained ones started); tensors(): the artifact tensors (norms, biases, online
    gain / shift / clip) that the trained values give.
    """

    def __init__(self, artifact: Artifact, device: torch.device | None = None, hold: bool | None = None):
        """hold: keep every dequantized block (default: holds_blocks of the artifact's config)."""
        self.hold = holds_blocks(ModelConfig.from_dict(artifact.model)) if hold is None else hold
        qm = reference_model(artifact, exact=False, device=device, lazy=not self.hold)
        self.config, self.weights, self.hooks = qm.config, qm.weights, qm.hooks
        self.outside = {k: self.weights[k] for k in self.weights if not k.startswith("layers.")}  # never trained
        self.online = dict(qm.hooks.params)
        self.params: dict[str, torch.Tensor] = {}
        for i in range(self.config.num_layers):
            for site in SITE_LINEARS:
                prefix = f"layers.{i}.{site}"
                gain = f"layers.{i}.{NORM_OF_SITE[site]}" if site in NORM_OF_SITE else f"{prefix}.gain"
                self.params[gain] = (self.weights if site in NORM_OF_SITE else self.online)[gain].clone()
                self.params[f"{prefix}.shift"] = self.online[f"{prefix}.shift"].clone()
                self.params[f"{prefix}.beta"] = torch.logit(self.online[f"{prefix}.clip"], CLIP_EPS)
            for site in KV_SITES:
                self.params[f"layers.{i}.{site}.beta"] = torch.logit(self.online[f"layers.{i}.{site}.clip"], CLIP_EPS)

    def groups(self, fit: EndToEndFit) -> list[dict]:
        """AdamW parameter groups (the tensors are made to require gradients)."""
        kinds = {"shift": fit.lr_shift, "beta": fit.lr_clip}
        groups: dict[float, list] = {}
        for name, t in self.params.items():
            t.requires_grad_(True)
            kind = name.rsplit(".", 1)[-1]
            groups.setdefault(kinds.get(kind, fit.lr_gain), []).append(t)
        return [{"params": ts, "lr": lr} for lr, ts in groups.items()]

    def materialize(self, layer: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(weights, online) of the reference forward with the current values (differentiable); with layer, the
        weights of that block only (read from lazy weights when the pass does not hold them)."""
        prefix = "" if layer is None else f"layers.{layer}."
        params = {k: v for k, v in self.params.items() if k.startswith(prefix)}
        weights = {k: self.weights[k] for k in self.weights if k.startswith(prefix)}
        online = dict(self.online)
        for name, t in params.items():
            kind = name.rsplit(".", 1)[-1]
            if kind == "beta":
                online[name.removesuffix(".beta") + ".clip"] = torch.sigmoid(t)
            elif kind in NORM_OF_SITE.values():
                weights[name] = t
            else:
                online[name] = t
        for name, shift in params.items():
            if not name.endswith(".shift"):
                continue
            layer, site, _ = name.rsplit(".", 2)
            moved = shift - self.online[name]
            for lin in SITE_LINEARS[site]:
                bias = self.weights.get(f"{layer}.{lin}.bias")
                extra = self.weights[f"{layer}.{lin}.weight"] @ moved
                weights[f"{layer}.{lin}.bias"] = extra if bias is None else bias + extra
        return weights, online

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        if self.hold:
            weights, online = self.materialize()
            self.hooks.params = online
            return forward(self.config, weights, ids, self.hooks)
        # each block materialized when it runs and again for its backward
        return forward(self.config, self.outside, ids, self.hooks, block=self._checkpointed_block)

    def _checkpointed_block(self, cfg, w, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *rest):
        """forward's block runner (w is empty: the block's weights are read in _block) under checkpointing."""
        return checkpoint(self._block, i, h, cos, sin, use_reentrant=False)

    def _block(self, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        weights, online = self.materialize(i)
        self.hooks.params = online
        return block_forward(self.config, layer_weights(weights, i), i, h, cos, sin, self.hooks, None, False)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The artifact tensors that change: norms, the sites' linears' biases, online gains, shifts and clips."""
        out = dict(self.online)
        with torch.no_grad():
            for i in range(self.config.num_layers):  # a block at a time: lazy weights are never all read at once
                weights, online = self.materialize(i)
                names = [f"layers.{i}.{n}" for n in NORM_OF_SITE.values()]
                names += [f"layers.{i}.{lin}.bias" for s in SITE_LINEARS for lin in SITE_LINEARS[s]]
                out.update({n: weights[n] for n in names})
                out.update({k: v for k, v in online.items() if k.startswith(f"layers.{i}.")})
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in out.items()}


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) of the next-token distributions."""
    t = torch.log_softmax(teacher_logits.float(), -1)
    s = torch.log_softmax(student_logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1).mean()


def tune_end_to_end(artifact: Artifact, windows: torch.Tensor, fp_last_hidden: torch.Tensor, fit: EndToEndFit,
                    seed: int, device: torch.device | None = None, hold: bool | None = None
                    ) -> tuple[dict[str, torch.Tensor] | None, dict]:
    """Train the artifact's gains, shifts and clips on the whole model's KL to the FP teacher (module docstring).

    windows [n, T] token ids; fp_last_hidden [n, T, d]: the FP blocks' output on them (rotated basis, as the
    artifact's head reads it). Returns (the changed artifact tensors, or None when the KL did not drop on the
    check windows, and a log entry). hold: TunableArtifact's (default: holds_blocks)."""
    if fit.epochs < 1:
        raise ValueError(f"the end-to-end pass needs at least one epoch, got {fit.epochs}")
    if windows.shape[:2] != fp_last_hidden.shape[:2]:
        raise ValueError(f"windows {list(windows.shape)} and FP hidden states {list(fp_last_hidden.shape)} differ")
    t0 = time.time()
    model = TunableArtifact(artifact, device, hold)
    dev = model.weights["embed"].device

    def teacher(j: int) -> torch.Tensor:
        with torch.no_grad():
            return head_logits(model.config, model.outside, fp_last_hidden[j : j + 1].to(dev), model.hooks)

    def check_kl() -> float:
        with torch.no_grad():
            n = min(fit.check_windows, windows.shape[0])
            return sum(float(token_kl(model.logits(windows[j : j + 1].to(dev)), teacher(j))) for j in range(n)) / n

    kl_start = check_kl()
    opt = torch.optim.AdamW(model.groups(fit), weight_decay=0.0)
    steps = fit.epochs * windows.shape[0]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(total=steps, desc="end-to-end", unit="window", leave=False)
    with torch.enable_grad():
        for _ in range(fit.epochs):
            for j in torch.randperm(windows.shape[0], generator=gen).tolist():
                loss = token_kl(model.logits(windows[j : j + 1].to(dev)), teacher(j))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
                bar.set_postfix(kl=f"{loss.item():.4f}")
    bar.close()
    for t in model.params.values():
        t.requires_grad_(False)
    kl_end = check_kl()
    kept = kl_end < kl_start
    entry = {"epochs": fit.epochs, "windows": list(windows.shape), "kl_start": kl_start, "kl_end": kl_end,
             "kept": kept, "seconds": round(time.time() - t0, 1)}
    return (model.tensors() if kept else None), entry
