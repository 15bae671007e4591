"""Stable Diffusion 3 / 3.5 (MMDiT) behind the adapter interface; mirrors ``StableDiffusion3Pipeline.__call__``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flowgrpo_core.models.base import JOINT_ATTENTION_PROJECTIONS, Conditioning, FlowAdapter, per_image_noise

NUM_TRAIN_TIMESTEPS = 1000


class SD3Adapter(FlowAdapter):
    family = "sd3"
    lora_target_modules = JOINT_ATTENTION_PROJECTIONS

    @property
    def resolution_factor(self) -> int:
        return self.pipeline.vae_scale_factor * self.transformer.config.patch_size

    @torch.no_grad()
    def encode_prompts(
        self, prompts: Sequence[str], negative_prompt: str, guidance_scale: float, max_sequence_length: int
    ) -> Conditioning:
        embeds, pooled = self._encode(list(prompts), max_sequence_length)
        tensors = {"embeds": embeds, "pooled": pooled}
        if guidance_scale > 1:
            # The negative prompt is the same for every batch of a run: encode it once (as the reference
            # does) and repeat it over the batch.
            key = (negative_prompt, max_sequence_length, self.device)
            if key not in self._negative_cache:
                self._negative_cache[key] = self._encode([negative_prompt], max_sequence_length)
            neg_embeds, neg_pooled = self._negative_cache[key]
            batch = len(prompts)
            tensors |= {
                "neg_embeds": neg_embeds.expand(batch, -1, -1),
                "neg_pooled": neg_pooled.expand(batch, -1),
            }
        # text encoders may run in another dtype than the transformer (the reference's float16 encoders feed a
        # float32 transformer under autocast, which casts them back the same way)
        return Conditioning({k: v.to(self.device, self.dtype) for k, v in tensors.items()})

    def _encode(self, prompts: list[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, tokens, dim) embeddings and (B, dim) pooled embeddings, as the pipeline encodes a prompt."""
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.text_device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        return embeds, pooled

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        scale = self.pipeline.vae_scale_factor
        return (self.transformer.config.in_channels, height // scale, width // scale)

    def initial_noise(self, generators: Sequence[torch.Generator], height: int, width: int) -> torch.Tensor:
        return per_image_noise(generators, self.latent_shape(height, width), self.device)

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
        timestep = sigma.float() * NUM_TRAIN_TIMESTEPS
        embeds, pooled = cond.tensors["embeds"], cond.tensors["pooled"]
        do_cfg = guidance_scale > 1
        if do_cfg:
            # One forward over [uncond; cond], as the pipeline does: a different batching changes the numerics.
            x, timestep = torch.cat([x, x]), torch.cat([timestep, timestep])
            embeds = torch.cat([cond.tensors["neg_embeds"], embeds])
            pooled = torch.cat([cond.tensors["neg_pooled"], pooled])
        velocity = self.denoiser(
            hidden_states=x,
            timestep=timestep,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        if do_cfg:
            uncond, text = velocity.chunk(2)
            velocity = uncond + guidance_scale * (text - uncond)
        return velocity

    def _vae_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return latents

    def _schedule(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        scheduler = type(self.pipeline.scheduler).from_config(self.pipeline.scheduler.config)
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            kwargs["mu"] = _resolution_shift(
                self._image_seq_len(height, width), scheduler.config, default_max_shift=1.16
            )
        scheduler.set_timesteps(num_steps, device="cpu", **kwargs)
        return scheduler.sigmas.float().clone()

    def _image_seq_len(self, height: int, width: int) -> int:
        return (height // self.resolution_factor) * (width // self.resolution_factor)


def _resolution_shift(image_seq_len: int, scheduler_config, default_max_shift: float = 1.15) -> float:
    """mu of the resolution-dependent shift (diffusers' ``calculate_shift``): linear in the token count.

    The SD3 and FLUX pipelines differ only in the default ``max_shift`` (1.16 vs 1.15)."""
    base_len = scheduler_config.get("base_image_seq_len", 256)
    max_len = scheduler_config.get("max_image_seq_len", 4096)
    base_shift = scheduler_config.get("base_shift", 0.5)
    max_shift = scheduler_config.get("max_shift", default_max_shift)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + (base_shift - slope * base_len)
