"""The shapes-world SD3: its sizes (``config.ShapesModelSpec``), tokenizers that know the world's words as single
tokens, and a builder with random weights.

A real CLIP or T5 vocabulary has "circle" and "purple" as one token; the character-level tokenizers of
``models/tiny.py`` would make a 2-layer text encoder spell, so the world's words get their own tokens here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flowgrpo_core.models.tiny import (
    clip_text_config,
    sd3_transformer,
    t5_encoder,
    tiny_clip_tokenizer,
    tiny_t5_tokenizer,
)
from flowgrpo_core.pretrain.config import ShapesModelSpec
from flowgrpo_core.prompts.vocabulary import COLORS, NUMBERS, SHAPES_WORLD, make_plural

RELATION_WORDS = ("left", "right", "of", "above", "below")


def world_words(shapes: Sequence[str] = SHAPES_WORLD) -> list[str]:
    """Every word a shapes-world caption can use."""
    words = ["a", "an", "and", *NUMBERS[2:5], *COLORS, *RELATION_WORDS]
    for shape in shapes:
        words += [shape, make_plural(shape)]
    return list(dict.fromkeys(words))


def shapes_clip_tokenizer(max_length: int = 16, words: Sequence[str] | None = None):
    """tiny.py's byte-level CLIP tokenizer plus merges that make each world word one token.

    The merges are found as BPE would learn them: tokenize every word, join its pieces left to right
    with new merges, and repeat until every word is a single token (an early merge such as "a"+"n" of
    "an" splits "orange" differently from its own chain, so one pass is not enough)."""
    words = world_words() if words is None else words
    merges: list[tuple[str, str]] = []
    for _ in range(8):
        tokenizer = tiny_clip_tokenizer(merges, max_length)
        split = [tokenizer.tokenize(word) for word in words]
        if all(len(pieces) == 1 for pieces in split):
            return tokenizer
        for pieces in split:
            current = pieces[0]
            for piece in pieces[1:]:
                if (current, piece) not in merges:
                    merges.append((current, piece))
                current += piece
    raise AssertionError(f"could not make every world word one CLIP token: {split}")


def shapes_t5_tokenizer(words: Sequence[str] | None = None):
    """tiny.py's character-level T5 tokenizer plus one piece per world word."""
    return tiny_t5_tokenizer(world_words() if words is None else words)


def build_shapes_sd3(spec: ShapesModelSpec | None = None, seed: int = 0):
    """A ``StableDiffusion3Pipeline`` of the shapes-world sizes with random weights (same seed, same weights)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    spec = spec or ShapesModelSpec()

    clip_tokenizer = shapes_clip_tokenizer(spec.max_text_tokens)
    t5_tokenizer = shapes_t5_tokenizer()
    latent_side = spec.resolution // 2 ** (len(spec.vae_blocks) - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip_config = clip_text_config(
            clip_tokenizer,
            spec.clip_hidden,
            intermediate=spec.clip_hidden * 4,
            vocab_size=len(clip_tokenizer),
            max_positions=spec.max_text_tokens,
            projection_dim=spec.clip_hidden,
        )
        text_encoder = CLIPTextModelWithProjection(clip_config)
        text_encoder_2 = CLIPTextModelWithProjection(clip_config)
        text_encoder_3 = t5_encoder(
            spec.t5_d_model,
            spec.t5_d_model // 4,
            d_ff=spec.t5_d_model * 2,
            vocab_size=len(t5_tokenizer),
            max_distance=spec.max_text_tokens,
            dropout_rate=0.0,  # the same function in training and sampling
        )
        transformer = sd3_transformer(
            sample_size=latent_side,
            patch_size=spec.patch_size,
            latent_channels=spec.latent_channels,
            num_layers=spec.num_layers,
            num_attention_heads=spec.num_attention_heads,
            attention_head_dim=spec.attention_head_dim,
            t5_d_model=spec.t5_d_model,
            clip_hidden=spec.clip_hidden,
            pos_embed_max_size=latent_side // spec.patch_size,
            qk_norm="rms_norm",  # as SD3.5: keeps attention logits bounded at a high learning rate
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(spec.vae_blocks),
            up_block_types=("UpDecoderBlock2D",) * len(spec.vae_blocks),
            block_out_channels=spec.vae_blocks,
            layers_per_block=1,
            latent_channels=spec.latent_channels,
            norm_num_groups=8,
            sample_size=spec.resolution,
            shift_factor=0.0,  # set from the latents after the VAE phase
            scaling_factor=1.0,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=spec.shift),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=shapes_clip_tokenizer(spec.max_text_tokens),
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer,
    )
    for module in (transformer, vae, text_encoder, text_encoder_2, text_encoder_3):
        module.eval()  # no dropout anywhere, so training and sampling compute the same function
    return pipe
