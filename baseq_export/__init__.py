"""baseq-export: BASE-Q quantization of causal LMs and export to ONNX / GGUF."""

__version__ = "0.1.0"
