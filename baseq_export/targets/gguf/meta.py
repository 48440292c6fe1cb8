"""GGUF metadata: the hyperparameter keys llama.cpp reads and the tokenizer carried over from tokenizer.json."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import gguf
import numpy as np
import torch

from ...artifact import Artifact, source_config
from ...models.base import ModelConfig
from ...quant.ggml_mix import MIXES
from . import pretok
from .tensors import GGUFExportError, Plan

FORMAT_KEY = "baseq.format"
FORMAT_VALUE = "baseq-gguf"
QUANT_KEY = "baseq.quant"
DEFAULT_CONTEXT = 4096  # when the source model no longer says how long a context it was trained for
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}


def rope_base(art: Artifact) -> float:
    """RoPE base: the source model's, else the shortest decimal base whose plain frequencies base**(-2i/d) give the
    artifact's highest quarter of inv_freq (left unscaled by Llama 3 / YaRN-style scaling) to 1e-6."""
    theta = source_config(art).get("rope_theta")
    if theta:
        return float(theta)
    cfg = ModelConfig.from_dict(art.model)
    inv = art.tensors["rope.inv_freq"].to(torch.float64).numpy()
    i = np.arange(1, max(2, inv.size // 4))
    exponent = -2 * i / cfg.head_dim
    fitted = float(np.exp(np.mean(np.log(inv[i]) / exponent)))
    for digits in range(1, 8):
        base = float(f"{fitted:.{digits}g}")
        if np.abs(base**exponent / inv[i] - 1).max() < 1e-6:
            return base
    return fitted


def rope_factors(art: Artifact) -> np.ndarray | None:
    """llama.cpp's rope_freqs tensor (it divides each RoPE frequency by one factor) when the artifact's inv_freq is
    a scaled one (e.g. Llama 3's), else None."""
    cfg = ModelConfig.from_dict(art.model)
    inv = art.tensors["rope.inv_freq"].to(torch.float64).numpy()
    plain = rope_base(art) ** (-np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
    factors = plain / inv
    if np.allclose(factors, 1.0, rtol=1e-5, atol=0):
        return None
    return factors.astype(np.float32)


def context_length(art: Artifact, requested: int | None) -> int:
    """The option, else the source model's, else DEFAULT_CONTEXT; capped at a sliding window (which the file
    does not describe)."""
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
    mixed = MIXES.get(plan.weight_type)
    w.add_file_type(mixed.file_type if mixed else FILE_TYPES.get(plan.weight_type, gguf.LlamaFileType.GUESSED))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_string(FORMAT_KEY, FORMAT_VALUE)
    w.add_string(QUANT_KEY, quant_note(art.quant or {}))


GGML_DECIDED = ("w_bits", "group_size", "symmetric", "weight_grid", "weight_clip", "embed", "lm_head")
"""Quant settings that a ggml mix's tensor types decide (ggml picks the scales): left out of a mixed file's note."""


def quant_note(quant: dict) -> str:
    """The artifact's quant settings as compact JSON for the file's QUANT_KEY: provenance only (nothing reads it to
    compute), so unset values, and in a ggml mix the settings its tensor types decide, are left out."""
    dropped = GGML_DECIDED if quant.get("ggml_mix") else ()
    return json.dumps({k: v for k, v in quant.items() if v is not None and k not in dropped}, sort_keys=True,
                      separators=(",", ":"))


def merge_scores(model: dict, vocab_size: int) -> list[float]:
    """Token scores for llama.cpp's SentencePiece-style tokenizer from BPE merge ranks: it merges the adjacent pair
    whose joined token scores highest, so the token made by merge r scores -r (BPE's order); others score 0."""
    scores = [0.0] * vocab_size
    vocab = model.get("vocab", {})
    for rank, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        idx = vocab.get(left + right)
        if idx is not None and idx < vocab_size and scores[idx] == 0.0:
            scores[idx] = -float(rank + 1)
    return scores


def tokenizer_json(tok_dir: Path) -> dict:
    """The parsed tokenizer.json in tok_dir, or the refusal of a directory without one."""
    path = tok_dir / "tokenizer.json"
    if not path.is_file():
        raise GGUFExportError(f"{tok_dir} has no tokenizer.json; a GGUF carries its tokenizer: quantize a model that "
                              "has a fast (tokenizer.json) tokenizer")
    return json.loads(path.read_text(encoding="utf-8"))


def vocab_kind(tj: dict) -> str:
    """llama.cpp's tokenizer model for a parsed tokenizer.json: gpt2 (GPT-2-style byte-level BPE) or llama
    (SentencePiece-style BPE with byte fallback); any other tokenizer is refused."""
    model, decoder = tj.get("model") or {}, (tj.get("decoder") or {}).get("type")
    if model.get("type") == "BPE" and decoder == "ByteLevel" and not model.get("byte_fallback"):
        return "gpt2"
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "llama"
    raise GGUFExportError(f"tokenizer model {model.get('type')!r} (decoder {decoder!r}) has no llama.cpp form here: "
                          "GGUF export takes GPT-2-style byte-level BPE and SentencePiece-style BPE tokenizers")


def token_table(tok_dir: Path, vocab_size: int) -> tuple[str, list[str], list[int], list[float] | None]:
    """(tokenizer model, tokens, token types, scores or None) for llama.cpp from a tokenizer.json.

    GPT-2-style byte-level BPE -> "gpt2" (tokens as their byte-level strings; added special tokens CONTROL,
    other added tokens USER_DEFINED); SentencePiece-style BPE with byte fallback -> "llama" through gguf-py's
    LlamaHfVocab. Ids the model has beyond the tokenizer become unused [PADi] tokens.
    """
    tj = tokenizer_json(tok_dir)
    model, kind = tj.get("model") or {}, vocab_kind(tj)
    tokens: list = [None] * vocab_size
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    scores = None
    if kind == "gpt2":
        entries = [(i, text, gguf.TokenType.NORMAL) for text, i in model["vocab"].items()]
        entries += [(a["id"], a["content"], gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
                    for a in tj.get("added_tokens") or []]
    else:
        vocab = list(gguf.vocab.LlamaHfVocab(tok_dir).all_tokens())
        entries = [(i, text.decode("utf-8", errors="replace"), typ) for i, (text, _, typ) in enumerate(vocab)]
        scores = merge_scores(model, vocab_size)
    beyond = sorted(i for i, _, _ in entries if i >= vocab_size)
    if beyond:
        raise GGUFExportError(f"the tokenizer has ids up to {beyond[-1]}, beyond the model's vocabulary of {vocab_size}")
    for i, text, typ in entries:
        tokens[i], types[i] = text, int(typ)
    return kind, [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)], types, scores


def add_tokenizer(w: "gguf.GGUFWriter", art: Artifact, tok_dir: Path, pre: str | None) -> None:
    """tokenizer.ggml.* (model, pre-tokenizer when not None, tokens, types, merges, special ids) and the chat
    template."""
    cfg = ModelConfig.from_dict(art.model)
    kind, tokens, types, scores = token_table(tok_dir, cfg.vocab_size)
    w.add_tokenizer_model(kind)
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


def write_vocab(path: Path, art: Artifact, arch: str, tok_dir: Path, pre: str | None) -> None:
    """A GGUF with the hyperparameters and tokenizer of the export and no tensors: what llama.cpp needs to tokenize."""
    w = gguf.GGUFWriter(path, arch)
    with warnings.catch_warnings():  # the export itself warns about the context length once
        warnings.simplefilter("ignore")
        add_hparams(w, art, Plan(arch, "f32"), context_length(art, None))
    add_tokenizer(w, art, tok_dir, pre)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()


def choose_pre(art: Artifact, arch: str, tok_dir: Path, requested: str | None = None,
               texts: list[str] | None = None) -> str | None:
    """The llama.cpp pre-tokenizer that reproduces the artifact's Hugging Face tokenization (pretok.choose)."""
    return pretok.choose(lambda path, pre: write_vocab(path, art, arch, tok_dir, pre), tok_dir,
                         vocab_kind(tokenizer_json(tok_dir)), requested, source_config(art).get("pre"), texts)
