"""Bagel behind the adapter interface; mirrors the reference's text-to-image path (flow_grpo's
``InterleaveInferencer`` with ``generate_image``).

- Prompts: ``ids`` (B, L) = ``<|im_start|>`` + tokens + ``<|im_end|>``, zero-padded to the batch's longest,
  and ``mask`` (B, L) bool. The text prefill (the KV cache) is rebuilt inside every velocity call (the
  reference builds it once per roll-out and per training pass): it always reflects the current weights, costs
  the prompt's few tokens per step, and the trajectories hold token ids only. The understanding expert that
  computes it is never trained by the reference or the presets, so the values are the reference's. Each call
  trims the batch to its longest valid prompt, so the same samples reach the model with the same tensors in
  sampling and training.
- Noise: (B, N, 4C) patches of 2x2 latent pixels, drawn per image as (N, 4C), as the reference draws them.
- Text CFG: the unconditional branch has an empty context (no prompt, no negative prompt: the reference's
  ``cfg_text`` context of a text-to-image call); ``v = u + g (c - u)`` then renormalised per sample:
  multiplied by ``clamp(|c| / |v|, min=cfg_renorm_min, max=1)``, norms over the whole latent (the
  reference's ``cfg_renorm_type="global"`` with batch size 1). Image CFG needs an input image: scale 1, off.
  Both branches run in one call of 2B rows.
- Schedule: ``t = linspace(1, 0, T + 1)`` shifted ``s t / (1 + (s - 1) t)``, s = 3 (the reference's
  ``timestep_shift``); its ``num_timesteps`` counts the final 0, so its 15 is our T = 14.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from flowgrpo_core.models.base import Conditioning, FlowAdapter, per_image_noise, valid_length

# the reference's LoRA targets (train_bagel.py): the generation expert's attention and feed-forward
BAGEL_LORA_TARGETS = (
    "self_attn.q_proj_moe_gen",
    "self_attn.k_proj_moe_gen",
    "self_attn.v_proj_moe_gen",
    "self_attn.o_proj_moe_gen",
    "mlp_moe_gen.gate_proj",
    "mlp_moe_gen.up_proj",
    "mlp_moe_gen.down_proj",
)


class BagelAdapter(FlowAdapter):
    family = "bagel"
    lora_target_modules = BAGEL_LORA_TARGETS
    # SD3/FLUX's names: the image stream is Bagel's generation expert, the final projection llm2vae; the
    # text stream's layers are the understanding expert, which the reference never trains: they select nothing
    lora_target_aliases: ClassVar[dict[str, str | tuple[str, ...]]] = {
        "attn.to_q": "self_attn.q_proj_moe_gen",
        "attn.to_k": "self_attn.k_proj_moe_gen",
        "attn.to_v": "self_attn.v_proj_moe_gen",
        "attn.to_out.0": "self_attn.o_proj_moe_gen",
        "ff.net.0.proj": ("mlp_moe_gen.gate_proj", "mlp_moe_gen.up_proj"),
        "ff.net.2": "mlp_moe_gen.down_proj",
        "proj_out": "llm2vae",
        "attn.add_q_proj": (),
        "attn.add_k_proj": (),
        "attn.add_v_proj": (),
        "attn.to_add_out": (),
        "ff_context.net.0.proj": (),
        "ff_context.net.2": (),
    }

    @property
    def resolution_factor(self) -> int:
        return self.pipeline.vae_scale_factor * self.transformer.config.latent_patch_size

    def check_resolution(self, height: int, width: int) -> None:
        super().check_resolution(height, width)
        largest = self.resolution_factor * self.transformer.config.max_latent_size
        if max(height, width) > largest:
            raise ValueError(
                f"resolution {height}x{width} exceeds the bagel model's largest side {largest} "
                f"(max_latent_size {self.transformer.config.max_latent_size} patches)"
            )

    def _grid(self, height: int, width: int) -> tuple[int, int]:
        return height // self.resolution_factor, width // self.resolution_factor

    @torch.no_grad()
    def encode_prompts(
        self, prompts: Sequence[str], negative_prompt: str, guidance_scale: float, max_sequence_length: int
    ) -> Conditioning:
        """``ids`` (B, L) long and ``mask`` (B, L) bool; at most ``max_sequence_length`` prompt tokens (the
        reference does not truncate). The negative prompt is not used: the unconditional branch is empty."""
        tokenizer = self.pipeline.tokenizer
        start, end = self.pipeline.token_id("<|im_start|>"), self.pipeline.token_id("<|im_end|>")
        rows = [[start, *tokenizer.encode(p)[:max_sequence_length], end] for p in prompts]
        length = max(map(len, rows))
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = True
        return Conditioning({"ids": ids.to(self.device), "mask": mask.to(self.device)})

    def initial_noise(self, generators: Sequence[torch.Generator], height: int, width: int) -> torch.Tensor:
        """(B, N, 4C) standard normal patches, drawn per image as (N, 4C)."""
        h, w = self._grid(height, width)
        return per_image_noise(generators, (h * w, self.transformer.patch_dim), self.device)

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
        # the batch's own padding only, whatever longer batches it was concatenated with
        length = valid_length(cond.tensors["mask"])
        ids, mask = cond.tensors["ids"][:, :length], cond.tensors["mask"][:, :length]
        do_cfg = guidance_scale > 1
        if do_cfg:  # [cond; uncond]: the unconditional rows have no valid prompt token
            x, sigma = torch.cat([x, x]), torch.cat([sigma, sigma])
            ids, mask = torch.cat([ids, ids]), torch.cat([mask, torch.zeros_like(mask)])
        markers = (self.pipeline.token_id("<|vision_start|>"), self.pipeline.token_id("<|vision_end|>"))
        # sigma stays float32: the reference embeds its float32 timestep, whatever the model's dtype
        velocity = self.denoiser(x, sigma.float(), ids, mask, self._grid(height, width), markers)
        if do_cfg:
            text, uncond = velocity.chunk(2)
            velocity = renormalised_cfg(text, uncond, guidance_scale, self.pipeline.cfg_renorm_min)
        return velocity

    def _vae_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, h*w, p*p*C) patches -> (B, C, h*p, w*p)."""
        h, w = self._grid(height, width)
        p = self.transformer.config.latent_patch_size
        c = self.transformer.config.latent_channels
        x = latents.reshape(-1, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(-1, c, h * p, w * p)

    def _schedule(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        t = torch.linspace(1, 0, num_steps + 1)
        shift = self.pipeline.timestep_shift
        return shift * t / (1 + (shift - 1) * t)

    @classmethod
    def fully_trained(cls, name: str) -> bool:
        """Full fine-tuning trains the generation expert only (the reference's ``*moe_gen*`` parameters)."""
        return "moe_gen" in name


def renormalised_cfg(
    cond: torch.Tensor, uncond: torch.Tensor, scale: float, renorm_min: float
) -> torch.Tensor:
    """``u + g (c - u)`` scaled per sample by ``clamp(|c| / (|v| + 1e-8), renorm_min, 1)`` with norms over all
    tokens and channels (the reference's global CFG renorm).

    Args:
        cond, uncond: (B, N, D) conditional and unconditional velocities.
    Returns:
        (B, N, D) float32.
    """
    cond, uncond = cond.float(), uncond.float()
    guided = uncond + scale * (cond - uncond)
    norm = lambda v: v.flatten(1).norm(dim=1)[:, None, None]  # noqa: E731
    return guided * (norm(cond) / (norm(guided) + 1e-8)).clamp(min=renorm_min, max=1.0)
