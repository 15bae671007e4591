"""Resumable checkpoints: everything an exact resume needs, written atomically.

Layout of ``<run>/checkpoints/epoch-000012/``:
    policy.safetensors     trainable weights (LoRA or full), by parameter name
    ema.safetensors        the EMA shadow weights (when EMA is on)
    trainer_state.pt       optimiser, stat tracker, RNG states, counters, metric history
    config.yaml            the resolved config the run was started with

A checkpoint is written to ``epoch-000012.tmp`` and renamed when complete, so a crash mid-write
never leaves a half checkpoint that looks valid. ``trainer_state.pt`` holds only tensors and plain
containers and is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from flowgrpo_core.config import flatten

_NAME = re.compile(r"^epoch-(\d{6})$")


def checkpoint_name(epoch: int) -> str:
    return f"epoch-{epoch:06d}"


def checkpoint_epoch(path: str | os.PathLike) -> int:
    """The epoch a checkpoint folder holds (epochs done), from its name."""
    match = _NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint folder (epoch-NNNNNN)")
    return int(match.group(1))


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [
        p
        for p in directory.iterdir()
        if p.is_dir() and _NAME.match(p.name) and (p / "trainer_state.pt").is_file()
    ]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    random.setstate(_python_state_from_plain(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def staging_dir(directory: str | os.PathLike, epoch: int, fresh: bool = True) -> Path:
    """The ``.tmp`` folder checkpoint ``epoch`` is written to before it is renamed into place."""
    tmp = Path(directory) / (checkpoint_name(epoch) + ".tmp")
    if fresh:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    return tmp


def save_checkpoint(
    directory: str | os.PathLike,
    epoch: int,
    policy: dict[str, torch.Tensor],
    trainer_state: dict[str, Any],
    config_yaml: str,
    ema: dict[str, torch.Tensor] | None = None,
    keep: int = 2,
    staged: bool = False,
) -> Path:
    """Write checkpoint ``epoch`` atomically and prune to the newest ``keep``. ``staged``: the staging folder
    already holds files written by other processes (DeepSpeed's per-rank state) and is kept."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / checkpoint_name(epoch)
    tmp = staging_dir(directory, epoch, fresh=not staged)
    save_file({k: v.detach().contiguous().cpu() for k, v in policy.items()}, str(tmp / "policy.safetensors"))
    if ema is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
    torch.save(trainer_state, tmp / "trainer_state.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``{"policy", "ema" (or None), "state", "config_yaml"}`` of a checkpoint folder."""
    path = Path(path)
    if not (path / "trainer_state.pt").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no trainer_state.pt)")
    return {
        "policy": load_file(str(path / "policy.safetensors")),
        "ema": load_file(str(path / "ema.safetensors")) if (path / "ema.safetensors").is_file() else None,
        "state": torch.load(path / "trainer_state.pt", weights_only=True, map_location="cpu"),
        "config_yaml": (path / "config.yaml").read_text(),
    }


# weights_only loading refuses numpy arrays and arbitrary tuples of them: store RNG states as tensors/lists.
def _numpy_state_to_plain(state: tuple) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = state
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _numpy_state_from_plain(state: dict[str, Any]) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return (state["name"], keys, state["pos"], state["has_gauss"], state["cached"])


def _python_state_to_plain(state: tuple) -> dict[str, Any]:
    version, internal, gauss = state
    return {"version": version, "internal": list(internal), "gauss": gauss}


def _python_state_from_plain(state: dict[str, Any]) -> tuple:
    return (state["version"], tuple(state["internal"]), state["gauss"])


# Changing these between a run and its resume cannot change what was already computed.
RESUMABLE_FIELDS = frozenset(
    {"train.epochs", "train.checkpoint_every", "train.keep_checkpoints", "train.device"}
)


def check_resumable(saved_yaml: str, current: dict[str, Any], path: str | os.PathLike) -> None:
    """Refuse to resume under a changed config, naming the fields that changed (the saved config is the
    checkpoint's ``config.yaml``; ``current`` the flattened config of the run that resumes). Bookkeeping
    fields and ``tracking.*`` may change."""
    saved = flatten(yaml.safe_load(saved_yaml))
    differ = sorted(
        k
        for k in set(saved) | set(current)
        if saved.get(k) != current.get(k) and k not in RESUMABLE_FIELDS and not k.startswith("tracking.")
    )
    if differ:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differ[:8])
        raise ValueError(f"cannot resume from {path}: the config changed ({details})")
