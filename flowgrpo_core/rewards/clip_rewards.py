"""CLIP-based rewards: CLIPScore, PickScore, the LAION aesthetic predictor and HPSv2.

All four are a transformers ``CLIPModel`` plus a little arithmetic on its unit-norm embeddings
(image ``(B, D)``, text ``(B, D)``):
- ``clipscore``: cosine(image, prompt)                       (CLIP ViT-L/14)
- ``pickscore``: exp(logit_scale) * cosine / 26             (PickScore_v1, a fine-tuned CLIP-H; /26 as Flow-GRPO)
- ``aesthetic``: MLP(image embedding)                        (CLIP ViT-L/14 + the LAION "improved aesthetic predictor" head)
- ``hpsv2``:     cosine(image, prompt)                       (HPSv2 / v2.1, an open_clip ViT-H-14 checkpoint, converted)
Each model loads from a hub id, a local folder or ``s3://`` (see flowgrpo_core/sources.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from flowgrpo_core.clip import CLIP_H14, ClipEmbedder
from flowgrpo_core.rewards.base import Reward, RewardOutput
from flowgrpo_core.sources import WeightsSourceError, load_state_dict, resolve_folder, resolve_weights


class ClipReward(ClipEmbedder, Reward):
    """A reward computed from CLIP embeddings (loading and embedding: :class:`ClipEmbedder`)."""


class ClipScore(ClipReward):
    """Cosine similarity of the image and prompt embeddings of CLIP ViT-L/14, in [-1, 1]."""

    name = "clipscore"

    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], metadata: Sequence[dict]
    ) -> RewardOutput:
        cosine = (self.embed_images(images) * self.embed_texts(prompts)).sum(-1)
        return RewardOutput(scores=cosine.cpu().numpy())


class PickScore(ClipReward):
    """PickScore: ``exp(logit_scale) * cosine``, divided by 26 as in Flow-GRPO (``pickscore_raw`` keeps the
    unscaled value the papers report, e.g. 21.7 -> 23.5)."""

    name = "pickscore"
    default_model = "yuvalkirstain/PickScore_v1"
    default_processor = CLIP_H14
    scale = 26.0

    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], metadata: Sequence[dict]
    ) -> RewardOutput:
        cosine = (self.embed_images(images) * self.embed_texts(prompts)).sum(-1)
        raw = (self.model.logit_scale.exp().float() * cosine).cpu().numpy()
        return RewardOutput(scores=raw / self.scale, details={"pickscore_raw": raw.tolist()})


class AestheticHead(nn.Module):
    """The LAION improved-aesthetic-predictor MLP on a unit-norm CLIP image embedding (B, D) -> (B,).

    Its ``layers.*`` names match the published ``.pth`` files (ddpo-pytorch, TRL)."""

    def __init__(self, embed_dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)


class Aesthetic(ClipReward):
    """LAION aesthetic score (about 1..10) of the image; the prompt is not used.

    Args (besides ClipReward's):
        head: the MLP weights: a file, or a folder / ``s3://`` prefix / hub id holding ``head_file``.
        head_file: file name inside ``head`` (TRL's copy of the ddpo-pytorch head by default).
    """

    name = "aesthetic"

    def __init__(
        self,
        model: str | None = None,
        revision: str | None = None,
        processor: str | None = None,
        device: str = "auto",
        dtype: str = "float32",
        head: str = "trl-lib/ddpo-aesthetic-predictor",
        head_file: str = "aesthetic-model.pth",
    ) -> None:
        super().__init__(model, revision, processor, device, dtype)
        state = load_state_dict(resolve_weights(head, head_file))
        if "layers.0.weight" not in state:
            raise WeightsSourceError(
                f"aesthetic head {head!r} has no 'layers.0.weight'; not an aesthetic-predictor MLP"
            )
        embed_dim = state["layers.0.weight"].shape[1]
        if embed_dim != self.model.config.projection_dim:
            raise WeightsSourceError(
                f"aesthetic head {head!r} expects {embed_dim}-d embeddings, the CLIP model gives {self.model.config.projection_dim}"
            )
        self.head = AestheticHead(embed_dim)
        self.head.load_state_dict(state)
        self.head.to(self.device, torch.float32).eval().requires_grad_(False)
        self.info["head"] = head

    @torch.inference_mode()
    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], metadata: Sequence[dict]
    ) -> RewardOutput:
        return RewardOutput(scores=self.head(self.embed_images(images)).cpu().numpy().astype(np.float64))


class HPSv2(ClipReward):
    """Human Preference Score v2 (v2.1 by default): cosine of an open_clip ViT-H-14 fine-tuned on HPD.

    ``model`` is the open_clip checkpoint (a file, or a folder / ``s3://`` prefix / hub id holding
    ``checkpoint_file``); ``processor`` holds the matching transformers CLIP config, tokenizer and image
    processor (LAION's ViT-H-14 conversion); the checkpoint is converted by ``openclip_convert``.
    """

    name = "hpsv2"
    default_model = "xswu/HPSv2"
    default_processor = CLIP_H14

    def __init__(
        self,
        model: str | None = None,
        revision: str | None = None,
        processor: str | None = None,
        device: str = "auto",
        dtype: str = "float32",
        checkpoint_file: str = "HPS_v2.1_compressed.pt",
    ) -> None:
        self.checkpoint_file = checkpoint_file
        self._processor_source = processor or self.default_processor
        super().__init__(model, revision, self._processor_source, device, dtype)

    def _load_model(self, model: str, revision: str | None) -> nn.Module:
        from transformers import CLIPConfig, CLIPModel

        from flowgrpo_core.rewards.openclip_convert import openclip_to_transformers

        config = CLIPConfig.from_pretrained(resolve_folder(self._processor_source))
        state = openclip_to_transformers(
            load_state_dict(resolve_weights(model, self.checkpoint_file, revision))
        )
        clip = CLIPModel(config)
        try:
            missing, unexpected = clip.load_state_dict(state, strict=False)
        except RuntimeError as error:  # shape mismatches
            raise WeightsSourceError(
                f"HPSv2 checkpoint {model!r} does not fit {self._processor_source!r}: {error}"
            ) from None
        if missing or unexpected:
            raise WeightsSourceError(
                f"HPSv2 checkpoint {model!r} does not fit the CLIP config of {self._processor_source!r}: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        return clip

    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], metadata: Sequence[dict]
    ) -> RewardOutput:
        cosine = (self.embed_images(images) * self.embed_texts(prompts)).sum(-1)
        return RewardOutput(scores=cosine.cpu().numpy())
