"""The public Python API: quantize a model, export an artifact, evaluate a model, an artifact or an export.

The `baseq-export` command line is a thin layer over these functions, and the scripts in tools/ call them
instead of re-implementing the pipeline. Example:

    import baseq_export as bq
    art = bq.quantize("default", "smollm2.baseq", method="baseq", preset="quick")
    bq.export(art, "onnx", "smollm2-135m-onnx")
    print(bq.evaluate("smollm2-135m-onnx").ppl)
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .locks import out_lock
from .settings import PRESET_R1_STEPS, PRESETS, PROFILES, W4A4KV4, W4A16, BaseqSettings, QuantSettings

GPTQ_NSAMPLES, GPTQ_CTX = 128, 512
"""Calibration windows for GPTQ methods when none are asked for: count and tokens per window."""


@dataclass(frozen=True)
class Plan:
    """What a quantization run will do: the settings that decide its numbers, BASE-Q's budget (None for the
    other methods) and the calibration windows it reads (count 0: none, e.g. RTN)."""

    settings: QuantSettings
    baseq: BaseqSettings | None
    nsamples: int
    calib_ctx: int
    tune: object | None = None  # tune.TuneSettings: the weight-only blockwise tuning after GPTQ, or None

    def quant_config(self) -> dict:
        """The quant config an artifact made with this plan records in its config.json."""
        import json

        from .calibrate import baseq_quant_config

        quant = baseq_quant_config(self.settings, self.baseq) if self.baseq else self.settings.quant_config()
        if self.tune is not None:
            quant = dict(quant, tune=dataclasses.asdict(self.tune))
        return json.loads(json.dumps(quant))


def plan(method: str = "baseq", bits: str = W4A4KV4, preset: str = "quick", *, profile: str | None = None,
         nsamples: int | None = None, calib_ctx: int | None = None, e2e_epochs: int | None = None,
         r1_steps: int | None = None, max_positions: int | None = None, tune: bool = False, **settings) -> Plan:
    """Resolve a method, bit widths, a BASE-Q preset and a profile (whose fields yield to the ones given) into a
    Plan. `settings`: any other QuantSettings field (group_size, seed, head_bits, ...). max_positions: the model's
    context, which caps the preset's calibration windows unless calib_ctx is given. tune: after GPTQ, tune each
    block's weight scales and output biases (tune.py; weight-only GPTQ methods, e.g. the gguf profile)."""
    if profile is not None and profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    fields = {**PROFILES.get(profile or "", {}), **{k: v for k, v in settings.items() if v is not None}}
    method = fields.pop("method", method)
    bits = fields.pop("bits", bits)
    baseq = method == "baseq"
    if r1_steps is None:  # the preset's for BASE-Q (which refuses w4a16 with its own message), else none
        r1_steps = PRESET_R1_STEPS.get(preset, 0) if baseq and bits != W4A16 else 0
    q = QuantSettings(method=method, bits=bits, r1_steps=r1_steps, **fields)
    if baseq:
        p = PRESETS[preset]
        ctx = calib_ctx or min(p.calib_ctx, max_positions or p.calib_ctx)
        e2e = p.e2e_epochs if e2e_epochs is None else e2e_epochs
        b = dataclasses.replace(p, nsamples=nsamples or p.nsamples, calib_ctx=ctx, e2e_epochs=e2e)
        return Plan(q, b, b.nsamples, b.calib_ctx)
    if tune and q.ggml_mix:
        raise ValueError("--tune-blocks tunes the scales of the q4_0 / q4_1 grids; with --gguf-mix ggml picks the "
                         "scales: drop one of the two")
    if tune and not (q.bits == W4A16 and q.gptq):
        raise ValueError("blockwise weight tuning follows GPTQ on weight-only models: use it with --profile gguf, or "
                         "--method quarot-gptq --bits w4a16")
    if q.gptq or r1_steps or q.kv_clip_fit != "fixed":
        from .tune import TuneSettings

        return Plan(q, None, nsamples or GPTQ_NSAMPLES, calib_ctx or min(GPTQ_CTX, max_positions or GPTQ_CTX),
                    TuneSettings() if tune else None)
    return Plan(q, None, 0, 0)


make_plan = plan  # the name quantize() uses, whose `plan` keyword takes a Plan


def plan_of(settings: QuantSettings, baseq: BaseqSettings | None = None) -> Plan:
    """The Plan of settings made by hand (benchmarks, ablations): BASE-Q's budget when baseq is given, else GPTQ's
    default windows for the methods that calibrate, none for RTN."""
    if baseq is not None:
        return Plan(settings, baseq, baseq.nsamples, baseq.calib_ctx)
    calibrates = settings.gptq or settings.r1_steps
    return Plan(settings, None, GPTQ_NSAMPLES if calibrates else 0, GPTQ_CTX if calibrates else 0)


def load(model: str = "default", lazy: bool = True):
    """A model by name: 'default' (the embedded SmolLM2-135M), a local HF checkpoint dir or a .gguf file."""
    from .models import load_model

    return load_model(model, lazy=lazy)


def check_context(model, ctx: int, option: str = "ctx") -> None:
    """Refuse windows longer than the context the model was trained for (its positions past that are untrained)."""
    if model.max_positions and ctx > model.max_positions:
        raise ValueError(f"{option} {ctx} is longer than the model's context of {model.max_positions} tokens "
                         f"(max_position_embeddings); pass {option} {model.max_positions} or less")


def calibration_windows(tokenizer, nsamples: int, ctx: int, seed: int = 0,
                        text: str | Path | list | None = None) -> torch.Tensor:
    """Seeded calibration windows [nsamples, ctx] of a text file, or of several joined (default: the embedded
    calibration split)."""
    from . import data

    return data.calibration_windows(data.tokenize(tokenizer, data.corpus_text("calib", text)), nsamples, ctx, seed)


@contextlib.contextmanager
def spool_dir(out: Path):
    """A hidden sibling directory of out for a non-resumable run's finished blocks, removed however the run ends."""
    out.expanduser().parent.mkdir(parents=True, exist_ok=True)
    spool = Path(tempfile.mkdtemp(prefix=f".{out.name}.spool-", dir=out.expanduser().parent))
    try:
        yield spool
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def quantize(model="default", out: str | Path | None = None, *, method: str = "baseq", bits: str = W4A4KV4,
             preset: str = "quick", profile: str | None = None, calib_text: str | Path | list | None = None,
             nsamples: int | None = None, calib_ctx: int | None = None, e2e_epochs: int | None = None,
             r1_steps: int | None = None, device: str | torch.device = "cpu", force: bool = False,
             plan: Plan | None = None, calib: torch.Tensor | None = None, **settings):
    """Quantize a model (a name for load(), or a loaded model) and return the Artifact. With `out` the artifact is
    written there atomically (a BASE-Q run is resumable from `out`.partial) and returned as loaded from it;
    without, its tensors stay in memory. `settings`: QuantSettings fields, as plan() takes them. `plan`: a Plan
    made beforehand, used instead of the keywords; `calib`: token windows [n, T] instead of ones cut from
    calib_text (benchmarks share one set across rows)."""
    from .calibrate import calibrate_baseq
    from .device import resolve_device
    from .artifact import check_writable, load_artifact, save_artifact
    from .gptq_model import quantize_model

    with out_lock(out) if out is not None else contextlib.nullcontext():  # one writer per --out (locks.py)
        device = resolve_device(device) if isinstance(device, str) else device
        if out is not None:
            check_writable(out, force)  # fail before the long work, not after it
        keywords = dict(profile=profile, nsamples=nsamples, calib_ctx=calib_ctx, e2e_epochs=e2e_epochs,
                        r1_steps=r1_steps)
        if plan is None:
            make_plan(method, bits, preset, **keywords, **settings)  # bad settings: refused before the model loads
        m = load(model) if isinstance(model, (str, Path)) else model  # lazy: a block's tensors read when needed
        p = plan or make_plan(method, bits, preset, max_positions=m.max_positions, **keywords, **settings)
        p.settings.check_model(m.config)
        if calib is None and p.nsamples:
            check_context(m, p.calib_ctx, "--calib-ctx")
            calib = calibration_windows(m.tokenizer, p.nsamples, p.calib_ctx, p.settings.seed, calib_text)
        kv_windows = None
        if p.settings.kv_clip_fit != "fixed":  # its own, longer windows of the same text (kv_clips.py)
            from . import data
            from .kv_clips import FIT_CTX, FIT_WINDOWS

            tokens = data.tokenize(m.tokenizer, data.corpus_text("calib", calib_text))
            ctx = min(FIT_CTX, m.max_positions or FIT_CTX, tokens.numel())  # shorter for a short text or context
            kv_windows = data.calibration_windows(tokens, FIT_WINDOWS, ctx, p.settings.seed)
        save = (lambda art: save_artifact(out, art, overwrite=force,
                                          write_extra=lambda d: m.tokenizer.save_pretrained(str(d))))
        if p.baseq or p.tune:  # resumable: each finished block is kept in out.partial
            from .tune import tune_blocks

            workdir = Path(out).with_name(Path(out).name + ".partial") if out is not None else None
            if workdir is not None and workdir.exists():
                print(f"resuming the partial run in {workdir}", file=sys.stderr)
            art = (calibrate_baseq(m, p.settings, p.baseq, calib, workdir=workdir, device=device) if p.baseq else
                   tune_blocks(m, p.settings, calib, p.tune, workdir=workdir, device=device))  # blocks: workdir's files
            if out is None:
                return art
            path = save(art)
            shutil.rmtree(workdir, ignore_errors=True)
        elif out is None:
            return quantize_model(m, p.settings, calib, device=device, kv_windows=kv_windows)
        else:
            with spool_dir(Path(out)) as spool:  # finished blocks wait on disk, not in memory, until it is written
                path = save(quantize_model(m, p.settings, calib, spool=spool, device=device, kv_windows=kv_windows))
        return load_artifact(path, lazy=True)


def export(artifact, format: str = "onnx", out: str | Path | None = None, *, force: bool = False, **options) -> Path:
    """Export an artifact (a loaded Artifact or a .baseq path) to `format` (export.TARGETS) at `out` (default:
    next to the artifact, named by the format); returns the export's path. `options`: the target's own."""
    from .targets import target
    from .memory import map_big_allocations
    from .models.base import ModelConfig
    from .artifact import load_artifact
    from .blocks import block_bytes

    t = target(format)
    art = load_artifact(artifact, lazy=True) if isinstance(artifact, (str, Path)) else artifact
    if art.path is None:  # an export carries the artifact's tokenizer files
        raise ValueError("this artifact is held in memory, without the tokenizer files an export carries: quantize "
                         "with out=PATH (or save_artifact it) and export that")
    if out is None:
        out = t.default_out(str(Path(art.path).with_suffix("")))
    t.check_artifact(art)
    map_big_allocations(block_bytes(ModelConfig.from_dict(art.model)))  # as quantize does, for a 7B model (memory.py)
    with out_lock(out):  # one writer per --out (locks.py)
        return t.write(art, out, force=force, **options)


def evaluate(target="default", text: str | Path | None = None, ctx: int = 512, max_windows: int | None = None,
             batch_size: int = 1, backend: str | None = None, device: str | torch.device = "cpu",
             windows: torch.Tensor | None = None):
    """Perplexity (evaluate.Perplexity, with a label naming what ran) on non-overlapping windows of a text file
    (default: the embedded evaluation split) of: an Artifact or a .baseq path (torch reference), an export (its
    runtime, or `backend`), a loaded model or a model name for load() (its full-precision forward).
    `windows`: token windows [n, T] to score instead (then text, ctx and max_windows are not used)."""
    from . import data
    from .perplexity import perplexity

    logits, label, tokenizer = runner(target, backend, resolve(device), ctx if windows is None else windows.shape[1],
                                      windows is None)
    if windows is None:
        windows = data.token_windows(data.tokenize(tokenizer(), data.corpus_text("eval", text)), ctx, max_windows)
    with torch.inference_mode():
        result = perplexity(logits, windows, batch_size, desc=f"{label} perplexity")
    return dataclasses.replace(result, label=label)


def fp_reference(model="default", windows: torch.Tensor | None = None, device: str | torch.device = "cpu",
                 cache: bool = True):
    """The FP model's compare.FPTop on token windows [n, T]: read from the cache (compare.cache_dir) when this
    model (by weights digest) was scored on these windows before, else computed and, with cache, stored."""
    from .compare import cache_dir, fp_top, load_reference, reference_key, save_reference
    from .models import weights_digest

    m = load(model) if isinstance(model, (str, Path)) else model
    path = cache_dir() / "fp" / f"{reference_key(weights_digest(m), windows)}.npz"
    found = load_reference(path, windows) if cache else None
    if found is not None:
        return found
    logits, _, _ = runner(m, None, resolve(device), windows.shape[1], need_tokenizer=False)
    fp = fp_top(logits, windows)
    if cache:
        save_reference(path, fp)
    return fp


def compare(target, against="default", text: str | Path | None = None, ctx: int = 512, max_windows: int | None = None,
            backend: str | None = None, device: str | torch.device = "cpu", cache: bool = True):
    """A compare.Comparison of target (an artifact, an export in its runtime or `backend`) against the FP model
    `against` (a name for load() or a loaded model) on windows of a text file (default: the embedded evaluation
    split) tokenized by the target's own tokenizer: perplexity, per-token KL divergence, top-1 agreement.
    `against` may also be an fp_reference() already made: then its windows are scored."""
    import dataclasses as dc

    from . import data
    from .compare import FPTop, compare as compare_logits

    logits, label, tokenizer = runner(target, backend, resolve(device), ctx, not isinstance(against, FPTop))
    if isinstance(against, FPTop):
        fp = against
    else:
        windows = data.token_windows(data.tokenize(tokenizer(), data.corpus_text("eval", text)), ctx, max_windows)
        fp = fp_reference(against, windows, device, cache)
    with torch.inference_mode():
        result = compare_logits(logits, fp, desc=f"{label} against FP")
    return dc.replace(result, label=label)


def runner(target, backend: str | None, device: torch.device, ctx: int, need_tokenizer: bool = True):
    """(logits function, label, a function returning the tokenizer) of whatever evaluate() was given."""
    from .artifact import Artifact
    from .targets import open_backend
    from .reference import reference_model

    if isinstance(target, Artifact):
        model = reference_model(target, device=device)
        label = f"{target.quant['method']} {target.quant['bits']} (torch reference)"
        if target.path is None and need_tokenizer:
            raise ValueError("an artifact held in memory has no tokenizer files: pass windows=, or save it first "
                             "(quantize(..., out=PATH))")
        return (lambda ids: model.logits(ids.to(model.device)).cpu()), label, lambda: load_tokenizer(target.path)
    if isinstance(target, (str, Path)) and not is_model(target):  # an artifact or an export (else its damage named)
        run = open_backend(target, backend, device=device)
        return run.logits, run.label, lambda: load_tokenizer(target)
    from .models.base import forward

    m = load(target) if isinstance(target, (str, Path)) else target
    check_context(m, ctx, "--ctx")
    w = m.weights.read_all() if hasattr(m.weights, "read_all") else m.weights
    weights = {k: v.to(device) for k, v in w.items()}
    return (lambda ids: forward(m.config, weights, ids.to(device)).cpu()), "FP", lambda: m.tokenizer


def chat(target="default", *, backend: str | None = None, device: str | torch.device = "cpu",
         sampling=None, max_new_tokens: int = 64, raw: bool = False):
    """A generate.Conversation with an artifact (torch reference), an export (its runtime, or `backend`) or a model
    name for load() (the full-precision model): ask(text) answers through the tokenizer's chat template unless
    raw; sampling is a generate.Sampling (default greedy)."""
    from .generate import Conversation, Sampling
    from .targets import FloatBackend, open_backend

    from .models import LoadedModel

    if isinstance(target, LoadedModel) or is_model(target):
        if backend not in (None, "torch"):
            raise ValueError(f"{target} is a model, which runs in the torch float forward; backend {backend!r} runs "
                             "exports: pass an export's path")
        run = FloatBackend(target)
        tokenizer = run.model.tokenizer
    else:
        run = open_backend(target, backend, device=resolve(device))
        tokenizer = load_tokenizer(target)
    return Conversation(run, tokenizer, sampling or Sampling(), max_new_tokens, raw)


def is_model(name: str | Path) -> bool:
    """True for what load() reads: 'default', a Hugging Face checkpoint directory or a .gguf file that is no
    export of ours."""
    from .targets import find_target

    path = Path(name)
    if str(name) == "default" or (path / "config.json").is_file() and not (path / "manifest.json").is_file():
        return not (path / "quant.safetensors").is_file()
    return path.suffix == ".gguf" and path.is_file() and find_target(path) is None


def resolve(device: str | torch.device) -> torch.device:
    """A torch device from 'cpu', 'cuda', 'auto' or a torch.device."""
    from .device import resolve_device

    return resolve_device(device) if isinstance(device, str) else device


def load_tokenizer(path: str | Path):
    """The tokenizer of an artifact or export: the files saved in its directory, or a GGUF file's own."""
    from transformers import AutoTokenizer

    path = Path(path)
    if path.is_file():  # a single-file export (GGUF) carries its tokenizer inside
        from .gguf_file import load_tokenizer as gguf_tokenizer

        return gguf_tokenizer(path)
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
