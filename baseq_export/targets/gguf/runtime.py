"""A GGUF file in llama.cpp through llama-cpp-python: every position's logits and greedy decoding.

llama.cpp facts this relies on (checked against the build llama-cpp-python 0.3.36 installs):
- A quantized V cache needs flash attention, so q8_0 / q4_0 caches turn it on.
- With a quantized K (V) cache and head_dim % 64 == 0, llama.cpp rotates K and Q (V and the
  output) by a Hadamard itself ("attn_rot"); LLAMA_ATTN_ROT_DISABLE=1, read when a context is
  made, turns that off (attn_rot=False here).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ...gguf_file import GGUFFileError, check_file

KV_CACHE_TYPES = ("f16", "f32", "q8_0", "q4_0")


def llama_quantize(src: Path, dst: Path, ftype: str, threads: int = 2,
                   imatrix: dict[str, np.ndarray] | None = None) -> float:
    """llama.cpp's own quantizer (llama_model_quantize, default parameters) of a float GGUF into file type ftype
    (a quant.ggml_mix.MIXES name: q4_0, q4_k_m, iq4_xs, ...), with an importance matrix {tensor name: mean
    squared input per column} when given: the peer our files are measured against. Returns seconds."""
    import ctypes
    import time

    import llama_cpp
    from llama_cpp import llama_cpp as L

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
    params.nthread = threads
    keep = []
    if imatrix:
        arr = (L.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, v) in enumerate(sorted(imatrix.items())):
            buf = np.ascontiguousarray(v, np.float32)
            keep.append(buf)
            arr[i].name = name.encode()
            arr[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = buf.size
        arr[len(imatrix)].name = None  # the list ends with a NULL name
        keep.append(arr)
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(L.llama_model_imatrix_data))
    t0 = time.time()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {ftype}) returned {rc}")
    return time.time() - t0


def _ggml_type(kv_cache: str) -> int:
    import llama_cpp

    if kv_cache not in KV_CACHE_TYPES:
        raise ValueError(f"kv_cache must be one of {KV_CACHE_TYPES}, got {kv_cache!r}")
    return getattr(llama_cpp, f"GGML_TYPE_{kv_cache.upper()}")


class LlamaCppBackend:
    """A GGUF in llama.cpp (an export.Backend): logits of every position, greedy continuation.

    kv_cache: f16 (llama.cpp's default), f32, q8_0 or q4_0 (quantized caches use flash attention);
    attn_rot: let llama.cpp rotate a quantized cache by its Hadamard (its default), False disables it.
    """

    def __init__(self, path: str | Path, n_threads: int | None = None, kv_cache: str = "f16",
                 n_ctx: int = 512, flash_attn: bool | None = None, attn_rot: bool = True,
                 threads: int | None = None, **_writer_options):
        check_file(path)
        self.path = Path(path)
        self.n_threads = n_threads or threads or min(os.cpu_count() or 1, 4)
        self.kv_cache = kv_cache
        self.type_kv = _ggml_type(kv_cache)
        self.flash_attn = kv_cache in ("q8_0", "q4_0") if flash_attn is None else flash_attn
        if kv_cache in ("q8_0", "q4_0") and not self.flash_attn:
            raise ValueError("a quantized V cache needs flash attention in llama.cpp; leave flash_attn on")
        self.attn_rot = attn_rot
        self.n_ctx = n_ctx
        self.label = f"llama.cpp ({kv_cache} KV cache{'' if attn_rot or kv_cache in ('f16', 'f32') else ', no attn_rot'})"
        self._scoring = None  # logits_all context, re-made when a longer sequence comes
        self._llm(512, logits_all=False)  # load now: a file llama.cpp rejects fails here, not at first use

    def _llm(self, n_ctx: int, logits_all: bool):
        """A llama.cpp context with room for n_ctx tokens (LLAMA_ATTN_ROT_DISABLE applied while it is made)."""
        import llama_cpp

        key, old = "LLAMA_ATTN_ROT_DISABLE", os.environ.get("LLAMA_ATTN_ROT_DISABLE")
        if not self.attn_rot:
            os.environ[key] = "1"
        try:
            return llama_cpp.Llama(model_path=str(self.path), n_ctx=n_ctx, n_batch=min(n_ctx, 512),
                                   n_ubatch=min(n_ctx, 512), n_threads=self.n_threads, n_threads_batch=self.n_threads,
                                   logits_all=logits_all, type_k=self.type_kv, type_v=self.type_kv,
                                   flash_attn=self.flash_attn, verbose=False)
        except ValueError as e:
            raise GGUFFileError(f"llama.cpp cannot load {self.path}: {e}") from e
        finally:
            if not self.attn_rot:
                if old is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = old

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 [B, T, vocab] logits of every position, each row of ids in a fresh (cleared) context."""
        b, t = ids.shape
        if self._scoring is None or self._scoring.n_ctx() < t:
            self._scoring = None
            self._scoring = self._llm(max(t, self.n_ctx), logits_all=True)
        llm = self._scoring
        out = np.empty((b, t, llm.n_vocab()), np.float32)
        for i in range(b):
            llm.reset()
            llm.eval([int(x) for x in ids[i]])
            out[i] = llm.scores[:t]
        return torch.from_numpy(out)

    def greedy(self, prompt_ids: list[int], max_new_tokens: int | None = None) -> Iterator[int]:
        """Argmax tokens after prompt_ids, one llama.cpp decode step each (until the context is full)."""
        return self.generate(prompt_ids, max_new_tokens)

    def generate(self, prompt_ids: list[int], max_new_tokens: int | None = None,
                 choose: Callable[[torch.Tensor], int] | None = None) -> Iterator[int]:
        """Tokens after prompt_ids picked by choose (None: argmax) from llama.cpp's logits of the last position,
        one decode step each (until the context is full)."""
        import llama_cpp

        n_ctx = max(self.n_ctx, len(prompt_ids) + (max_new_tokens if max_new_tokens is not None else 512))
        llm = self._llm(n_ctx, logits_all=False)
        n_vocab = llm.n_vocab()

        def last_logits() -> np.ndarray:
            return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))

        llm.eval(list(prompt_ids))
        produced = 0
        while llm.n_tokens < n_ctx and (max_new_tokens is None or produced < max_new_tokens):
            token = int(np.argmax(last_logits())) if choose is None else choose(torch.from_numpy(last_logits()))
            yield token
            produced += 1
            if llm.n_tokens + 1 > n_ctx:
                return
            llm.eval([token])
