"""safetensors files read and written with Ctrl-C and SIGTERM held until each native call returns.

A signal whose Python handler runs inside safetensors' or torch's native layer does not come out as the
KeyboardInterrupt it raised: it was swallowed (the run went on) or turned into an unrelated torch error. Every
safetensors call of the package goes through this module, so an interrupted run stops cleanly between calls."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, its I/O failures (a full disk, a file size limit) raised as the OSError they are."""
    try:
        with signals_held():
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    except Exception as e:  # noqa: BLE001 - SafetensorError wraps the OS error in its message
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), f"{os.strerror(int(code.group(1)))} writing {path}") from e


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
