"""The ONNX export target (see targets/__init__.py for the interface every target implements).

An export directory holds model.onnx + model.onnx.data (external weights), the tokenizer files,
genai_config.json (onnxruntime-genai), manifest.json and, with custom ops, a copy of our op
library. The graph is built by model.py (from graph.py's pieces); runtime.py and genai.py run it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import warnings
from pathlib import Path

import onnx

from ...artifact import Artifact, source_config, staged_dir
from ...artifact_tensors import GGML_TENSORS
from ...models.base import ModelConfig
from .. import loaded, option_default
from .genai import GenaiBackend, write_genai_config
from .graph import ExternalData
from .model import KV_CACHE_CHOICES, build_model
from .runtime import (DATA_FILE, KV4_MODEL_FILE, MANIFEST, MANIFEST_FORMAT, MODEL_FILE, OnnxModel, file_digests,
                      greedy_graph_file, open_session, read_manifest, verify_files)

NAME = "onnx"
BACKENDS = ("onnxruntime", "onnxruntime-genai")
OPS_OPTIONS = ("auto", "custom", "standard")
DEFAULT_MAX_LENGTH = 2048
"""Context of an export when the source model no longer says its own (--max-length sets it)."""


def add_arguments(p: argparse.ArgumentParser, sub: bool = False) -> None:
    """--ops and --kv-cache (sub: defaults SUPPRESSed so a subcommand does not mask the main options)."""
    p.add_argument("--ops", choices=OPS_OPTIONS, default=option_default("auto", sub),
                   help="ONNX online parts as our C++ custom ops (custom), as standard ONNX ops for runtimes that cannot "
                   "load our library (standard), or custom when the library builds here, else standard (auto, default)")
    p.add_argument("--max-length", type=int, default=option_default(None, sub), metavar="N",
                   help="longest sequence (prompt + generated tokens) the ONNX export runs: the size of its RoPE tables "
                   "and of onnxruntime-genai's KV buffer (default: the source model's own context, else "
                   f"{DEFAULT_MAX_LENGTH})")
    p.add_argument("--kv-cache", choices=KV_CACHE_CHOICES, default=option_default("float", sub),
                   help="ONNX KV cache of model.onnx: float32 values on the 4-bit grid (default), or packed 4-bit codes + "
                   "per-token scale/zero (int4: about 6x smaller, our ops only). With our ops and a 4-bit KV artifact "
                   "the default export also holds model.kv4.onnx (packed), which onnxruntime and onnxruntime-genai run")


def options(args: argparse.Namespace) -> dict:
    return {"ops": getattr(args, "ops", "auto"), "kv_cache": getattr(args, "kv_cache", "float"),
            "max_length": getattr(args, "max_length", None)}


def export_length(art: Artifact, requested: int | None) -> int:
    """The export's context: the option, else the source model's own (artifact.source_config), else
    DEFAULT_MAX_LENGTH."""
    n = requested or source_config(art).get("context_length") or DEFAULT_MAX_LENGTH
    if int(n) < 2:
        raise ValueError(f"--max-length must be at least 2 tokens, got {n}")
    return int(n)


def main_job_settings(args: argparse.Namespace) -> dict:
    """The main job for ONNX: BASE-Q W4A4KV4 (the command line's defaults) with a 4-bit embedding and head
    (GatherBlockQuantized + MatMulNBits on one tied table): a third of the float head's size, and faster; the
    head's input rounded to int8 per group so that MatMulNBits runs its int8 kernels (accuracy level 4)."""
    return {"head_bits": 4, "head_act_bits": 8}


def default_out(stem: str) -> str:
    """Where an export of the artifact or model named stem goes by default: a directory."""
    return f"{stem}-onnx"


def check_artifact(art: Artifact) -> None:
    """Every artifact kind has an ONNX form except weights in llama.cpp's block types (--gguf-mix) or on its
    Q4_1 grid (a float minimum per block, which MatMulNBits' integer zero points cannot hold)."""
    if art.quant.get("ggml_mix") or any(n.endswith(GGML_TENSORS) for n in art.tensors):
        raise ValueError(f"this artifact holds its weights in llama.cpp's block types (--gguf-mix "
                         f"{art.quant.get('ggml_mix')}), which onnxruntime has no kernels for: export it with --format "
                         "gguf, or quantize again without --gguf-mix for ONNX")
    if art.quant.get("weight_grid") == "q4_1":
        raise ValueError("this artifact's weights lie on llama.cpp's Q4_1 grid (a float minimum per block of 32, e.g. "
                         "--profile gguf), which onnxruntime's MatMulNBits (integer zero points) cannot hold: export it "
                         "with --format gguf, or quantize for ONNX (the main job `--format onnx`, or --profile "
                         "onnx-w4a16)")


def is_export(path: str | Path) -> bool:
    path = Path(path)
    if not ((path / MANIFEST).is_file() and (path / MODEL_FILE).is_file()):
        return False
    try:
        return json.loads((path / MANIFEST).read_text()).get("format", MANIFEST_FORMAT) == MANIFEST_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def diagnose(path: str | Path) -> None:
    """Raise an error naming the damage when path looks like an ONNX export of ours but cannot be opened."""
    path = Path(path)
    if path.is_dir() and (path / MODEL_FILE).is_file() and not (path / MANIFEST).is_file():
        raise FileNotFoundError(f"{path} holds {MODEL_FILE} but no {MANIFEST}: it is not an export of ours, or its "
                                "manifest was lost; re-export it with `baseq-export export ARTIFACT`")
    if path.is_dir() and (path / MANIFEST).is_file():
        manifest = read_manifest(path)  # a manifest.json of another format is refused, naming it
        if not (path / MODEL_FILE).is_file():
            raise FileNotFoundError(f"{path} lacks {MODEL_FILE}; copy the whole export directory again or re-export it")
        verify_files(path, manifest)


def resolve_ops(ops: str) -> tuple[str, Path | None]:
    """("custom", library) or ("standard", None) for --ops custom|standard|auto.

    auto: our custom ops when the library builds here, else standard ops with a warning saying why.
    """
    from ...runtime_ops import BuildError, library_path

    if ops == "standard":
        return "standard", None
    if ops not in ("custom", "auto"):
        raise ValueError(f"--ops must be one of {', '.join(OPS_OPTIONS)}, got {ops!r}")
    try:
        return "custom", library_path()
    except BuildError as e:
        if ops == "custom":
            raise
        warnings.warn(f"custom ops unavailable, exporting with standard ONNX ops instead: {e}")
        return "standard", None


def is_tokenizer_file(name: str) -> bool:
    """Files of a saved Hugging Face tokenizer, which an export carries so it runs on its own."""
    return name.startswith("tokenizer") or name in ("special_tokens_map.json", "chat_template.jinja")


def write(artifact: Artifact | str | Path, out: str | Path, force: bool = False, max_length: int | None = None,
          ops: str = "auto", kv_cache: str = "float") -> Path:
    """Write model.onnx (+ model.onnx.data), the tokenizer (the files in the artifact's directory),
    genai_config.json, a manifest and, with custom ops, a copy of our op library to `out`, atomically.
    A lazily loaded artifact is read a tensor at a time while the graphs are built. max_length: export_length.
    Nothing written names a path of this machine: an export is shipped to others."""
    art, out = loaded(artifact), Path(out).expanduser()
    max_length = export_length(art, max_length)
    if out.exists():
        if not force:
            raise FileExistsError(f"{out} already exists; choose another --out or pass --force to replace it")
        if not is_export(out):
            raise FileExistsError(f"{out} exists and is not a baseq ONNX export; refusing to replace it")
    if kv_cache == "int4" and ops == "auto":
        ops = "custom"  # a packed cache exists only as our ops: fail clearly rather than fall back
    ops, library = resolve_ops(ops)
    with staged_dir(out) as tmp:
        with ExternalData(tmp / DATA_FILE) as data:  # weights stream to disk as the graphs are built
            model = build_model(art, max_length, ops, kv_cache, data)
            save_graph(model, tmp / MODEL_FILE)
            files = [MODEL_FILE, DATA_FILE]
            runner = {"model": MODEL_FILE, "kv_cache": kv_cache}
            if kv_cache == "float" and ops == "custom" and art.quant.get("kv_bits") == 4:  # the packed cache all the same
                save_graph(build_model(art, max_length, ops, "int4", data), tmp / KV4_MODEL_FILE)  # shares the weights
                files.append(KV4_MODEL_FILE)
                runner = {"model": KV4_MODEL_FILE, "kv_cache": "int4"}
            if ops == "custom":  # for our runner's greedy decoder: each graph with the last position's logits only
                for graph, cache in {MODEL_FILE: kv_cache, runner["model"]: runner["kv_cache"]}.items():
                    save_graph(build_model(art, max_length, ops, cache, data, last_logits=True), tmp / greedy_graph_file(graph))
                    files.append(greedy_graph_file(graph))
        if library is not None:
            shutil.copy2(library, tmp / library.name)
            files.append(library.name)
        for f in art.path.iterdir() if art.path is not None else ():
            if is_tokenizer_file(f.name):
                shutil.copy2(f, tmp / f.name)
        # genai runs the same graph as our runner; with our attention ops past and present share one buffer
        write_genai_config(tmp, ModelConfig.from_dict(art.model), art, max_length,
                           library.name if library is not None else None, runner["model"], share_buffer=ops == "custom")
        manifest = {"format": MANIFEST_FORMAT, "artifact": art.path.name if art.path is not None else None,
                    "quant": art.quant,
                    "model": art.model, "max_length": max_length, "ops": ops, "kv_cache": kv_cache,
                    "onnxruntime": runner, "files": files, "digests": file_digests(tmp, files)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        validate_written(tmp, manifest, model)
    return out


SESSION_CHECK_BYTES = 2**30  # exports with more weights are not opened in onnxruntime when written (memory)


def validate_written(tmp: Path, manifest: dict, built: onnx.ModelProto) -> None:
    """Re-read a staged export before it replaces anything: the files as recorded, the graph's initializers
    as built (names, types, shapes), and every graph opened by onnxruntime (up to SESSION_CHECK_BYTES of
    weights; export memory then stays bounded by the largest tensor, not the model)."""
    verify_files(tmp, manifest)
    saved = onnx.load(str(tmp / MODEL_FILE), load_external_data=False)
    want = {t.name: (t.data_type, tuple(t.dims)) for t in built.graph.initializer}
    got = {t.name: (t.data_type, tuple(t.dims)) for t in saved.graph.initializer}
    if got != want:
        raise ValueError(f"the written {MODEL_FILE} holds other initializers than the graph built "
                         f"({len(got)} against {len(want)}); nothing was replaced")
    weights = (tmp / DATA_FILE).stat().st_size
    if weights > SESSION_CHECK_BYTES:  # a session loads every weight: the export would need the model's size in memory
        print(f"{weights / 2**30:.1f} GiB of weights: the export is checked against what was built but not opened in "
              f"onnxruntime here (that loads them all); `baseq-export eval` on it runs it", file=sys.stderr)
        return
    graphs = [f for f in manifest["files"] if f.endswith(".onnx")]
    for graph in graphs:
        open_session(tmp, graph, manifest)


def save_graph(model: onnx.ModelProto, path: Path) -> None:
    """Save a graph whose weights are already in the external data file, and check it (from the file: any size)."""
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))


def open(path: str | Path, backend: str | None = None, threads: int | None = None, **_options):
    """The export in onnxruntime (default) or onnxruntime-genai."""
    if (backend or BACKENDS[0]) == "onnxruntime-genai":
        return GenaiBackend(path)
    return OnnxModel(path, threads=threads)


def describe(path: str | Path) -> str:
    """One line for the main job's summary: what was written and with which ops."""
    manifest = read_manifest(path)
    return f"ONNX export: {Path(path) / MODEL_FILE} ({manifest['ops']} ops, {manifest.get('kv_cache', 'float')} KV cache)"
