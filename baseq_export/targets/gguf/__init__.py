"""The GGUF export target for llama.cpp (see targets/__init__.py for the interface every target implements).

One .gguf file written with gguf-py's GGUFWriter: llama architecture keys (qwen2 for Qwen2 models
whose biases llama.cpp's qwen2 graph loads), the tokenizer and chat template from the artifact's
tokenizer files, 4-bit linears as Q4_0 / Q4_1 blocks built from the artifact's own codes (no
re-rounding), embedding and output in a selectable type, norms and biases F32, a baseq.* key
that marks the file as ours. The GGUF profile is weight-only: llama.cpp has no online Hadamard
and no 4-bit activations, so artifacts that need online ops are refused. runtime.py runs
the file in llama.cpp (llama-cpp-python).
"""

from __future__ import annotations

import argparse
import builtins
import os
import struct
import tempfile
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np

from ...artifact import Artifact
from ...artifact_tensors import is_online_param
from ...gguf_file import check_file, read_keys
from ...models.base import LINEARS, ModelConfig, linear_in_features
from ...quant import GGML_BLOCK
from .. import loaded, option_default
from .meta import FORMAT_KEY, FORMAT_VALUE, add_hparams, add_tokenizer, choose_pre, rope_factors
from .meta import context_length as planned_context
from .runtime import KV_CACHE_TYPES
from .tensors import ARCHS, HEAD_TYPES, QT, WEIGHT_TYPES, GGUFExportError, Plan, nbytes, plan_tensors

NAME = "gguf"
BACKENDS = ("llama.cpp",)
DEFAULT_FILE = "model.gguf"
PROFILE_HINT = ("quantize with the gguf weight-only profile (`baseq-export quantize --method quarot-gptq --bits w4a16 "
                "--group-size 32`, q4_1 grid, R1/R2 offline, no R4)")
__all__ = ["GGUFExportError", "NAME", "BACKENDS", "add_arguments", "options", "main_job_settings", "default_out",
           "check_artifact", "is_export", "describe", "open", "write", "write_model"]


# ---------------------------------------------------------------------------------------------
# The target interface (targets/__init__.py)


def add_arguments(p: argparse.ArgumentParser, sub: bool = False) -> None:
    """--gguf-weights, --gguf-head, --gguf-embed, --gguf-kv-cache, --gguf-ctx, --gguf-pre (sub: defaults SUPPRESSed)."""
    p.add_argument("--gguf-weights", choices=WEIGHT_TYPES, default=option_default("auto", sub),
                   help="GGUF type of the 4-bit linears: auto (the artifact's own grid: Q4_0 for symmetric/q4_0-grid "
                   "weights, else Q4_1), q4_0, q4_1, or f16/f32 (the weights as floats, e.g. an unquantized model)")
    p.add_argument("--gguf-head", choices=HEAD_TYPES, default=option_default("auto", sub),
                   help="GGUF type of the output (lm_head): auto = the artifact's 4-bit grid when it stores 4-bit "
                   "heads, else q8_0")
    p.add_argument("--gguf-embed", choices=HEAD_TYPES, default=option_default(None, sub),
                   help="GGUF type of the token embedding (default: the --gguf-head type; a tied embedding is written "
                   "once when both types agree)")
    p.add_argument("--gguf-kv-cache", choices=KV_CACHE_TYPES, default=option_default("f16", sub),
                   help="llama.cpp KV cache type when running a GGUF (eval/run): f16 (llama.cpp's default), f32, or "
                   "quantized q8_0 / q4_0 (these turn on flash attention, which a quantized V cache needs)")
    p.add_argument("--gguf-ctx", type=int, default=option_default(None, sub),
                   help="context length written to the GGUF (default: the source model's)")
    p.add_argument("--gguf-pre", metavar="NAME", default=option_default(None, sub),
                   help="llama.cpp pre-tokenizer written to the GGUF (default: the one whose tokenization of probe "
                   "texts equals the Hugging Face tokenizer's, found by trying llama.cpp's names; an export that none "
                   "reproduces is refused). A name given here is written as asked, with a warning if its ids differ")


def options(args: argparse.Namespace) -> dict:
    """The GGUF options of a parsed command line as write()/open() keywords."""
    return {"weights": getattr(args, "gguf_weights", "auto"), "head": getattr(args, "gguf_head", "auto"),
            "embed": getattr(args, "gguf_embed", None), "kv_cache": getattr(args, "gguf_kv_cache", "f16"),
            "context_length": getattr(args, "gguf_ctx", None), "tokenizer_pre": getattr(args, "gguf_pre", None)}


MAIN_JOB_MIX = "q4_k_m"
"""The main job's llama.cpp file type: the mix llama.cpp users pick most; at its size our rotated GPTQ file beats
llama.cpp's own with an importance matrix on text nobody calibrated on (docs/results.md, GGUF mixes)."""


def main_job_settings(args: argparse.Namespace) -> dict:
    """The main job for GGUF quantizes with the gguf profile (settings.PROFILES; --profile gguf) into MAIN_JOB_MIX."""
    return {"profile": "gguf", "gguf_mix": MAIN_JOB_MIX}


def default_out(stem: str) -> str:
    """Where an export of the artifact or model named stem goes by default: one file."""
    return f"{stem}.gguf"


def check_artifact(art: Artifact) -> None:
    """Raise GGUFExportError when llama.cpp cannot compute what the artifact's reference forward computes."""
    q, cfg = art.quant or {}, ModelConfig.from_dict(art.model)
    if q.get("a_bits") or q.get("kv_bits"):
        raise GGUFExportError(
            f"this artifact quantizes activations / the KV cache ({q.get('bits')}): llama.cpp has no per-token "
            f"4-bit activations or online quantizers, so its GGUF would compute something else; {PROFILE_HINT}")
    rot = q.get("rotation") or {}
    if rot.get("r3") or rot.get("r4"):
        which = " and ".join(r.upper() for r in ("r3", "r4") if rot.get(r))
        raise GGUFExportError(
            f"this artifact uses the online Hadamard {which} (rotation config {rot}); llama.cpp has no online "
            f"Hadamard before down_proj / after RoPE, so only R1/R2 (folded offline) can be written; {PROFILE_HINT}, "
            "with R4 off")
    online = sorted(n for n in art.tensors if is_online_param(n))
    if online:
        raise GGUFExportError(f"this artifact has online parameters ({', '.join(online[:3])}, ...) that llama.cpp "
                              f"cannot apply; {PROFILE_HINT}")
    if "head_mix" in art.tensors:
        raise GGUFExportError("this artifact stores its head as the 4-bit embedding table times head_mix (a rotated "
                              "tied head for ONNX, --head-bits 4); llama.cpp's output tensor cannot hold that product: "
                              "quantize with --head-bits 16 and choose the GGUF head type with --gguf-head")
    if cfg.arch not in ARCHS:
        raise GGUFExportError(f"architecture {cfg.arch!r} has no GGUF mapping here; supported: {', '.join(ARCHS)}")
    if cfg.rope_attention_scaling != 1.0:
        raise GGUFExportError(f"RoPE attention scaling {cfg.rope_attention_scaling} is not written to GGUF yet")
    if q.get("w_bits") not in (None, 4):
        raise GGUFExportError(f"{q.get('w_bits')}-bit weights have no GGUF block type here; use 4-bit weights")
    gs = q.get("group_size")
    quantized = any(n.endswith(".qweight") for n in art.tensors)
    for name in LINEARS if quantized else ():
        k = linear_in_features(cfg, name)
        if (gs or k) % GGML_BLOCK:
            raise GGUFExportError(
                f"{name}: weight groups of {gs or k} (K={k}) do not split into llama.cpp's {GGML_BLOCK}-weight Q4 "
                f"blocks; quantize with --group-size {GGML_BLOCK} (or per channel with K a multiple of {GGML_BLOCK})")
    if q.get("embed") == "int4" and q.get("head_group_size", GGML_BLOCK) % GGML_BLOCK:
        raise GGUFExportError(f"4-bit heads in groups of {q.get('head_group_size')} do not map onto "
                              f"{GGML_BLOCK}-weight blocks")


def is_export(path: str | Path) -> bool:
    """True for a complete GGUF file that this writer made (it carries the baseq.format key)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        return check_file(path, {FORMAT_KEY}).values.get(FORMAT_KEY) == FORMAT_VALUE
    except (OSError, ValueError, IndexError, KeyError, TypeError, OverflowError, struct.error):
        return False


def describe(path: str | Path) -> str:
    """One line for the main job's summary: the file, its weight type and size."""
    ftype = read_keys(path, {gguf.Keys.General.FILE_TYPE}).get(gguf.Keys.General.FILE_TYPE)
    name = gguf.LlamaFileType(ftype).name if ftype is not None else "?"
    return f"GGUF export: {path} ({name}, {Path(path).stat().st_size / 2**20:.1f} MiB)"


def open(path: str | Path, backend: str | None = None, **options):
    """The GGUF in llama.cpp (llama-cpp-python): an export.Backend."""
    if (backend or BACKENDS[0]) not in BACKENDS:
        raise ValueError(f"a GGUF runs in {', '.join(BACKENDS)}, not {backend!r}")
    from .runtime import LlamaCppBackend

    return LlamaCppBackend(path, **options)


# ---------------------------------------------------------------------------------------------
# Writing


def check_out(out: Path, force: bool) -> Path:
    """The file to write: out itself, or out/model.gguf for an existing directory. An existing file is replaced
    only with force, and only when it is one of our GGUF exports."""
    if out.is_dir():
        out = out / DEFAULT_FILE
    if out.exists() or out.is_symlink():
        if not force:
            raise FileExistsError(f"{out} already exists; choose another --out or pass --force to replace it")
        if not is_export(out):
            raise FileExistsError(f"{out} exists and is not a baseq GGUF export; refusing to replace it (delete it "
                                  "yourself if it is a damaged export), choose another --out")
    return out


def stream(w: "gguf.GGUFWriter", plan: Plan) -> Iterator[str]:
    """Write header, keys, tensor infos, then each tensor's data made one at a time (only one copy in memory)."""
    for p in plan.tensors:
        if p.qtype in (QT.F32, QT.F16):
            w.add_tensor_info(p.name, p.shape, np.dtype(np.float32 if p.qtype == QT.F32 else np.float16),
                              nbytes(p.shape, p.qtype))
        else:
            n, k = p.shape
            block, type_size = gguf.GGML_QUANT_SIZES[p.qtype]
            w.add_tensor_info(p.name, (n, k // block * type_size), np.dtype(np.uint8), nbytes(p.shape, p.qtype),
                              raw_dtype=p.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for p in plan.tensors:
        data = p.make()
        if data.nbytes != nbytes(p.shape, p.qtype):
            raise AssertionError(f"{p.name}: {data.nbytes} bytes made, {nbytes(p.shape, p.qtype)} planned")
        w.write_tensor_data(data)
        yield p.name


def write(artifact: Artifact | str | Path, out: str | Path, force: bool = False, weights: str = "auto",
          head: str = "auto", embed: str | None = None, context_length: int | None = None,
          tokenizer_pre: str | None = None, **_runtime_options) -> Path:
    """Write an artifact (loaded, or the .baseq directory at a path; quantized, or float weights in the canonical
    layout) as one GGUF file at `out` (or out/model.gguf for a directory), atomically. The tokenizer is read from
    the artifact's directory."""
    art = loaded(artifact)
    if art.path is None:
        raise GGUFExportError("the artifact has no directory with its tokenizer files (it is held in memory only); "
                              "save it with artifact.save_artifact first")
    check_artifact(art)
    out = check_out(Path(out).expanduser(), force)
    plan = plan_tensors(art, weights, head, embed, rope_factors(art))
    pre = choose_pre(art, plan.arch, art.path, tokenizer_pre)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        w = gguf.GGUFWriter(tmp, plan.arch)
        add_hparams(w, art, plan, planned_context(art, context_length))
        add_tokenizer(w, art, art.path, pre)
        for _ in stream(w, plan):
            pass
        w.close()
        with builtins.open(tmp, "rb") as f:
            os.fsync(f.fileno())
        validate_written(tmp, plan)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    plan.log.warn()
    return out


def validate_written(path: Path, plan: Plan) -> None:
    """Re-read a written file before it replaces anything: complete, and holding the planned tensors by name,
    type and element count."""
    got = {t.name: (t.qtype, t.n_elements) for t in check_file(path).tensors}
    want = {p.name: (int(p.qtype), int(np.prod(p.shape))) for p in plan.tensors}
    if got != want:
        raise GGUFExportError(f"the written GGUF holds other tensors than planned ({len(got)} against {len(want)}); "
                              "nothing was replaced")


def diagnose(path: str | Path) -> None:
    """Raise an error naming the damage when path looks like a GGUF but is no readable export of ours."""
    path = Path(path)
    if path.suffix == ".gguf" or path.is_file() and builtins.open(path, "rb").read(4) == b"GGUF":
        check_file(path)


def write_model(model, out: str | Path, force: bool = False, weights: str = "f32", head: str = "f32",
                embed: str | None = None, context_length: int | None = None, tokenizer_pre: str | None = None) -> Path:
    """Write an unquantized models.LoadedModel as a float GGUF (weights f32/f16, or llama.cpp's own q4_0/q4_1
    rounding of the float weights): the reference rows of a benchmark."""
    from ...models import source_info

    if weights not in ("f32", "f16", "q4_0", "q4_1"):
        raise GGUFExportError(f"an unquantized model is written as f32, f16, q4_0 or q4_1, not {weights!r}")
    tensors = {k: v for k, v in model.weights.items() if not (k == "lm_head" and model.config.tied_embeddings)}
    with tempfile.TemporaryDirectory(prefix="baseq-gguf-tok-") as tok:
        model.tokenizer.save_pretrained(tok)
        art = Artifact(model=model.config.to_dict(), quant={}, tensors=tensors, source=source_info(model), path=Path(tok))
        return write(art, out, force, weights, head, embed, context_length, tokenizer_pre)
