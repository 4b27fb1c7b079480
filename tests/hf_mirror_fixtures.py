"""Pytest fixtures that start the loopback Hugging Face mirror (to be written)."""
