"""Export targets behind one seam: the CLI knows only this module, each format is one module.

A target module (``export/onnx.py``, ``export/gguf.py``) provides:

    NAME                     the --format value
    BACKENDS                 names of the runtimes that run its exports (the first is the default)
    add_arguments(p, sub)    its own command-line options (sub=True: defaults are argparse.SUPPRESS)
    options(args)            those options as keywords for write() and open()
    check_artifact(art)      raise ValueError naming the problem and the fix if art cannot be written
    is_export(path)          True for an export this target wrote
    write(artifact, out, force=False, **options) -> Path       atomic; replaces only its own exports
    open(path, backend=None, **options) -> Backend             a runner for eval and run
    main_job_settings(args)  quantization settings the main job uses for this format (a dict of
                             argparse names -> values, used where the command line left the default)
    default_out(stem)        the default export path for an artifact or model named stem
    describe(path)           one line saying what an export holds, for the main job's summary
    diagnose(path)           raise an error naming the damage if path looks like its export but is unreadable

A Backend has ``label``, ``logits(ids [B, T]) -> [B, T, vocab]`` (a fresh context per call) and
``greedy(prompt_ids, max_new_tokens=None) -> Iterator[int]`` (the argmax continuation; the
bound lets runtimes that allocate ahead size their buffers). A new format is one new module
named in TARGETS, and nothing else.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from types import ModuleType
from typing import Iterator, Protocol

import torch

TARGETS = ("onnx", "gguf")


class Backend(Protocol):
    """A runnable model: an artifact in the torch reference, or an export in its runtime."""

    label: str

    def logits(self, ids: torch.Tensor) -> torch.Tensor: ...

    def greedy(self, prompt_ids: list[int], max_new_tokens: int | None = None) -> Iterator[int]: ...


def option_default(value, sub: bool):
    """A CLI option's default: the value on the main parser, SUPPRESS on a subcommand, so `baseq-export --x V sub`
    and `baseq-export sub --x V` mean the same and a subcommand never masks the main parser's value."""
    return argparse.SUPPRESS if sub else value


def target(name: str) -> ModuleType:
    """The target module for a --format value."""
    if name not in TARGETS:
        raise ValueError(f"unknown export format {name!r}; choose one of {', '.join(TARGETS)}")
    return importlib.import_module(f"{__name__}.{name}")


def all_targets() -> list[ModuleType]:
    return [target(name) for name in TARGETS]


def find_target(path: str | Path) -> ModuleType | None:
    """The target that wrote the export at path, or None if path is no export of ours."""
    return next((t for t in all_targets() if t.is_export(path)), None)


class TorchBackend:
    """A .baseq artifact in its PyTorch reference forward (the oracle every export is compared to)."""

    def __init__(self, path: str | Path, device: torch.device | None = None):
        from ..artifact import load_artifact
        from ..reference import reference_model

        art = load_artifact(path)
        self.model = reference_model(art, device=device)
        self.device = self.model.device
        self.label = f"{art.quant['method']} {art.quant['bits']} (torch reference)"

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.logits(ids.to(self.device)).cpu()

    def greedy(self, prompt_ids: list[int], max_new_tokens: int | None = None) -> Iterator[int]:
        from ..generate import greedy_stream, torch_stepper

        return greedy_stream(torch_stepper(self.model), prompt_ids)


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
