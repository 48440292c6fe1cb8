"""baseq-export: BASE-Q quantization of causal LMs and export to ONNX / GGUF.

The public API (api.py): quantize, export, evaluate, chat, plan, plan_of, load (and generate.Sampling); imported
on first use, so that `import baseq_export` stays light.
"""

__version__ = "0.1.0"
__all__ = ["quantize", "export", "evaluate", "chat", "plan", "plan_of", "load", "Plan", "Sampling"]


def __getattr__(name: str):
    if name == "Sampling":
        from .generate import Sampling

        return Sampling
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'baseq_export' has no attribute {name!r}")
