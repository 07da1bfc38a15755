"""Files the package ships: ImageNet class names, the iPhone latency fit data, the RepViTBench app."""
from pathlib import Path

RESOURCES = Path(__file__).resolve().parent
