"""Device names: one resolution of "auto" for every stage that runs a model (torch imported on first call, so
that CLI modules can import this cheaply)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lutq.core.errors import LutqError

if TYPE_CHECKING:
    import torch

DEVICE_HELP = "cpu, cuda, cuda:N, mps or auto (CUDA when present)."


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else is passed to torch.device (cuda checked)."""
    import torch

    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise LutqError(f"unknown device {device!r} (cpu, cuda, cuda:N, mps or auto)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LutqError(f"device {device!r}: this torch sees no CUDA device ({torch.__version__})")
    return dev
