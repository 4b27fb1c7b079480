"""qreg: a model registry and distribution tool for the GGUF files of Qwen3-Embedding-0.6B."""

__version__ = "0.1.0"
