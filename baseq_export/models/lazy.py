"""Lazy weights: a checkpoint read one tensor at a time, never materialised whole.

A local Hugging Face checkpoint (one file or shards listed in model.safetensors.index.json) is read
with safetensors' safe_open; a .gguf file with gguf-py's reader, dequantizing one tensor when it is
asked for (q/k rows put back from llama.cpp's RoPE order). `LazyWeights` maps the canonical names of
models.base to those reads, so code written for a weight dict reads a block's tensors when it needs
them and holds nothing else. The values equal what transformers loads (tested).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from .base import LINEARS, ModelConfig


class LazyWeights(Mapping):
    """Canonical weight name -> tensor, read from the checkpoint on every access (nothing is cached)."""

    def __init__(self, readers: dict[str, Callable[[], torch.Tensor]]):
        self._readers = readers

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._readers[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)

    def with_tensor(self, name: str, tensor: torch.Tensor) -> "LazyWeights":
        """These weights plus one held in memory (e.g. rope.inv_freq, computed rather than read)."""
        return LazyWeights({**self._readers, name: lambda: tensor.clone()})

    def read_all(self) -> dict[str, torch.Tensor]:
        """Every tensor read once into memory, for work that reads them all many times (a full-precision
        evaluation); names with one reader (a tied head and the embedding) share one tensor."""
        read: dict[int, torch.Tensor] = {}
        for r in self._readers.values():
            if id(r) not in read:
                read[id(r)] = r()
        return {name: read[id(r)] for name, r in self._readers.items()}


def hf_names(cfg: ModelConfig, adapter) -> dict[str, str]:
    """Canonical name -> transformers parameter name of every weight a checkpoint may hold (biases included)."""
    names = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "lm_head": "lm_head.weight"}
    for i in range(cfg.num_layers):
        for name, path in adapter.NORM_PATHS.items():
            names[f"layers.{i}.{name}"] = f"model.layers.{i}.{path}.weight"
        for name in LINEARS:
            for kind in ("weight", "bias"):
                names[f"layers.{i}.{name}.{kind}"] = f"model.layers.{i}.{adapter.LINEAR_PATHS[name]}.{kind}"
    return names


def meta_model(hf_config):
    """The transformers model of hf_config on the meta device: its parameter names and rotary embedding, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


def rope_tensors(shell, hf_config) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention scaling) exactly as the model's own rotary embedding computes them from its config."""
    rotary = type(shell.model.rotary_emb)(config=hf_config)
    return rotary.inv_freq.detach().clone(), float(getattr(rotary, "attention_scaling", 1.0))


def expected_names(shell, names: dict[str, str]) -> set[str]:
    """The canonical names of the tensors transformers' model of this config has (a bias only where it has one)."""
    params = set(shell.state_dict())
    return {c for c, n in names.items() if n in params}


def _checked(weights: dict, cfg: ModelConfig, present: set[str], names: dict[str, str], expected: set[str]) -> None:
    """The same refusals as the eager loader: tensors the config needs but the checkpoint lacks (a bias the config
    asks for included), tensors it would ignore, a head that contradicts tie_word_embeddings."""
    from . import TIED_HEAD_DIFFERS, UNTIED_WITHOUT_HEAD, ModelLoadError, lacks_error

    required = [c for c in names if c in expected and not (c == "lm_head" and cfg.tied_embeddings)]
    missing = [names[c] for c in required if names[c] not in present]
    if missing:
        hint = (UNTIED_WITHOUT_HEAD if names["lm_head"] in missing else
                " config.json asks for them (e.g. attention_bias / mlp_bias true): fix config.json or the checkpoint")
        raise lacks_error(missing, hint)
    ignored = [names[c] for c in names if c not in expected and names[c] in present]
    if ignored:
        raise ModelLoadError(f"the checkpoint has tensors the model would ignore: {', '.join(ignored[:5])}; config.json "
                             "does not use them (e.g. attention_bias false): fix config.json")
    if cfg.tied_embeddings and names["lm_head"] in present and not torch.equal(weights["lm_head"](), weights["embed"]()):
        raise ModelLoadError(TIED_HEAD_DIFFERS)


def safetensors_weights(directory: Path, cfg: ModelConfig, adapter, dtype: torch.dtype, shell) -> LazyWeights:
    """Lazy weights of a safetensors checkpoint (one file, or the shards its index lists)."""
    from ..tensor_files import read_tensor, tensor_index

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        where = {k: directory / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    else:
        where = {}
        for f in sorted(directory.glob("*.safetensors")):
            where.update({k: f for k in tensor_index(f)})
    names = hf_names(cfg, adapter)

    def reader(hf_name: str) -> Callable[[], torch.Tensor]:
        def read() -> torch.Tensor:
            return read_tensor(where[hf_name], hf_name).to(dtype)
        return read

    readers = {c: reader(n) for c, n in names.items() if n in where}
    _checked(readers, cfg, set(where), names, expected_names(shell, names))
    if cfg.tied_embeddings:
        readers["lm_head"] = readers["embed"]
    return LazyWeights(readers)


def gguf_weights(path: Path, cfg: ModelConfig, dtype: torch.dtype, shell, adapter) -> LazyWeights:
    """Lazy weights of a llama.cpp GGUF file: each tensor dequantized by gguf-py when read."""
    import gguf

    from ..gguf_file import GGUF_TENSORS, rope_permutation, tensor_name
    from .checks import config_fields, shape_mismatch

    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    names = {"embed": tensor_name(gguf.MODEL_TENSOR.TOKEN_EMBD), "norm": tensor_name(gguf.MODEL_TENSOR.OUTPUT_NORM),
             "lm_head": tensor_name(gguf.MODEL_TENSOR.OUTPUT)}
    norms = {"attn_norm": gguf.MODEL_TENSOR.ATTN_NORM, "mlp_norm": gguf.MODEL_TENSOR.FFN_NORM}
    for i in range(cfg.num_layers):
        for name, kind in norms.items():
            names[f"layers.{i}.{name}"] = tensor_name(kind, bid=i)
        for name in LINEARS:
            for suffix in ("weight", "bias"):
                names[f"layers.{i}.{name}.{suffix}"] = tensor_name(GGUF_TENSORS[name], suffix, i)

    def read_tensor(canonical: str, gguf_name: str) -> Callable[[], torch.Tensor]:
        def read() -> torch.Tensor:
            t = tensors[gguf_name]
            values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
            proj = canonical.split(".")[2] if canonical.startswith("layers.") else None
            if proj in unpermute:  # llama.cpp rotates adjacent pairs: put q/k rows back in transformers' order
                values = values[unpermute[proj]]
            return torch.from_numpy(np.array(values, dtype=np.float32)).to(dtype)  # a writable copy
        return read

    hf = hf_names(cfg, adapter)
    want = {k: list(v.shape) for k, v in shell.state_dict().items()}
    fields = config_fields(shell.config)
    for c, n in names.items():  # each tensor's shape against the one its metadata implies (checks.check_shapes's rule)
        if n in tensors and hf.get(c) in want:
            problem = shape_mismatch(n, [int(d) for d in reversed(tensors[n].shape)], want[hf[c]], fields,
                                     "the file's metadata", "the file is damaged; convert or download it again")
            if problem:
                from . import ModelLoadError

                raise ModelLoadError(f"{path}: {problem}")
    # sized by the metadata: made only once the tensors' shapes agree with it
    unpermute = {"q": np.argsort(rope_permutation(cfg.num_heads, cfg.head_dim)),
                 "k": np.argsort(rope_permutation(cfg.num_kv_heads, cfg.head_dim))}
    readers = {c: read_tensor(c, n) for c, n in names.items() if n in tensors}
    _checked(readers, cfg, set(tensors), names, expected_names(shell, hf))
    if cfg.tied_embeddings:  # (an untied model without output.weight was refused by _checked)
        readers["lm_head"] = readers["embed"]
    return LazyWeights(readers)
