"""Choosing the torch device (one place for the extractor and the trainer)."""

from __future__ import annotations

import torch

from wsi_mil.errors import WsiMilError


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` = cuda > mps > cpu; an explicitly requested device that is missing is an error."""
    if isinstance(name, torch.device):
        return name
    name = str(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise WsiMilError(f"device '{name}' was requested but no CUDA device is visible; use device auto or cpu.")
    if name == "mps" and not _mps_available():
        raise WsiMilError("device 'mps' was requested but MPS is not available; use device auto or cpu.")
    return torch.device(name)
