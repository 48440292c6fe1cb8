"""A GGUF file as both the model loader and the GGUF exporter see it: llama.cpp's tensor names, its q/k row
order, and the check that a file is whole. It sits below models/ and targets/ so that reading a .gguf checkpoint
needs nothing from the exporter."""

from __future__ import annotations

import struct
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


def check_file(path: str | Path) -> None:
    """Raise GGUFFileError unless path is a complete GGUF file (magic, readable header, every tensor's data
    inside the file): llama.cpp's own message for these cases is only 'failed to load model'."""
    path = Path(path)
    if not path.is_file():
        raise GGUFFileError(f"{path} does not exist or is not a file")
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFFileError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, struct.error) as e:
        raise GGUFFileError(f"{path} is truncated or damaged: its header cannot be read ({e}); export it again") from e
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:
        raise GGUFFileError(f"{path} is truncated: its tensors need {end} bytes, the file has {size}; export it again")
