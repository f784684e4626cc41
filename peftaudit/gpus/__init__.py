"""GPUs: the bundled catalog with sourced figures, user overrides, and sizing answers."""

from peftaudit.gpus.catalog import GPU, find_gpu, gpus

__all__ = ["GPU", "find_gpu", "gpus"]
