"""Tiny detectors with random weights (OWLv2, Mask2Former), saved as hub-style folders.

They have the real architectures and processors at a few hundred thousand parameters, so the GenEval
code path (loading, pre- and post-processing, rules, colour crops) runs offline on a CPU in a second.
Their detections are random: tests assert on shapes and bookkeeping, never on accuracy.
"""

from __future__ import annotations

from pathlib import Path

from flowgrpo_core.prompts.vocabulary import COCO_CLASSES

# COCO's own spellings, so that loading exercises the renaming to GenEval's names
COCO_LABELS = tuple(
    {"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard"}.get(c, c)
    for c in COCO_CLASSES
)


def _byte_level_vocab() -> dict[str, int]:
    """A character-level CLIP vocabulary. ``<|startoftext|>`` must not get id 0: OWL treats a query whose
    first token is 0 as padding."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = [chr(c) for c in printable + [256 + i for i in range(256 - len(printable))]]
    vocab: dict[str, int] = {}
    for token in [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(token, len(vocab))
    return vocab


def save_tiny_owlv2(folder: str | Path, seed: int = 0, image_size: int = 64) -> Path:
    import torch
    from transformers import (
        CLIPTokenizer,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
    )

    folder = Path(folder)
    vocab = _byte_level_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    common = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    ids = {
        "bos_token_id": vocab["<|startoftext|>"],
        "eos_token_id": vocab["<|endoftext|>"],
        "pad_token_id": vocab["<|endoftext|>"],
    }
    config = Owlv2Config(
        text_config={**common, **ids, "vocab_size": len(vocab), "max_position_embeddings": 77},
        vision_config={**common, "image_size": image_size, "patch_size": 16},
        projection_dim=32,  # OWL's class head compares image features with text embeddings of this size
    )
    torch.manual_seed(seed)
    Owlv2ForObjectDetection(config).eval().save_pretrained(folder)
    processor = Owlv2ImageProcessor(size={"height": image_size, "width": image_size})
    Owlv2Processor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def save_tiny_mask2former(folder: str | Path, seed: int = 0, labels: tuple[str, ...] = COCO_LABELS) -> Path:
    import torch
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    folder = Path(folder)
    backbone = SwinConfig(
        image_size=64,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        hidden_dim=32,
        num_queries=20,
        encoder_layers=1,
        decoder_layers=2,
        mask_feature_size=32,
        feature_size=32,
        encoder_feedforward_dim=64,
        dim_feedforward=64,
        num_attention_heads=2,
        common_stride=4,
        use_timm_backbone=False,
    )
    torch.manual_seed(seed)
    Mask2FormerForUniversalSegmentation(config).eval().save_pretrained(folder)
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 128}).save_pretrained(folder)
    return folder
