"""Bagel's generation path: the velocity of latent patches given a prompt (reference: ``Bagel._forward_flow``).

A prompt ``[<|im_start|>] + tokens + [<|im_end|>]`` is first run through the understanding expert with causal
attention (the *text prefill*); its keys and values of every layer are the context. The image is then one
block of tokens ``[<|vision_start|>, N latent patches, <|vision_end|>]``, all at the rotary position that
follows the prompt, attending to the context and to each other without a causal mask. The patches enter as
``vae2llm(patch) + time_embedder(sigma) + latent_pos_embed(position)`` and go through the generation expert;
``llm2vae`` of their final hidden states is the velocity ``noise - x0``. With no prompt (the unconditional
branch of text CFG) the context is empty and the block sits at position 0.

The understanding half of the checkpoint that text-to-image never uses is not built: the SigLIP ViT and its
connector (``vit_model``, ``connector``, ``vit_pos_embed``) and the language model's ``lm_head``.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from flowgrpo_core.models.bagel.embeddings import PositionEmbedding, TimestepEmbedder, latent_position_ids
from flowgrpo_core.models.bagel.mot import LayerCache, MoTLanguageModel

# parameter prefixes of the official checkpoint that only image understanding or text generation uses
UNDERSTANDING_ONLY_PREFIXES = ("vit_model.", "connector.", "vit_pos_embed.", "language_model.lm_head.")


class BagelTransformer(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """The language model (MoT) with the latent projections of Bagel's generation path.

    ``llm_config`` is the checkpoint's ``llm_config.json`` (a Qwen2 config); ``latent_channels`` the VAE's
    ``z_channels``.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        llm_config: dict,
        latent_channels: int = 16,
        latent_patch_size: int = 2,
        max_latent_size: int = 64,
    ) -> None:
        super().__init__()
        hidden = llm_config["hidden_size"]
        patch_dim = latent_patch_size**2 * latent_channels
        self.language_model = MoTLanguageModel(llm_config)
        self.time_embedder = TimestepEmbedder(hidden)
        self.vae2llm = nn.Linear(patch_dim, hidden)
        self.llm2vae = nn.Linear(hidden, patch_dim)
        self.latent_pos_embed = PositionEmbedding(max_latent_size, hidden)

    @property
    def patch_dim(self) -> int:
        return self.config.latent_patch_size**2 * self.config.latent_channels

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(ids)

    def prefill_text(self, ids: torch.Tensor, mask: torch.Tensor) -> list[LayerCache]:
        """The context of each prompt: keys and values per layer of ``ids`` (B, L) through the understanding
        expert with causal attention. ``mask`` (B, L) bool marks the valid tokens (right padding); a padded
        token also attends to itself so that no attention row is empty (its output is never used)."""
        length = ids.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()
        eye = torch.eye(length, dtype=torch.bool, device=ids.device)
        attend = causal & (mask[:, None, None, :] | eye)
        positions = torch.arange(length, device=ids.device).expand(ids.shape[0], -1)
        _, caches = self.language_model.model(self.embed(ids), positions, attend)
        return caches

    def forward(
        self,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        grid: tuple[int, int],
        marker_ids: tuple[int, int],
    ) -> torch.Tensor:
        """Velocity of the latent patches.

        Args:
            latents: (B, N, p*p*C) patches of an h x w grid (``grid``), row-major, channels last in a patch.
            sigma: (B,) noise levels.
            text_ids, text_mask: (B, L) prompt tokens and their validity; a row without valid tokens has no
                context (the unconditional branch).
            marker_ids: the ``<|vision_start|>`` and ``<|vision_end|>`` token ids.
        Returns:
            (B, N, p*p*C) velocity ``noise - x0``.
        """
        batch, n = latents.shape[:2]
        device = latents.device
        context = self.prefill_text(text_ids, text_mask)
        h, w = grid
        positions = latent_position_ids(h, w, self.config.max_latent_size, device)
        patches = (
            self.vae2llm(latents)
            + self.time_embedder(sigma)[:, None]
            + self.latent_pos_embed(positions)[None]
        )
        markers = self.embed(torch.tensor(marker_ids, device=device)).expand(batch, -1, -1)
        # in the token embeddings' dtype, as the reference writes patches into its packed sequence
        block = torch.cat([markers[:, :1], patches.to(markers.dtype), markers[:, 1:]], dim=1)
        # every block token sits at the position after its prompt; it sees the prompt and the whole block
        text_length = text_mask.sum(dim=1, keepdim=True)
        block_positions = text_length.expand(-1, n + 2)
        attend = torch.cat([text_mask, torch.ones(batch, n + 2, dtype=torch.bool, device=device)], dim=1)
        attend = attend[:, None, None, :].expand(-1, 1, n + 2, -1)
        hidden, _ = self.language_model.model(block, block_positions, attend, gen=(1, n + 1), past=context)
        return self.llm2vae(hidden[:, 1 : n + 1])
