"""Model adapters (one per family) and the loader that picks the right one."""

from __future__ import annotations

from collections.abc import Mapping

from flowgrpo_core.models.bagel import BagelAdapter
from flowgrpo_core.models.base import Conditioning, FlowAdapter
from flowgrpo_core.models.flux import FluxAdapter
from flowgrpo_core.models.loading import ModelSourceError, load_pipeline, parse_source
from flowgrpo_core.models.qwenimage import QwenImageAdapter
from flowgrpo_core.models.sd3 import SD3Adapter

# pipeline class -> its family's adapter (diffusers' pipelines; BagelPipeline is our container of Bagel's parts)
ADAPTERS: dict[str, type[FlowAdapter]] = {
    "StableDiffusion3Pipeline": SD3Adapter,
    "FluxPipeline": FluxAdapter,
    "QwenImagePipeline": QwenImageAdapter,
    "BagelPipeline": BagelAdapter,
}
FAMILIES = {cls.family: cls for cls in ADAPTERS.values()}


def adapter_for(pipeline, source: str = "", revision: str | None = None) -> FlowAdapter:
    name = type(pipeline).__name__
    if name not in ADAPTERS:
        raise ModelSourceError(
            f"{source or 'model'}: pipeline class {name} is not supported; supported: {sorted(ADAPTERS)}"
        )
    return ADAPTERS[name](pipeline, source=source, revision=revision)


def load_model(
    source: str, revision: str | None = None, dtype: str | Mapping[str, str] = "float32", device: str = "cpu"
) -> FlowAdapter:
    """Load a base model and wrap it in its family's adapter, on ``device``; ``dtype`` as in
    :func:`load_pipeline` (one dtype, or one per component). A folder of an unsupported pipeline class fails
    before any weights load."""
    adapter = adapter_for(load_pipeline(source, revision, dtype, supported=ADAPTERS), source, revision)
    return adapter.to(device)


__all__ = [
    "ADAPTERS",
    "FAMILIES",
    "BagelAdapter",
    "Conditioning",
    "FlowAdapter",
    "FluxAdapter",
    "ModelSourceError",
    "QwenImageAdapter",
    "SD3Adapter",
    "adapter_for",
    "load_model",
    "load_pipeline",
    "parse_source",
]
