"""Checks of a checkpoint against what it will be used for, before any work starts: the weight files are ones we
read (safetensors, never pickle), every tensor has the shape its config.json implies (transformers' own model of
that config on the meta device says which), and the tokenizer's ids all have an embedding row.

Each check raises models.ModelLoadError with one line that names the file, the field and the fix.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from .base import whole

PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "pytorch_model.bin.index.json")


def _error(message: str):
    from . import ModelLoadError

    return ModelLoadError(message)


def convert_command(directory: Path) -> str:
    """The one line that converts a pickle checkpoint to safetensors (the user runs it, trusting the file)."""
    out = f"{directory}-safetensors"
    return (f"python -c \"import transformers as t; d, o = '{directory}', '{out}'; "
            "t.AutoModelForCausalLM.from_pretrained(d).save_pretrained(o); "
            "t.AutoTokenizer.from_pretrained(d).save_pretrained(o)\"")


DIMENSIONS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
OPTIONAL_DIMENSIONS = ("num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")


def number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_config_fields(config: object, where: Path) -> None:
    """The fields of a checkpoint's config.json the forward is built from have the types and ranges it needs."""
    def bad(field: str, value: object, want: str):
        return _error(f"{where}: {field} is {value!r}, not {want}; use the checkpoint's own config.json")

    if not isinstance(config, dict):
        raise _error(f"{where} is not a JSON object; use the checkpoint's own config.json")
    if not isinstance(config.get("model_type"), str):
        raise bad("model_type", config.get("model_type"), "an architecture name")
    for field in DIMENSIONS:
        if not whole(config.get(field)):
            raise bad(field, config.get(field), "a positive whole number")
    for field in OPTIONAL_DIMENSIONS:
        if config.get(field) is not None and not whole(config[field]):
            raise bad(field, config[field], "a positive whole number or absent")
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    if heads % kv:
        raise bad("num_key_value_heads", kv, f"a divisor of num_attention_heads ({heads})")
    if config.get("head_dim") is None and config["hidden_size"] % heads:
        raise bad("hidden_size", config["hidden_size"], f"a multiple of num_attention_heads ({heads}) without head_dim")
    eps = config.get("rms_norm_eps", 1e-6)
    if not (number(eps) and 0 < eps < 1):
        raise bad("rms_norm_eps", eps, "a number between 0 and 1")
    for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ids = config.get(field)
        ids = ids if isinstance(ids, list) else [ids]
        if not all(i is None or (isinstance(i, int) and not isinstance(i, bool) and 0 <= i < config["vocab_size"])
                   for i in ids):
            raise bad(field, config.get(field), f"a token id below vocab_size ({config['vocab_size']}) or absent")
    for field in ("rope_theta",):
        if config.get(field) is not None and not (number(config[field]) and config[field] > 0):
            raise bad(field, config[field], "a positive number")
    for field in ("rope_parameters", "rope_scaling"):
        if config.get(field) is not None and not isinstance(config[field], dict):
            raise bad(field, config[field], "an object or absent")
    for field, kind, want in (("tie_word_embeddings", bool, "true or false"), ("hidden_act", str, "a name"),
                              ("attention_bias", bool, "true or false"), ("mlp_bias", bool, "true or false")):
        if config.get(field) is not None and not isinstance(config[field], kind):
            raise bad(field, config[field], want)


def check_not_pickle_only(directory: Path) -> None:
    """A checkpoint directory without safetensors weights: name pickle files as such (they are never opened:
    unpickling can run code) and give the conversion, instead of calling every tensor missing."""
    if (directory / "model.safetensors.index.json").is_file() or any(directory.glob("*.safetensors")):
        return
    pickles = sorted({p.name for pattern in PICKLE_PATTERNS for p in directory.glob(pattern)})
    if pickles:
        raise _error(f"{directory} holds its weights only in pickle files ({', '.join(pickles[:3])}): baseq-export does "
                     f"not read pickle, since loading one can run code. If you trust the file, convert it once to "
                     f"safetensors and pass the new directory: {convert_command(directory)}")
    raise _error(f"{directory} has no weight files (*.safetensors or model.safetensors.index.json): "
                 "download the complete checkpoint")


def config_fields(hf_config) -> dict[str, int]:
    """The config.json fields (or products of them) that set a weight's dimensions, by name."""
    c = hf_config
    heads = getattr(c, "num_attention_heads", None)
    head_dim = getattr(c, "head_dim", None) or (c.hidden_size // heads if heads else None)
    kv = getattr(c, "num_key_value_heads", None) or heads
    fields = {"hidden_size": getattr(c, "hidden_size", None), "intermediate_size": getattr(c, "intermediate_size", None),
              "vocab_size": getattr(c, "vocab_size", None)}
    if heads and head_dim:
        fields["num_attention_heads x head_dim"] = heads * head_dim
        fields["num_key_value_heads x head_dim"] = kv * head_dim
    return {k: v for k, v in fields.items() if isinstance(v, int)}


CONFIG_FIX = "the config does not belong to these weights; use the checkpoint's own config.json or correct those fields"


def shape_mismatch(name: str, found: list[int], want: list[int], fields: dict[str, int],
                   implied_by: str = "config.json", fix: str = CONFIG_FIX) -> str | None:
    """The refusal text for one tensor whose shape is not the one its config (implied_by) gives, or None when they
    agree."""
    if list(found) == list(want):
        return None
    setting = sorted({f"{k} = {v}" for i, w in enumerate(want) if i >= len(found) or found[i] != w
                      for k, v in fields.items() if v == w})
    why = f" ({', '.join(setting)})" if setting else ""
    return f"tensor {name} has shape {list(found)} but {implied_by} implies {list(want)}{why}: {fix}"


def checkpoint_shapes(directory: Path) -> dict[str, tuple[str, list[int]]]:
    """Tensor name -> (file name, shape) of every safetensors file of a checkpoint, from the headers alone."""
    from ..tensor_files import tensor_index

    index = directory / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else sorted(p.name for p in directory.glob("*.safetensors")))
    shapes = {}
    for f in files:
        shapes.update({k: (f, shape) for k, (_, shape) in tensor_index(directory / f).items()})
    return shapes


def check_shapes(directory: Path, hf_config, shell) -> None:
    """Every tensor the checkpoint and transformers' model of its config (shell, on the meta device) both name has
    the model's shape. Tensors only one of them has are left to the loaders' missing / unexpected refusals."""
    want = {k: list(v.shape) for k, v in shell.state_dict().items()}
    fields = config_fields(hf_config)
    for name, (file, found) in checkpoint_shapes(directory).items():
        if name in want:
            problem = shape_mismatch(name, found, want[name], fields)
            if problem:
                raise _error(f"{directory / file}: {problem}")


LAYER_INDEX = re.compile(r"(?:^|\.)(layers|blk)\.(\d+)\.")  # transformers' and llama.cpp's tensor names


def layers_held(names) -> int:
    """How many decoder layers tensors of these names hold (the highest layer index + 1; 0 if none)."""
    found = [int(m.group(2)) for name in names if (m := LAYER_INDEX.search(name))]
    return max(found) + 1 if found else 0


def check_layer_count(directory: Path, layers: int) -> None:
    """config.json's num_hidden_layers matches the layers the checkpoint's tensors hold, checked before a model of
    the config is built (a config claiming millions of layers would otherwise take that long to build)."""
    held = layers_held(checkpoint_shapes(directory))
    if layers != held:
        span = f" (layers.0 to layers.{held - 1})" if held else ""
        raise _error(f"{directory / 'config.json'}: num_hidden_layers is {layers} but the checkpoint's tensors hold "
                     f"{held} layers{span}; use the checkpoint's own config.json")


def check_gguf_layer_count(path: Path) -> None:
    """The same for a GGUF: its <arch>.block_count against its blk.N tensors, before transformers reads the file."""
    from ..gguf_file import read_header

    arch = read_header(path, {"general.architecture"}).values.get("general.architecture")
    if not isinstance(arch, str):
        return  # transformers' reader refuses the file, naming it
    header = read_header(path, {f"{arch}.block_count"})
    layers = header.values.get(f"{arch}.block_count")
    held = layers_held(t.name for t in header.tensors)
    if layers != held:
        raise _error(f"{path}: {arch}.block_count is {layers!r} but the file's tensors hold {held} layers; use the "
                     "GGUF as llama.cpp's converter wrote it")


def check_tokenizer(tokenizer, vocab_size: int, where: str) -> None:
    """Every id the tokenizer can produce (added tokens included) has a row in the embedding."""
    n = len(tokenizer) if tokenizer is not None else 0
    if n > vocab_size:
        raise _error(f"{where}: the tokenizer has {n} tokens (added tokens included) but the embedding has "
                     f"{vocab_size} rows (config.json vocab_size), so ids {vocab_size}..{n - 1} have no embedding: use "
                     "the tokenizer that came with these weights, or resize the embedding and vocab_size to match")
