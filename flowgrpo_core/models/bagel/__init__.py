"""Bagel (ByteDance-Seed's unified model) as a text-to-image flow model: our own implementation of its
generation path (:mod:`.mot`, :mod:`.embeddings`, :mod:`.model`), the FLUX VAE (:mod:`.vae`), the official
checkpoint folder (:mod:`.layout`), the pipeline-like container (:mod:`.pipeline`) and the adapter
(:mod:`.adapter`). The SigLIP ViT (image understanding) is not implemented: text-to-image never runs it."""

from flowgrpo_core.models.bagel.adapter import BAGEL_LORA_TARGETS, BagelAdapter
from flowgrpo_core.models.bagel.layout import check_folder
from flowgrpo_core.models.bagel.model import BagelTransformer
from flowgrpo_core.models.bagel.pipeline import BagelPipeline

__all__ = ["BAGEL_LORA_TARGETS", "BagelAdapter", "BagelPipeline", "BagelTransformer", "check_folder"]
