"""``BagelPipeline``: Bagel's parts behind the few pipeline methods the project calls on a diffusers pipeline.

Bagel is no diffusers pipeline; this container gives the adapter registry a class name to recognise
(``BagelPipeline``) and the rest of the project what it uses of a pipeline: ``transformer`` / ``vae`` /
``tokenizer``, ``components``, ``to``, ``register_modules``, ``save_pretrained`` (here: the official folder
layout) and diffusers' LoRA file (``save_lora_weights`` / ``load_lora_weights``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from flowgrpo_core.models.bagel.layout import (
    check_folder,
    read_tokenizer,
    read_transformer,
    read_vae,
    write_folder,
)
from flowgrpo_core.models.bagel.model import BagelTransformer

# the reference's text-to-image sampling settings (flow_grpo's ``timestep_shift`` and ``cfg_renorm_min``)
TIMESTEP_SHIFT = 3.0
CFG_RENORM_MIN = 0.0


class BagelPipeline:
    def __init__(
        self,
        transformer: BagelTransformer,
        vae,
        tokenizer,
        timestep_shift: float = TIMESTEP_SHIFT,
        cfg_renorm_min: float = CFG_RENORM_MIN,
        vit_config: dict | None = None,
    ) -> None:
        self.transformer = transformer
        self.vae = vae
        self.tokenizer = tokenizer
        self.timestep_shift = timestep_shift
        self.cfg_renorm_min = cfg_renorm_min
        self.vit_config = vit_config or {}

    @property
    def components(self) -> dict:
        return {"transformer": self.transformer, "vae": self.vae, "tokenizer": self.tokenizer}

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def token_id(self, token: str) -> int:
        return self.tokenizer.convert_tokens_to_ids(token)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> BagelPipeline:
        moves = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for module in (self.transformer, self.vae):
            module.to(**moves)  # diffusers warns on a dtype argument, even None
        return self

    def register_modules(self, **modules) -> None:
        for name, module in modules.items():
            setattr(self, name, module)

    def set_progress_bar_config(self, **kwargs) -> None:
        """No progress bar to configure (kept for callers written for diffusers pipelines)."""

    # ---- the official folder layout ----

    @classmethod
    def from_folder(
        cls, folder: str | os.PathLike, dtypes: Mapping[str, torch.dtype] | None = None, source: str = ""
    ) -> BagelPipeline:
        """Load a folder in the official layout, checked first (:func:`check_folder`). ``dtypes``: per
        component (``transformer``, ``vae``) or ``default``; float32 when absent."""
        dtypes = dict(dtypes or {})
        default = dtypes.get("default", torch.float32)
        layout = check_folder(Path(folder), source)
        return cls(
            read_transformer(layout, dtypes.get("transformer", default)),
            read_vae(layout, dtypes.get("vae", default)),
            read_tokenizer(Path(folder)),
            vit_config=layout.vit_config,
        )

    def save_pretrained(self, folder: str | os.PathLike, **_) -> None:
        write_folder(Path(folder), self.transformer, self.vae, self.tokenizer, self.vit_config)

    # ---- LoRA in diffusers' file format (keys ``transformer.<module>.lora_A.weight``, config in metadata) ----

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str | os.PathLike,
        transformer_lora_layers: Mapping[str, torch.Tensor],
        transformer_lora_adapter_metadata: dict | None = None,
        weight_name: str | None = None,
    ) -> None:
        from diffusers.loaders.lora_base import LoraBaseMixin

        LoraBaseMixin._save_lora_weights(
            save_directory=save_directory,
            lora_layers={"transformer": transformer_lora_layers},
            lora_metadata={"transformer": transformer_lora_adapter_metadata},
            weight_name=weight_name,
        )

    def load_lora_weights(
        self, folder: str | os.PathLike, weight_name: str | None = None, adapter_name: str = "grpo"
    ) -> None:
        self.transformer.load_lora_adapter(
            str(folder), prefix="transformer", weight_name=weight_name, adapter_name=adapter_name
        )
