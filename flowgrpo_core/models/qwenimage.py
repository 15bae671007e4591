"""Qwen-Image behind the adapter interface; mirrors ``QwenImagePipeline.__call__`` and upstream's Flow-GRPO.

What differs from SD3 and FLUX:

- Text: Qwen2.5-VL hidden states of a chat template (its first 34 tokens dropped by the pipeline), of
  variable length per prompt: ``embeds`` (B, L, D) zero-padded to the batch's longest prompt, ``mask``
  (B, L) bool marking the valid tokens; no pooled embedding. Batches of different L are padded when
  concatenated (:meth:`Conditioning.cat`), and every forward trims its batch back to the batch's own longest
  valid length and passes ``mask=None`` when every token is valid, as ``encode_prompt`` does: the same
  samples then reach the transformer with the same tensors in sampling and training, whatever else was
  padded with them (a mask, or padding, changes the output by ~4e-7 in float32).
- True CFG, as upstream computes it in sampling and training alike: one transformer call on the conditional
  and unconditional batches concatenated, padded to one length (the pipeline makes two calls), then
  ``neg + g (cond - neg)`` rescaled, per token, to the conditional prediction's norm over the channels.
  Gradients flow through both branches.
- Latents packed 2x2 like FLUX, positions from ``img_shapes`` (MSRoPE), no guidance embedding; the VAE has a
  frame axis and per-channel ``latents_mean`` / ``latents_std`` instead of a scaling and shift factor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from flowgrpo_core.models.base import (
    JOINT_ATTENTION_PROJECTIONS,
    JOINT_FEED_FORWARDS,
    Conditioning,
    pad_tokens,
    valid_length,
)
from flowgrpo_core.models.packed import PackedLatentAdapter
from flowgrpo_core.models.sd3 import NUM_TRAIN_TIMESTEPS

# The MMDiT blocks' feed-forwards, image stream then text stream; upstream's LoRA adds them to attention
QWEN_FEED_FORWARDS = ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")


class QwenImageAdapter(PackedLatentAdapter):
    family = "qwenimage"
    # upstream's train_qwenimage.py: the joint attention projections and both streams' feed-forwards
    lora_target_modules = (*JOINT_ATTENTION_PROJECTIONS, *QWEN_FEED_FORWARDS)
    # SD3/FLUX's feed-forwards (ff: image stream, ff_context: text stream) are img_mlp and txt_mlp here
    lora_target_aliases: ClassVar[dict[str, str]] = dict(zip(JOINT_FEED_FORWARDS, QWEN_FEED_FORWARDS))

    @torch.no_grad()
    def encode_prompts(
        self, prompts: Sequence[str], negative_prompt: str, guidance_scale: float, max_sequence_length: int
    ) -> Conditioning:
        """``embeds`` (B, L, D) and ``mask`` (B, L) bool; with CFG also ``neg_embeds`` (B, Ln, D), ``neg_mask``.

        The negative prompt is encoded once per run and repeated (upstream encodes it again with every batch,
        in the same text-encoder call as the prompts; the embeddings agree up to that call's rounding).
        """
        embeds, mask = self._encode(list(prompts), max_sequence_length)
        tensors = {"embeds": embeds.to(self.dtype), "mask": mask}
        if guidance_scale > 1:
            key = (negative_prompt, max_sequence_length, self.device)
            if key not in self._negative_cache:
                self._negative_cache[key] = self._encode([negative_prompt], max_sequence_length)
            neg_embeds, neg_mask = self._negative_cache[key]
            batch = len(prompts)
            tensors |= {
                "neg_embeds": neg_embeds.to(self.dtype).expand(batch, -1, -1),
                "neg_mask": neg_mask.expand(batch, -1),
            }
        return Conditioning(tensors).to(self.device)

    def _encode(self, prompts: list[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D) embeddings padded with zeros to the longest prompt and their (B, L) bool mask."""
        embeds, mask = self.pipeline.encode_prompt(
            prompt=prompts, device=self.text_device, max_sequence_length=max_sequence_length
        )
        if mask is None:  # the pipeline drops an all-valid mask; the conditioning always carries one
            mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        return embeds, mask.bool()

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
        # the pipeline casts the timestep to the latents' dtype before dividing by 1000; so do we
        timestep = (sigma.float() * NUM_TRAIN_TIMESTEPS).to(self.dtype) / NUM_TRAIN_TIMESTEPS
        do_cfg = guidance_scale > 1
        if do_cfg:  # [cond; uncond], as upstream concatenates them
            x, timestep = torch.cat([x, x]), torch.cat([timestep, timestep])
        embeds, mask = text_batch(cond, do_cfg)
        h, w = self._latent_hw(height, width)
        velocity = self.denoiser(
            hidden_states=x,
            timestep=timestep,
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=mask,
            img_shapes=[[(1, h // 2, w // 2)]] * x.shape[0],
            return_dict=False,
        )[0]
        if do_cfg:
            text, uncond = velocity.chunk(2)
            velocity = true_cfg(text, uncond, guidance_scale)
        return velocity

    def _vae_decode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, 1, h, w) normalised latents -> (B, 3, H, W) in [-1, 1]: un-normalised per channel with the
        VAE's ``latents_mean`` / ``latents_std`` (computed as the pipeline does, dividing by 1/std), decoded as a
        one-frame video."""
        vae = self.pipeline.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(x.device, x.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(x.device, x.dtype)
        return vae.decode(x / inv_std + mean, return_dict=False)[0][:, :, 0]


def text_batch(cond: Conditioning, with_negative: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The text inputs of one transformer call: ``embeds`` (B, L, D), or [embeds; neg_embeds] (2B, L, D)
    with ``with_negative``, trimmed to the longest valid length L among them, and their (B or 2B, L) mask,
    None when every token is valid (as ``encode_prompt`` returns it).

    The result depends only on these samples, not on what they were padded with before, so a sampling batch
    and a training micro-batch of the same samples give the transformer identical inputs.
    """
    embeds, mask = cond.tensors["embeds"], cond.tensors["mask"]
    if with_negative:
        neg_embeds, neg_mask = cond.tensors["neg_embeds"], cond.tensors["neg_mask"]
        length = max(embeds.shape[1], neg_embeds.shape[1])
        embeds = torch.cat([pad_tokens(embeds, length), pad_tokens(neg_embeds, length)])
        mask = torch.cat([pad_tokens(mask, length), pad_tokens(neg_mask, length)])
    valid = valid_length(mask)
    embeds, mask = embeds[:, :valid], mask[:, :valid]
    return embeds, None if bool(mask.all()) else mask


def true_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Qwen-Image's true CFG: ``uncond + g (cond - uncond)``, rescaled per token to the norm of ``cond`` over
    the last (channel) axis.

    Args:
        cond, uncond: (B, tokens, channels) conditional and unconditional velocities.
    Returns:
        (B, tokens, channels) float32. Combined in float32 (a bf16 norm keeps 3 significant digits), and a
        guided token of norm exactly 0 stays 0 instead of 0/0 = NaN; otherwise the pipeline's arithmetic.
    """
    cond, uncond = cond.float(), uncond.float()
    combined = uncond + scale * (cond - uncond)
    cond_norm = torch.norm(cond, dim=-1, keepdim=True)
    combined_norm = torch.norm(combined, dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return combined * (cond_norm / combined_norm)
