"""The quantized-model artifact: a `*.baseq` directory, written atomically and checked on load.

Layout:
  config.json          format name and version, model config, quant config, tensor index, checksums
  quant.safetensors    every tensor: packed int4 codes, scales, zero points, biases, norms, online params
  calibration.json     optional: per-block losses, timings, seed
  tokenizer files      whatever the tokenizer's save_pretrained writes
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from safetensors import SafetensorError

from .tensor_files import load_tensors, read_tensor, save_tensors, tensor_index

if TYPE_CHECKING:
    from .models.base import ModelConfig
    from .quant import IntActivation, QuantizedWeight

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


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
"""torch dtype -> the safetensors header's dtype name (the file format's spelling)."""
DTYPE_OF_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class TensorStore(MutableMapping):
    """Named tensors held in memory or in safetensors files on disk, a file's tensor read only when asked: the
    artifact of a model larger than memory is written and read one block's file at a time, never whole.

    `put(tensors, file)` with a spool directory writes the tensors to spool/file (atomically) and keeps only their
    names; `attach(path)` adds an existing file's tensors. Assigning a name keeps that tensor in memory."""

    def __init__(self, spool: Path | None = None):
        self.spool = spool
        self._memory: dict[str, torch.Tensor] = {}
        self._file_of: dict[str, Path] = {}
        self._meta: dict[str, tuple[str, list[int]]] = {}

    def attach(self, path: str | Path) -> None:
        """Add every tensor of the safetensors file at path (read lazily; names, dtypes and shapes read now)."""
        path = Path(path)
        for name, meta in tensor_index(path).items():
            self._memory.pop(name, None)
            self._file_of[name] = path
            self._meta[name] = meta

    def put(self, tensors: Mapping[str, torch.Tensor], file: str) -> None:
        """Add tensors: written to spool/file and dropped from memory when the store has a spool, else kept."""
        if self.spool is None:
            self.update(tensors)
            return
        self.spool.mkdir(parents=True, exist_ok=True)
        path = self.spool / file
        save_tensors(dict(tensors), path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
        self.attach(path)

    def meta(self, name: str) -> tuple[str, list[int]]:
        """(safetensors dtype name, shape) of a tensor, without reading it."""
        if name in self._memory:
            t = self._memory[name]
            return SAFETENSORS_DTYPES[t.dtype], list(t.shape)
        return self._meta[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._memory:
            return self._memory[name]
        if name not in self._file_of:
            raise KeyError(name)
        return read_tensor(self._file_of[name], name)

    def __setitem__(self, name: str, tensor: torch.Tensor) -> None:
        self._file_of.pop(name, None)
        self._memory[name] = tensor

    def __delitem__(self, name: str) -> None:
        if self._memory.pop(name, None) is None and self._file_of.pop(name, None) is None:
            raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        yield from self._memory
        yield from (k for k in self._file_of if k not in self._memory)

    def __len__(self) -> int:
        return len(self._memory) + len(self._file_of)

    def __contains__(self, name: object) -> bool:
        return name in self._memory or name in self._file_of


def tensor_meta(tensors: Mapping[str, torch.Tensor], name: str) -> tuple[str, list[int]]:
    """(safetensors dtype name, shape) of one tensor of a dict or a TensorStore (read from the header, not the data)."""
    if isinstance(tensors, TensorStore):
        return tensors.meta(name)
    t = tensors[name]
    return SAFETENSORS_DTYPES[t.dtype], list(t.shape)


def tensor_index_entry(tensors: Mapping[str, torch.Tensor], name: str) -> dict:
    """config.json's entry for one tensor: torch's dtype name and the shape."""
    dtype, shape = tensor_meta(tensors, name)
    return {"dtype": str(DTYPE_OF_SAFETENSORS[dtype]).removeprefix("torch."), "shape": shape}


SAFETENSORS_ALIGN = 8
"""The safetensors header is padded with spaces to a multiple of this, so the data that follows is aligned."""


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: Path) -> str:
    """Write tensors (a dict or a TensorStore) as one safetensors file, one tensor in memory at a time: the header
    from each tensor's dtype and shape, then the data in name order. Returns the file's hex SHA-256."""
    names = sorted(tensors)
    header, offset = {}, 0
    for name in names:
        dtype, shape = tensor_meta(tensors, name)
        size = math.prod(shape) * DTYPE_OF_SAFETENSORS[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % SAFETENSORS_ALIGN)
    digest = hashlib.sha256()
    try:
        with open(path, "wb") as f:
            for chunk in (len(text).to_bytes(8, "little"), text):
                f.write(chunk)
                digest.update(chunk)
            for name in names:
                t = tensors[name].detach().cpu().contiguous()
                raw = t.reshape(-1).view(torch.uint8).numpy()
                if raw.nbytes != header[name]["data_offsets"][1] - header[name]["data_offsets"][0]:
                    raise ValueError(f"tensor {name} changed size while being written")
                f.write(memoryview(raw))
                digest.update(memoryview(raw))
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror} writing {path}") from e
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
        checksum = write_safetensors(tensors, tmp / TENSORS)
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
    return config


def load_artifact(path: str | Path, map_location: str = "cpu", lazy: bool = False) -> Artifact:
    """Load and verify an artifact: version, checksum of the tensor file, and every indexed tensor's dtype and
    shape. lazy: the tensors stay in the file (a TensorStore reads each when asked), for exporters of big models."""
    path = Path(path).expanduser()
    config = read_config(path)
    tensor_file = path / TENSORS
    if not tensor_file.is_file():
        raise ArtifactError(f"{path} has no {TENSORS}; the artifact is incomplete, quantize again")
    expected = config.get("checksums", {}).get(TENSORS)
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
    return Artifact(config["model"], config["quant"], tensors, config.get("source", {}), calibration)


# ---------------------------------------------------------------------------------------------
# The quantized model: tensors <-> QuantizedWeight, and the reference forward (the oracle that
# every exporter is compared to).

KV_SITES = ("k_cache", "v_cache")
HEAD_TENSORS = ("embed", "lm_head")  # stored as float, or as 4-bit codes (quant["head_group_size"])


def is_online_param(name: str) -> bool:
    """True for ``layers.i.<site>.<param>`` tensors of an activation or KV-cache quantization site."""
    from .models.base import ACT_SITES

    parts = name.split(".")
    return len(parts) == 4 and parts[0] == "layers" and parts[2] in ACT_SITES + KV_SITES


def linear_tensors(prefix: str, qw: "QuantizedWeight", bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The artifact tensors of one quantized linear: packed codes, scales, zero points, bias."""
    from .quant import pack_int4

    if qw.bits != 4:
        raise ValueError(f"{prefix}: the artifact stores 4-bit weights, got {qw.bits}")
    out = {f"{prefix}.qweight": pack_int4(qw.codes), f"{prefix}.scales": qw.scale}
    if qw.grid == "q4_1":  # w = codes * scales + mins (quant.py conventions), no zero points
        out[f"{prefix}.mins"] = qw.minimum
    else:
        out[f"{prefix}.zeros"] = qw.zero
    if bias is not None:
        out[f"{prefix}.bias"] = bias.to(torch.float32)
    return out


def linear_from_tensors(
    prefix: str, tensors: dict[str, torch.Tensor], in_features: int, group_size: int | None, grid: str | None = None
):
    """QuantizedWeight of one linear read back from artifact tensors. grid: the quant config's "weight_grid"
    (None: "q4_1" when `{prefix}.mins` is stored, else "int")."""
    from .quant import QuantizedWeight, unpack_int4

    codes = unpack_int4(tensors[f"{prefix}.qweight"], in_features)
    mins = tensors.get(f"{prefix}.mins")
    grid = grid or ("q4_1" if mins is not None else "int")
    return QuantizedWeight(codes, tensors[f"{prefix}.scales"], tensors.get(f"{prefix}.zeros"), group_size or in_features, 4,
                           minimum=mins, grid=grid)


def head_from_tensors(name: str, tensors: dict[str, torch.Tensor], cfg: "ModelConfig", quant: dict) -> "QuantizedWeight | None":
    """A 4-bit embedding / lm_head ([vocab, hidden] in groups of quant["head_group_size"] along hidden), or
    None when the artifact keeps it in float."""
    if f"{name}.qweight" not in tensors:
        return None
    return linear_from_tensors(name, tensors, cfg.hidden_size, quant["head_group_size"])


class QuantHooks:
    """Online part of a quantized model: R4/R3 Hadamards, per-token activation and KV fake quantization.

    `params` holds the online tensors by artifact name ``layers.i.<site>.<param>``:
      clip   activation sites (one value) and k_cache / v_cache (one per KV head): range shrink
      gain   o_in / down_in only: per-channel multiplier before quantization (BASE-Q scaling;
             for attn_in / mlp_in the gain is the RMSNorm weight instead)
      shift  per-channel shift subtracted before quantization (BASE-Q bias correction); the
             matching `+ shift` is folded into the next linear's bias, so it is not added back
    A site computes, in order: [R4 Hadamard if down_in] -> x * gain -> fq(x - shift).
    exact=True (the reference forward): Hadamards in float64 rounded once, and quantized activation
    sites return an IntActivation (levels and scale) so the next linear is an integer matmul.
    """

    def __init__(self, quant: dict, params: dict[str, torch.Tensor], exact: bool = False):
        rot = quant.get("rotation") or {}
        self.r3, self.r4 = bool(rot.get("r3")), bool(rot.get("r4"))
        self.a_bits, self.kv_bits = quant.get("a_bits"), quant.get("kv_bits")
        self.head_act_bits, self.head_group_size = quant.get("head_act_bits"), quant.get("head_group_size")
        self.linear_act_bits, self.group_size = quant.get("linear_act_bits"), quant.get("group_size")
        self.params = params
        self.exact = exact

    def hadamard(self, x: torch.Tensor) -> torch.Tensor:
        """An online Hadamard; in exact mode computed in float64 and rounded once (models.base.forward)."""
        from .hadamard import apply_hadamard

        return apply_hadamard(x.to(torch.float64)).to(x.dtype) if self.exact else apply_hadamard(x)

    def prequant(self, layer: int, site: str, x: torch.Tensor) -> torch.Tensor:
        """A site's input as its quantizer sees it: [R4 if down_in] -> x * gain -> x - shift."""
        if self.r4 and site == "down_in":
            x = self.hadamard(x)
        prefix = f"layers.{layer}.{site}"
        gain = self.params.get(f"{prefix}.gain")
        if gain is not None:
            x = x * gain
        shift = self.params.get(f"{prefix}.shift")
        if shift is not None:
            x = x - shift
        return x

    def act(self, layer: int, site: str, x: torch.Tensor) -> "torch.Tensor | IntActivation":
        from .quant import fake_quant_int8_blocks, fake_quant_per_token, quantize_per_token

        x = self.prequant(layer, site, x)
        if self.a_bits:
            clip = self.params[f"layers.{layer}.{site}.clip"]
            x = quantize_per_token(x, self.a_bits, clip) if self.exact else fake_quant_per_token(x, self.a_bits, clip)
        elif self.linear_act_bits == 8:  # weight-only linears on onnxruntime's int8 kernels
            x = fake_quant_int8_blocks(x, self.group_size)
        return x

    def qk(self, layer, q, k):
        return (self.hadamard(q), self.hadamard(k)) if self.r3 else (q, k)

    def kv(self, layer, k, v):
        from .quant import fake_quant_kv

        if not self.kv_bits:
            return k, v
        p = self.params
        return (
            fake_quant_kv(k, self.kv_bits, p[f"layers.{layer}.k_cache.clip"]),
            fake_quant_kv(v, self.kv_bits, p[f"layers.{layer}.v_cache.clip"]),
        )

    def head_in(self, x):
        """The lm_head's input: rounded to int8 blocks when the artifact says the head runs onnxruntime's
        int8 kernels (quant["head_act_bits"] == 8), else unchanged."""
        from .quant import fake_quant_int8_blocks

        return fake_quant_int8_blocks(x, self.head_group_size) if self.head_act_bits == 8 else x


@dataclass
class QuantizedModel:
    """A loaded artifact ready to run: float weights (int4 dequantized once) and its online hooks."""

    config: "ModelConfig"
    weights: dict[str, torch.Tensor]
    hooks: QuantHooks
    artifact: Artifact

    @property
    def device(self) -> torch.device:
        return self.weights["embed"].device

    def logits(self, ids: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        from .models.base import forward

        return forward(self.config, self.weights, ids, self.hooks, cache, exact=self.hooks.exact)


def reference_model(artifact: Artifact, dtype: torch.dtype = torch.float32, exact: bool = True,
                    device: torch.device | None = None) -> QuantizedModel:
    """The PyTorch reference forward of an artifact: exactly what the exporters must compute.

    exact (default): the order-independent forward of models.base.forward(exact=True); with 4-bit
    activations and per-channel weights every linear holds integer levels (codes - zero) and its
    per-channel scales instead of a dequantized weight. exact=False: the float32 forward that
    calibration trains (same values up to rounding). device: where it runs (default CPU).
    """
    from .models.base import ModelConfig, linear_in_features

    cfg = ModelConfig.from_dict(artifact.model)
    t = artifact.tensors
    group_size = artifact.quant.get("group_size")
    integer_linears = exact and bool(artifact.quant.get("a_bits")) and group_size is None
    weights: dict[str, torch.Tensor] = {}
    online: dict[str, torch.Tensor] = {}
    quantized = {name.removesuffix(".qweight") for name in t if name.endswith(".qweight")}
    for name, tensor in t.items():
        base = name.rsplit(".", 1)[0]
        if base in quantized and name.endswith((".qweight", ".scales", ".zeros", ".mins")):
            continue
        if is_online_param(name):
            online[name] = tensor
        else:
            weights[name] = tensor.to(dtype)
    for prefix in quantized:
        if prefix in HEAD_TENSORS:
            weights[prefix] = head_from_tensors(prefix, t, cfg, artifact.quant).dequantize().to(dtype)
            continue
        in_features = linear_in_features(cfg, prefix.rsplit(".", 1)[-1])
        qw = linear_from_tensors(prefix, t, in_features, group_size, artifact.quant.get("weight_grid", "int"))
        if integer_linears:
            weights[f"{prefix}.levels"] = qw.codes.to(torch.float32) - qw.zero.to(torch.float32)
            weights[f"{prefix}.scales"] = qw.scale[:, 0]
        else:
            weights[f"{prefix}.weight"] = qw.dequantize().to(dtype)
    if device is not None and torch.device(device).type != "cpu":
        weights = {k: v.to(device) for k, v in weights.items()}
        online = {k: v.to(device) for k, v in online.items()}
    if cfg.tied_embeddings or "head_mix" in t:  # the embedding table serves the head (after head_mix)
        weights["lm_head"] = weights["embed"]
    return QuantizedModel(cfg, weights, QuantHooks(artifact.quant, online, exact), artifact)
