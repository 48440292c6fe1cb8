"""onnxruntime-genai for our ONNX exports: the genai_config.json that describes them, and a runner."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ...artifact import Artifact
from ...models.base import ModelConfig
from .runtime import MODEL_FILE

GENAI_CONFIG = "genai_config.json"
GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}


def write_genai_config(out: Path, cfg: ModelConfig, art: Artifact, max_length: int, ops_library: str | None = None,
                       model_file: str = MODEL_FILE, share_buffer: bool = False) -> None:
    """genai_config.json for onnxruntime-genai: the graph it runs (its past/present types and row widths are read
    from the graph: float32 or our packed rows), our input/output names, the KV cache as one buffer of max_length
    rows shared by past and present (share_buffer: our attention ops write the new rows in place) or grown every
    step, and our op library (a file inside the export: genai refuses paths outside the model folder)."""
    eos = art.source.get("eos_token_id")
    if eos is None:  # artifacts that do not record it: the tokenizer copied into the export may know it
        try:
            from transformers import AutoTokenizer

            eos = AutoTokenizer.from_pretrained(str(out)).eos_token_id
        except (OSError, ValueError):
            eos = None
    if eos is None:
        import warnings

        warnings.warn("the model has no eos_token_id: genai_config.json not written (onnxruntime-genai needs it)")
        return
    config = {
        "model": {
            "bos_token_id": art.source.get("bos_token_id") if art.source.get("bos_token_id") is not None else eos,
            "eos_token_id": eos,
            "pad_token_id": art.source.get("pad_token_id", eos),
            "context_length": max_length,
            "type": GENAI_TYPES[cfg.arch],
            "vocab_size": cfg.vocab_size,
            "decoder": {
                "session_options": {"log_id": "baseq-export", "provider_options": [],
                                    **({"custom_ops_library": ops_library} if ops_library else {})},
                "filename": model_file,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "num_attention_heads": cfg.num_heads,
                "num_hidden_layers": cfg.num_layers,
                "num_key_value_heads": cfg.num_kv_heads,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "max_length": max_length, "min_length": 0,
                   "past_present_share_buffer": share_buffer, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
                   "repetition_penalty": 1.0, "num_return_sequences": 1, "early_stopping": True,
                   "length_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }
    (out / GENAI_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def read_genai_config(path: Path) -> dict:
    """genai_config.json of an export, checked where genai would act on it: the context length is a positive whole
    number and the graph and op library it names lie inside the export (genai loads them); else ValueError naming
    the file, the field and the fix."""
    from ...models.base import whole
    from .runtime import inside

    f = path / GENAI_CONFIG

    def bad(field: str, what: str) -> ValueError:
        return ValueError(f"{f}: {field} {what}; the file is damaged or was edited: re-export it")

    try:
        config = json.loads(f.read_text())
    except ValueError as e:  # UnicodeDecodeError included
        raise ValueError(f"{f} is not valid JSON ({e}); re-export it") from e
    model = config.get("model") if isinstance(config, dict) else None
    decoder = model.get("decoder") if isinstance(model, dict) else None
    if not isinstance(decoder, dict):
        raise bad('"model.decoder"', "is missing or not an object")
    length = model.get("context_length")
    if not whole(length):
        raise bad('"model.context_length"', "is not a positive whole number")
    options = decoder.get("session_options", {})
    names = {"model.decoder.filename": decoder.get("filename")}
    if isinstance(options, dict) and "custom_ops_library" in options:
        names["model.decoder.session_options.custom_ops_library"] = options["custom_ops_library"]
    for field, name in names.items():
        if not inside(path, name):
            raise bad(f'"{field}" ({name!r})', "is not a file name inside the export directory")
    return config


def genai_stream(path, prompt_ids: list[int], max_new_tokens: int,
                 choose: Callable[[torch.Tensor], int] | None = None) -> Iterator[int]:
    """Tokens from onnxruntime-genai running an export directory (one with a genai_config.json): its greedy search,
    or tokens picked by choose from the logits it returns."""
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        from .. import OPTIONAL_BACKENDS

        raise ValueError(f"the onnxruntime-genai backend needs `pip install {OPTIONAL_BACKENDS['onnxruntime-genai'][1]}`"
                         f" ({e})") from e
    model = og.Model(str(path))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + max_new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([prompt_ids], dtype=np.int32))
    if choose is None:
        while not gen.is_done():
            gen.generate_next_token()
            yield int(gen.get_next_tokens()[0])
        return
    for produced in range(max_new_tokens):
        logits = np.asarray(gen.get_logits(), np.float32)
        token = choose(torch.from_numpy(logits.reshape(-1, logits.shape[-1])[-1].copy()))
        yield token
        if produced + 1 < max_new_tokens:
            gen.append_tokens(np.array([[token]], dtype=np.int32))


class GenaiBackend:
    """An export in onnxruntime-genai (an export.Backend). genai is a generation API: logits of a whole window
    are read one position at a time (each token appended, the last position's logits read), as a decode does."""

    label = "onnxruntime-genai"

    def __init__(self, path: str | Path):
        from .runtime import read_manifest, verify_files

        self.path = Path(path)
        verify_files(self.path, read_manifest(self.path))
        if not (self.path / GENAI_CONFIG).is_file():
            raise ValueError(f"{path} has no {GENAI_CONFIG}: onnxruntime-genai cannot run it (the model has no "
                             "eos_token_id; export it again from an artifact whose tokenizer has one)")
        self.context_length = read_genai_config(self.path)["model"]["context_length"]

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.context_length:
            raise ValueError(f"windows of {ids.shape[1]} tokens exceed the export's context of {self.context_length}")
        return genai_logits(self.path, ids)

    def greedy(self, prompt_ids: list[int], max_new_tokens: int | None = None) -> Iterator[int]:
        return self.generate(prompt_ids, max_new_tokens)

    def generate(self, prompt_ids: list[int], max_new_tokens: int | None = None,
                 choose: Callable[[torch.Tensor], int] | None = None) -> Iterator[int]:
        """Tokens after prompt_ids: genai's own greedy search, or with choose, each token picked from genai's
        logits of the last position and appended back (so every backend samples the same way)."""
        room = self.context_length - len(prompt_ids)
        return genai_stream(self.path, prompt_ids, room if max_new_tokens is None else min(room, max_new_tokens),
                            choose)


def genai_logits(path: str | Path, ids: torch.Tensor) -> torch.Tensor:
    """float32 logits [B, T, vocab] of every position of ids [B, T] in onnxruntime-genai running the model
    directory at path (ours or another builder's), a token at a time: genai returns the last position's logits."""
    import onnxruntime_genai as og

    model = og.Model(str(path))
    rows = []
    for row in ids.tolist():
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(row), do_sample=False)  # a window as long as the context fits
        gen = og.Generator(model, params)
        out = []
        for token in row:
            gen.append_tokens(np.array([[token]], dtype=np.int32))
            logits = np.asarray(gen.get_logits(), np.float32)
            out.append(logits.reshape(-1, logits.shape[-1])[-1].copy())
        rows.append(np.stack(out))
    return torch.from_numpy(np.stack(rows))
