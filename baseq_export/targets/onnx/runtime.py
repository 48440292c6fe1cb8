"""An ONNX export in an onnxruntime session: logits, incremental decode steps, greedy generation."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ...models.base import ModelConfig, whole
from .model import KV_CACHE_CHOICES as KV_CACHES, kv_row_width

MODEL_FILE = "model.onnx"
KV4_MODEL_FILE = "model.kv4.onnx"  # the same model with the packed 4-bit KV cache, sharing model.onnx.data
DATA_FILE = "model.onnx.data"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "baseq-onnx"


def greedy_graph_file(model_file: str) -> str:
    """The last-position-logits twin of a graph file (model.kv4.onnx -> model.kv4.last.onnx), for greedy decoding."""
    return model_file[: -len(".onnx")] + ".last.onnx"


def read_manifest(path: str | Path) -> dict:
    """manifest.json of an export directory, checked (check_manifest), with a clear error when it is missing or
    damaged."""
    f = Path(path) / MANIFEST
    try:
        manifest = json.loads(f.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} has no {MANIFEST}: it is not a baseq ONNX export (make one with "
                                "`baseq-export export ARTIFACT`)") from None
    except ValueError as e:  # UnicodeDecodeError included
        raise ValueError(f"{f} is not valid JSON ({e}); export again") from e
    check_manifest(Path(path), manifest)
    return manifest


def inside(directory: Path, name: object) -> bool:
    """True when name is a plain relative file name that resolves to a file path inside directory."""
    if not isinstance(name, str) or not name or "\x00" in name or Path(name).is_absolute() or ".." in Path(name).parts:
        return False
    root = directory.resolve()
    return (root / name).resolve().is_relative_to(root)


def check_manifest(path: Path, manifest: object) -> None:
    """Every field of a manifest that is read has the type and range it is used as, and every file it names lies
    inside the export directory: else ValueError naming the file, the field and the fix."""
    where = path / MANIFEST

    def bad(field: str, what: str) -> ValueError:
        return ValueError(f"{where}: {field} {what}; the manifest is damaged or was edited: re-export it")

    if not isinstance(manifest, dict):
        raise bad("the top level", "is not a JSON object")
    if manifest.get("format", MANIFEST_FORMAT) != MANIFEST_FORMAT:  # checked before any field is trusted
        raise ValueError(f"{where}: format {manifest.get('format')!r} is not {MANIFEST_FORMAT!r}: {path} is not an ONNX "
                         "export of baseq-export (make one with `baseq-export export ARTIFACT`)")
    problem = ModelConfig.problem(manifest.get("model"))
    if problem:
        raise bad('"model"', f"is not a model config: it {problem}")
    files = manifest.get("files", [])
    if not isinstance(files, list) or not all(isinstance(x, str) for x in files):
        raise bad('"files"', "is not a list of file names")
    digests = manifest.get("digests", {})
    if not isinstance(digests, dict) or not all(
            isinstance(d, dict) and isinstance(d.get("bytes"), int) and isinstance(d.get("sha256"), str)
            for d in digests.values()):
        raise bad('"digests"', "is not a map of file name to {bytes, sha256}")
    runner = onnxruntime_graph(manifest)
    if not isinstance(runner, dict) or not isinstance(runner.get("model"), str) or \
            runner.get("kv_cache") not in KV_CACHES:
        raise bad('"onnxruntime"', f"is not {{model: a graph file, kv_cache: one of {', '.join(KV_CACHES)}}}")
    if manifest.get("kv_cache", "float") not in KV_CACHES:
        raise bad('"kv_cache"', f"is not one of {', '.join(KV_CACHES)}")
    if manifest.get("ops", "standard") not in ("custom", "standard"):
        raise bad('"ops"', "is not custom or standard")
    length = manifest.get("max_length")
    if length is not None and not whole(length):
        raise bad('"max_length"', "is not a positive whole number")
    for name in [*files, *digests, runner["model"]]:
        if not inside(path, name):
            raise bad(f"the file name {name!r}", "lies outside the export directory")


def genai_graph(manifest: dict) -> dict:
    """{model, kv_cache} of the graph genai runs (model.onnx, the export's own cache kind)."""
    return {"model": MODEL_FILE, "kv_cache": manifest.get("kv_cache", "float")}


def onnxruntime_graph(manifest: dict) -> dict:
    """{model, kv_cache} of the graph our onnxruntime runner opens by default: the manifest's "onnxruntime" entry
    where the export carries a second graph (packed KV cache), else genai's."""
    return manifest.get("onnxruntime", genai_graph(manifest))


def file_digests(path: Path, files: list[str]) -> dict[str, dict]:
    """Size and SHA-256 of each file of an export (written into its manifest, checked when it is opened)."""
    from ...tensor_files import sha256_file

    return {f: {"bytes": (path / f).stat().st_size, "sha256": sha256_file(path / f)} for f in files}


def verify_files(path: str | Path, manifest: dict) -> None:
    """Every file the manifest lists is there with its recorded size and checksum, else an error naming it
    (a copy cut short, a lost model.onnx.data, an op library from another build)."""
    path = Path(path)
    for name, want in manifest.get("digests", {}).items():
        f = path / name
        if not f.is_file():
            raise FileNotFoundError(f"{path} lacks {name}, which the export needs; copy the whole export directory "
                                    "again or re-export it")
        size = f.stat().st_size
        if size != want["bytes"]:
            raise ValueError(f"{f} has {size} bytes, the export wrote {want['bytes']}: it is truncated or replaced; "
                             "copy it again or re-export")
        from ...tensor_files import sha256_file

        if sha256_file(f) != want["sha256"]:
            kind = "an op library from another build" if name.endswith(".so") else "damaged"
            raise ValueError(f"{f} does not match the file the export wrote (checksum): it is {kind}; re-export it")


def open_session(path: Path, model_file: str, manifest: dict, threads: int | None = None):
    """An onnxruntime session on one graph of an export, with our op library registered where it was used."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    if manifest.get("ops") == "custom":
        libs = [f for f in manifest["files"] if f.endswith(".so")]
        if not libs or not (path / libs[0]).is_file():
            raise FileNotFoundError(f"{path} was exported with custom ops but its op library is missing; "
                                    "re-export it (or export with --ops standard)")
        opts.register_custom_ops_library(str((path / libs[0]).resolve()))
    try:
        return ort.InferenceSession(str(path / model_file), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ValueError(f"onnxruntime cannot open {path / model_file}: {e}") from e


class OnnxModel:
    """An exported model in an onnxruntime session (an export.Backend): logits, decode steps, greedy."""

    label = "onnxruntime"

    def __init__(self, path: str | Path, threads: int | None = None, kv_cache: str | None = None):
        """kv_cache: run the export's graph with this cache ("float": the genai graph; "int4": packed), default
        the export's onnxruntime graph (packed when the export carries one)."""
        path = Path(path)
        manifest = read_manifest(path)
        self.config = ModelConfig.from_dict(manifest["model"])
        # an export may carry a second graph for onnxruntime (packed KV cache) beside genai's float-cache one
        main, runner = genai_graph(manifest), onnxruntime_graph(manifest)
        if kv_cache not in (None, runner["kv_cache"]):
            if kv_cache != main["kv_cache"]:
                raise ValueError(f"{path} has no graph with a {kv_cache} KV cache; export it with --kv-cache {kv_cache}")
            runner = main
        self.kv_cache, self.model_file = runner["kv_cache"], runner["model"]
        # the C++ decoder's graph: its last-position-logits twin where the export has one (a prompt then skips the
        # head on every other position)
        twin = greedy_graph_file(self.model_file)
        self.greedy_file = twin if twin in manifest.get("files", []) else self.model_file
        self.shares_buffer = manifest.get("ops") == "custom"  # our attention ops write into a longer past in place
        self.max_length = int(manifest.get("max_length") or 0)
        verify_files(path, manifest)
        self.path, self.manifest, self.threads = path, manifest, threads
        self._session = None
        self._native = None  # the C++ decoder, opened on first greedy() and reused (native_decoder)
        self._native_refused = False  # it could not open here: not tried (nor warned about) again

    @property
    def session(self):
        """The Python onnxruntime session, opened on first use: greedy decoding in C++ needs none."""
        if self._session is None:
            self._session = open_session(self.path, self.model_file, self.manifest, self.threads)
        return self._session

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        cfg = self.config
        dtype = np.float32 if self.kv_cache == "float" else np.uint8
        empty = np.zeros((batch, cfg.num_kv_heads, 0, kv_row_width(cfg, self.kv_cache)), dtype)
        return {f"past_key_values.{i}.{kind}": empty for i in range(cfg.num_layers) for kind in ("key", "value")}

    def step(self, ids: np.ndarray, past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits for ids [B, T] after `past`, and the cache that includes them."""
        total = ids.shape[1] + next(iter(past.values())).shape[2]
        if self.max_length and total > self.max_length:
            raise ValueError(f"{total} tokens exceed this export's context of {self.max_length} (its RoPE tables): "
                             "export again with a larger --max-length")
        mask = np.ones((ids.shape[0], total), np.int64)
        outs = self.session.run(None, {"input_ids": ids.astype(np.int64), "attention_mask": mask, **past})
        names = [o.name for o in self.session.get_outputs()]
        result = dict(zip(names, outs))
        present = {n.replace("present.", "past_key_values."): v for n, v in result.items() if n.startswith("present.")}
        return result["logits"], present

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.step(ids.numpy(), self.empty_cache(ids.shape[0]))
        return torch.from_numpy(out)

    def generate(self, prompt_ids: list[int], max_new_tokens: int | None = None,
                 choose: Callable[[torch.Tensor], int] | None = None) -> Iterator[int]:
        """Tokens after prompt_ids picked by choose from each step's logits (None: greedy, the C++ decoder)."""
        from ...generate import onnx_stepper, token_stream

        if choose is None:
            return self.greedy(prompt_ids, max_new_tokens)
        room = self.room(len(prompt_ids), max_new_tokens)
        if not self.shares_buffer:
            return itertools.islice(token_stream(onnx_stepper(self), prompt_ids, choose), room)
        return itertools.islice(token_stream(buffer_stepper(self, len(prompt_ids) + room), prompt_ids, choose), room)

    def room(self, n_prompt: int, max_new_tokens: int | None) -> int:
        """New tokens after a prompt of n_prompt: max_new_tokens, ending where the export's context does (as
        llama.cpp's generation ends at its context); a prompt that fills the context is refused."""
        left = self.max_length - n_prompt if self.max_length else None
        if left is not None and left < 1:
            raise ValueError(f"the prompt's {n_prompt} tokens fill this export's context of {self.max_length}: "
                             "export again with a larger --max-length")
        if max_new_tokens is None:
            return left if left is not None else 512
        return max_new_tokens if left is None else min(max_new_tokens, left)

    def greedy(self, prompt_ids: list[int], max_new_tokens: int | None = None, native: bool = True) -> Iterator[int]:
        """Greedy tokens after prompt_ids. Where the export's attention ops write the KV cache in place, the
        C++ decoder (native.py) runs the loop unless native=False or it cannot load here; then Python steps
        on the same shared buffer. All paths give the same tokens."""
        from ...generate import greedy_stream, onnx_stepper

        room = self.room(len(prompt_ids), max_new_tokens)
        if not self.shares_buffer:
            return itertools.islice(greedy_stream(onnx_stepper(self), prompt_ids), room)
        if native:
            decoder = self.native_decoder(len(prompt_ids) + room)
            if decoder is not None:
                return itertools.islice(native_stream(decoder, prompt_ids), room)
        return itertools.islice(greedy_stream(buffer_stepper(self, len(prompt_ids) + room), prompt_ids), room)

    def native_decoder(self, capacity: int):
        """This model's C++ greedy decoder (native.NativeGreedy), reset for a new sequence of up to
        `capacity` tokens, or None where it cannot run here (tried once: a refusal is remembered, so its warning
        comes once). One session serves every sequence; it is reopened only for a longer KV buffer."""
        from .native import open_native

        if self._native_refused:
            return None
        if self._native is not None and self._native.capacity >= capacity:
            self._native.reset()
            return self._native
        if self._native is not None:
            self._native.close()
        self._native = open_native(self.path, self.greedy_file, self.manifest, self.threads, capacity)
        self._native_refused = self._native is None
        return self._native


def native_stream(decoder, prompt_ids: list[int]) -> Iterator[int]:
    """Greedy tokens from a C++ decoder, one graph run each; stops with an error if another sequence took the
    decoder over (a second greedy() on the same model while this one is read)."""
    sequence = decoder.sequence
    token = decoder.step(prompt_ids)
    while True:
        yield token
        if decoder.sequence != sequence:
            raise RuntimeError("another greedy() on this model started a new sequence in its decoder; read one "
                               "generation at a time per OnnxModel (or open a second OnnxModel)")
        token = decoder.step([token])


def buffer_stepper(model: OnnxModel, capacity: int):
    """Decode steps on one KV buffer per layer of `capacity` rows that the attention ops write in place: the past
    input and the present output are bound to the same memory (onnxruntime IO binding, as onnxruntime-genai's
    shared past/present buffer), so no step copies the cache. The same logits as the growing cache."""
    import onnxruntime as ort

    cfg = model.config
    dtype = np.float32 if model.kv_cache == "float" else np.uint8
    shape = (1, cfg.num_kv_heads, capacity, kv_row_width(cfg, model.kv_cache))
    binding = model.session.io_binding()
    binding.bind_output("logits")  # output 0 of the binding (outputs come back in binding order)
    # A one-token step reads its id from `one_id`, its mask from a view of `ones` and writes its logits into
    # `logits_one`: no allocation and no copy per decoded token. The returned logits share `logits_one`'s memory
    # until the next step (generate.Step).
    one_id = np.zeros((1, 1), np.int64)
    one_id_value = ort.OrtValue.ortvalue_from_numpy(one_id)
    logits_one = np.empty((1, 1, cfg.vocab_size), np.float32)
    logits_value = ort.OrtValue.ortvalue_from_numpy(logits_one)
    ones = np.ones((1, capacity), dtype=np.int64)
    buffers = []
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            buf = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype))
            binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", buf)
            binding.bind_ortvalue_output(f"present.{i}.{kind}", buf)
            buffers.append(buf)  # kept alive as long as the stepper
    seen = [0]

    def step(ids: list[int]) -> torch.Tensor:
        if seen[0] + len(ids) > capacity:
            raise ValueError(f"the KV buffer holds {capacity} tokens; generate fewer tokens or export with a larger "
                             "--max-length")
        seen[0] += len(ids)
        binding.bind_ortvalue_input("attention_mask", ort.OrtValue.ortvalue_from_numpy(ones[:, : seen[0]]))
        if len(ids) == 1:
            one_id[0, 0] = ids[0]
            binding.bind_ortvalue_input("input_ids", one_id_value)
            binding.bind_ortvalue_output("logits", logits_value)
            model.session.run_with_iobinding(binding)
            return torch.from_numpy(logits_one[0, -1])
        binding.bind_cpu_input("input_ids", np.array([ids], dtype=np.int64))
        binding.bind_output("logits")  # a prompt: its length follows the step's tokens
        model.session.run_with_iobinding(binding)
        return torch.from_numpy(binding.get_outputs()[0].numpy()[0, -1])

    step.buffers = buffers
    return step
