"""Tiny SD3, FLUX, Qwen-Image and Bagel pipelines with random weights, built offline and deterministically from a seed.

They have the real architectures (MMDiT, CLIP + T5 or Qwen2.5-VL text encoders, KL or Wan-style 3-D VAE) at a
few hundred thousand parameters, so every code path of the project runs on a CPU in seconds and no test needs
the hub. Tokenizers are built in memory (byte-level BPE for CLIP and Qwen, a character Unigram for T5).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def byte_level_alphabet() -> dict[int, str]:
    """byte -> its printable stand-in in byte-level BPE vocabularies (GPT-2, CLIP, Qwen), printable bytes first."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {byte: chr(code) for byte, code in zip(printable, codes)}


def bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins for bytes that byte-level BPE vocabularies use (GPT-2 / CLIP)."""
    return list(byte_level_alphabet().values())


# A few frequent English merges so that prompts tokenize into more than single characters.
_CLIP_MERGES = (
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "n"),
    ("i", "n"),
    ("o", "n</w>"),
    ("e", "r"),
    ("r", "e"),
    ("a", "t"),
)


def tiny_clip_tokenizer(merges: Sequence[tuple[str, str]] = _CLIP_MERGES, max_length: int = 77):
    """A byte-level BPE CLIP tokenizer with only ``merges`` beyond single bytes (the vocabulary follows)."""
    from transformers import CLIPTokenizer

    chars = bytes_to_unicode()
    vocab: dict[str, int] = {}
    for token in ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]:
        vocab.setdefault(token, len(vocab))
    for merge in merges:
        vocab.setdefault("".join(merge), len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=max_length)


def tiny_t5_tokenizer(words: Sequence[str] = ()):
    """A character-level Unigram T5 tokenizer; each of ``words`` gets one likely piece that beats its
    spelling (each character costs -3)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for char in map(chr, range(33, 127)):
        pieces += [(char, -3.0), ("▁" + char, -3.5)]
    pieces += [("▁" + word, -1.0) for word in words]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


@dataclass(frozen=True)
class TinySD3Spec:
    """Sizes of a random SD3; the defaults give ~0.5M parameters and 64 px images in milliseconds."""

    num_layers: int = 2
    num_attention_heads: int = 4
    attention_head_dim: int = 8
    vae_blocks: tuple[int, ...] = (8, 16, 16, 16)  # 4 blocks -> VAE factor 8
    latent_channels: int = 16
    clip_hidden: int = 32
    t5_d_model: int = 64
    # blocks with SD3.5's second image self-attention (``attn2``), as SD3.5-Medium has in its first 13
    dual_attention_layers: tuple[int, ...] = ()


def build_tiny_sd3(seed: int = 0, spec: TinySD3Spec = TinySD3Spec()):
    """A ``StableDiffusion3Pipeline`` with random weights, identical for equal seeds."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    tokenizer = tiny_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip_config = clip_text_config(tokenizer, spec.clip_hidden, projection_dim=spec.clip_hidden)
        text_encoder = CLIPTextModelWithProjection(clip_config)
        text_encoder_2 = CLIPTextModelWithProjection(clip_config)
        text_encoder_3 = t5_encoder(d_model=spec.t5_d_model, d_kv=16)
        transformer = sd3_transformer(
            sample_size=32,
            patch_size=2,
            latent_channels=spec.latent_channels,
            num_layers=spec.num_layers,
            num_attention_heads=spec.num_attention_heads,
            attention_head_dim=spec.attention_head_dim,
            t5_d_model=spec.t5_d_model,
            clip_hidden=spec.clip_hidden,
            pos_embed_max_size=128,
            dual_attention_layers=spec.dual_attention_layers,
        )
        vae = _tiny_vae(spec.vae_blocks, spec.latent_channels)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tiny_t5_tokenizer(),
    )
    return _eval_mode(pipe)


def build_tiny_flux(seed: int = 0):
    """A ``FluxPipeline`` (guidance-distilled like FLUX.1-dev) with random weights."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(clip_text_config(tokenizer, 32))
        text_encoder_2 = t5_encoder(d_model=32, d_kv=8)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels x 2x2 packing
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 4, 8),
        )
        vae = _tiny_vae((8, 16, 16, 16), latent_channels=4)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_t5_tokenizer(),
    )
    return _eval_mode(pipe)


def clip_text_config(
    tokenizer,
    hidden: int,
    *,
    intermediate: int | None = None,
    vocab_size: int = 1000,
    max_positions: int = 77,
    **extra,
):
    """A 2-layer CLIP text config for ``tokenizer`` (``max_positions``: the pipelines pad CLIP prompts to the
    tokenizer's ``model_max_length``, 77 for the tiny one)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 2,
        num_hidden_layers=2,  # SD3 reads hidden_states[-2]
        num_attention_heads=4,
        vocab_size=vocab_size,
        max_position_embeddings=max_positions,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def t5_encoder(
    d_model: int,
    d_kv: int,
    *,
    d_ff: int | None = None,
    vocab_size: int = 1000,
    max_distance: int = 16,
    **extra,
):
    """A 2-layer T5 encoder with random weights (``extra``: more ``T5Config`` fields)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=d_model,
            d_kv=d_kv,
            d_ff=d_ff or d_model,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=max_distance,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
            **extra,
        )
    )


def sd3_transformer(
    *,
    sample_size: int,
    patch_size: int,
    latent_channels: int,
    num_layers: int,
    num_attention_heads: int,
    attention_head_dim: int,
    t5_d_model: int,
    clip_hidden: int,
    pos_embed_max_size: int,
    **extra,
):
    """An MMDiT sized for two CLIPs of width ``clip_hidden`` and a T5 of width ``t5_d_model``."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=patch_size,
        in_channels=latent_channels,
        num_layers=num_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=t5_d_model,  # CLIP (2 x hidden) is padded to the T5 width
        caption_projection_dim=num_attention_heads * attention_head_dim,
        pooled_projection_dim=2 * clip_hidden,
        out_channels=latent_channels,
        pos_embed_max_size=pos_embed_max_size,
        **extra,
    )


def _tiny_vae(blocks: tuple[int, ...], latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        block_out_channels=blocks,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        shift_factor=0.0609,
        scaling_factor=1.5035,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _eval_mode(pipe):
    # Freshly constructed modules are in train mode, and T5's dropout would make every call random.
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.eval()
    return pipe


# Qwen-Image's chat template, whose first 34 tokens (the system turn and the user turn's header) the pipeline
# drops from the text encoder's output (``prompt_template_encode_start_idx``)
QWEN_TEMPLATE_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")

# Qwen/Qwen-Image's scheduler config: resolution-dependent exponential time shift, stretched to end at 0.02
QWEN_IMAGE_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}


def tiny_qwen_tokenizer(template: str, special_tokens: Sequence[str] = QWEN_TEMPLATE_SPECIAL_TOKENS):
    """A byte-level BPE ``Qwen2Tokenizer`` with Qwen's ``special_tokens`` whose merges spell every word of
    ``template`` (the pipeline's chat template) as one token, as the real vocabulary does: the template's
    system turn then tokenizes to as many tokens as the pipeline drops, and prompts to a few bytes each."""
    import re

    from transformers import Qwen2Tokenizer

    alphabet = byte_level_alphabet()
    vocab = {char: i for i, char in enumerate(alphabet.values())}
    merges: list[tuple[str, str]] = []
    plain = re.sub("|".join(re.escape(t) for t in special_tokens), "", template)
    for word in dict.fromkeys(re.findall(r" ?[A-Za-z]+", plain)):
        pieces = [alphabet[b] for b in word.encode()]
        merged = pieces[0]
        for piece in pieces[1:]:
            if (merged, piece) not in merges:
                merges.append((merged, piece))
            merged += piece
            vocab.setdefault(merged, len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)  # adds <|endoftext|> (end of text, padding)
    tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    return tokenizer


@dataclass(frozen=True)
class TinyQwenImageSpec:
    """Sizes of a random Qwen-Image; the defaults give a 0.05M-parameter transformer and 64 px images in
    milliseconds. The latent factor is 2 ** vae_downsamples (8, as the real VAE) x 2 for the 2x2 packing."""

    num_layers: int = 2
    num_attention_heads: int = 2
    attention_head_dim: int = 16
    # MSRoPE's (frame, height, width) split of a head's dimensions; sums to attention_head_dim
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)
    text_hidden: int = 32
    text_heads: int = 4
    text_layers: int = 2
    latent_channels: int = 4  # z_dim (Qwen-Image: 16)
    vae_base_dim: int = 8
    vae_downsamples: int = 3


def build_tiny_qwenimage(seed: int = 0, spec: TinyQwenImageSpec = TinyQwenImageSpec()):
    """A ``QwenImagePipeline`` with random weights: Qwen2.5-VL text encoder, MMDiT with MSRoPE, causal 3-D VAE."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=4 * spec.latent_channels,  # 2x2 packing
            out_channels=spec.latent_channels,
            num_layers=spec.num_layers,
            attention_head_dim=spec.attention_head_dim,
            num_attention_heads=spec.num_attention_heads,
            joint_attention_dim=spec.text_hidden,
            axes_dims_rope=spec.axes_dims_rope,
        )
        vae = AutoencoderKLQwenImage(
            base_dim=spec.vae_base_dim,
            z_dim=spec.latent_channels,
            dim_mult=[1] + [2] * spec.vae_downsamples,
            num_res_blocks=1,
            # the real VAE's pattern: no time downsampling in the first stage (an image is one frame anyway)
            temperal_downsample=[False] + [True] * (spec.vae_downsamples - 1),
            latents_mean=torch.linspace(-0.5, 0.5, spec.latent_channels).tolist(),
            latents_std=torch.linspace(1.5, 2.5, spec.latent_channels).tolist(),
        )
        pipe = QwenImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER),
            vae=vae,
            text_encoder=None,
            tokenizer=None,
            transformer=transformer,
        )
        # the tokenizer is made for the chat template the pipeline formats prompts with
        tokenizer = tiny_qwen_tokenizer(pipe.prompt_template_encode)
        text_encoder = Qwen2_5_VLForConditionalGeneration(qwen_vl_config(tokenizer, spec))
    pipe.register_modules(text_encoder=text_encoder, tokenizer=tokenizer)
    return _eval_mode(pipe)


def qwen_vl_config(tokenizer, spec: TinyQwenImageSpec):
    """A small ``Qwen2_5_VLConfig`` for ``tokenizer``: ``spec.text_layers`` decoder layers and a one-block vision
    tower (the pipeline encodes text only). The multimodal RoPE splits each head's half-dimension like the
    7B model's (16, 24, 24) of 64."""
    from transformers import Qwen2_5_VLConfig

    half = spec.text_hidden // spec.text_heads // 2
    temporal = half // 4
    height = (half - temporal) // 2
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokens = {
        "bos_token_id": end_of_text,
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": end_of_text,
    }
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": spec.text_hidden,
            "intermediate_size": 2 * spec.text_hidden,
            "num_hidden_layers": spec.text_layers,
            "num_attention_heads": spec.text_heads,
            "num_key_value_heads": spec.text_heads // 2,
            "max_position_embeddings": 2048,
            "rope_scaling": {"type": "mrope", "mrope_section": [temporal, height, half - temporal - height]},
            **tokens,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": spec.text_hidden,
            "fullatt_block_indexes": [0],
        },
        **tokens,
    )


@dataclass(frozen=True)
class TinyBagelSpec:
    """Sizes of a random Bagel: a 2-layer MoT of width 32 (0.06M parameters) and a FLUX-style VAE of width 32
    (its GroupNorm has FLUX's fixed 32 groups); 64 px images are 4 x 4 patches of 2 x 2 latent pixels."""

    num_layers: int = 2
    hidden: int = 32
    heads: int = 4
    kv_heads: int = 2
    latent_channels: int = 4  # z_channels (FLUX: 16)
    vae_width: int = 32
    vae_levels: int = 4  # 3 halvings: 8 pixels per latent pixel, as FLUX
    max_latent_size: int = 16  # patches per side (the real model: 64)


# words the tiny Bagel tokenizer spells as one token each (the rest of a prompt goes byte by byte)
_BAGEL_WORDS = "a photo of the cat dog in with and"


def build_tiny_bagel(seed: int = 0, spec: TinyBagelSpec = TinyBagelSpec()):
    """A ``BagelPipeline`` with random weights, written in the official folder layout and read back through the
    loader of real checkpoints (in a temporary folder), identical for equal seeds."""
    import tempfile

    from diffusers import AutoencoderKL

    from flowgrpo_core.models.bagel import BagelPipeline, BagelTransformer
    from flowgrpo_core.models.bagel.layout import SPECIAL_TOKENS
    from flowgrpo_core.models.bagel.vae import autoencoder_config

    tokenizer = tiny_qwen_tokenizer(_BAGEL_WORDS, special_tokens=SPECIAL_TOKENS)
    llm_config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": spec.hidden,
        "intermediate_size": 2 * spec.hidden,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "vocab_size": len(tokenizer),
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # llm2vae is random: the reference zero-initialises it before training from scratch, which here would
        # make every velocity 0
        transformer = BagelTransformer(llm_config, spec.latent_channels, 2, spec.max_latent_size)
        vae = AutoencoderKL(**autoencoder_config([spec.vae_width] * spec.vae_levels, 1, spec.latent_channels))
    vit = {"hidden_size": 16, "num_hidden_layers": 1, "patch_size": 14, "image_size": 224}
    with tempfile.TemporaryDirectory() as folder:
        BagelPipeline(transformer, vae, tokenizer, vit_config=vit).save_pretrained(folder)
        return BagelPipeline.from_folder(folder)


TINY_BUILDERS = {
    "sd3": build_tiny_sd3,
    "flux": build_tiny_flux,
    "qwenimage": build_tiny_qwenimage,
    "bagel": build_tiny_bagel,
}
