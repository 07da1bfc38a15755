"""Metrics, host timing, iPhone latency, and scoring an artifact in its runtime."""
