"""Export targets behind one seam: the CLI and the API know only this module, each format is one sub-package.

A target (``targets/onnx/``, ``targets/gguf/``) is a sub-package whose ``__init__`` provides what `Target`
names: its --format value, the runtimes that run its exports, its command-line options, write() of a loaded
artifact, and open() / is_export() / describe() / diagnose() for the files it wrote. A Backend has ``label``,
``logits(ids [B, T]) -> [B, T, vocab]`` (a fresh context per call), ``greedy(prompt_ids, max_new_tokens=None)
-> Iterator[int]`` (the argmax continuation; the bound lets runtimes that allocate ahead size their buffers) and
``generate(prompt_ids, max_new_tokens=None, choose=None)``, the same with the next token picked by ``choose``
from each step's logits (generate.Sampling.chooser(); None is greedy).
A new format is one new sub-package named in TARGETS, and nothing else.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Callable, Iterator, Protocol, cast

import torch

from ..artifact import Artifact, load_artifact

TARGETS = ("onnx", "gguf")


class Backend(Protocol):
    """A runnable model: an artifact in the torch reference, or an export in its runtime."""

    label: str

    def logits(self, ids: torch.Tensor) -> torch.Tensor: ...

    def greedy(self, prompt_ids: list[int], max_new_tokens: int | None = None) -> Iterator[int]: ...

    def generate(self, prompt_ids: list[int], max_new_tokens: int | None = None,
                 choose: Callable[[torch.Tensor], int] | None = None) -> Iterator[int]: ...


class Target(Protocol):
    """What an export target's sub-package provides (its module-level names; `self` is the module)."""

    NAME: str  # the --format value
    BACKENDS: tuple[str, ...]  # the runtimes that run its exports, the first the default

    def add_arguments(self, p: argparse.ArgumentParser, sub: bool = False) -> None:
        """Its own command-line options (sub=True: defaults are argparse.SUPPRESS, see option_default)."""

    def options(self, args: argparse.Namespace) -> dict:
        """Those options of a parsed command line as keywords for write() and open()."""

    def main_job_settings(self, args: argparse.Namespace) -> dict:
        """Quantization settings the main job uses for this format (argparse names -> values, used where the
        command line left the default)."""

    def default_out(self, stem: str) -> str:
        """The default export path for an artifact or model named stem."""

    def check_artifact(self, art: Artifact) -> None:
        """Raise ValueError naming the problem and the fix if art cannot be written in this format."""

    def write(self, artifact: Artifact | str | Path, out: str | Path, force: bool = False, **options) -> Path:
        """Write a loaded artifact (or the .baseq directory at a path, loaded lazily) to out, atomically;
        an existing out is replaced only with force, and only when it is an export of this target."""

    def is_export(self, path: str | Path) -> bool:
        """True for an export this target wrote."""

    def open(self, path: str | Path, backend: str | None = None, **options) -> Backend:
        """A runner of the export at path for eval and run, in one of BACKENDS (default the first)."""

    def describe(self, path: str | Path) -> str:
        """One line saying what an export holds, for the main job's summary."""

    def diagnose(self, path: str | Path) -> None:
        """Raise an error naming the damage if path looks like this target's export but is unreadable."""


def loaded(artifact: Artifact | str | Path) -> Artifact:
    """The artifact a writer works on: a loaded one as it is, a path loaded lazily (a tensor read when asked)."""
    return artifact if isinstance(artifact, Artifact) else load_artifact(artifact, lazy=True)


def option_default(value, sub: bool):
    """A CLI option's default: the value on the main parser, SUPPRESS on a subcommand, so `baseq-export --x V sub`
    and `baseq-export sub --x V` mean the same and a subcommand never masks the main parser's value."""
    return argparse.SUPPRESS if sub else value


def target(name: str) -> Target:
    """The target sub-package for a --format value."""
    if name not in TARGETS:
        raise ValueError(f"unknown export format {name!r}; choose one of {', '.join(TARGETS)}")
    return cast(Target, importlib.import_module(f"{__name__}.{name}"))


def all_targets() -> list[Target]:
    """Every target, in TARGETS order."""
    return [target(name) for name in TARGETS]


def find_target(path: str | Path) -> Target | None:
    """The target that wrote the export at path, or None if path is no export of ours."""
    return next((t for t in all_targets() if t.is_export(path)), None)


class TorchBackend:
    """A .baseq artifact in its PyTorch reference forward (the oracle every export is compared to)."""

    def __init__(self, path: str | Path, device: torch.device | None = None):
        from ..reference import reference_model

        art = load_artifact(path)
        self.model = reference_model(art, device=device)
        self.device = self.model.device
        self.label = f"{art.quant['method']} {art.quant['bits']} (torch reference)"

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.logits(ids.to(self.device)).cpu()

    def greedy(self, prompt_ids: list[int], max_new_tokens: int | None = None) -> Iterator[int]:
        return self.generate(prompt_ids, max_new_tokens)

    def generate(self, prompt_ids: list[int], max_new_tokens: int | None = None,
                 choose: Callable[[torch.Tensor], int] | None = None) -> Iterator[int]:
        from ..generate import argmax_token, token_stream, torch_stepper

        return token_stream(torch_stepper(self.model), prompt_ids, choose or argmax_token)


class FloatBackend:
    """The unquantized model (--model M, no artifact) in the float forward: the baseline a user compares with."""

    def __init__(self, model):
        """model: a name for models.load_model, or a LoadedModel (its weights read into memory if lazy)."""
        from ..models import LoadedModel, load_model

        m = model if isinstance(model, LoadedModel) else load_model(model)
        if hasattr(m.weights, "read_all"):
            m = LoadedModel(**{**m.__dict__, "weights": m.weights.read_all()})
        self.model = m
        self.label = "FP (torch)"

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        from ..models.base import forward

        with torch.inference_mode():
            return forward(self.model.config, self.model.weights, ids)

    def greedy(self, prompt_ids: list[int], max_new_tokens: int | None = None) -> Iterator[int]:
        return self.generate(prompt_ids, max_new_tokens)

    def generate(self, prompt_ids: list[int], max_new_tokens: int | None = None,
                 choose: Callable[[torch.Tensor], int] | None = None) -> Iterator[int]:
        from ..generate import argmax_token, token_stream
        from ..models.base import forward, new_cache

        cache = new_cache(self.model.config)

        @torch.inference_mode()
        def step(ids: list[int]) -> torch.Tensor:
            return forward(self.model.config, self.model.weights, torch.tensor([ids]), cache=cache)[0, -1]

        return token_stream(step, prompt_ids, choose or argmax_token)


OPTIONAL_BACKENDS = {"onnxruntime-genai": ("onnxruntime_genai", "onnxruntime-genai")}
"""Backends whose Python package the base install does not bring: backend -> (module, pip package)."""


def install_hint(backend: str) -> str | None:
    """`pip install PACKAGE` when the backend's package is not installed here, else None."""
    import importlib.util

    module, package = OPTIONAL_BACKENDS.get(backend, (None, None))
    return None if module is None or importlib.util.find_spec(module) else f"pip install {package}"


def backend_names() -> tuple[str, ...]:
    """Every backend name: torch (artifacts) and each target's runtimes."""
    return ("torch",) + tuple(b for t in all_targets() for b in t.BACKENDS)


def open_backend(path: str | Path, backend: str | None = None, **options) -> Backend:
    """A runner for path: the torch reference for an artifact, the export's runtime for an export."""
    t = find_target(path)
    if t is None:  # a damaged export (its target names the damage), an artifact, or else load_artifact says what is wrong
        for candidate in all_targets():
            candidate.diagnose(path)
        if not Path(path).exists():
            raise FileNotFoundError(f"{path} does not exist: pass a .baseq artifact or an export of ours "
                                    f"({', '.join(TARGETS)}), made by `baseq-export quantize` / `baseq-export export`")
        if backend not in (None, "torch"):
            raise ValueError(f"{path} is a .baseq artifact, which runs in the torch reference; backend {backend!r} "
                             "runs exports: make one with `baseq-export export ARTIFACT --format ...`")
        return TorchBackend(path, options.get("device"))
    if backend == "torch":
        raise ValueError(f"{path} is a {t.NAME} export: use --backend {' or '.join(t.BACKENDS)}, "
                         "or pass the .baseq artifact for the torch reference")
    if backend is not None and backend not in t.BACKENDS:
        raise ValueError(f"{path} is a {t.NAME} export, which runs in {', '.join(t.BACKENDS)}, not {backend!r}")
    options.pop("device", None)  # an export runs in its runtime's own place
    return t.open(path, backend, **options)
