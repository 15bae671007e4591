"""What FLUX and Qwen-Image share: latents packed 2x2 into tokens and a schedule shifted by the token count.

Both pipelines draw (C, h, w) noise per image, pack each 2x2 patch of latent pixels into one token of 4C
channels, (B, h*w/4, 4C), and denoise on ``sigmas = linspace(1, 1/T, T)`` shifted by ``mu``, linear in the
number of image tokens (``calculate_shift``). The latents stay packed: the transformer's own layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from flowgrpo_core.models.base import FlowAdapter
from flowgrpo_core.models.sd3 import _resolution_shift


class PackedLatentAdapter(FlowAdapter):
    """A family whose pipeline has ``_pack_latents`` / ``_unpack_latents`` and ``vae_scale_factor``."""

    @property
    def resolution_factor(self) -> int:
        # packing groups 2x2 latent pixels into one token
        return self.pipeline.vae_scale_factor * 2

    def _latent_hw(self, height: int, width: int) -> tuple[int, int]:
        """Latent (h, w) of an image, as the pipelines' ``prepare_latents`` compute them."""
        scale = self.pipeline.vae_scale_factor
        return 2 * (height // (scale * 2)), 2 * (width // (scale * 2))

    def initial_noise(self, generators: Sequence[torch.Generator], height: int, width: int) -> torch.Tensor:
        """(B, h*w/4, 4C) packed standard normal noise, drawn per image as (C, h, w)."""
        h, w = self._latent_hw(height, width)
        channels = self.transformer.config.in_channels // 4
        noise = torch.stack([torch.randn((channels, h, w), generator=g, device=g.device) for g in generators])
        return self.pipeline._pack_latents(noise, len(generators), channels, h, w).to(self.device)

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
