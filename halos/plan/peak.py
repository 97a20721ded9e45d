"""The trainer's peak memory, recorded in halos_training.json so the leaderboard shows it."""

from __future__ import annotations

import resource
import sys


def peak_memory() -> dict[str, float]:
    """Max RSS of this process (MB) and, on a GPU, the peak memory torch allocated (MB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak = {"max_rss_mb": round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)}
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["gpu_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak
