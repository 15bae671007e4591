"""ImageReward (Xu et al. 2023): BLIP's ViT image encoder, its BERT text encoder cross-attending to the
image, and an MLP on the text [CLS] feature; the output is standardised with the training mean and std.

The original checkpoint (``THUDM/ImageReward``: ``ImageReward.pt`` + ``med_config.json``) is loaded into
transformers' ``BlipVisionModel`` and ``BlipTextModel`` (ported from the same BLIP code): the text keys
are identical, the timm-style vision keys are renamed. The tokenizer is bert-base-uncased plus BLIP's
``[DEC]`` and ``[ENC]`` tokens.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from flowgrpo_core.devices import torch_device, torch_dtype
from flowgrpo_core.rewards.base import Reward, RewardOutput
from flowgrpo_core.rewards.clip_rewards import AestheticHead
from flowgrpo_core.sources import WeightsSourceError, load_state_dict, resolve_file, resolve_folder

# standardisation constants of the released model (ImageReward.py)
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEXT_LENGTH = 35

_VISION_RENAMES = (
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
)


def split_checkpoint(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """ImageReward.pt -> (vision, text, mlp) state dicts in transformers / AestheticHead naming.
    BLIP's unused heads (projections, ITM) and the ``position_ids`` buffer are dropped."""
    vision, text, mlp = {}, {}, {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith("blip.visual_encoder."):
            name = key[len("blip.visual_encoder.") :]
            for pattern, target in _VISION_RENAMES:
                if re.match(pattern, name):
                    vision[re.sub(pattern, target, name)] = value
                    break
            else:
                raise WeightsSourceError(f"unexpected ImageReward vision key {key!r}")
        elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
            text[key[len("blip.text_encoder.") :]] = value
        elif key.startswith("mlp."):
            mlp[key[len("mlp.") :]] = value
    if not vision or not text or "layers.0.weight" not in mlp:
        raise WeightsSourceError(
            "not an ImageReward checkpoint: needs blip.visual_encoder.*, blip.text_encoder.* and mlp.*"
        )
    return vision, text, mlp


def vision_config_from_weights(vision: dict[str, torch.Tensor], head_dim: int = 64):
    """BLIP's ViT hyper-parameters read off the tensor shapes (ViT-B and ViT-L both use 64-d heads)."""
    from transformers import BlipVisionConfig

    hidden = vision["embeddings.class_embedding"].shape[-1]
    patch = vision["embeddings.patch_embedding.weight"].shape[-1]
    tokens = vision["embeddings.position_embedding"].shape[1] - 1
    layers = 1 + max(int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers."))
    return BlipVisionConfig(
        hidden_size=hidden,
        intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // head_dim),
        image_size=math.isqrt(tokens) * patch,
        patch_size=patch,
        layer_norm_eps=1e-6,  # BLIP's ViT uses partial(nn.LayerNorm, eps=1e-6)
    )


def text_config_from_med(med: dict, encoder_width: int):
    """BlipTextConfig from BLIP's med_config.json; the cross-attention width is the ViT's."""
    from transformers import BlipTextConfig

    return BlipTextConfig(
        vocab_size=med["vocab_size"],
        hidden_size=med["hidden_size"],
        encoder_hidden_size=encoder_width,
        intermediate_size=med["intermediate_size"],
        num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"],
        max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med.get("hidden_act", "gelu"),
        layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        pad_token_id=med.get("pad_token_id", 0),
    )


def preprocess(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """ImageReward's transform: bicubic resize of the short side, centre crop, CLIP normalisation. -> (B, 3, S, S)"""
    batch = []
    for image in images:
        image = image.convert("RGB")
        w, h = image.size
        scale = size / min(w, h)
        image = image.resize(
            (max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC
        )
        w, h = image.size
        left, top = round((w - size) / 2.0), round((h - size) / 2.0)
        array = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
        batch.append((array - CLIP_MEAN) / CLIP_STD)
    return torch.from_numpy(np.stack(batch).astype(np.float32)).permute(0, 3, 1, 2)


class ImageReward(Reward):
    """ImageReward score (standardised: about N(0, 1) over generated images, higher is better).

    Args:
        model: folder, ``s3://`` prefix or hub id with ``ImageReward.pt`` and ``med_config.json``.
        tokenizer: bert-base-uncased tokenizer source.
        device, dtype: as for the CLIP rewards.
    """

    name = "imagereward"

    def __init__(
        self,
        model: str = "THUDM/ImageReward",
        revision: str | None = None,
        tokenizer: str = "google-bert/bert-base-uncased",
        device: str = "auto",
        dtype: str = "float32",
        checkpoint_file: str = "ImageReward.pt",
    ) -> None:
        from transformers import AutoTokenizer, BlipTextModel, BlipVisionModel

        self.device = torch_device(device)
        self.dtype = torch_dtype(dtype)
        med = json.loads(resolve_file(model, "med_config.json", revision).read_text())
        vision_state, text_state, mlp_state = split_checkpoint(
            load_state_dict(resolve_file(model, checkpoint_file, revision))
        )
        vision_config = vision_config_from_weights(vision_state)
        self.image_size = vision_config.image_size
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(
            text_config_from_med(med, vision_config.hidden_size), add_pooling_layer=False
        )
        self.mlp = AestheticHead(mlp_state["layers.0.weight"].shape[1])  # the same 5-layer MLP shape
        for module, state, part in (
            (self.vision, vision_state, "vision"),
            (self.text, text_state, "text"),
            (self.mlp, mlp_state, "mlp"),
        ):
            try:
                module.load_state_dict(state, strict=True)
            except RuntimeError as error:
                raise WeightsSourceError(
                    f"ImageReward {part} weights of {model!r} do not fit: {error}"
                ) from None
            module.to(
                self.device, self.dtype if module is not self.mlp else torch.float32
            ).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_folder(tokenizer))
        # BLIP's tokenizer additions, so ids match the checkpoint's 30524-token vocabulary
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
        self.info = {"model": model, "revision": revision, "tokenizer": tokenizer, "dtype": str(dtype)}

    @torch.inference_mode()
    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], metadata: Sequence[dict]
    ) -> RewardOutput:
        pixels = preprocess(images, self.image_size).to(self.device, self.dtype)
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state  # (B, 1 + patches, D_vision)
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=TEXT_LENGTH, return_tensors="pt"
        )
        hidden = self.text(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long, device=self.device),
            is_decoder=False,  # BLIP's "multimodal" mode: bidirectional self-attention + cross-attention
        ).last_hidden_state  # (B, L, D_text)
        raw = self.mlp(hidden[:, 0].float())
        return RewardOutput(scores=((raw - REWARD_MEAN) / REWARD_STD).cpu().numpy().astype(np.float64))
