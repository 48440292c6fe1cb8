"""Where calibration and evaluation run: `--device cpu|cuda|auto`. Weights are read and rotated on the CPU and
moved to the device one block at a time; the artifact is written from the CPU. One code path for both."""

from __future__ import annotations

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for --device: auto = the first CUDA GPU when PyTorch sees one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"--device must be one of {', '.join(DEVICE_CHOICES)} (or cuda:N), got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this PyTorch sees no CUDA GPU (torch {torch.__version__}, "
                         f"torch.cuda.is_available() is False; the pinned CPU build has no CUDA): use --device cpu, "
                         "or install a CUDA build of the same torch version")
    return torch.device(name)
