"""Quantization: the scheme table's consumers, range statistics, sensitivity, fake quantization and QAT training."""
