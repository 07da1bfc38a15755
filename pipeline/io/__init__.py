"""Checkpoints, downloads, data folders, listings and hashing of inputs."""
