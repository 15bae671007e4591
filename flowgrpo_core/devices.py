"""Device and dtype names (``auto`` = CUDA when there is one), checked against what this machine has."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def available_devices() -> list[str]:
    """The device names this torch build can use here: ``cpu``, ``cuda:0`` .. ``cuda:N-1``, ``mps``."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        names.append("mps")
    return names


def require_device(device: str = "auto", field: str = "device") -> torch.device:
    """The torch device ``device`` names (``auto``: the first GPU, else the CPU), refused unless it exists
    here: a GPU named on a machine or torch build without one must fail at start, with what there is
    instead, not deep inside the first tensor moved to it. ``field`` names the setting in the message."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    available = available_devices()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda", "mps"):
        raise ValueError(
            f"{field}: {device!r} is not a usable device name (auto, cpu, cuda, cuda:N or mps); "
            f"this machine has: {', '.join(available)}"
        )
    wanted = {"cpu": "cpu", "cuda": f"cuda:{resolved.index or 0}", "mps": "mps"}[resolved.type]
    if wanted not in available:
        raise ValueError(
            f"{field}: device {device!r} is not available ({_missing(resolved.type)}); "
            f"available devices: {', '.join(available)}"
        )
    return resolved


def _missing(kind: str) -> str:
    """Why a ``cuda`` or ``mps`` device is not there."""
    if kind == "mps":
        return "Apple's MPS is not available here"
    if not torch.backends.cuda.is_built():
        return "this torch build has no CUDA support"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return f"this machine has {torch.cuda.device_count()} CUDA GPU(s)"


def torch_device(device: str = "auto") -> torch.device:
    return require_device(device)


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]
