"""FLUX.1 behind the adapter interface; mirrors ``FluxPipeline.__call__``.

FLUX.1-dev is guidance-distilled: the guidance scale enters as an embedding, not as CFG, so a roll-out
costs one forward per step. Latents are kept packed as (B, tokens, 4C), the transformer's own layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flowgrpo_core.models.base import JOINT_ATTENTION_PROJECTIONS, Conditioning
from flowgrpo_core.models.packed import PackedLatentAdapter
from flowgrpo_core.models.sd3 import NUM_TRAIN_TIMESTEPS


class FluxAdapter(PackedLatentAdapter):
    family = "flux"
    true_cfg = False  # the guidance scale is an input of the transformer
    lora_target_modules = JOINT_ATTENTION_PROJECTIONS

    @torch.no_grad()
    def encode_prompts(
        self, prompts: Sequence[str], negative_prompt: str, guidance_scale: float, max_sequence_length: int
    ) -> Conditioning:
        embeds, pooled, _text_ids = self.pipeline.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            device=self.text_device,
            max_sequence_length=max_sequence_length,
        )
        # the text encoders' dtype may differ from the transformer's (see SD3Adapter.encode_prompts)
        return Conditioning(
            {"embeds": embeds.to(self.device, self.dtype), "pooled": pooled.to(self.device, self.dtype)}
        )

    def predict_velocity(
        self,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        cond: Conditioning,
        guidance_scale: float,
        height: int,
        width: int,
    ) -> torch.Tensor:
        x = latents.to(self.dtype)
        batch = x.shape[0]
        h, w = self._latent_hw(height, width)
        image_ids = self.pipeline._prepare_latent_image_ids(batch, h // 2, w // 2, self.device, self.dtype)
        embeds = cond.tensors["embeds"]
        text_ids = torch.zeros(embeds.shape[1], 3, device=self.device, dtype=self.dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), guidance_scale, device=self.device, dtype=torch.float32)
        # The pipeline casts the timestep to the latent dtype before dividing by 1000; do the same.
        timestep = (sigma.float() * NUM_TRAIN_TIMESTEPS).to(self.dtype) / NUM_TRAIN_TIMESTEPS
        return self.denoiser(
            hidden_states=x,
            timestep=timestep,
            guidance=guidance,
            pooled_projections=cond.tensors["pooled"],
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
