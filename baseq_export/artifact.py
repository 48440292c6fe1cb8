"""The quantized-model artifact: a `*.baseq` directory, written atomically and checked on load.

Layout:
  config.json          format name and version, model config, quant config, tensor index, checksums
  quant.safetensors    every tensor: packed int4 codes, scales, zero points, biases, norms, online params
  calibration.json     optional: per-block losses, timings, seed
  tokenizer files      whatever the tokenizer's save_pretrained writes
How the tensors are named is artifact_tensors.py; what they compute is reference.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError

from .tensor_files import (DTYPE_OF_SAFETENSORS, TensorStore, load_tensors, save_tensors, sha256_file,
                           tensor_meta)

FORMAT = "baseq"
FORMAT_VERSION = 1
CONFIG = "config.json"
TENSORS = "quant.safetensors"
CALIBRATION = "calibration.json"


class ArtifactError(ValueError):
    """An artifact directory is missing, damaged or of another format version."""


@dataclass
class Artifact:
    """What a .baseq directory holds: free-form JSON config sections and named tensors."""

    model: dict
    quant: dict
    tensors: MutableMapping[str, torch.Tensor]  # a dict, or a TensorStore reading from files on disk
    source: dict = field(default_factory=dict)
    calibration: dict | None = None
    path: Path | None = None  # the directory it was loaded from or saved to (tokenizer files); None in memory only


def tensor_index_entry(tensors: Mapping[str, torch.Tensor], name: str) -> dict:
    """config.json's entry for one tensor: torch's dtype name and the shape."""
    dtype, shape = tensor_meta(tensors, name)
    return {"dtype": str(DTYPE_OF_SAFETENSORS[dtype]).removeprefix("torch."), "shape": shape}


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def is_artifact(path: str | Path) -> bool:
    """True when path is a directory whose config.json names the baseq format."""
    cfg = Path(path) / CONFIG
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_writable(path: str | Path, overwrite: bool) -> None:
    """Raise unless an artifact may be written at path (new, or an artifact with overwrite set)."""
    path = Path(path).expanduser()
    if path.exists():
        if not overwrite:
            raise ArtifactError(f"{path} already exists; choose another --out or pass --force to replace it")
        if not is_artifact(path):
            raise ArtifactError(f"{path} exists and is not a baseq artifact; refusing to replace it, choose another --out")


def save_artifact(
    path: str | Path,
    artifact: Artifact,
    overwrite: bool = False,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write the artifact to path atomically: build it in a sibling temp dir, then rename.

    An existing path is replaced only when overwrite is set and it is itself a baseq artifact;
    anything else there is never touched. write_extra(dir) may add files (the tokenizer).
    """
    path = Path(path).expanduser()
    check_writable(path, overwrite)
    with staged_dir(path) as tmp:
        tensors = artifact.tensors
        checksum = save_tensors(tensors, tmp / TENSORS)
        if write_extra is not None:
            write_extra(tmp)
        if artifact.calibration is not None:
            _write_json(tmp / CALIBRATION, artifact.calibration)
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": artifact.model,
            "quant": artifact.quant,
            "source": artifact.source,
            "tensors": {k: tensor_index_entry(tensors, k) for k in sorted(tensors)},
            "checksums": {TENSORS: checksum},
        }
        _write_json(tmp / CONFIG, config)
    artifact.path = path
    return path


@contextlib.contextmanager
def staged_dir(dest: Path):
    """A sibling temp directory to build `dest` in; on success it replaces dest (replace_dir), on any
    error it is removed and dest is left as it was."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _usual_permissions(d: Path) -> None:
    """Give a directory built in a private temp dir (mkdtemp makes it 0700) the modes a plain mkdir and
    open would have under the user's umask, so others can read a published artifact or export."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(d, 0o777 & ~umask)
    for f in d.iterdir():
        if f.is_file() and not f.is_symlink():
            os.chmod(f, (0o777 if os.access(f, os.X_OK) else 0o666) & ~umask)


def replace_dir(new: Path, dest: Path) -> None:
    """Move new onto dest; an old dest is renamed aside first and removed only after the swap."""
    _usual_permissions(new)
    if not dest.exists():
        os.replace(new, dest)
        return
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    os.replace(dest, old)
    try:
        os.replace(new, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_config(path: str | Path) -> dict:
    """config.json of an artifact after format and version checks."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ArtifactError(f"{path} is not a directory; pass a .baseq artifact made by `baseq-export quantize`")
    cfg_path = path / CONFIG
    if not cfg_path.is_file():
        raise ArtifactError(f"{path} has no {CONFIG}; it is not a baseq artifact (or it is incomplete)")
    try:
        config = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise ArtifactError(f"{cfg_path} is not valid JSON ({e}); the artifact is damaged, quantize again") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a baseq artifact ({CONFIG} has no \"format\": \"{FORMAT}\")")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has artifact format version {version}, this baseq-export reads version {FORMAT_VERSION}; "
            "quantize the model again with this version"
        )
    check_record(cfg_path, config)
    return config


def check_record(where: Path, config: dict) -> None:
    """Every field of an artifact's config.json that is read has the type it is used as, and the tensor index
    agrees with the model's dimensions (each linear's out x in, norms, the embedding): else ArtifactError naming
    the file, the field and the fix."""
    from .models.base import LINEARS, ModelConfig, linear_in_features, linear_out_features

    def bad(field: str, what: str) -> ArtifactError:
        return ArtifactError(f"{where}: {field} {what}; the artifact is damaged or was edited: quantize again")

    problem = ModelConfig.problem(config.get("model"))
    if problem:
        raise bad('"model"', f"is not a model config: it {problem}")
    quant, index = config.get("quant"), config.get("tensors")
    if not isinstance(quant, dict) or not all(isinstance(quant.get(k), str) for k in ("method", "bits")):
        raise bad('"quant"', "is not an object naming method and bits")
    for k in ("group_size", "head_group_size"):
        if quant.get(k) is not None and not (type(quant[k]) is int and quant[k] > 0):
            raise bad(f'"quant.{k}"', "is not a positive whole number or null")
    for k in ("a_bits", "kv_bits", "w_bits", "head_act_bits"):
        if quant.get(k) is not None and quant[k] not in (4, 8, 16):
            raise bad(f'"quant.{k}"', "is not 4, 8 or 16")
    for k in ("source", "checksums", "baseq", "rotation"):
        holder = quant if k in ("baseq", "rotation") else config
        if holder.get(k) is not None and not isinstance(holder[k], dict):
            raise bad(f'"{k}"', "is not an object")
    if not isinstance(index, dict) or not all(
            isinstance(m, dict) and isinstance(m.get("dtype"), str) and isinstance(m.get("shape"), list)
            and all(type(n) is int and n >= 0 for n in m["shape"]) for m in index.values()):
        raise bad('"tensors"', "is not a map of tensor name to {dtype, shape}")
    cfg = ModelConfig.from_dict(config["model"])
    want = {"norm": [cfg.hidden_size]}
    for i in range(cfg.num_layers):
        want.update({f"layers.{i}.attn_norm": [cfg.hidden_size], f"layers.{i}.mlp_norm": [cfg.hidden_size]})
        for lin in LINEARS:
            out, inp = linear_out_features(cfg, lin), linear_in_features(cfg, lin)
            prefix = f"layers.{i}.{lin}"
            if not any(prefix + s in index for s in (".qweight", ".ggml", ".weight")):
                raise bad('"tensors"', f"has no {prefix} weight")
            want.update({f"{prefix}.weight": [out, inp], f"{prefix}.qweight": [out, (inp + 1) // 2],
                         f"{prefix}.bias": [out]})
            for s in (".scales", ".zeros", ".mins"):
                if prefix + s in index and index[prefix + s]["shape"][:1] != [out]:
                    raise bad(f'"tensors.{prefix}{s}"', f"has shape {index[prefix + s]['shape']}, not {out} rows")
    for name in ("embed", "lm_head"):
        want.update({name: [cfg.vocab_size, cfg.hidden_size], f"{name}.qweight": [cfg.vocab_size, (cfg.hidden_size + 1) // 2]})
    if not any(k in index for k in ("embed", "embed.qweight")):
        raise bad('"tensors"', "has no embedding (embed)")
    for name, shape in want.items():
        if name in index and index[name]["shape"] != shape:
            raise bad(f'"tensors.{name}"', f"has shape {index[name]['shape']}, but the model's dimensions give {shape}")
    layers = {n: n.split(".")[1] for n in index if n.startswith("layers.")}
    extra = sorted(n for n, i in layers.items() if not i.isdecimal() or int(i) >= cfg.num_layers)
    if extra:
        raise bad('"tensors"', f"has {extra[0]}, beyond the model's {cfg.num_layers} layers")


def load_artifact(path: str | Path, map_location: str = "cpu", lazy: bool = False) -> Artifact:
    """Load and verify an artifact: version, checksum of the tensor file, and every indexed tensor's dtype and
    shape. lazy: the tensors stay in the file (a TensorStore reads each when asked), for exporters of big models."""
    path = Path(path).expanduser()
    config = read_config(path)
    tensor_file = path / TENSORS
    if not tensor_file.is_file():
        raise ArtifactError(f"{path} has no {TENSORS}; the artifact is incomplete, quantize again")
    expected = (config.get("checksums") or {}).get(TENSORS)  # null is allowed by check_record: no checksum
    if not isinstance(expected, str):
        raise ArtifactError(f"{path / CONFIG} records no checksum of {TENSORS} (\"checksums\" is "
                            f"{config.get('checksums')!r}); the artifact is damaged or was edited: quantize again")
    actual = sha256_file(tensor_file)
    if expected != actual:
        raise ArtifactError(
            f"{tensor_file} fails its checksum (expected {expected}, found {actual}): the file is corrupted or "
            "truncated; quantize again or restore it from a copy"
        )
    try:
        tensors = TensorStore()
        tensors.attach(tensor_file)
        index = config.get("tensors", {})
        missing = sorted(set(index) - set(tensors))
        if missing:
            raise ArtifactError(f"{tensor_file} is missing tensors listed in {CONFIG}: {', '.join(missing[:8])}")
        for name, meta in index.items():
            got = tensor_index_entry(tensors, name)
            if got != {"dtype": meta["dtype"], "shape": meta["shape"]}:
                raise ArtifactError(f"tensor {name} is {got['dtype']} {got['shape']}, {CONFIG} says {meta['dtype']} {meta['shape']}")
        if not lazy:  # one read of the whole file, not an open per tensor
            tensors = load_tensors(tensor_file, device=map_location)
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        if isinstance(e, ArtifactError):
            raise
        raise ArtifactError(f"{tensor_file} cannot be read ({e}); quantize again") from e
    calibration = None
    if (path / CALIBRATION).is_file():
        calibration = json.loads((path / CALIBRATION).read_text())
    return Artifact(config["model"], config["quant"], tensors, config.get("source") or {}, calibration, path)


def source_config(art: Artifact) -> dict:
    """Context length, RoPE base and llama.cpp pre-tokenizer of the source model, where it is still readable:
    a Hugging Face config.json, or the keys of a source .gguf (the default model)."""
    import gguf

    from .gguf_file import read_keys

    src = Path(str((art.source or {}).get("model", "")))
    out: dict = {}
    try:
        if src.is_dir() and (src / "config.json").is_file():
            c = json.loads((src / "config.json").read_text())
            out["context_length"] = c.get("max_position_embeddings")
            out["rope_theta"] = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta")
        elif src.is_file() and src.suffix == ".gguf":
            arch = read_keys(src, {gguf.Keys.General.ARCHITECTURE}).get(gguf.Keys.General.ARCHITECTURE)
            keys = {gguf.Keys.LLM.CONTEXT_LENGTH.format(arch=arch): "context_length",
                    gguf.Keys.Rope.FREQ_BASE.format(arch=arch): "rope_theta", gguf.Keys.Tokenizer.PRE: "pre"}
            out = {keys[k]: v for k, v in read_keys(src, set(keys)).items()}
    except (OSError, ValueError, KeyError, AttributeError):
        return {}
    return {k: v for k, v in out.items() if v is not None}
