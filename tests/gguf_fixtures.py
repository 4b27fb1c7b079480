"""Fixture GGUF files made with gguf's GGUFWriter and llama.cpp's llama-quantize (to be written)."""
