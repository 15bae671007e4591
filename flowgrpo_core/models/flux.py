"""FLUX.1 behind the adapter interface; mirrors ``FluxPipeline.__call__``.

FLUX.1-dev is guidance-distilled: the guidance scale enters as an embedding, not as CFG, so a roll-out
costs one forward per step. Latents are kept packed as (B, tokens, 4C), the transformer's own layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from flowgrpo_core.models.base import JOINT_ATTENTION_PROJECTIONS, Conditioning, FlowAdapter
from flowgrpo_core.models.sd3 import NUM_TRAIN_TIMESTEPS, _resolution_shift


class FluxAdapter(FlowAdapter):
    family = "flux"
    lora_target_modules = JOINT_ATTENTION_PROJECTIONS

    @property
    def resolution_factor(self) -> int:
        # packing groups 2x2 latent pixels into one token
        return self.pipeline.vae_scale_factor * 2

    @torch.no_grad()
    def encode_prompts(
        self, prompts: Sequence[str], negative_prompt: str, guidance_scale: float, max_sequence_length: int
    ) -> Conditioning:
        embeds, pooled, _text_ids = self.pipeline.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=self.device, max_sequence_length=max_sequence_length
        )
        # the text encoders' dtype may differ from the transformer's (see SD3Adapter.encode_prompts)
        return Conditioning({"embeds": embeds.to(self.dtype), "pooled": pooled.to(self.dtype)})

    def _latent_hw(self, height: int, width: int) -> tuple[int, int]:
        scale = self.pipeline.vae_scale_factor
        return 2 * (height // (scale * 2)), 2 * (width // (scale * 2))

    def initial_noise(self, generators: Sequence[torch.Generator], height: int, width: int) -> torch.Tensor:
        h, w = self._latent_hw(height, width)
        channels = self.transformer.config.in_channels // 4
        noise = torch.stack([torch.randn((channels, h, w), generator=g, device=g.device) for g in generators])
        return self.pipeline._pack_latents(noise, len(generators), channels, h, w).to(self.device)

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

    def _vae_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self.pipeline._unpack_latents(latents, height, width, self.pipeline.vae_scale_factor)

    def _schedule(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        scheduler = type(self.pipeline.scheduler).from_config(self.pipeline.scheduler.config)
        h, w = self._latent_hw(height, width)
        base = np.linspace(1.0, 1 / num_steps, num_steps)
        scheduler.set_timesteps(
            sigmas=base, device="cpu", mu=_resolution_shift((h // 2) * (w // 2), scheduler.config)
        )
        return scheduler.sigmas.float().clone()
