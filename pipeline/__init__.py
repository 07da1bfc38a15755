"""RepViT to app-ready on-device models, with proof of what each step cost."""
__version__ = "0.1.0"
