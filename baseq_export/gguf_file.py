"""A GGUF file as both the model loader and the GGUF exporter see it: llama.cpp's tensor names, its q/k row
order, and the check that a file is whole. It sits below models/ and targets/ so that reading a .gguf checkpoint
needs nothing from the exporter."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

GGUF_TENSORS = {"q": gguf.MODEL_TENSOR.ATTN_Q, "k": gguf.MODEL_TENSOR.ATTN_K, "v": gguf.MODEL_TENSOR.ATTN_V,
                "o": gguf.MODEL_TENSOR.ATTN_OUT, "gate": gguf.MODEL_TENSOR.FFN_GATE, "up": gguf.MODEL_TENSOR.FFN_UP,
                "down": gguf.MODEL_TENSOR.FFN_DOWN}


def tensor_name(kind: "gguf.MODEL_TENSOR", suffix: str = "weight", bid: int | None = None) -> str:
    """A llama.cpp tensor name from gguf-py's table (e.g. blk.3.attn_q.bias)."""
    return f"{gguf.TENSOR_NAMES[kind].format(bid=bid)}.{suffix}"


def rope_permutation(n_heads: int, head_dim: int) -> np.ndarray:
    """Row order of q/k for llama.cpp's llama graph: its RoPE ("normal" type) rotates adjacent pairs
    (2j, 2j+1) where transformers rotates (j, j + head_dim/2), so row 2j+e of a head takes row e*head_dim/2 + j."""
    half = head_dim // 2
    j = np.arange(half)
    per_head = np.stack([j, j + half], axis=1).reshape(-1)  # [0, half, 1, half+1, ...]
    return (np.arange(n_heads)[:, None] * head_dim + per_head[None, :]).reshape(-1)


class GGUFFileError(ValueError):
    """A .gguf file that is missing, not GGUF, truncated or damaged; the message says which."""


def check_file(path: str | Path, wanted: set[str] = frozenset()) -> "Header":
    """Raise GGUFFileError unless path is a complete GGUF file (magic, readable header, every tensor's data
    inside the file): llama.cpp's own message for these cases is only 'failed to load model'. Returns the header
    read on the way (read_header, with the wanted keys)."""
    path = Path(path)
    if not path.is_file():
        raise GGUFFileError(f"{path} does not exist or is not a file")
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFFileError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        head = read_header(path, wanted)
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, struct.error, UnicodeDecodeError) as e:
        raise GGUFFileError(f"{path} is truncated or damaged: its header cannot be read ({e}); export it again") from e
    end = max((t.offset + t.nbytes for t in head.tensors), default=0)
    if end > size:
        raise GGUFFileError(f"{path} is truncated: its tensors need {end} bytes, the file has {size}; export it again")
    return head


_SCALARS = {gguf.GGUFValueType.UINT8: "<B", gguf.GGUFValueType.INT8: "<b", gguf.GGUFValueType.UINT16: "<H",
            gguf.GGUFValueType.INT16: "<h", gguf.GGUFValueType.UINT32: "<I", gguf.GGUFValueType.INT32: "<i",
            gguf.GGUFValueType.FLOAT32: "<f", gguf.GGUFValueType.BOOL: "<?", gguf.GGUFValueType.UINT64: "<Q",
            gguf.GGUFValueType.INT64: "<q", gguf.GGUFValueType.FLOAT64: "<d"}


@dataclass
class TensorInfo:
    """One tensor of a GGUF: name, ggml type, element count, absolute data offset and bytes."""

    name: str
    qtype: int
    n_elements: int
    offset: int
    nbytes: int


@dataclass
class Header:
    """What read_header found: the wanted keys' scalar / string values, and every tensor's info."""

    values: dict
    tensors: list[TensorInfo]


def read_header(path: str | Path, wanted: set[str] = frozenset()) -> Header:
    """The wanted metadata keys (scalars and strings) and the tensor infos of a GGUF, read sequentially from its
    header (arrays are skipped, not parsed: gguf-py's GGUFReader takes seconds over a 49k-token vocabulary)."""
    values: dict = {}
    size = Path(path).stat().st_size
    with Path(path).open("rb") as f:
        def take(fmt: str):
            raw = f.read(struct.calcsize(fmt))
            if len(raw) != struct.calcsize(fmt):
                raise GGUFFileError(f"{path} is truncated inside its header; export it again")
            return struct.unpack(fmt, raw)[0]

        def text() -> str:
            n = take("<Q")
            if n > size - f.tell():  # a damaged length: never allocate it
                raise GGUFFileError(f"{path} is damaged: a string in its header claims {n} bytes; export it again")
            raw = f.read(n)
            if len(raw) != n:
                raise GGUFFileError(f"{path} is truncated inside its header; export it again")
            return raw.decode("utf-8")

        def skip(vtype: int) -> None:
            if vtype == gguf.GGUFValueType.STRING:
                f.seek(take("<Q"), 1)
            elif vtype == gguf.GGUFValueType.ARRAY:
                etype, count = take("<I"), take("<Q")
                if etype in (gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY):
                    for _ in range(count):
                        skip(etype)
                else:
                    f.seek(count * struct.calcsize(_SCALARS[gguf.GGUFValueType(etype)]), 1)
            else:
                f.seek(struct.calcsize(_SCALARS[gguf.GGUFValueType(vtype)]), 1)

        if f.read(4) != b"GGUF":
            raise GGUFFileError(f"{path} is not a GGUF file")
        take("<I")  # version
        n_tensors, n_kv = take("<Q"), take("<Q")
        alignment = gguf.GGUF_DEFAULT_ALIGNMENT
        for _ in range(n_kv):
            key, vtype = text(), take("<I")
            if key == gguf.Keys.General.ALIGNMENT and vtype in _SCALARS:
                alignment = take(_SCALARS[gguf.GGUFValueType(vtype)])
                if key in wanted:
                    values[key] = alignment
            elif key not in wanted:
                skip(vtype)
            elif vtype == gguf.GGUFValueType.STRING:
                values[key] = text()
            elif vtype in _SCALARS:
                values[key] = take(_SCALARS[gguf.GGUFValueType(vtype)])
            else:
                skip(vtype)
        infos = []
        for _ in range(n_tensors):
            name = text()
            dims = [take("<Q") for _ in range(take("<I"))]
            qtype, offset = take("<I"), take("<Q")
            count = int(np.prod(dims, dtype=np.int64)) if dims else 1
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
            infos.append((name, qtype, count, offset, count // block * type_size))
        start = -(-f.tell() // alignment) * alignment
    return Header(values, [TensorInfo(n, q, c, start + o, b) for n, q, c, o, b in infos])


def read_keys(path: str | Path, wanted: set[str]) -> dict:
    """The scalar and string values of the wanted metadata keys of a GGUF (read_header)."""
    return read_header(path, wanted).values


DIGIT_SPLIT_PRES = ("smollm",)
"""llama.cpp pre-tokenizer names that split off every digit before GPT-2's regex (llama.cpp's llama-vocab.cpp)."""


def load_tokenizer(path: str | Path):
    """transformers' tokenizer of a .gguf file, split as llama.cpp splits it for the file's pre-tokenizer name."""
    from transformers import AutoTokenizer

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    restore_pre_tokenizer(tokenizer, path)
    return tokenizer


def restore_pre_tokenizer(tokenizer, path: str | Path) -> None:
    """Give transformers' tokenizer of a .gguf checkpoint the digit split that the file's pre-tokenizer name asks
    for: transformers' GGUF conversion keeps only GGUF's byte-level split, so SmolLM2's tokenizer loses the
    digit split it was trained with (whitespace before a number then merges differently: 19664 tokens of the
    embedded evaluation text instead of the trained tokenizer's 19605)."""
    if read_keys(path, {gguf.Keys.Tokenizer.PRE}).get(gguf.Keys.Tokenizer.PRE) not in DIGIT_SPLIT_PRES:
        return
    from tokenizers import pre_tokenizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.pre_tokenizer).__name__ == "ByteLevel":
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                         backend.pre_tokenizer])
