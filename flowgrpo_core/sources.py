"""Where weights come from (base models, reward models, detectors): a local folder or file,
``s3://bucket/prefix``, or a hub id.

Everything resolves to a local path first, so each model loads with one code path
(``from_pretrained(folder)``, ``safetensors``/``torch.load(weights_only=True)`` of a file).
S3 objects are cached under ``$FLOWGRPO_CACHE/s3/<bucket>/<prefix>`` (default ``~/.cache/flowgrpo``),
written to a temporary folder and renamed, so an interrupted download is never taken for a complete one.
The S3 endpoint comes from ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``/``MLFLOW_S3_ENDPOINT_URL``.
The hub honours ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE``, read at call time so a process can point at a
pre-filled cache.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class WeightsSourceError(ValueError):
    """A weights source that cannot be resolved; the message names the source."""


def cache_root() -> Path:
    return Path(os.environ.get("FLOWGRPO_CACHE", Path.home() / ".cache" / "flowgrpo"))


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def hub_cache_dir() -> str | None:
    """The Hugging Face cache folder the environment names now (None: huggingface_hub's default)."""
    return os.environ.get("HF_HUB_CACHE") or None


def is_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and not Path(source).exists()


def resolve_folder(source: str, revision: str | None = None) -> Path:
    """A local folder holding the files of ``source`` (folder, ``s3://`` prefix or hub id)."""
    if source.startswith("s3://"):
        return _s3_folder(source)
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if is_hub_id(source):
        from huggingface_hub import snapshot_download

        try:
            return Path(
                snapshot_download(
                    source, revision=revision, local_files_only=hub_offline(), cache_dir=hub_cache_dir()
                )
            )
        except Exception as error:  # hub errors are many (offline, 404, gated): all mean "not here"
            raise WeightsSourceError(
                f"cannot fetch {source!r} from the hub{_offline_hint()}: {error}"
            ) from error
    raise WeightsSourceError(
        f"weights source {source!r} is neither an existing folder, s3://bucket/prefix nor a hub id"
    )


def resolve_file(source: str, filename: str | None = None, revision: str | None = None) -> Path:
    """A local file: ``source`` itself (path or ``s3://`` object), or ``filename`` inside the folder, S3
    prefix or hub repository ``source``."""
    if filename is None:
        if source.startswith("s3://"):
            return _s3_file(source)
        path = Path(source).expanduser()
        if path.is_file():
            return path
        raise WeightsSourceError(f"weights file {source!r} does not exist")
    if source.startswith("s3://"):
        return _s3_file(source.rstrip("/") + "/" + filename)
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / filename).is_file():
            raise WeightsSourceError(f"{filename!r} not found in folder {source!r}")
        return path / filename
    if is_hub_id(source):
        from huggingface_hub import hf_hub_download

        try:
            return Path(
                hf_hub_download(
                    source,
                    filename,
                    revision=revision,
                    local_files_only=hub_offline(),
                    cache_dir=hub_cache_dir(),
                )
            )
        except Exception as error:
            raise WeightsSourceError(
                f"cannot fetch {filename!r} of {source!r} from the hub{_offline_hint()}: {error}"
            ) from error
    raise WeightsSourceError(
        f"weights source {source!r} is neither an existing folder, s3://bucket/prefix nor a hub id"
    )


def _offline_hint() -> str:
    return " (HF_HUB_OFFLINE is set and it is not in the local cache)" if hub_offline() else ""


def _s3_cache_path(uri: str) -> Path:
    from flowgrpo_core.storage import parse_s3_uri

    bucket, key = parse_s3_uri(uri)
    if ".." in Path(key).parts:
        raise WeightsSourceError(f"S3 URI {uri!r} must not contain '..'")
    return cache_root() / "s3" / bucket / key


def _s3_folder(uri: str) -> Path:
    from flowgrpo_core.storage import download_prefix

    target = _s3_cache_path(uri)
    if (target / ".complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
    try:
        download_prefix(uri, staging)
        (staging / ".complete").touch()
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    except (RuntimeError, FileNotFoundError) as error:  # their messages name the URI already
        raise WeightsSourceError(str(error)) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _s3_file(uri: str) -> Path:
    from botocore.exceptions import BotoCoreError, ClientError

    from flowgrpo_core.storage import parse_s3_uri, s3_client

    target = _s3_cache_path(uri)
    if target.is_file():
        return target
    bucket, key = parse_s3_uri(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".partial-{os.getpid()}-{target.name}")
    try:
        s3_client().download_file(bucket, key, str(staging))
        staging.rename(target)
    except (BotoCoreError, ClientError) as error:
        raise WeightsSourceError(f"cannot download {uri}: {error}") from error
    finally:
        staging.unlink(missing_ok=True)
    return target


def load_state_dict(path: str | os.PathLike) -> dict:
    """Tensors of a ``.safetensors`` file, or of a torch checkpoint loaded with ``weights_only=True``
    (never unpickling code); a ``{"state_dict": ...}`` wrapper is unwrapped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors carry many types; all mean "not a plain tensor checkpoint"
        raise WeightsSourceError(
            f"cannot load {path} as a tensor checkpoint (weights_only=True): {error}"
        ) from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsSourceError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def resolve_weights(source: str, default_filename: str, revision: str | None = None) -> Path:
    """A single weights file: ``source`` itself when it names a file (local or ``s3://.../x.pt``), else
    ``default_filename`` inside the folder, S3 prefix or hub repository ``source``."""
    if Path(source).expanduser().is_file() or (
        source.startswith("s3://") and source.endswith(WEIGHT_SUFFIXES)
    ):
        return resolve_file(source)
    return resolve_file(source, default_filename, revision)
