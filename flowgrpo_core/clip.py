"""CLIP as an image and text embedder (transformers ``CLIPModel``), shared by the CLIP rewards and GenEval's
colour classifier. Weights load from a hub id, a local folder or ``s3://`` (see ``sources.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn

from flowgrpo_core.devices import torch_device, torch_dtype
from flowgrpo_core.sources import resolve_folder

CLIP_L14 = "openai/clip-vit-large-patch14"
CLIP_H14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
_PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "processor_config.json",
    "preprocessor_config.json",
)


def _features(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor
    return output.pooler_output if hasattr(output, "pooler_output") else output


class ClipEmbedder:
    """A CLIP model as an embedder: loaded from a hub id, a folder or ``s3://``, it maps images and texts to
    unit-norm embeddings. The CLIP rewards and GenEval's colour classifier are built on it.

    Args:
        model: CLIP weights (hub id, folder or ``s3://``).
        revision: hub revision of ``model``.
        processor: where the tokenizer and image processor live (default: ``model``'s own folder).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...
        dtype: ``float32``, ``float16`` or ``bfloat16``.
    """

    default_model: str = CLIP_L14
    default_processor: str | None = None

    def __init__(
        self,
        model: str | None = None,
        revision: str | None = None,
        processor: str | None = None,
        device: str = "auto",
        dtype: str = "float32",
    ) -> None:
        from transformers import AutoProcessor

        self.device = torch_device(device)
        self.dtype = torch_dtype(dtype)
        model = model or self.default_model
        processor = processor or self._default_processor(model, revision)
        self.processor = AutoProcessor.from_pretrained(
            resolve_folder(processor, revision if processor == model else None)
        )
        self.model = (
            self._load_model(model, revision).to(self.device, self.dtype).eval().requires_grad_(False)
        )
        self.info = {"model": model, "revision": revision, "processor": processor, "dtype": dtype}

    def _default_processor(self, model: str, revision: str | None) -> str:
        """The model's own folder when it holds a tokenizer, else the family's processor (PickScore_v1 ships
        none: it uses the LAION CLIP-H one)."""
        if self.default_processor is None:
            return model
        folder = resolve_folder(model, revision)
        return (
            model if any((folder / name).is_file() for name in _PROCESSOR_FILES) else self.default_processor
        )

    def _load_model(self, model: str, revision: str | None) -> nn.Module:
        from transformers import CLIPModel

        return CLIPModel.from_pretrained(resolve_folder(model, revision))

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(B, D) unit-norm image embeddings."""
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")[
            "pixel_values"
        ]
        features = _features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))
        return nn.functional.normalize(features.float(), dim=-1)

    @torch.inference_mode()
    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, D) unit-norm text embeddings; prompts longer than the text tower's context are truncated."""
        max_length = self.model.config.text_config.max_position_embeddings
        tokens = self.processor.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        features = _features(
            self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device),
            )
        )
        return nn.functional.normalize(features.float(), dim=-1)
