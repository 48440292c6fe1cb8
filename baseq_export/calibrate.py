"""BASE-Q blockwise calibration: GPTQ weights, then learned bias correction, scaling and clipping.

One transformer block at a time, on top of the QuaRot rotations:
  stage A  (when stage_a_epochs > 0) learned function-preserving v/o and up/down transforms of the float
           weights, trained through RTN fake-quantized weights (stage_a.py), folded in before GPTQ;
  stage B  GPTQ asymmetric INT4 weights, Hessians from this block's quantized-stream inputs;
  stage C  weights frozen, learn per site (attn_in, o_in, mlp_in, down_in) a per-channel gain
           (asymmetric scaling), a per-channel shift (bias correction) and a clip (LAC,
           clip = sigmoid(beta)); K and V get a clip per head. Loss: MSE between the block's
           output on the quantized stream and the FP block's output on the FP stream.
Then (when e2e_epochs > 0) the end-to-end pass (end_to_end.py) tunes every block's gains, shifts and clips
together on the whole quantized model's KL to the FP model over the same windows.
The training forward is the artifact's reference forward with its tensors made learnable: the
gain of attn_in / mlp_in is the RMSNorm weight, `+ shift` lives in the next linear's bias
(bias + W_q shift), so folding is just detaching (the folded artifact computes the same thing).

Resumable: each finished block is written to `<out>.partial/block_<i>.safetensors` (and the end-to-end
pass's result to end_to_end.*); a rerun with the same settings replays the finished work (deterministic)
and continues.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .end_to_end import EndToEndFit, end_to_end_bytes, tune_end_to_end
from .memory import available_memory, memory_now, release_free_memory
from .models import LoadedModel, source_info, weights_digest
from .models.base import ACT_SITES, LINEARS, NORM_OF_SITE, SITE_LINEARS, ModelConfig, site_width
from .settings import W4A4KV4, W4A8KV8, BaseqSettings, QuantSettings
from .pipeline import (TapHooks, block_weights, calib_rope, checked_block, float_tensors, gptq_layer,
                       learned_residual, run_block, save_block)
from .artifact import Artifact
from .artifact_tensors import KV_SITES, linear_tensors
from .reference import QuantHooks
from .quant import rescale_rows
from .rotate import RotationHooks
from .stage_a import TRANSFORMED, init_transform, ste_weight, transform_block
from .tensor_files import TensorStore, load_tensors, save_tensors, write_text_atomically


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
        means = _site_means(cfg, weights(), layer, x, fp_hooks, rope) if b.shift_init == "mean" else None
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


RESIDUAL_FILE = "r1_residual.safetensors"
"""A resumable run's learned residual rotation (learn_rotation.py), fitted once and reused on a rerun."""


def _saved_residual(work: Path | None, model: LoadedModel, q: QuantSettings, calib: torch.Tensor,
                    device: torch.device | None) -> torch.Tensor | None:
    """The learned residual rotation of this run (None when q.r1_steps is 0): read from a resumable run's work
    directory when an earlier try saved it, else fitted now (and saved there)."""
    if not q.r1_steps:
        return None
    path = work / RESIDUAL_FILE if work else None
    if path is not None and path.is_file():
        return load_tensors(path)["residual"]
    residual = learned_residual(model, q, calib, device)
    if path is not None:
        save_tensors({"residual": residual}, path.with_suffix(".tmp"))  # then renamed: never half written
        os.replace(path.with_suffix(".tmp"), path)
    return residual


def settings_key(model: LoadedModel, q: QuantSettings, b: BaseqSettings, calib: torch.Tensor) -> str:
    """A digest of everything that decides the result: a partial run resumes only if it matches."""
    h = hashlib.sha256(json.dumps([model.source, dataclasses.asdict(q), dataclasses.asdict(b)], sort_keys=True).encode())
    h.update(calib.numpy().tobytes())
    h.update(weights_digest(model).encode())
    return h.hexdigest()


def block_loss(cfg, lw, layer, x, y, hooks, rope, loss: str = "mse") -> float:
    with torch.no_grad():
        return float(output_loss(run_block(cfg, lw, layer, x, hooks, rope), y, loss))


def baseq_quant_config(q: QuantSettings, b: BaseqSettings) -> dict:
    """The quant config a BASE-Q artifact records (what the main job compares before reusing one)."""
    return dict(q.quant_config(), method="baseq", baseq=dataclasses.asdict(b))


@torch.no_grad()
def calibrate_baseq(
    model: LoadedModel, q: QuantSettings, b: BaseqSettings, calib: torch.Tensor, workdir: str | Path | None = None,
    device: torch.device | None = None,
) -> Artifact:
    """BASE-Q quantize `model` on the calibration windows; `workdir` makes the run resumable; `device`: where the
    blocks are calibrated (default CPU)."""
    if b.input_stream not in ("quant", "fp") or b.shift_init not in ("zero", "mean") or b.loss not in LOSSES:
        raise ValueError(f"input_stream must be 'quant' or 'fp', shift_init 'zero' or 'mean' and loss one of {LOSSES}")
    if q.bits not in (W4A4KV4, W4A8KV8):
        raise ValueError("BASE-Q learns activation-quantizer parameters: use --bits w4a4kv4 or w4a8kv8")
    t_start = time.time()
    torch.manual_seed(q.seed)
    work = Path(workdir) if workdir else None
    if work:
        key = settings_key(model, q, b, calib)  # reads every weight once: only for a resumable run
        work.mkdir(parents=True, exist_ok=True)
        state = work / "state.json"
        if state.is_file() and json.loads(state.read_text()).get("key") != key:
            raise ValueError(f"{work} holds a partial run with other settings, data or model weights; remove it to "
                             "start over, or choose another --out")
        state.write_text(json.dumps({"key": key}))
    src = block_weights(model, q, calib, device, r4=True, residual=_saved_residual(work, model, q, calib, device))
    cfg, w = src.config, src.outside
    quant_cfg = baseq_quant_config(q, b)
    fp_hooks = RotationHooks(r3=False, r4=True)
    h_fp = torch.nn.functional.embedding(calib.to(src.device), src.embed())
    h_q = h_fp.clone()
    rope = calib_rope(cfg, w, h_fp)
    tensors = TensorStore(work)  # with a workdir the finished blocks' files are the artifact's tensors
    log = []
    bar = tqdm(range(cfg.num_layers), desc="BASE-Q", unit="block")
    for i in bar:
        t0 = time.time()
        fp_lw = src.layer(i)
        y = checked_block(cfg, fp_lw, i, h_fp, fp_hooks, rope, "full-precision")
        done = work / f"block_{i}.safetensors" if work else None
        if done is not None and done.is_file():
            bt = load_tensors(done, device=str(src.device))
            entry = json.loads((work / f"block_{i}.json").read_text())
            qdeq = _dequantized_linears(bt, cfg, q, i)
        else:
            x = h_q if b.input_stream == "quant" else h_fp
            a_entry = {}
            if b.stage_a_epochs:
                with torch.enable_grad():
                    fp_lw, a_entry = train_stage_a(cfg, fp_lw, i, x, y, quant_cfg, q, b, rope, fp_hooks, q.seed + i, bar)
            qweights = gptq_layer(cfg, fp_lw, i, x, fp_hooks, rope, q)  # each Hessian dropped once used
            qdeq = {f"{n}.weight": qw.dequantize() for n, qw in qweights.items()}
            qlw = {**qdeq, **{k: v for k, v in fp_lw.items() if k.endswith(".bias")}}
            means = _site_means(cfg, qlw, i, x, fp_hooks, rope) if b.shift_init == "mean" else None
            params = init_params(cfg, b, means, src.device)
            if b.learn_weight_scale:
                params.update({f"{n}.log_wscale": torch.zeros(qw.shape[0], device=src.device) for n, qw in qweights.items()})
            lw0, on0 = fold_block(qlw, params, i)
            loss0 = block_loss(cfg, lw0, i, x, y, QuantHooks(quant_cfg, on0), rope, b.loss)
            with torch.enable_grad():
                params = train_block(cfg, qlw, i, x, y, quant_cfg, b, rope, {k: v.clone() for k, v in params.items()}, q.seed + i, bar)
            gptq_weights = qweights
            if b.learn_weight_scale:  # into the stored (fp16) scales before the loss is taken: what the artifact holds
                qweights = {n: rescale_rows(qw, params.pop(f"{n}.log_wscale").exp()) for n, qw in qweights.items()}
                qlw = {**qlw, **{f"{n}.weight": qw.dequantize() for n, qw in qweights.items()}}
            lw1, on1 = fold_block(qlw, params, i)
            loss1 = block_loss(cfg, lw1, i, x, y, QuantHooks(quant_cfg, on1), rope, b.loss)
            kept = "trained"
            if not loss1 < loss0:  # never make a block worse than its GPTQ start
                lw1, on1, loss1, kept, qweights = lw0, on0, loss0, "untrained", gptq_weights
            if qweights is not gptq_weights:  # the learned scales were kept: the stream goes on with them
                qdeq = {f"{n}.weight": qw.dequantize() for n, qw in qweights.items()}
            bt = block_tensors(qweights, lw1, on1, i)
            del qweights, gptq_weights, qlw, lw0, lw1, on0, on1, params, means, x  # the block's float copies: not kept into the next one
            release_free_memory()
            entry = {"block": i, **a_entry, "mse_gptq": loss0, "mse_baseq": loss1, "kept": kept,
                     "seconds": round(time.time() - t0, 2), **memory_now()}
            if done is not None:
                save_block(work, i, bt, entry)
        log.append(entry)
        if done is not None:
            tensors.attach(done)
        else:
            tensors.put(bt, f"block_{i}.safetensors")
        lw, online = block_from_tensors(bt, qdeq, i)
        h_q = checked_block(cfg, lw, i, h_q, QuantHooks(quant_cfg, online), rope, "quantized")
        h_fp = y
        del fp_lw, qdeq, lw, online, y  # a 7B block's float weights are 0.8 GB a copy: none is held into the next block
        bar.set_postfix(block=i, mse=f"{entry['mse_baseq']:.3g}", gptq=f"{entry['mse_gptq']:.3g}")
    tensors.put(float_tensors(cfg, src.outside_and_norms(), q, online=False, head_inputs=h_q), "outside.safetensors")
    del h_q
    art = Artifact(model=cfg.to_dict(), quant=quant_cfg, tensors=tensors, source=source_info(model),
                   calibration={"seed": q.seed, "windows": list(calib.shape), "blocks": log})
    if b.e2e_epochs:
        art.calibration["end_to_end"] = _tuned_end_to_end(art, work, b, calib, h_fp, q.seed, device)
    art.calibration["seconds"] = round(time.time() - t_start, 1)
    return art


E2E_FILE = "end_to_end"
"""A resumable run's end-to-end pass: <work>/end_to_end.json (its log entry) and .safetensors (its tensors)."""


def _tuned_end_to_end(art: Artifact, work: Path | None, b: BaseqSettings, calib: torch.Tensor, fp_last: torch.Tensor,
                      seed: int, device: torch.device | None) -> dict:
    """Run (or, on a resumed run, reread) the end-to-end pass and put its tensors into the artifact; its log entry.
    Skipped with a note when the dequantized model would not fit in the memory that is free."""
    entry_file, tensor_file = (work / f"{E2E_FILE}.json", work / f"{E2E_FILE}.safetensors") if work else (None, None)
    if entry_file is not None and entry_file.is_file():
        entry = json.loads(entry_file.read_text())
        if entry.get("kept"):
            art.tensors.attach(tensor_file)
        return entry
    need, free = end_to_end_bytes(ModelConfig.from_dict(art.model)), available_memory()
    if free is not None and need > free:
        tqdm.write(f"end-to-end tuning skipped: it needs about {need / 2**30:.1f} GiB and {free / 2**30:.1f} GiB is free; "
                   "the artifact is complete without it (--e2e-epochs 0 leaves it out without this note; a machine "
                   "with more free memory runs it)")
        return {"skipped": "memory", "needed_gib": round(need / 2**30, 1), "free_gib": round(free / 2**30, 1)}
    tuned, entry = tune_end_to_end(art, calib, fp_last, EndToEndFit(b.e2e_epochs), seed, device)
    if tuned is not None:  # the tensors first, then the entry that marks the pass done (each written atomically)
        art.tensors.put(tuned, f"{E2E_FILE}.safetensors")
    if entry_file is not None:
        write_text_atomically(entry_file, json.dumps(entry))
    return entry


def _dequantized_linears(bt: dict, cfg: ModelConfig, q: QuantSettings, layer: int) -> dict[str, torch.Tensor]:
    from .artifact_tensors import linear_from_tensors

    out = {}
    for site, names in SITE_LINEARS.items():
        for name in names:
            qw = linear_from_tensors(f"layers.{layer}.{name}", bt, site_width(cfg, site), q.group_size)
            out[f"{name}.weight"] = qw.dequantize()
    return out


def _site_means(cfg, qlw, layer, h, hooks, rope) -> dict[str, torch.Tensor]:
    """Per-channel token means of each activation site's input (the 'mean' shift start)."""
    sums: dict[str, torch.Tensor] = {}

    def add(site: str, x: torch.Tensor) -> None:
        sums[site] = sums.get(site, 0) + x.reshape(-1, x.shape[-1]).sum(0)

    run_block(cfg, qlw, layer, h, TapHooks(hooks, add), rope)
    n = h.shape[0] * h.shape[1]
    return {k: v / n for k, v in sums.items()}
