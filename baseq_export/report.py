"""PNG plots of a calibrated artifact: what rotation and BASE-Q do to one activation site,
per-block calibration losses, and a perplexity bar chart from a benchmark JSON."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .models.base import ACT_SITES, IDENTITY, WrappedHooks, forward
from .artifact import Artifact
from .reference import reference_model
from .rotate import RotationHooks


class SiteCapture(WrappedHooks):
    """Hooks wrapper that records one site's input (as `transform` maps it) and stops nothing."""

    def __init__(self, inner, layer: int, site: str, transform=None):
        super().__init__(inner)
        self.layer, self.site, self.transform = layer, site, transform
        self.values: torch.Tensor | None = None

    def act(self, layer, site, x):
        if (layer, site) == (self.layer, self.site):
            seen = self.transform(layer, site, x) if self.transform else x
            self.values = seen.detach().reshape(-1, seen.shape[-1]).float()
        return self.inner.act(layer, site, x)


@torch.no_grad()
def site_activations(model, art: Artifact, ids: torch.Tensor, layer: int, site: str) -> dict[str, torch.Tensor]:
    """[tokens, channels] values of one site: original model, after rotation, after BASE-Q shift/scale."""
    from .rotate import rotate_model

    rot = art.quant.get("rotation") or {}
    stages = {}
    cap = SiteCapture(IDENTITY, layer, site)
    forward(model.config, model.weights, ids, cap)
    stages["original"] = cap.values
    if rot:
        cfg, w = rotate_model(model.config, {k: v.double() for k, v in model.weights.items()}, rot.get("r1_seed", 0))
        hooks = RotationHooks(r3=False, r4=True)
        cap = SiteCapture(hooks, layer, site, transform=lambda lyr, s, x: hooks.act(lyr, s, x))
        forward(cfg, {k: v.float() for k, v in w.items()}, ids, cap)
        stages["rotated"] = cap.values
    q = reference_model(art)
    cap = SiteCapture(q.hooks, layer, site, transform=q.hooks.prequant)
    forward(q.config, q.weights, ids, cap)
    stages[f"{art.quant['method']} (quantizer input)"] = cap.values
    return stages


def plot_activations(stages: dict[str, torch.Tensor], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(stages), 2, figsize=(10, 2.6 * len(stages)), squeeze=False)
    for row, (name, x) in enumerate(stages.items()):
        means = x.mean(0)
        axes[row][0].hist(means.numpy(), bins=80, color="tab:blue")
        axes[row][0].set_title(f"{name}: channel means (|mean| avg {means.abs().mean():.3g})", fontsize=9)
        axes[row][1].hist(x.flatten().numpy(), bins=200, color="tab:orange", log=True)
        axes[row][1].set_title(f"{name}: values (absmax {x.abs().max():.3g})", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_losses(calibration: dict, path: Path) -> bool:
    """Per-block MSE at the GPTQ start and after BASE-Q training (False when there is none)."""
    blocks = (calibration or {}).get("blocks")
    if not blocks or not isinstance(blocks[0], dict) or "mse_gptq" not in blocks[0]:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.5))
    idx = [b["block"] for b in blocks]
    ax.semilogy(idx, [b["mse_gptq"] for b in blocks], "o-", label="before training (QuaRot-GPTQ start)")
    ax.semilogy(idx, [b["mse_baseq"] for b in blocks], "s-", label="after BASE-Q training")
    ax.set_xlabel("block")
    ax.set_ylabel("block output MSE")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_perplexities(bench: dict, path: Path) -> None:
    """Bar chart of the rows of a bench_baseq / bench_quarot JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = bench["rows"]
    items = list(rows.items()) if isinstance(rows, dict) else [(r["name"], r) for r in rows]
    names, ppls = [n for n, _ in items], [r["ppl"] for _, r in items]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.2))
    ax.barh(names[::-1], ppls[::-1], color="tab:green")
    for i, v in enumerate(ppls[::-1]):
        ax.text(v, i, f" {v:.2f}", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("perplexity (log scale, lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(art: Artifact, model, ids: torch.Tensor, out: Path, layer: int, site: str, bench: Path | None) -> list[Path]:
    """Write the plots into out; returns the files written."""
    if site not in ACT_SITES:
        raise ValueError(f"--site must be one of {', '.join(ACT_SITES)}")
    if not 0 <= layer < model.config.num_layers:
        raise ValueError(f"--layer must be in [0, {model.config.num_layers - 1}]")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    p = out / f"activations_layer{layer}_{site}.png"
    plot_activations(site_activations(model, art, ids, layer, site), f"layer {layer}, site {site}", p)
    written.append(p)
    if plot_losses(art.calibration, out / "block_losses.png"):
        written.append(out / "block_losses.png")
    if bench is not None:
        plot_perplexities(json.loads(Path(bench).read_text()), out / "perplexity.png")
        written.append(out / "perplexity.png")
    return written
