"""Resumable checkpoints: everything an exact resume needs, written atomically and verified on load.

Layout of ``<run>/checkpoints/epoch-000012/``:
    policy.safetensors     trainable weights (LoRA or full), by parameter name
    ema.safetensors        the EMA shadow weights (when EMA is on)
    trainer_state.pt       optimiser, stat tracker, RNG states, counters, metric history
    config.yaml            the resolved config the run was started with
    deepspeed/             each rank's optimiser partition (DeepSpeed runs only)
    manifest.json          every other file's size and sha256, written last

A checkpoint is written to ``epoch-000012.tmp`` and renamed when complete, so a crash mid-write
never leaves a half checkpoint that looks valid. The manifest catches what the rename cannot: a file
truncated or emptied afterwards (a full disk at flush time, a power loss before the data reached the disk,
a bad copy). Checkpoints from before the manifest are verified by loading each file. ``trainer_state.pt``
holds only tensors and plain containers and is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from flowgrpo_core.config import flatten

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^epoch-(\d{6})$")
MANIFEST = "manifest.json"
# what every checkpoint holds; ema.safetensors only when EMA is on
REQUIRED_FILES = ("policy.safetensors", "trainer_state.pt", "config.yaml")
# below this many free bytes an opaque write error (torch's "basic_ios::clear") is taken for a full disk:
# the failed write has filled the disk up to the last block
_NEARLY_FULL_BYTES = 1 << 20


class CorruptCheckpoint(ValueError):
    """A checkpoint file that is missing, truncated, altered or unreadable; ``file`` names it."""

    def __init__(self, file: str | os.PathLike, problem: str) -> None:
        self.file, self.problem = Path(file), problem
        super().__init__(f"{file}: {problem}")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, no permission, ...); the earlier ones are intact."""


def checkpoint_name(epoch: int) -> str:
    return f"epoch-{epoch:06d}"


def checkpoint_epoch(path: str | os.PathLike) -> int:
    """The epoch a checkpoint folder holds (epochs done), from its name."""
    match = _NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint folder (epoch-NNNNNN)")
    return int(match.group(1))


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoints renamed into place (complete when written; ``load_checkpoint`` verifies them), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [
        p
        for p in directory.iterdir()
        if p.is_dir()
        and _NAME.match(p.name)
        and ((p / MANIFEST).is_file() or (p / "trainer_state.pt").is_file())
    ]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest checkpoint folder, unverified (``load_latest_checkpoint`` skips corrupt ones)."""
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
    already holds files written by other processes (DeepSpeed's per-rank state) and is kept; the manifest
    covers them too.

    Raises:
        CheckpointWriteError: a file could not be written; the message names it and the cause (e.g. "No
            space left on device"). The staging folder is removed; earlier checkpoints are untouched.
    """
    directory = Path(directory)
    tmp = directory / (checkpoint_name(epoch) + ".tmp")
    final = directory / checkpoint_name(epoch)

    def write(target: Path, action: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        # only the file system's failures become a CheckpointWriteError: the arguments (tensors moved to the
        # CPU, where a GPU error would surface) are evaluated before
        try:
            action(*args, **kwargs)
        except (OSError, RuntimeError, SafetensorError) as error:
            raise _write_error(target, directory, error) from error

    complete = False
    try:
        write(tmp, directory.mkdir, parents=True, exist_ok=True)
        write(tmp, staging_dir, directory, epoch, fresh=not staged)
        write(tmp / "policy.safetensors", save_file, _on_cpu(policy), str(tmp / "policy.safetensors"))
        if ema is not None:
            write(tmp / "ema.safetensors", save_file, _on_cpu(ema), str(tmp / "ema.safetensors"))
        write(tmp / "trainer_state.pt", torch.save, trainer_state, tmp / "trainer_state.pt")
        write(tmp / "config.yaml", (tmp / "config.yaml").write_text, config_yaml, encoding="utf-8")
        write(tmp / MANIFEST, write_manifest, tmp)
        write(final, _move_into_place, tmp, final)
        complete = True
    finally:
        if not complete:  # never leave a partial staging folder behind, whatever interrupted the write
            shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _on_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def _move_into_place(tmp: Path, final: Path) -> None:
    shutil.rmtree(final, ignore_errors=True)  # an earlier write of this epoch (a resume re-trains it)
    os.replace(tmp, final)


def _write_error(target: Path, directory: Path, error: BaseException) -> CheckpointWriteError:
    """``error`` (raised writing ``target``) as an OSError that says which file, why and that the earlier
    checkpoints are safe. Torch's errors are opaque ("basic_ios::clear: iostream error"): the free space and
    the folder's permissions tell what went wrong. Call it before the staging folder is removed, while
    the partial file still takes the disk's last blocks."""
    code = error.errno if isinstance(error, OSError) and error.errno else None
    if code is None:
        folder = target.parent if target.parent.exists() else directory
        try:
            if shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES:
                code = errno.ENOSPC
            elif not os.access(folder, os.W_OK):
                code = errno.EACCES
        except OSError:
            pass
    cause = f"{type(error).__name__}: {error}"
    if code is not None:
        cause = os.strerror(code) + ("" if isinstance(error, OSError) else f" ({cause})")
    earlier = [p.name for p in list_checkpoints(directory)]
    safe = (
        f"the earlier checkpoints ({', '.join(earlier)}) are intact" if earlier else "no earlier checkpoint"
    )
    message = f"could not write checkpoint file {target}: {cause}; {safe}"
    return CheckpointWriteError(code, message) if code is not None else CheckpointWriteError(message)


def write_manifest(folder: Path) -> Path:
    """Record every file under ``folder`` (sub-folders included) with its size and sha256; written last, so a
    checkpoint with a manifest was complete when written."""
    files = {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    path = folder / MANIFEST
    path.write_text(json.dumps({"format": 1, "files": files}, indent=1), encoding="utf-8")
    return path


def verify_checkpoint(path: str | os.PathLike) -> list[str]:
    """Check the files of a checkpoint with a manifest against it; the relative paths it lists.

    Raises:
        CorruptCheckpoint: naming the first file that is missing, has the wrong size or other content, or the
            manifest itself when it is unreadable or lacks a required file.
    """
    path = Path(path)
    manifest = path / MANIFEST
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        entries = {name: (int(e["bytes"]), str(e["sha256"])) for name, e in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CorruptCheckpoint(manifest, f"unreadable manifest ({type(error).__name__}: {error})") from None
    for name in REQUIRED_FILES:
        if name not in entries:
            raise CorruptCheckpoint(manifest, f"the manifest does not list {name}")
    for name, (size, digest) in entries.items():
        file = path / name
        if not file.is_file():
            raise CorruptCheckpoint(file, "is missing (listed in the manifest)")
        actual = file.stat().st_size
        if actual != size:
            raise CorruptCheckpoint(
                file, f"has {actual} bytes but the manifest records {size} (truncated or partly written)"
            )
        if _sha256(file) != digest:
            raise CorruptCheckpoint(file, "content differs from the manifest (sha256 mismatch)")
    return list(entries)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``{"policy", "ema" (or None), "state", "config_yaml"}`` of a checkpoint folder, verified against its
    manifest (older checkpoints without one: every file must load).

    Raises:
        FileNotFoundError: ``path`` is not a folder.
        CorruptCheckpoint: naming the file that is missing, damaged or unreadable.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist or is not a folder")
    if (path / MANIFEST).is_file():
        has_ema = "ema.safetensors" in verify_checkpoint(path)
    else:
        has_ema = (path / "ema.safetensors").is_file()
        for name in REQUIRED_FILES:
            if not (path / name).is_file():
                raise CorruptCheckpoint(path / name, "is missing")
    config_yaml = _read(path / "config.yaml", _yaml_mapping_text)
    return {
        "policy": _read(path / "policy.safetensors", lambda f: load_file(str(f))),
        "ema": _read(path / "ema.safetensors", lambda f: load_file(str(f))) if has_ema else None,
        "state": _read(
            path / "trainer_state.pt", lambda f: torch.load(f, weights_only=True, map_location="cpu")
        ),
        "config_yaml": config_yaml,
    }


def load_latest_checkpoint(
    directory: str | os.PathLike, warn: Callable[[str], None] = logger.warning
) -> tuple[Path, dict[str, Any]] | None:
    """The newest intact checkpoint in ``directory`` and its contents (``load_checkpoint``); None when there
    is no checkpoint. Each corrupt newer one is reported through ``warn``, naming the file and the fault.

    Raises:
        CorruptCheckpoint: there are checkpoints, but none is intact (naming ``directory``).
    """
    found = list_checkpoints(directory)
    faults = []
    for path in reversed(found):
        try:
            return path, load_checkpoint(path)
        except CorruptCheckpoint as error:
            faults.append(str(error))
            warn(f"skipping corrupt checkpoint {path.name}: {error}")
    if found:
        raise CorruptCheckpoint(
            directory, f"none of its {len(found)} checkpoints is intact: " + "; ".join(faults)
        )
    return None


def latest_intact_checkpoint(
    directory: str | os.PathLike, warn: Callable[[str], None] = logger.warning
) -> Path | None:
    """The newest checkpoint whose files match its manifest, without loading it (for a launcher that only
    needs to know where training will resume); one written before manifests existed is taken as it is."""
    for path in reversed(list_checkpoints(directory)):
        if not (path / MANIFEST).is_file():
            return path
        try:
            verify_checkpoint(path)
            return path
        except CorruptCheckpoint as error:
            warn(f"skipping corrupt checkpoint {path.name}: {error}")
    return None


def _read(file: Path, loader: Callable[[Path], Any]) -> Any:
    """``loader(file)``, any failure reported as a corrupt ``file`` (a damaged file fails in many ways:
    safetensors' header errors, torch's zip reader, unpickling, YAML, UTF-8)."""
    try:
        return loader(file)
    except Exception as error:  # whatever the reader raises, the file is at fault
        raise CorruptCheckpoint(file, f"cannot be read ({type(error).__name__}: {error})") from error


def _yaml_mapping_text(file: Path) -> str:
    """The text of a YAML file that must hold a mapping (a checkpoint's config)."""
    text = file.read_text(encoding="utf-8")
    if not isinstance(yaml.safe_load(text), dict):
        raise ValueError("does not hold a YAML mapping")
    return text


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


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
