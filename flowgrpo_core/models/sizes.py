"""A model's sizes for the memory plan (:class:`flowgrpo_core.memory_plan.ModelShape`), counted from its
architecture: the components are instantiated from their configs on the ``meta`` device (shapes, no memory,
no weights read) and their parameters counted. Tiny models are built by their builders; a local folder, the
packaged models and a hub model already in the Hugging Face cache are read from their ``config.json`` files
(a Bagel checkpoint folder from its ``llm_config.json`` and its safetensors headers, as its loader reads it);
a hub model that is not is read from the published configs in :mod:`flowgrpo_core.models.published`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flowgrpo_core.memory_plan import ModelShape
from flowgrpo_core.models.base import TEXT_ENCODERS
from flowgrpo_core.models.loading import (
    BAGEL_MARKER,
    BAGEL_PIPELINE,
    PACKED_TRANSFORMERS,
    ModelSourceError,
    parse_source,
    pipeline_class,
    vae_spatial_compression,
)
from flowgrpo_core.models.published import PUBLISHED, PUBLISHED_BAGEL

# transformer class -> family
_TRANSFORMER_FAMILY = {
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
    "QwenImageTransformer2DModel": "qwenimage",
    "BagelTransformer": "bagel",
}
# SD3 puts the CLIP tokens before T5's in the joint sequence; Bagel wraps the prompt in <|im_start|> and
# <|im_end|>, the image in <|vision_start|> and <|vision_end|>
_EXTRA_TEXT_TOKENS = {"sd3": 77, "bagel": 4}
# the transformer's blocks: the MMDiTs' double and single blocks, Bagel's MoT decoder layers
_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "language_model.model.layers")


def model_shape(
    source: str,
    lora_rank: int,
    lora_targets: Sequence[str] = (),
    max_sequence_length: int = 128,
    revision: str | None = None,
) -> tuple[ModelShape, str]:
    """The shape of ``source`` (any ``model.source``) trained with a LoRA of ``lora_rank`` on ``lora_targets``
    (empty: the family's; rank 0: full fine-tuning), for prompts of ``max_sequence_length`` tokens, and where
    its architecture was read from."""
    components, origin = _components(source, revision)
    return shape_of(components, lora_rank, lora_targets, max_sequence_length), origin


def shape_of(
    components: Mapping[str, nn.Module],
    lora_rank: int,
    lora_targets: Sequence[str] = (),
    max_sequence_length: int = 128,
) -> ModelShape:
    """The shape of a pipeline's ``components`` (``transformer``, ``vae``, text encoders; real or meta)."""
    from flowgrpo_core.models import FAMILIES

    transformer, vae = components["transformer"], components["vae"]
    family = _TRANSFORMER_FAMILY.get(type(transformer).__name__)
    if family is None:
        raise ModelSourceError(
            f"cannot plan a {type(transformer).__name__}: supported transformers {sorted(_TRANSFORMER_FAMILY)}"
        )
    adapter = FAMILIES[family]
    targets = adapter.peft_targets(lora_targets)
    blocks = [b for name in _BLOCK_LISTS for b in _attribute(transformer, name)]
    cfg = transformer.config
    vae_cfg = dict(vae.config)
    if family == "bagel":  # a language model's width and the latent patches' side
        width, patch = cfg.llm_config["hidden_size"], cfg.latent_patch_size
    else:
        width = cfg.num_attention_heads * cfg.attention_head_dim
        patch = 2 if type(transformer).__name__ in PACKED_TRANSFORMERS else cfg.patch_size
    return ModelShape(
        family=family,
        transformer_params=count(transformer),
        block_params=max(count(b) for b in blocks),
        blocks=len(blocks),
        width=width,
        lora_params=lora_parameters(transformer, targets, lora_rank) if lora_rank else 0,
        text_encoder_params=sum(count(components[n]) for n in TEXT_ENCODERS if components.get(n) is not None),
        vae_params=count(vae),
        vae_channels=vae_cfg["base_dim"] if "base_dim" in vae_cfg else vae_cfg["block_out_channels"][0],
        pixels_per_token=vae_spatial_compression(vae_cfg) * patch,
        text_tokens=max_sequence_length + _EXTRA_TEXT_TOKENS.get(family, 0),
        true_cfg=adapter.true_cfg,
        full_fine_tuning_params=sum(
            p.numel() for n, p in transformer.named_parameters() if adapter.fully_trained(n)
        ),
    )


def _attribute(module: nn.Module, dotted: str) -> Any:
    for name in dotted.split("."):
        module = getattr(module, name, None)
    return module if module is not None else []


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_parameters(transformer: nn.Module, targets: Sequence[str], rank: int) -> int:
    """Parameters of a LoRA of ``rank`` on every linear layer peft would match with ``targets`` (a target
    matches a module whose dotted name is it or ends with ``.`` + it): ``rank x (in + out)`` each."""
    total = 0
    for name, module in transformer.named_modules():
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            total += rank * (module.in_features + module.out_features)
    return total


def _components(source: str, revision: str | None) -> tuple[dict[str, nn.Module], str]:
    parsed = parse_source(source)
    if parsed.kind == "tiny":
        from flowgrpo_core.models.tiny import TINY_BUILDERS

        pipe = TINY_BUILDERS[parsed.location](parsed.seed)
        return {n: m for n, m in pipe.components.items() if isinstance(m, nn.Module)}, "its tiny builder"
    if parsed.kind in ("local", "packaged"):
        folder = Path(parsed.location)
        if folder.is_dir() and pipeline_class(folder) == BAGEL_PIPELINE:
            return _bagel_from_folder(folder), f"{parsed.location}/{BAGEL_MARKER} and safetensors headers"
        return _from_configs(
            _folder_configs(Path(parsed.location)), source
        ), f"{parsed.location}/*/config.json"
    if parsed.kind == "hub":
        cached_bagel = _hub_cache_bagel_folder(parsed.location, revision)
        if cached_bagel is not None:
            return _bagel_from_folder(cached_bagel), f"the Hugging Face cache's {BAGEL_MARKER}"
        cached = _hub_cache_configs(parsed.location, revision)
        if cached is not None:
            return _from_configs(cached, source), "the Hugging Face cache's config.json files"
        published = "its published configs (models/published.py)"
        if parsed.location in PUBLISHED_BAGEL:
            configs = PUBLISHED_BAGEL[parsed.location]
            return _bagel_from_configs(configs["transformer"], configs["vae"]), published
        configs = PUBLISHED.get(parsed.location)
        if configs is None:
            raise ModelSourceError(
                f"{source}: its configs are not in the Hugging Face cache and not among the published ones "
                f"({', '.join(sorted({**PUBLISHED, **PUBLISHED_BAGEL}))}); download it first (`flowgrpo "
                "download`) or plan a local folder"
            )
        return _from_configs(configs, source), published
    raise ModelSourceError(f"{source}: plan a local copy of it (an {parsed.kind} source is not read offline)")


def _folder_configs(folder: Path) -> dict[str, dict[str, Any]]:
    """Each component's config.json of a diffusers folder (the pipeline's model_index.json says which)."""
    index = json.loads((folder / "model_index.json").read_text())
    out = {}
    for name in ("transformer", "vae", *TEXT_ENCODERS):
        path = folder / name / "config.json"
        if name in index and index[name][0] is not None and path.is_file():
            out[name] = json.loads(path.read_text())
    if "transformer" not in out or "vae" not in out:
        raise ModelSourceError(f"{folder}: no transformer/config.json or vae/config.json")
    return out


def _hub_cache_configs(repo: str, revision: str | None) -> dict[str, dict[str, Any]] | None:
    """The component configs of ``repo`` when the Hugging Face cache holds them (nothing is downloaded)."""
    from huggingface_hub import try_to_load_from_cache

    from flowgrpo_core.sources import hub_cache_dir

    out = {}
    for name in ("transformer", "vae", *TEXT_ENCODERS):
        path = try_to_load_from_cache(
            repo, f"{name}/config.json", cache_dir=hub_cache_dir(), revision=revision
        )
        if isinstance(path, str):
            out[name] = json.loads(Path(path).read_text())
    return out if "transformer" in out and "vae" in out else None


def _bagel_from_folder(folder: Path) -> dict[str, nn.Module]:
    """A Bagel checkpoint folder's transformer and VAE on the meta device, configured as its loader configures
    them: ``llm_config.json`` with the official overrides, the patch size and the VAE read off the
    safetensors headers (no weight is read)."""
    from flowgrpo_core.models.bagel.layout import EMA_FILE, header_shapes, transformer_config
    from flowgrpo_core.models.bagel.vae import AE_FILE, vae_config

    for name in (EMA_FILE, AE_FILE):
        if not (folder / name).is_file():
            raise ModelSourceError(f"{folder}: Bagel checkpoint folder lacks {name}")
    vae = vae_config(header_shapes(folder / AE_FILE))
    config = transformer_config(folder, header_shapes(folder / EMA_FILE), vae["latent_channels"])
    return _bagel_from_configs(config, vae)


def _bagel_from_configs(transformer: Mapping[str, Any], vae: Mapping[str, Any]) -> dict[str, nn.Module]:
    """``BagelTransformer`` (``transformer``: its ``llm_config`` and latent sizes) and the VAE on the meta
    device; the official loader's overrides of ``llm_config`` are applied (again)."""
    from flowgrpo_core.models.bagel import BagelTransformer
    from flowgrpo_core.models.bagel.layout import OFFICIAL_LLM_OVERRIDES
    from flowgrpo_core.models.bagel.vae import build_vae

    vae = {k: v for k, v in vae.items() if not k.startswith("_")}
    with torch.device("meta"):
        return {
            "transformer": BagelTransformer(
                llm_config={**transformer["llm_config"], **OFFICIAL_LLM_OVERRIDES},
                latent_channels=vae["latent_channels"],
                latent_patch_size=transformer["latent_patch_size"],
                max_latent_size=transformer["max_latent_size"],
            ),
            "vae": build_vae(vae),
        }


def _hub_cache_bagel_folder(repo: str, revision: str | None) -> Path | None:
    """The cached snapshot of a Bagel repository when it holds the files its plan reads."""
    from huggingface_hub import try_to_load_from_cache

    from flowgrpo_core.models.bagel.layout import EMA_FILE
    from flowgrpo_core.models.bagel.vae import AE_FILE
    from flowgrpo_core.sources import hub_cache_dir

    paths = [
        try_to_load_from_cache(repo, name, cache_dir=hub_cache_dir(), revision=revision)
        for name in (BAGEL_MARKER, EMA_FILE, AE_FILE)
    ]
    if not all(isinstance(p, str) for p in paths):
        return None
    return Path(paths[0]).parent


def _from_configs(configs: Mapping[str, Mapping[str, Any]], source: str) -> dict[str, nn.Module]:
    """Each component built from its config on the meta device: its shapes, no storage."""
    import diffusers
    import transformers

    out = {}
    with torch.device("meta"):
        for name, cfg in configs.items():
            cls_name = cfg.get("_class_name") or (cfg.get("architectures") or [None])[0]
            if cls_name is None:
                raise ModelSourceError(f"{source}: {name}/config.json names no class")
            fields = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "architectures"}
            if hasattr(diffusers, cls_name) and not hasattr(transformers, cls_name):
                out[name] = getattr(diffusers, cls_name).from_config(fields)
            else:
                config = transformers.AutoConfig.for_model(**fields)
                out[name] = getattr(transformers, cls_name)._from_config(config)
    return out
