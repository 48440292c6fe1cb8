"""The GGUF export target for llama.cpp (see export/__init__.py for the interface every target implements).

One .gguf file written with gguf-py's GGUFWriter: llama architecture keys (qwen2 for Qwen2 models
whose biases llama.cpp's qwen2 graph loads), the tokenizer and chat template from the artifact's
tokenizer files, 4-bit linears as Q4_0 / Q4_1 blocks built from the artifact's own codes (no
re-rounding), embedding and output in a selectable type, norms and biases F32, a baseq.* key
that marks the file as ours. The GGUF profile is weight-only: llama.cpp has no online Hadamard
and no 4-bit activations, so artifacts that need online ops are refused. gguf_runtime.py runs
the file in llama.cpp (llama-cpp-python).
"""

from __future__ import annotations

import argparse
import builtins
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import gguf
import numpy as np
import torch

from ..models.base import LINEARS, ModelConfig, linear_in_features
from ..qmodel import HEAD_TENSORS, Artifact, is_online_param, load_artifact
from ..quant import unpack_int4

NAME = "gguf"
BACKENDS = ("llama.cpp",)
FORMAT_KEY = "baseq.format"
FORMAT_VALUE = "baseq-gguf"
QUANT_KEY = "baseq.quant"
DEFAULT_FILE = "model.gguf"
DEFAULT_CONTEXT = 4096  # when neither the source model nor the tokenizer says how long a context it was trained for

QT = gguf.GGMLQuantizationType
TYPES = {"f32": QT.F32, "f16": QT.F16, "q8_0": QT.Q8_0, "q6_k": QT.Q6_K, "q4_0": QT.Q4_0, "q4_1": QT.Q4_1}
WEIGHT_TYPES = ("auto", "q4_0", "q4_1", "f16", "f32")
HEAD_TYPES = ("auto", "f32", "f16", "q8_0", "q6_k", "q4_0", "q4_1")
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
QWEN2_BIASES = ("q", "k", "v")  # the only projection biases llama.cpp's qwen2 graph loads
LLAMA_NAMES = {"q": gguf.MODEL_TENSOR.ATTN_Q, "k": gguf.MODEL_TENSOR.ATTN_K, "v": gguf.MODEL_TENSOR.ATTN_V,
               "o": gguf.MODEL_TENSOR.ATTN_OUT, "gate": gguf.MODEL_TENSOR.FFN_GATE, "up": gguf.MODEL_TENSOR.FFN_UP,
               "down": gguf.MODEL_TENSOR.FFN_DOWN}
PROFILE_HINT = ("quantize with the GGUF weight-only profile (`baseq-export quantize --bits w4a16 --group-size 32`, "
                "rotations R1/R2 only)")


class GGUFExportError(ValueError):
    """An artifact or option that this writer cannot turn into a GGUF file; the message says why and what to do."""


def tensor_name(kind: "gguf.MODEL_TENSOR", suffix: str = "weight", bid: int | None = None) -> str:
    """A llama.cpp tensor name from gguf-py's table (e.g. blk.3.attn_q.bias)."""
    return f"{gguf.TENSOR_NAMES[kind].format(bid=bid)}.{suffix}"


# ---------------------------------------------------------------------------------------------
# The target interface (export/__init__.py)


def add_arguments(p: argparse.ArgumentParser, sub: bool = False) -> None:
    """--gguf-weights, --gguf-head, --gguf-embed, --gguf-kv-cache, --gguf-ctx (sub: defaults SUPPRESSed)."""
    default = (lambda v: argparse.SUPPRESS) if sub else (lambda v: v)
    p.add_argument("--gguf-weights", choices=WEIGHT_TYPES, default=default("auto"),
                   help="GGUF type of the 4-bit linears: auto (the artifact's own grid: Q4_0 for symmetric/q4_0-grid "
                   "weights, else Q4_1), q4_0, q4_1, or f16/f32 (the weights as floats, e.g. an unquantized model)")
    p.add_argument("--gguf-head", choices=HEAD_TYPES, default=default("auto"),
                   help="GGUF type of the output (lm_head): auto = the artifact's 4-bit grid when it stores 4-bit "
                   "heads, else q8_0")
    p.add_argument("--gguf-embed", choices=HEAD_TYPES, default=default(None),
                   help="GGUF type of the token embedding (default: the --gguf-head type; a tied embedding is written "
                   "once when both types agree)")
    p.add_argument("--gguf-kv-cache", choices=("f16", "f32", "q8_0", "q4_0"), default=default("f16"),
                   help="llama.cpp KV cache type when running a GGUF (eval/run): f16 (llama.cpp's default), f32, or "
                   "quantized q8_0 / q4_0 (these turn on flash attention, which a quantized V cache needs)")
    p.add_argument("--gguf-ctx", type=int, default=default(None),
                   help="context length written to the GGUF (default: the source model's)")


def options(args: argparse.Namespace) -> dict:
    """The GGUF options of a parsed command line as write()/open() keywords."""
    return {"weights": getattr(args, "gguf_weights", "auto"), "head": getattr(args, "gguf_head", "auto"),
            "embed": getattr(args, "gguf_embed", None), "kv_cache": getattr(args, "gguf_kv_cache", "f16"),
            "context_length": getattr(args, "gguf_ctx", None)}


def main_job_settings(args: argparse.Namespace) -> dict:
    """The main job for GGUF quantizes weight-only on llama.cpp's 32-weight blocks (the GGUF profile)."""
    # TODO(quantization owner): the profile's own flag (rotations without R4, Q4_1 grid) once it lands.
    return {"bits": "w4a16", "group_size": 32}


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
        if (gs or k) % 32:
            raise GGUFExportError(
                f"{name}: weight groups of {gs or k} (K={k}) do not split into llama.cpp's 32-weight Q4 blocks; "
                "quantize with --group-size 32 (or per channel with K a multiple of 32)")
    if q.get("embed") == "int4" and q.get("head_group_size", 32) % 32:
        raise GGUFExportError(f"4-bit heads in groups of {q.get('head_group_size')} do not map onto 32-weight blocks")


def is_export(path: str | Path) -> bool:
    """True for a GGUF file that this writer made (it carries the baseq.format key)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with builtins.open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return False
        field_ = gguf.GGUFReader(str(path)).get_field(FORMAT_KEY)
        return field_ is not None and field_.contents() == FORMAT_VALUE
    except (OSError, ValueError, IndexError, KeyError, TypeError):
        return False


def describe(path: str | Path) -> str:
    """One line for the main job's summary: the file, its weight type and size."""
    r = gguf.GGUFReader(str(path))
    ftype = r.get_field(gguf.Keys.General.FILE_TYPE)
    name = gguf.LlamaFileType(ftype.contents()).name if ftype is not None else "?"
    return f"GGUF export: {path} ({name}, {Path(path).stat().st_size / 2**20:.1f} MiB)"


def open(path: str | Path, backend: str | None = None, **options):
    """The GGUF in llama.cpp (llama-cpp-python): an export.Backend."""
    if (backend or BACKENDS[0]) not in BACKENDS:
        raise ValueError(f"a GGUF runs in {', '.join(BACKENDS)}, not {backend!r}")
    from .gguf_runtime import LlamaCppBackend

    return LlamaCppBackend(path, **options)


# ---------------------------------------------------------------------------------------------
# 4-bit grids -> GGUF Q4 blocks


@dataclass
class Grid:
    """A 4-bit [N, K] weight on llama.cpp's 32-weight blocks: codes, block scale d and block offset m.

    Q4_0 stands for d * (q - 8), Q4_1 for d * q + m. `exact_m` is False when m = -zero * d of a
    legacy integer-zero artifact is not an fp16 value (the Q4_1 block then holds it rounded).
    """

    codes: np.ndarray  # uint8 [N, K]
    d: np.ndarray  # float32 [N, K // 32], fp16 values
    m: np.ndarray  # float64 [N, K // 32], the block offset the artifact means
    zero8: bool  # every block is symmetric around code 8 (Q4_0 holds it exactly)

    def rows(self, perm: np.ndarray) -> "Grid":
        """The same grid with its output rows reordered (exact: rows are independent)."""
        return Grid(self.codes[perm], self.d[perm], self.m[perm], self.zero8)


def q4_block() -> int:
    """Weights per Q4_0 / Q4_1 block, from gguf-py's table."""
    block, _ = gguf.GGML_QUANT_SIZES[QT.Q4_0]
    assert gguf.GGML_QUANT_SIZES[QT.Q4_1][0] == block
    return block


def read_grid(prefix: str, tensors: dict[str, torch.Tensor], k: int) -> Grid:
    """The artifact's 4-bit weight `prefix` as a Grid: groups of any multiple of 32 repeat per block.

    Two layouts (quant.py conventions): legacy `w = (q - zero) * scale` with integer zeros, and the
    Q4_1 grid `w = scale * q + mins` (tensor `{prefix}.mins`, fp16-exact).
    """
    block = q4_block()
    codes = unpack_int4(tensors[f"{prefix}.qweight"], k).numpy()
    scale = tensors[f"{prefix}.scales"].to(torch.float32).numpy()
    groups = scale.shape[1]
    if k % groups or (k // groups) % block:
        raise GGUFExportError(f"{prefix}: groups of {k // groups if k % groups == 0 else '?'} weights (K={k}) do not "
                              f"split into {block}-weight GGUF blocks; quantize with --group-size {block}")
    rep = k // groups // block
    d = np.repeat(scale, rep, axis=1)
    if f"{prefix}.mins" in tensors:
        m = np.repeat(tensors[f"{prefix}.mins"].to(torch.float64).numpy(), rep, axis=1)
        return Grid(codes, d, m, bool(np.all(m == -8.0 * d.astype(np.float64))))
    zero = np.repeat(tensors[f"{prefix}.zeros"].numpy(), rep, axis=1)
    m = -zero.astype(np.float64) * d.astype(np.float64)
    return Grid(codes, d, m, bool(np.all(zero == 8)))


@dataclass
class RoundingLog:
    """Q4_1 blocks whose m = -zero * d had to be rounded to fp16 (legacy integer-zero artifacts)."""

    blocks: int = 0
    rounded: int = 0
    max_rel: float = 0.0
    max_abs: float = 0.0

    def add(self, m: np.ndarray, m16: np.ndarray) -> None:
        diff = np.abs(m16.astype(np.float64) - m)
        self.blocks += m.size
        self.rounded += int(np.count_nonzero(diff))
        if diff.size:
            self.max_abs = max(self.max_abs, float(diff.max()))
            nz = m != 0
            if nz.any():
                self.max_rel = max(self.max_rel, float((diff[nz] / np.abs(m[nz])).max()))

    def warn(self) -> None:
        if self.rounded:
            warnings.warn(
                f"Q4_1: m = -zero*scale is not an fp16 value in {self.rounded} of {self.blocks} blocks and was rounded "
                f"(max relative error of m {self.max_rel:.2e}, weights off by at most {self.max_abs:.2e}); the GGUF "
                "is exact for artifacts quantized on the Q4_1 grid (the GGUF profile)", stacklevel=3)


def pack_q4(grid: Grid, qtype: "gguf.GGMLQuantizationType", log: RoundingLog | None = None) -> np.ndarray:
    """GGUF Q4_0 / Q4_1 block bytes uint8 [N, K // 32 * type_size] of a grid, built from its codes.

    Block layout (ggml): fp16 d, [fp16 m for Q4_1], then 16 bytes holding element j in the low
    nibble and element j + 16 in the high one.
    """
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n, k = grid.codes.shape
    nb = k // block
    c = grid.codes.reshape(n, nb, block)
    qs = c[..., : block // 2] | (c[..., block // 2 :] << 4)
    parts = [grid.d.astype("<f2").view(np.uint8).reshape(n, nb, 2)]
    if qtype == QT.Q4_0:
        if not grid.zero8:
            raise GGUFExportError("Q4_0 holds symmetric weights only (zero point 8); this weight is asymmetric: "
                                  "write it as q4_1, or quantize with --symmetric / the q4_0 grid")
    elif qtype == QT.Q4_1:
        m16 = grid.m.astype("<f2")
        if log is not None:
            log.add(grid.m, m16)
        parts.append(m16.view(np.uint8).reshape(n, nb, 2))
    else:
        raise ValueError(f"pack_q4: {qtype.name} is not a 4-bit block type")
    out = np.concatenate(parts + [qs.astype(np.uint8)], axis=-1).reshape(n, nb * type_size)
    return np.ascontiguousarray(out)


def dequantize_grid(grid: Grid) -> np.ndarray:
    """float32 [N, K] weights a grid stands for (what the artifact's reference forward multiplies by)."""
    block = q4_block()
    n, k = grid.codes.shape
    q = grid.codes.reshape(n, k // block, block).astype(np.float64)
    w = q * grid.d.astype(np.float64)[..., None] + grid.m[..., None]
    return w.reshape(n, k).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Float tensors -> GGUF types


def _ggml_lib():
    """ggml's base library as llama-cpp-python ships it (its quantizers cover types gguf-py cannot make)."""
    import ctypes

    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def convert(w: np.ndarray, qtype: "gguf.GGMLQuantizationType") -> np.ndarray:
    """A float [N, K] tensor in a GGUF type: F32/F16 cast; Q8_0/Q4_x by gguf-py (ggml's reference rounding);
    Q6_K by ggml's own quantizer (gguf-py has no numpy Q6_K quantizer)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if qtype == QT.F32:
        return w
    if qtype == QT.F16:
        return w.astype(np.float16)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if w.shape[-1] % block:
        raise GGUFExportError(f"rows of {w.shape[-1]} values do not split into {qtype.name} blocks of {block}; "
                              "choose another type (q8_0 takes rows of any multiple of 32)")
    if qtype != QT.Q6_K:
        return np.ascontiguousarray(gguf.quants.quantize(w, qtype))
    lib = _ggml_lib()
    n, k = w.shape
    out = np.empty((n, k // block * type_size), np.uint8)
    lib.ggml_quantize_init(int(qtype))
    written = lib.ggml_quantize_chunk(int(qtype), w.ctypes.data, out.ctypes.data, 0, n, k, None)
    assert written == out.nbytes, (written, out.nbytes)
    return out


def nbytes(shape: tuple[int, int] | tuple[int], qtype: "gguf.GGMLQuantizationType") -> int:
    """Bytes of a tensor of logical shape in a GGUF type."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    count = int(np.prod(shape))
    return count // block * type_size


# ---------------------------------------------------------------------------------------------
# The model's tensors in llama.cpp's naming and row order


def rope_permutation(n_heads: int, head_dim: int) -> np.ndarray:
    """Row order of q/k for llama.cpp's llama graph: its RoPE ("normal" type) rotates adjacent pairs
    (2j, 2j+1) where transformers rotates (j, j + head_dim/2), so row 2j+e of a head takes row e*head_dim/2 + j."""
    half = head_dim // 2
    j = np.arange(half)
    per_head = np.stack([j, j + half], axis=1).reshape(-1)  # [0, half, 1, half+1, ...]
    return (np.arange(n_heads)[:, None] * head_dim + per_head[None, :]).reshape(-1)


@dataclass
class Planned:
    """One tensor of the file: its name, ggml type, logical numpy shape and how to make its data."""

    name: str
    qtype: "gguf.GGMLQuantizationType"
    shape: tuple[int, ...]
    make: Callable[[], np.ndarray]


@dataclass
class Plan:
    """Every tensor in file order plus what the writer reports afterwards."""

    arch: str
    tensors: list[Planned] = field(default_factory=list)
    log: RoundingLog = field(default_factory=RoundingLog)
    weight_type: str = "f32"

    def add(self, name: str, qtype, shape, make) -> None:
        self.tensors.append(Planned(name, qtype, tuple(int(s) for s in shape), make))


def _f32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to(torch.float32).cpu().numpy())


def _has_grid(t: dict, prefix: str) -> bool:
    return f"{prefix}.qweight" in t


def weight_type_of(art: Artifact, requested: str) -> str:
    """The GGUF type of the block linears: the artifact's own 4-bit grid for auto, else as requested."""
    if requested not in WEIGHT_TYPES:
        raise GGUFExportError(f"weights must be one of {WEIGHT_TYPES}, got {requested!r}")
    if requested != "auto":
        return requested
    if not _has_grid(art.tensors, "layers.0.q"):
        return "f16"
    grid = (art.quant or {}).get("weight_grid")
    if grid in ("q4_0", "q4_1"):
        return grid
    return "q4_0" if (art.quant or {}).get("symmetric") else "q4_1"


def head_type_of(art: Artifact, name: str, requested: str | None) -> str:
    """The GGUF type of the embedding / output: the artifact's 4-bit grid for auto when it stores one, else q8_0."""
    if requested is not None and requested not in HEAD_TYPES:
        raise GGUFExportError(f"head types are {HEAD_TYPES}, got {requested!r}")
    if requested not in (None, "auto"):
        return requested
    if _has_grid(art.tensors, name):
        grid = read_grid(name, art.tensors, int(art.model["hidden_size"]))
        return "q4_0" if grid.zero8 else "q4_1"
    return "q8_0"


def _add_matrix(plan: Plan, name: str, art: Artifact, prefix: str, k: int, kind: str, perm: np.ndarray | None) -> None:
    """Plan a [N, K] matrix (4-bit grid or float in the artifact) as GGUF type `kind`, rows reordered by perm."""
    t = art.tensors
    qtype = TYPES[kind]
    if _has_grid(t, prefix):
        n = t[f"{prefix}.scales"].shape[0]

        def grid() -> Grid:
            g = read_grid(prefix, t, k)
            return g if perm is None else g.rows(perm)

        if kind in ("q4_0", "q4_1"):
            if kind == "q4_0" and not read_grid(prefix, t, k).zero8:
                raise GGUFExportError(f"{prefix} is asymmetric (zero points other than 8): Q4_0 cannot hold it; "
                                      "write q4_1 (--gguf-weights q4_1 / --gguf-head q4_1)")
            plan.add(name, qtype, (n, k), lambda: pack_q4(grid(), qtype, plan.log))
        else:  # a float type (or q8_0 / q6_k) of the dequantized grid
            plan.add(name, qtype, (n, k), lambda: convert(dequantize_grid(grid()), qtype))
        return
    w = t[prefix] if prefix in HEAD_TENSORS else t[f"{prefix}.weight"]
    n = w.shape[0]

    def make() -> np.ndarray:
        a = _f32(w)
        return convert(a if perm is None else a[perm], qtype)

    plan.add(name, qtype, (n, k), make)


def _add_vector(plan: Plan, name: str, v: torch.Tensor | None, n: int, perm: np.ndarray | None = None) -> None:
    """Plan an F32 vector (a norm gain or a bias); None = a norm without gain, written as ones."""
    def make() -> np.ndarray:
        a = np.ones(n, np.float32) if v is None else _f32(v).reshape(-1)
        return a if perm is None else a[perm]

    plan.add(name, QT.F32, (n,), make)


def gguf_arch(art: Artifact) -> str:
    """llama.cpp architecture: qwen2 for Qwen2 models whose biases its qwen2 graph loads (q/k/v), else llama.

    llama.cpp's llama graph loads optional biases on every projection, so a Qwen2 model with more
    biases (e.g. folded bias corrections on o/down) is written as llama with q/k rows permuted.
    """
    cfg = ModelConfig.from_dict(art.model)
    arch = ARCHS[cfg.arch]
    if arch == "qwen2":
        extra = sorted({n.split(".")[2] for n in art.tensors if n.startswith("layers.") and n.endswith(".bias")}
                       - set(QWEN2_BIASES))
        if extra or cfg.num_heads * cfg.head_dim != cfg.hidden_size:
            arch = "llama"
    return arch


def plan_tensors(art: Artifact, weights: str = "auto", head: str = "auto", embed: str | None = None) -> Plan:
    """Every tensor of the GGUF in file order with its type; nothing is computed until the writer asks."""
    cfg = ModelConfig.from_dict(art.model)
    t = art.tensors
    plan = Plan(gguf_arch(art), weight_type=weight_type_of(art, weights))
    permute = plan.arch == "llama"
    perms = {"q": rope_permutation(cfg.num_heads, cfg.head_dim) if permute else None,
             "k": rope_permutation(cfg.num_kv_heads, cfg.head_dim) if permute else None}
    head_kind = head_type_of(art, "embed" if cfg.tied_embeddings else "lm_head", head)
    embed_kind = head_type_of(art, "embed", embed if embed is not None else head_kind)
    _add_matrix(plan, tensor_name(gguf.MODEL_TENSOR.TOKEN_EMBD), art, "embed", cfg.hidden_size, embed_kind, None)
    for i in range(cfg.num_layers):
        _add_vector(plan, tensor_name(gguf.MODEL_TENSOR.ATTN_NORM, bid=i), t.get(f"layers.{i}.attn_norm"), cfg.hidden_size)
        for lin in LINEARS:
            if lin == "gate":
                _add_vector(plan, tensor_name(gguf.MODEL_TENSOR.FFN_NORM, bid=i), t.get(f"layers.{i}.mlp_norm"),
                            cfg.hidden_size)
            prefix = f"layers.{i}.{lin}"
            _add_matrix(plan, tensor_name(LLAMA_NAMES[lin], bid=i), art, prefix, linear_in_features(cfg, lin),
                        plan.weight_type, perms.get(lin))
            if f"{prefix}.bias" in t:
                bias = t[f"{prefix}.bias"]
                _add_vector(plan, tensor_name(LLAMA_NAMES[lin], "bias", bid=i), bias, bias.numel(), perms.get(lin))
    _add_vector(plan, tensor_name(gguf.MODEL_TENSOR.OUTPUT_NORM), t.get("norm"), cfg.hidden_size)
    if not cfg.tied_embeddings:
        _add_matrix(plan, tensor_name(gguf.MODEL_TENSOR.OUTPUT), art, "lm_head", cfg.hidden_size, head_kind, None)
    elif head_kind != embed_kind:  # the tied matrix once more, in the output's own type
        _add_matrix(plan, tensor_name(gguf.MODEL_TENSOR.OUTPUT), art, "embed", cfg.hidden_size, head_kind, None)
    factors = rope_factors(art)
    if factors is not None:
        plan.add(tensor_name(gguf.MODEL_TENSOR.ROPE_FREQS), QT.F32, factors.shape, lambda: factors)
    return plan


# ---------------------------------------------------------------------------------------------
# Metadata: hyperparameters and the tokenizer


def source_config(art: Artifact) -> dict:
    """What the source model says about context length, RoPE base and tokenizer pre-processing, when it is still
    readable: a Hugging Face config.json, or the keys of a source .gguf (the default model)."""
    src = Path(str((art.source or {}).get("model", "")))
    out: dict = {}
    try:
        if src.is_dir() and (src / "config.json").is_file():
            c = json.loads((src / "config.json").read_text())
            out["context_length"] = c.get("max_position_embeddings")
            out["rope_theta"] = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta")
        elif src.is_file() and src.suffix == ".gguf":
            r = gguf.GGUFReader(str(src))
            arch = r.get_field(gguf.Keys.General.ARCHITECTURE).contents()
            for key, name in ((gguf.Keys.LLM.CONTEXT_LENGTH, "context_length"),
                              (gguf.Keys.Rope.FREQ_BASE, "rope_theta"), (gguf.Keys.Tokenizer.PRE, "pre")):
                f = r.get_field(key.format(arch=arch))
                if f is not None:
                    out[name] = f.contents()
    except (OSError, ValueError, KeyError, AttributeError):
        return {}
    return {k: v for k, v in out.items() if v is not None}


def rope_base(art: Artifact) -> float:
    """RoPE base: the source model's, else fitted to the artifact's inv_freq (inv_freq[i] = base**(-2i/d))."""
    theta = source_config(art).get("rope_theta")
    if theta:
        return float(theta)
    cfg = ModelConfig.from_dict(art.model)
    inv = art.tensors["rope.inv_freq"].to(torch.float64).numpy()
    i = np.arange(1, inv.size)
    log_base = float(np.mean(-np.log(inv[1:]) * cfg.head_dim / (2 * i)))
    base = float(np.exp(log_base))
    return float(f"{base:.6g}")


def rope_factors(art: Artifact) -> np.ndarray | None:
    """llama.cpp's rope_freqs (it divides each frequency by one factor) when the artifact's inv_freq is a scaled
    one (e.g. Llama 3's), else None."""
    cfg = ModelConfig.from_dict(art.model)
    inv = art.tensors["rope.inv_freq"].to(torch.float64).numpy()
    plain = rope_base(art) ** (-np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
    factors = plain / inv
    if np.allclose(factors, 1.0, rtol=1e-5, atol=0):
        return None
    return factors.astype(np.float32)


def token_table(tok_dir: Path, vocab_size: int) -> tuple[str, list, list, list | None]:
    """(tokenizer model, tokens, token types, scores or None) for llama.cpp from a tokenizer.json.

    GPT-2-style byte-level BPE -> "gpt2" (tokens as the byte-level strings, added special tokens CONTROL);
    SentencePiece-style BPE with byte fallback -> "llama" through gguf-py's LlamaHfVocab. Ids the model
    has beyond the tokenizer become unused [PADi] tokens.
    """
    path = tok_dir / "tokenizer.json"
    if not path.is_file():
        raise GGUFExportError(f"{tok_dir} has no tokenizer.json; a GGUF carries its tokenizer: quantize from a model "
                              "with a fast (tokenizer.json) tokenizer")
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model") or {}
    byte_level = (tj.get("decoder") or {}).get("type") == "ByteLevel"
    if model.get("type") == "BPE" and byte_level and not model.get("byte_fallback"):
        kind, scores = "gpt2", None
        tokens: list = [None] * vocab_size
        types = [gguf.TokenType.UNUSED] * vocab_size
        for text, idx in model["vocab"].items():
            if idx < vocab_size:
                tokens[idx], types[idx] = text, gguf.TokenType.NORMAL
        for added in tj.get("added_tokens") or []:
            if added["id"] < vocab_size:
                tokens[added["id"]] = added["content"]
                types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    elif model.get("type") == "BPE" and model.get("byte_fallback"):
        kind = "llama"
        entries = list(gguf.vocab.LlamaHfVocab(tok_dir).all_tokens())
        tokens = [e[0].decode("utf-8", errors="replace") if isinstance(e[0], bytes) else e[0] for e in entries]
        scores = [float(e[1]) for e in entries]
        types = [e[2] for e in entries]
        tokens, scores, types = tokens[:vocab_size], scores[:vocab_size], types[:vocab_size]
        tokens += [None] * (vocab_size - len(tokens))
        scores += [-1000.0] * (vocab_size - len(scores))
        types += [gguf.TokenType.UNUSED] * (vocab_size - len(types))
    else:
        raise GGUFExportError(
            f"tokenizer model {model.get('type')!r} (decoder {(tj.get('decoder') or {}).get('type')!r}) has no "
            "llama.cpp form here: GGUF export supports GPT-2-style byte-level BPE and SentencePiece-style BPE")
    known = sum(t is not None for t in tokens)
    if len(model.get("vocab", {})) + 0 > vocab_size and kind == "gpt2" and known < len(model["vocab"]):
        raise GGUFExportError(f"the tokenizer has more tokens ({len(model['vocab'])}) than the model's vocabulary "
                              f"({vocab_size})")
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    return kind, tokens, [int(x) for x in types], scores


def add_tokenizer(w: "gguf.GGUFWriter", art: Artifact, tok_dir: Path, pre: str | None) -> None:
    """tokenizer.ggml.* and the chat template from the artifact's tokenizer files."""
    cfg = ModelConfig.from_dict(art.model)
    kind, tokens, types, scores = token_table(tok_dir, cfg.vocab_size)
    w.add_tokenizer_model(kind)
    if pre is None:
        pre = source_config(art).get("pre")
    if pre is None and kind == "gpt2":
        pre = "default"
        warnings.warn("GGUF tokenizer: the source model does not say which llama.cpp pre-tokenizer it uses, so the "
                      "file says 'default' (GPT-2's split); llama.cpp's own tokenization of text may differ from the "
                      "Hugging Face tokenizer's. Token ids (eval, run through baseq-export) are unaffected", stacklevel=3)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    special = gguf.SpecialVocab(tok_dir, load_merges=kind == "gpt2", n_vocab=cfg.vocab_size)
    for typ, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "pad_token_id")):
        if typ not in special.special_token_ids and (art.source or {}).get(key) is not None:
            special.special_token_ids[typ] = int(art.source[key])
    special.add_to_gguf(w, quiet=True)


def context_length(art: Artifact, requested: int | None) -> int:
    """Context length for the file: the option, else the source model's, else the tokenizer's, else DEFAULT_CONTEXT
    (capped at the sliding window: the file has no windowed attention)."""
    cfg = ModelConfig.from_dict(art.model)
    n = requested or source_config(art).get("context_length") or DEFAULT_CONTEXT
    if cfg.sliding_window is not None and n > cfg.sliding_window:
        warnings.warn(f"the model attends within a sliding window of {cfg.sliding_window} tokens, which the GGUF does "
                      f"not describe: context length written as {cfg.sliding_window}", stacklevel=3)
        n = cfg.sliding_window
    return int(n)


def add_hparams(w: "gguf.GGUFWriter", art: Artifact, plan: Plan, n_ctx: int) -> None:
    """The {arch}.* keys llama.cpp reads, the file type and our own baseq.* keys."""
    cfg = ModelConfig.from_dict(art.model)
    w.add_name(Path(str((art.source or {}).get("model", "baseq"))).stem or "baseq")
    w.add_context_length(n_ctx)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_rope_freq_base(rope_base(art))
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_file_type(FILE_TYPES.get(plan.weight_type, gguf.LlamaFileType.GUESSED))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_string(FORMAT_KEY, FORMAT_VALUE)
    w.add_string(QUANT_KEY, json.dumps(art.quant or {}, sort_keys=True))


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
            raise FileExistsError(f"{out} exists and is not a baseq GGUF export; refusing to replace it, "
                                  "choose another --out")
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


def write_gguf(art: Artifact, out: str | Path, tok_dir: Path, force: bool = False, weights: str = "auto",
               head: str = "auto", embed: str | None = None, context_length_: int | None = None,
               tokenizer_pre: str | None = None) -> Path:
    """Write an in-memory artifact (quantized, or float weights in the canonical layout) as a GGUF, atomically."""
    check_artifact(art)
    out = check_out(Path(out).expanduser(), force)
    plan = plan_tensors(art, weights, head, embed)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        w = gguf.GGUFWriter(tmp, plan.arch)
        add_hparams(w, art, plan, context_length(art, context_length_))
        add_tokenizer(w, art, tok_dir, tokenizer_pre)
        for _ in stream(w, plan):
            pass
        w.close()
        with builtins.open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    plan.log.warn()
    return out


def write(artifact: str | Path, out: str | Path, force: bool = False, weights: str = "auto", head: str = "auto",
          embed: str | None = None, context_length: int | None = None, tokenizer_pre: str | None = None,
          **_runtime_options) -> Path:
    """Write the .baseq artifact at `artifact` as one GGUF file at `out` (or out/model.gguf for a directory)."""
    artifact = Path(artifact)
    return write_gguf(load_artifact(artifact), out, artifact, force, weights, head, embed, context_length,
                      tokenizer_pre)


def write_model(model, out: str | Path, force: bool = False, weights: str = "f32", head: str = "f32",
                embed: str | None = None, context_length: int | None = None, tokenizer_pre: str | None = None) -> Path:
    """Write an unquantized models.LoadedModel as a float GGUF (weights f32/f16, or llama.cpp's own q4_0/q4_1
    rounding of the float weights): the reference rows of a benchmark."""
    from ..models import source_info

    if weights not in ("f32", "f16", "q4_0", "q4_1"):
        raise GGUFExportError(f"an unquantized model is written as f32, f16, q4_0 or q4_1, not {weights!r}")
    tensors = {k: v for k, v in model.weights.items() if not (k == "lm_head" and model.config.tied_embeddings)}
    art = Artifact(model=model.config.to_dict(), quant={}, tensors=tensors, source=source_info(model))
    with tempfile.TemporaryDirectory(prefix="baseq-gguf-tok-") as tok:
        model.tokenizer.save_pretrained(tok)
        return write_gguf(art, out, Path(tok), force, weights, head, embed, context_length, tokenizer_pre)
