"""Where a base model comes from: ``tiny:<family>[@seed]``, a model packaged with flowgrpo (``shapes:sd3``), a
local diffusers folder (or Bagel checkpoint folder), ``s3://``, or a hub id."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from flowgrpo_core.devices import torch_dtype
from flowgrpo_core.models.base import ModelSourceError

SourceKind = Literal["tiny", "packaged", "local", "s3", "hub"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# Models trained by the project and shipped in the package (a few MB each): source -> folder under data/.
# shapes:sd3 is the shapes-world base model (`flowgrpo pretrain-shapes`; data/shapes-sd3/PROVENANCE.md).
PACKAGED_MODELS = {"shapes:sd3": "shapes-sd3"}
PACKAGED_DIR = Path(__file__).resolve().parent.parent / "data"


@dataclass(frozen=True)
class ModelSource:
    kind: SourceKind
    location: str  # family for tiny, folder for packaged and local, URI or hub id
    seed: int = 0


def parse_source(source: str) -> ModelSource:
    """Classify a model source string without touching the network or the disk beyond ``exists``."""
    from flowgrpo_core.models.tiny import TINY_BUILDERS

    if not source:
        raise ModelSourceError("model source is empty")
    if source.startswith("tiny:"):
        family, _, seed = source[len("tiny:") :].partition("@")
        if family not in TINY_BUILDERS:
            raise ModelSourceError(
                f"unknown tiny model {source!r}; expected one of {[f'tiny:{f}' for f in TINY_BUILDERS]}"
            )
        if seed and not seed.isdigit():
            raise ModelSourceError(f"tiny model seed in {source!r} must be a non-negative integer")
        return ModelSource("tiny", family, int(seed or 0))
    if source.startswith("shapes:"):
        if source not in PACKAGED_MODELS:
            raise ModelSourceError(
                f"unknown packaged model {source!r}; expected one of {sorted(PACKAGED_MODELS)}"
            )
        folder = PACKAGED_DIR / PACKAGED_MODELS[source]
        if not (folder / "model_index.json").is_file():
            raise ModelSourceError(
                f"packaged model {source!r} is missing from {folder} (reinstall flowgrpo, or rebuild it as "
                f"{folder / 'PROVENANCE.md'} says)"
            )
        return ModelSource("packaged", str(folder))
    if source.startswith("s3://"):
        return ModelSource("s3", source)
    if os.path.isabs(source) or source.startswith((".", "~")) or Path(source).exists():
        path = Path(source).expanduser()
        if not path.is_dir():
            raise ModelSourceError(f"model folder {source!r} does not exist")
        if pipeline_class(path) is None:
            raise ModelSourceError(
                f"model folder {source!r} has no model_index.json (expected a diffusers pipeline folder, or a "
                f"Bagel checkpoint folder with {BAGEL_MARKER})"
            )
        return ModelSource("local", str(path.resolve()))
    if _HUB_ID.match(source):
        return ModelSource("hub", source)
    raise ModelSourceError(
        f"model source {source!r} is neither tiny:<family>, an existing folder, s3://bucket/prefix nor a hub id (org/name)"
    )


def resolve_folder(source: str, revision: str | None = None) -> Path | None:
    """The local diffusers folder holding ``source`` (downloaded from S3 or the hub when needed); None for
    tiny models, which are built, not stored."""
    from flowgrpo_core.sources import WeightsSourceError
    from flowgrpo_core.sources import resolve_folder as resolve

    parsed = parse_source(source)
    if parsed.kind == "tiny":
        return None
    if parsed.kind == "packaged":
        return Path(parsed.location)
    try:
        folder = resolve(parsed.location, revision if parsed.kind == "hub" else None)
    except WeightsSourceError as error:
        rev = f" at revision {revision!r}" if revision else ""
        raise ModelSourceError(f"cannot download model {source!r}{rev}: {error}") from error
    if pipeline_class(folder) is None:
        raise ModelSourceError(
            f"{source} holds no model_index.json (expected a diffusers pipeline folder, or a Bagel checkpoint "
            f"folder with {BAGEL_MARKER})"
        )
    return folder


# Bagel's official checkpoint is no diffusers folder: it is recognised by its language model's config
BAGEL_PIPELINE = "BagelPipeline"
BAGEL_MARKER = "llm_config.json"


def pipeline_class(folder: Path) -> str | None:
    """The pipeline class a folder holds: ``model_index.json``'s, or ``BagelPipeline`` for a folder in Bagel's
    official layout; None for neither."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return json.loads((folder / "model_index.json").read_text()).get("_class_name", "")
    if (folder / BAGEL_MARKER).is_file():
        return BAGEL_PIPELINE
    return None


def load_pipeline(
    source: str,
    revision: str | None = None,
    dtype: str | Mapping[str, str] = "float32",
    supported: Collection[str] | None = None,
):
    """A diffusers pipeline from any supported source (see module docstring).

    ``dtype`` is one dtype for every component, or ``{component: dtype, "default": dtype}`` (e.g. the
    reference's float32 transformer and VAE with float16 text encoders). With ``supported`` (pipeline class
    names), a folder is checked by :func:`check_pipeline_folder` before any weights load.
    """
    from diffusers import DiffusionPipeline

    from flowgrpo_core.models.tiny import TINY_BUILDERS

    parsed = parse_source(source)
    names = {"default": dtype} if isinstance(dtype, str) else dict(dtype)
    torch_dtypes = {name: torch_dtype(value) for name, value in names.items()}
    torch_dtypes.setdefault("default", torch.float32)
    if parsed.kind == "tiny":
        pipe = TINY_BUILDERS[parsed.location](seed=parsed.seed)
        for name, component in pipe.components.items():
            wanted = torch_dtypes.get(name, torch_dtypes["default"])
            # cast only what differs: diffusers warns on every dtype cast of some models (Qwen-Image's)
            if isinstance(component, torch.nn.Module) and any(
                p.dtype != wanted for p in component.parameters()
            ):
                component.to(dtype=wanted)
        return pipe
    folder = resolve_folder(source, revision)
    if pipeline_class(folder) == BAGEL_PIPELINE:
        from flowgrpo_core.models.bagel import BagelPipeline

        _check_supported(BAGEL_PIPELINE, source, supported)
        return BagelPipeline.from_folder(folder, torch_dtypes, source)
    if supported is not None:
        check_pipeline_folder(folder, source, supported)
    try:
        return DiffusionPipeline.from_pretrained(str(folder), dtype=torch_dtypes, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ModelSourceError(f"cannot load model {source!r} from {folder}: {error}") from error


def _check_supported(name: str, source: str, supported: Collection[str] | None) -> None:
    if supported is not None and name not in supported:
        raise ModelSourceError(
            f"{source}: pipeline class {name or '(none)'} is not supported; supported: {sorted(supported)}"
        )


# The files a tokenizer folder can hold its vocabulary in, one set per format: a fast tokenizer's
# tokenizer.json, a byte-level BPE's vocab.json + merges.txt (CLIP, Qwen), a SentencePiece model (T5),
# a WordPiece vocab.txt
TOKENIZER_VOCABULARIES = (
    ("tokenizer.json",),
    ("vocab.json", "merges.txt"),
    ("spiece.model",),
    ("vocab.txt",),
)


def check_pipeline_folder(folder: Path, source: str, supported: Collection[str]) -> None:
    """Refuse a diffusers folder that cannot load, naming the problem, before any weights are read: a pipeline
    class outside ``supported``, a component folder that is missing, a tokenizer without its vocabulary."""
    index = json.loads((folder / "model_index.json").read_text())
    _check_supported(index.get("_class_name", ""), source, supported)
    for component, spec in index.items():
        if component.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue  # metadata, or an optional component the pipeline goes without
        path = folder / component
        if not path.is_dir():
            raise ModelSourceError(f"{source}: component folder {component}/ ({spec[1]}) is missing")
        if spec[1].endswith(("Tokenizer", "TokenizerFast")) and not any(
            all((path / f).is_file() for f in files) for files in TOKENIZER_VOCABULARIES
        ):
            expected = " or ".join(" + ".join(files) for files in TOKENIZER_VOCABULARIES)
            raise ModelSourceError(
                f"{source}: tokenizer folder {component}/ has no vocabulary file (expected {expected}); "
                f"it holds {sorted(p.name for p in path.iterdir()) or 'nothing'}"
            )


# VAE downsampling x patch size of every supported family (SD3, FLUX, Qwen-Image: 8 x 2).
DEFAULT_RESOLUTION_FACTOR = 16
# transformers fed latents packed 2x2 per token by their pipeline (their patch_size is not a patchifier)
PACKED_TRANSFORMERS = ("FluxTransformer2DModel", "QwenImageTransformer2DModel")


def vae_spatial_compression(vae_config: Mapping) -> int:
    """Pixels per latent pixel along a side, from a VAE's config: the Qwen-Image (Wan-style) VAE halves the
    sides once per entry of ``temperal_downsample``; a KL VAE once per block after the first."""
    if "temperal_downsample" in vae_config:
        return 2 ** len(vae_config["temperal_downsample"])
    return 2 ** (len(vae_config.get("block_out_channels", [0, 0, 0, 0])) - 1)


def resolution_factor(source: str) -> int:
    """Image sides must be multiples of this, known without loading weights (read from a local folder's
    configs when there is one; the families' common value otherwise). Unparseable sources get the
    default here and fail with their own message when loaded."""
    try:
        parsed = parse_source(source)
    except ModelSourceError:
        return DEFAULT_RESOLUTION_FACTOR
    if parsed.kind not in ("local", "packaged"):
        return DEFAULT_RESOLUTION_FACTOR
    folder = Path(parsed.location)
    if pipeline_class(folder) == BAGEL_PIPELINE:
        from flowgrpo_core.models.bagel.layout import resolution_factor as bagel_factor

        try:
            return bagel_factor(folder)
        except (OSError, ValueError):
            return DEFAULT_RESOLUTION_FACTOR  # the loader names what is wrong with the folder
    try:
        vae = json.loads((folder / "vae" / "config.json").read_text())
        transformer = json.loads((folder / "transformer" / "config.json").read_text())
    except (OSError, ValueError):
        return DEFAULT_RESOLUTION_FACTOR
    packed = transformer.get("_class_name", "") in PACKED_TRANSFORMERS
    return vae_spatial_compression(vae) * (2 if packed else transformer.get("patch_size", 2))
