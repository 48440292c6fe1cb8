"""Greedy decoding of an export in C++ (runtime_ops/greedy_runner.cc, in the export's op library): one
onnxruntime run and the argmax per token with no Python between runs, on the wheel's libonnxruntime (the
library onnxruntime-genai runs on). OnnxModel.greedy uses it where the export's graph writes its KV cache in
place; the Python shared-buffer stepper (runtime.buffer_stepper) is the fallback and computes the same
tokens."""

from __future__ import annotations

import ctypes
import functools
import warnings
from pathlib import Path

import numpy as np

ERROR_BYTES = 2048
RUNNER_SYMBOLS = ("baseq_runner_open", "baseq_runner_step", "baseq_runner_reset", "baseq_runner_vocab",
                  "baseq_runner_capacity", "baseq_runner_close", "baseq_greedy_argmax")


@functools.lru_cache(maxsize=1)
def onnxruntime_api_base() -> int | None:
    """Address of OrtGetApiBase() of the onnxruntime wheel's shared C API library, or None where the wheel ships
    none (the Python module links onnxruntime statically; the shared copy sits beside it)."""
    import onnxruntime

    capi = Path(onnxruntime.__file__).parent / "capi"
    libs = sorted(capi.glob(f"libonnxruntime.so.{onnxruntime.__version__}")) or sorted(capi.glob("libonnxruntime.so*"))
    if not libs:
        return None
    lib = ctypes.CDLL(str(libs[0]))
    lib.OrtGetApiBase.restype = ctypes.c_void_p
    return lib.OrtGetApiBase()


def runner_symbols(op_library: Path) -> ctypes.CDLL | None:
    """The export's op library with the runner's functions typed, or None for a library built before it had
    them (an older export: the Python stepper decodes it) or that does not load here (the Python session then
    says why)."""
    try:
        lib = ctypes.CDLL(str(Path(op_library).resolve()))
    except OSError:
        return None
    if not all(hasattr(lib, name) for name in RUNNER_SYMBOLS):
        return None
    lib.baseq_runner_open.restype = ctypes.c_void_p
    lib.baseq_runner_open.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int64, ctypes.c_char_p,
                                      ctypes.c_size_t]
    lib.baseq_runner_step.restype = ctypes.c_int64
    lib.baseq_runner_step.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                      ctypes.c_char_p, ctypes.c_size_t]
    for name in ("baseq_runner_vocab", "baseq_runner_capacity"):
        getattr(lib, name).restype = ctypes.c_int64
        getattr(lib, name).argtypes = [ctypes.c_void_p]
    lib.baseq_greedy_argmax.restype = ctypes.c_int64
    lib.baseq_greedy_argmax.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.baseq_runner_reset.restype = None
    lib.baseq_runner_reset.argtypes = [ctypes.c_void_p]
    lib.baseq_runner_close.restype = None
    lib.baseq_runner_close.argtypes = [ctypes.c_void_p]
    return lib


class NativeGreedy:
    """A C++ decoder: step(ids) runs the graph on ids after everything since the last reset() and returns the
    greedy token (the first of equal maxima); the KV cache holds `capacity` tokens. One sequence at a time:
    reset() starts the next in the same session and buffers (`sequence` counts them)."""

    def __init__(self, lib: ctypes.CDLL, api_base: int, graph: Path, threads: int | None, capacity: int):
        self._handle = None  # set once the C++ side is open (close() and __del__ read it)
        self._lib = lib
        self._err = ctypes.create_string_buffer(ERROR_BYTES)
        handle = lib.baseq_runner_open(api_base, str(graph).encode(), int(threads or 0), int(capacity), self._err, ERROR_BYTES)
        if not handle:
            raise ValueError(f"onnxruntime cannot run {graph} in the C++ decoder: {self._err.value.decode(errors='replace')}")
        self._handle = handle
        self.vocab_size = int(lib.baseq_runner_vocab(handle))
        self.capacity = int(lib.baseq_runner_capacity(handle))
        self.sequence = 0
        self._one = np.zeros(1, np.int64)
        self._one_ptr = self._one.ctypes.data

    def step(self, ids: list[int], logits: np.ndarray | None = None) -> int:
        """The greedy token after ids; logits (float32 [vocab], optional) receives the last position's logits."""
        if self._handle is None:
            raise ValueError("this decoder is closed")
        if logits is not None and (logits.dtype != np.float32 or logits.shape != (self.vocab_size,) or not logits.flags.c_contiguous):
            raise ValueError(f"logits must be a contiguous float32 array of shape ({self.vocab_size},)")
        out = logits.ctypes.data if logits is not None else None
        if len(ids) == 1:
            self._one[0] = ids[0]
            token = self._lib.baseq_runner_step(self._handle, self._one_ptr, 1, out, self._err, ERROR_BYTES)
        else:
            arr = np.ascontiguousarray(ids, dtype=np.int64)
            token = self._lib.baseq_runner_step(self._handle, arr.ctypes.data, arr.size, out, self._err, ERROR_BYTES)
        if token < 0:
            raise ValueError(self._err.value.decode(errors="replace"))
        return token

    def reset(self) -> int:
        """Start a new sequence; returns its number."""
        self._lib.baseq_runner_reset(self._handle)
        self.sequence += 1
        return self.sequence

    def close(self) -> None:
        if self._handle is not None:
            self._lib.baseq_runner_close(self._handle)
            self._handle = None

    def __del__(self):
        self.close()


def open_native(path: Path, model_file: str, manifest: dict, threads: int | None, capacity: int) -> NativeGreedy | None:
    """The C++ decoder on an export's graph, or None where it cannot run here (no custom-op library with the
    runner, or no shared onnxruntime library in the wheel)."""
    libs = [f for f in manifest.get("files", []) if f.endswith(".so")]
    if manifest.get("ops") != "custom" or not libs:
        return None
    lib = runner_symbols(path / libs[0])
    base = onnxruntime_api_base()
    if lib is None or base is None:
        return None
    try:
        return NativeGreedy(lib, base, path / model_file, threads, capacity)
    except ValueError as e:  # e.g. a wheel older than the library's headers: Python steps instead, same tokens
        warnings.warn(f"{e}; decoding with Python steps instead", RuntimeWarning, stacklevel=3)
        return None
