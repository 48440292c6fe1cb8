"""safetensors files: the one writer, the readers, and a store of named tensors held in memory or in files.

Reads go through safetensors' native layer with Ctrl-C and SIGTERM held until each call returns: a signal whose
Python handler runs inside safetensors' or torch's native layer does not come out as the KeyboardInterrupt it
raised (it was swallowed, or turned into an unrelated torch error), so an interrupted run stops cleanly between
calls. The writer is plain Python, one tensor in memory at a time."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import threading
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
"""torch dtype -> the safetensors header's dtype name (the file format's spelling)."""
DTYPE_OF_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT / SIGTERM for the duration of the block, then act on the first one that came, as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = {sig: signal.signal(sig, lambda signum, frame: got.append(signum)) for sig in HELD_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if got:
            handler = old[got[0]]
            if callable(handler):
                handler(got[0], None)  # Python's Ctrl-C handler or the CLI's SIGTERM one: raises here
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), got[0])


def load_tensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, in one read."""
    with signals_held():
        return load_file(str(path), device=device)


def read_tensor(path: str | Path, name: str) -> torch.Tensor:
    """One tensor of a safetensors file; the file is opened for this read only (a mapping kept open would leave
    every page read resident, so reading a large file through would hold all of it)."""
    with signals_held(), safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name)


def tensor_index(path: str | Path) -> dict[str, tuple[str, list[int]]]:
    """{name: (safetensors dtype name, shape)} of a file's tensors, read from its header alone."""
    with signals_held(), safe_open(str(path), framework="pt") as f:
        return {name: (f.get_slice(name).get_dtype(), list(f.get_slice(name).get_shape())) for name in f.keys()}


def write_text_atomically(path: Path, text: str) -> None:
    """Write text to path through a temp file and a rename, so a reader never finds it half written."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


SAFETENSORS_ALIGN = 8
"""The safetensors header is padded with spaces to a multiple of this, so the data that follows is aligned."""


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> str:
    """Write tensors (a dict or a TensorStore) as one safetensors file, one tensor in memory at a time: the header
    from each tensor's dtype and shape, then the data in name order. Returns the file's hex SHA-256. I/O failures
    (a full disk, a file size limit) are raised as the OSError they are, naming the file."""
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
