"""Helpers shared by the reward and serving tests: rendered text, tiny random reward models built from
configs with a fixed seed, real servers on 127.0.0.1 (reward servers, moto S3)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render_text(text: str, size: int = 512, seed: int = 0) -> Image.Image:
    """Dark text on a light, slightly noisy background, as a text-to-image model would draw a sign."""
    rng = np.random.default_rng(seed)
    background = (225 + rng.integers(-8, 8, (size, size, 3))).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=48)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text(
        ((size - (right - left)) // 2, (size - (bottom - top)) // 2), text, fill=(20, 20, 30), font=font
    )
    return image


def random_image(seed: int, size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


@contextlib.contextmanager
def serving(reward, **options) -> Iterator:
    """A RewardServer for ``reward`` on a free 127.0.0.1 port, served from a thread."""
    from flowgrpo_core.serving.server import RewardServer

    server = RewardServer(reward, host="127.0.0.1", port=0, **options)
    with server:
        yield server


@contextlib.contextmanager
def moto_s3(tmp_path: Path) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 and the environment that points boto3 (and our cache) at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FLOWGRPO_CACHE": str(tmp_path / "cache"),
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield env["AWS_ENDPOINT_URL"]
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


# ---- tiny models -------------------------------------------------------------------------------


def tiny_clip_tokenizer():
    """A byte-level BPE CLIP tokenizer with a 514-token vocabulary (no merges): every prompt tokenizes."""
    from transformers import CLIPTokenizer

    # the 256 printable stand-ins for bytes of byte-level BPE (GPT-2 / CLIP)
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = [256 + i for i in range(256 - len(printable))]
    chars = [chr(c) for c in printable + extra]
    vocab = {"<|startoftext|>": 0}
    for token in [*chars, *(c + "</w>" for c in chars)]:
        vocab.setdefault(token, len(vocab))
    vocab["<|endoftext|>"] = len(vocab)  # the largest id, as in CLIP: open_clip pools at argmax(ids)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


TINY_EOS = 513  # id of <|endoftext|> above


def tiny_clip_config(projection_dim: int = 16, hidden_act: str = "quick_gelu", image_size: int = 32):
    from transformers import CLIPConfig

    common = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "hidden_act": hidden_act,
    }
    return CLIPConfig(
        text_config={
            **common,
            "vocab_size": 600,
            "max_position_embeddings": 77,
            "bos_token_id": 0,
            "eos_token_id": TINY_EOS,
            "pad_token_id": TINY_EOS,
        },
        vision_config={**common, "image_size": image_size, "patch_size": 8},
        projection_dim=projection_dim,
    )


def save_clip_processor(folder: Path, image_size: int = 32) -> None:
    from transformers import CLIPImageProcessor, CLIPProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tiny_clip_tokenizer()).save_pretrained(folder)


def tiny_clip_folder(folder: Path, seed: int = 0, projection_dim: int = 16) -> Path:
    """A random CLIPModel + processor saved as a hub-style folder (what ``from_pretrained`` reads)."""
    import torch
    from transformers import CLIPModel

    torch.manual_seed(seed)
    CLIPModel(tiny_clip_config(projection_dim)).eval().save_pretrained(folder)
    save_clip_processor(folder)
    return folder


def aesthetic_head_file(path: Path, embed_dim: int = 16, seed: int = 0) -> Path:
    """An aesthetic MLP head with random weights, saved as the published ``.pth`` (a plain state dict)."""
    import torch

    from flowgrpo_core.rewards.clip_rewards import AestheticHead

    torch.manual_seed(seed)
    torch.save(AestheticHead(embed_dim).state_dict(), path)
    return path


def tiny_imagereward_folder(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """(model folder with ImageReward.pt + med_config.json in the original BLIP naming, tokenizer folder).

    The checkpoint is written key by key in the layout of BLIP's timm ViT and med.py BERT (names and
    shapes), with random values, so loading exercises the real renaming and config inference."""
    import torch
    from transformers import BertTokenizer

    g = torch.Generator().manual_seed(seed)
    vision, text, patch, tokens, mlp_in = 64, 32, 8, 16, 32

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.05

    state: dict[str, torch.Tensor] = {
        "blip.visual_encoder.cls_token": rand(1, 1, vision),
        "blip.visual_encoder.pos_embed": rand(1, tokens + 1, vision),
        "blip.visual_encoder.patch_embed.proj.weight": rand(vision, 3, patch, patch),
        "blip.visual_encoder.patch_embed.proj.bias": rand(vision),
        "blip.visual_encoder.norm.weight": 1 + rand(vision),
        "blip.visual_encoder.norm.bias": rand(vision),
        "blip.text_encoder.embeddings.word_embeddings.weight": rand(120, text),
        "blip.text_encoder.embeddings.position_embeddings.weight": rand(64, text),
        "blip.text_encoder.embeddings.LayerNorm.weight": 1 + rand(text),
        "blip.text_encoder.embeddings.LayerNorm.bias": rand(text),
        "blip.text_encoder.embeddings.position_ids": torch.arange(64).unsqueeze(0),
        "blip.vision_proj.weight": rand(16, vision),  # BLIP heads ImageReward does not use
        "blip.text_proj.weight": rand(16, text),
    }
    for i in range(2):
        v = f"blip.visual_encoder.blocks.{i}."
        state.update(
            {
                v + "norm1.weight": 1 + rand(vision),
                v + "norm1.bias": rand(vision),
                v + "attn.qkv.weight": rand(3 * vision, vision),
                v + "attn.qkv.bias": rand(3 * vision),
                v + "attn.proj.weight": rand(vision, vision),
                v + "attn.proj.bias": rand(vision),
                v + "norm2.weight": 1 + rand(vision),
                v + "norm2.bias": rand(vision),
                v + "mlp.fc1.weight": rand(2 * vision, vision),
                v + "mlp.fc1.bias": rand(2 * vision),
                v + "mlp.fc2.weight": rand(vision, 2 * vision),
                v + "mlp.fc2.bias": rand(vision),
            }
        )
        t = f"blip.text_encoder.encoder.layer.{i}."
        for attention, width in (("attention", text), ("crossattention", vision)):
            state.update(
                {
                    f"{t}{attention}.self.query.weight": rand(text, text),
                    f"{t}{attention}.self.query.bias": rand(text),
                    f"{t}{attention}.self.key.weight": rand(text, width),
                    f"{t}{attention}.self.key.bias": rand(text),
                    f"{t}{attention}.self.value.weight": rand(text, width),
                    f"{t}{attention}.self.value.bias": rand(text),
                    f"{t}{attention}.output.dense.weight": rand(text, text),
                    f"{t}{attention}.output.dense.bias": rand(text),
                    f"{t}{attention}.output.LayerNorm.weight": 1 + rand(text),
                    f"{t}{attention}.output.LayerNorm.bias": rand(text),
                }
            )
        state.update(
            {
                t + "intermediate.dense.weight": rand(2 * text, text),
                t + "intermediate.dense.bias": rand(2 * text),
                t + "output.dense.weight": rand(text, 2 * text),
                t + "output.dense.bias": rand(text),
                t + "output.LayerNorm.weight": 1 + rand(text),
                t + "output.LayerNorm.bias": rand(text),
            }
        )
    for index, (fan_out, fan_in) in zip(
        (0, 2, 4, 6, 7), ((1024, mlp_in), (128, 1024), (64, 128), (16, 64), (1, 16))
    ):
        state[f"mlp.layers.{index}.weight"] = torch.randn(fan_out, fan_in, generator=g) / fan_in**0.5
        state[f"mlp.layers.{index}.bias"] = rand(fan_out)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "ImageReward.pt")
    med = {
        "vocab_size": 120,
        "hidden_size": text,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 2 * text,
        "max_position_embeddings": 64,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "encoder_width": vision,
        "add_cross_attention": True,
    }
    (folder / "med_config.json").write_text(json.dumps(med))
    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *"abcdefghijklmnopqrstuvwxyz0123456789",
        *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"),
        "a",
        "cat",
        "dog",
        "red",
        "blue",
        "photo",
        "of",
        "the",
    ]
    tokenizer_folder = folder / "tokenizer"
    tokenizer_folder.mkdir(exist_ok=True)
    (tokenizer_folder / "vocab.txt").write_text("\n".join(dict.fromkeys(words)) + "\n")
    BertTokenizer(str(tokenizer_folder / "vocab.txt"), model_max_length=64).save_pretrained(tokenizer_folder)
    return folder, tokenizer_folder
