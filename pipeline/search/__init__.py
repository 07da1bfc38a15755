"""Searches over quantization choices, measured in each artifact's own runtime."""
