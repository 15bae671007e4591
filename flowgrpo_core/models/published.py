"""The published architecture configs of the hub models the reference presets train, for planning memory
offline (``models.sizes``): the ``config.json`` of each component, as its model card's repository publishes
it (copied 2026-12-03 from the ``transformer/``, ``text_encoder*/`` and ``vae/`` folders on huggingface.co;
only architecture fields, no weights and no parameter counts). A folder or a hub cache that holds the real
files is read instead.

Bagel's checkpoint is no diffusers folder: :data:`PUBLISHED_BAGEL` holds what its official layout
(``models.bagel.layout``) reads, the language model's ``llm_config.json``, the two sizes the official loader
passes in code, and its FLUX autoencoder's architecture.
"""

from __future__ import annotations

from typing import Any

_CLIP_L = {
    "_class_name": "CLIPTextModelWithProjection",
    "model_type": "clip_text_model",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
_CLIP_G = {
    **_CLIP_L,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}
_T5_XXL = {
    "_class_name": "T5EncoderModel",
    "model_type": "t5",
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": 24,
    "vocab_size": 32128,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
}
_KL_VAE_16 = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "norm_num_groups": 32,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}

PUBLISHED: dict[str, dict[str, dict[str, Any]]] = {
    # stabilityai/stable-diffusion-3.5-medium: MMDiT-X, 24 blocks (the first 13 with a second self-attention)
    "stabilityai/stable-diffusion-3.5-medium": {
        "transformer": {
            "_class_name": "SD3Transformer2DModel",
            "sample_size": 128,
            "patch_size": 2,
            "in_channels": 16,
            "out_channels": 16,
            "num_layers": 24,
            "attention_head_dim": 64,
            "num_attention_heads": 24,
            "joint_attention_dim": 4096,
            "caption_projection_dim": 1536,
            "pooled_projection_dim": 2048,
            "pos_embed_max_size": 384,
            "dual_attention_layers": list(range(13)),
            "qk_norm": "rms_norm",
        },
        "text_encoder": _CLIP_L,
        "text_encoder_2": _CLIP_G,
        "text_encoder_3": _T5_XXL,
        "vae": _KL_VAE_16,
    },
    # black-forest-labs/FLUX.1-dev: 19 double-stream and 38 single-stream blocks, guidance embedded
    "black-forest-labs/FLUX.1-dev": {
        "transformer": {
            "_class_name": "FluxTransformer2DModel",
            "patch_size": 1,
            "in_channels": 64,
            "num_layers": 19,
            "num_single_layers": 38,
            "attention_head_dim": 128,
            "num_attention_heads": 24,
            "joint_attention_dim": 4096,
            "pooled_projection_dim": 768,
            "guidance_embeds": True,
            "axes_dims_rope": [16, 56, 56],
        },
        "text_encoder": {**_CLIP_L, "_class_name": "CLIPTextModel"},
        "text_encoder_2": _T5_XXL,
        "vae": _KL_VAE_16,
    },
    # Qwen/Qwen-Image: a 60-block MMDiT over Qwen2.5-VL-7B-Instruct's hidden states, a Wan-style VAE
    "Qwen/Qwen-Image": {
        "transformer": {
            "_class_name": "QwenImageTransformer2DModel",
            "patch_size": 2,
            "in_channels": 64,
            "out_channels": 16,
            "num_layers": 60,
            "attention_head_dim": 128,
            "num_attention_heads": 24,
            "joint_attention_dim": 3584,
            "guidance_embeds": False,
            "axes_dims_rope": [16, 56, 56],
        },
        "text_encoder": {
            "_class_name": "Qwen2_5_VLForConditionalGeneration",
            "model_type": "qwen2_5_vl",
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152064,
            "tie_word_embeddings": False,
            "vision_config": {
                "depth": 32,
                "hidden_size": 1280,
                "intermediate_size": 3420,
                "num_heads": 16,
                "out_hidden_size": 3584,
                "patch_size": 14,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "in_chans": 3,
                "window_size": 112,
                "fullatt_block_indexes": [7, 15, 23, 31],
            },
        },
        "vae": {
            "_class_name": "AutoencoderKLQwenImage",
            "base_dim": 96,
            "z_dim": 16,
            "dim_mult": [1, 2, 4, 4],
            "num_res_blocks": 2,
            "attn_scales": [],
            "temperal_downsample": [False, True, True],
        },
    },
}

# ByteDance-Seed/BAGEL-7B-MoT: its llm_config.json (copied 2026-12-03, architecture fields only) is
# Qwen2.5-7B's language model; the official loader (flow_grpo's train_bagel.py, Bagel's inferencer) turns on
# qk-norm, unties the embeddings and doubles every layer into the understanding and the generation expert
# (``*_moe_gen``): 14B parameters with the ViT and lm_head that text-to-image never builds. It passes
# ``latent_patch_size=2, max_latent_size=64`` in code, and its ae.safetensors is FLUX.1's autoencoder
# (z 16, 8x downsampling: 16 pixels per token along a side).
PUBLISHED_BAGEL: dict[str, dict[str, dict[str, Any]]] = {
    "ByteDance-Seed/BAGEL-7B-MoT": {
        "transformer": {
            "llm_config": {
                "architectures": ["Qwen2ForCausalLM"],
                "model_type": "qwen2",
                "hidden_act": "silu",
                "hidden_size": 3584,
                "intermediate_size": 18944,
                "num_hidden_layers": 28,
                "num_attention_heads": 28,
                "num_key_value_heads": 4,
                "vocab_size": 152064,
                "rms_norm_eps": 1e-6,
                "rope_theta": 1000000.0,
                "max_position_embeddings": 32768,
                "tie_word_embeddings": False,
            },
            "latent_patch_size": 2,
            "max_latent_size": 64,
        },
        "vae": _KL_VAE_16,
    },
}
