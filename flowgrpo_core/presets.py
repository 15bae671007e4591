"""Named presets: small dicts of what differs from the defaults in ``config.py``.

The reference presets carry the hyper-parameters of Flow-GRPO on SD3.5-Medium at 512 px
(ALGORITHM.md sect. 9): T = 10 training steps, 40 evaluation steps, CFG 4.5, noise level 0.7,
clip range 1e-4, 24 images per prompt, 48 prompts per epoch, LoRA r32/alpha 64, lr 3e-4, EMA.
The reference trains on 8-32 GPUs; on fewer, the 48 groups per epoch are kept by running more
sampling batches per epoch, which the derived batch arithmetic does automatically.

All presets use the exact KL of the step Gaussians (``train.kl_form: exact``); set ``reference`` to
reproduce flow_grpo's scale.
"""

from __future__ import annotations

import copy
from typing import Any

from flowgrpo_core.models.base import JOINT_ATTENTION_PROJECTIONS

SD35_MEDIUM = "stabilityai/stable-diffusion-3.5-medium"
FLUX1_DEV = "black-forest-labs/FLUX.1-dev"

_SD3_REFERENCE: dict[str, Any] = {
    "model": {"source": SD35_MEDIUM, "dtype": "float16"},
    "sampling": {
        "resolution": 512,
        "num_steps": 10,
        "guidance_scale": 4.5,
        "noise_level": 0.7,
        "group_size": 24,
        "groups_per_epoch": 48,
        "batch_size": 9,
        "max_sequence_length": 256,
    },
    "train": {
        "epochs": 1000,
        "learning_rate": 3e-4,
        "clip_range": 1e-4,
        "adv_clip_max": 5.0,
        "timestep_fraction": 0.99,
        "global_std": True,
        "lora": True,
        "lora_rank": 32,
        "lora_alpha": 64.0,
        "ema": True,
        "mixed_precision": "fp16",
        "gradient_checkpointing": True,
        "checkpoint_every": 20,
        "device": "auto",
    },
    "eval": {"num_steps": 40, "guidance_scale": 4.5, "num_prompts": 256, "batch_size": 16},
}

PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny": (
        "random tiny SD3 built locally, 64 px, JPEG incompressibility: about a second per epoch on a CPU",
        {
            "model": {"source": "tiny:sd3", "dtype": "float32"},
            "sampling": {
                "resolution": 64,
                "num_steps": 8,
                "guidance_scale": 4.5,
                "noise_level": 0.7,
                "group_size": 4,
                "groups_per_epoch": 4,
                "batch_size": 4,
                "max_sequence_length": 32,
            },
            "train": {
                "epochs": 10,
                "seed": 0,
                # A random model has no notion of smooth images, so compressibility barely moves in a few
                # epochs; incompressibility follows the velocity's scale, which LoRA on proj_out and the
                # feed-forwards reaches at once. lr and clip are large for the same reason: 0.08M weights.
                "learning_rate": 1e-2,
                "clip_range": 1e-2,
                "beta": 0.01,
                "lora": True,
                "lora_rank": 8,
                "lora_alpha": 16.0,
                "lora_target_modules": [
                    *JOINT_ATTENTION_PROJECTIONS,
                    "proj_out",
                    "ff.net.0.proj",
                    "ff.net.2",
                ],
                "optimizer_steps_per_epoch": 2,
                "ema": True,
                "ema_update_interval": 1,  # 2 optimiser steps per epoch: the reference's 8 would never update
                "checkpoint_every": 2,
                "device": "cpu",
            },
            "rewards": {"jpeg_incompressibility": 1.0},
            "prompts": {"train": "builtin:animals", "eval": "builtin:animals"},
            "eval": {"num_steps": 10, "guidance_scale": 4.5, "num_prompts": 8, "batch_size": 8},
            "calibration": {"epochs": 2},
        },
    ),
    "shapes": (
        "shapes world: the packaged pre-trained tiny SD3, GenEval rules by a colour-segmentation detector; "
        "base -> trained accuracy per task in minutes on a CPU",
        {
            "model": {"source": "shapes:sd3", "dtype": "float32"},
            "sampling": {
                "resolution": 64,
                "num_steps": 6,  # 10 CPU-min probes: 0.347 with 6 steps, 0.303 with 10 (more epochs per minute)
                "guidance_scale": 4.5,
                "noise_level": 0.7,
                "group_size": 8,
                "groups_per_epoch": 8,
                "batch_size": 16,
                "max_sequence_length": 16,  # the base model was pre-trained with 16 T5 tokens
            },
            "train": {
                "epochs": 30,
                "seed": 0,
                "learning_rate": 1e-3,
                "clip_range": 1e-3,
                "beta": 0.01,
                "lora": True,
                "lora_rank": 16,
                "lora_alpha": 32.0,
                "lora_target_modules": [*JOINT_ATTENTION_PROJECTIONS, "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"],
                "optimizer_steps_per_epoch": 2,
                "ema": True,
                "ema_update_interval": 1,
                "checkpoint_every": 5,
                "device": "cpu",
            },
            "rewards": {"shapes_geneval": 1.0},
            # the score is a mean over the six tasks, and 150 of the 236 training prompts are colour attribution
            "prompts": {"train": "builtin:shapes_train", "eval": "builtin:shapes_test", "balance_tags": True},
            "eval": {
                "num_steps": 20,
                "guidance_scale": 4.5,
                "num_prompts": 80,
                "images_per_prompt": 2,
                "min_images_per_tag": 32,  # the world has 1-4 test prompts in three tasks
                "batch_size": 32,
                "metrics": ["shapes_geneval"],
            },
            "calibration": {"epochs": 2},
            # 273 images give about 2.3 points of standard error: promote only a gain beyond two of the difference
            "tracking": {"gate_metric": "eval/policy/shapes_geneval/accuracy/overall", "gate_standard_errors": 2.0},
        },
    ),
    "sd3-geneval": (
        "SD3.5-M, GenEval reward, beta 0.04 (reference: GenEval 0.63 -> 0.95)",
        {
            **_SD3_REFERENCE,
            "rewards": {"geneval": 1.0},
            "train": {**_SD3_REFERENCE["train"], "beta": 0.04},
            "prompts": {"train": "builtin:geneval_train", "eval": "builtin:geneval_test"},
        },
    ),
    "sd3-ocr": (
        "SD3.5-M, OCR reward, beta 0.04 (reference: OCR accuracy 0.59 -> 0.92)",
        {
            **_SD3_REFERENCE,
            "rewards": {"ocr": 1.0},
            "train": {**_SD3_REFERENCE["train"], "beta": 0.04},
            "prompts": {"train": "builtin:ocr_train", "eval": "builtin:ocr_test"},
        },
    ),
    "sd3-pickscore": (
        "SD3.5-M, PickScore reward, beta 0.01",
        {
            **_SD3_REFERENCE,
            "rewards": {"pickscore": 1.0},
            "train": {**_SD3_REFERENCE["train"], "beta": 0.01},
            "prompts": {"train": "builtin:general_train", "eval": "builtin:general_test"},
        },
    ),
    "sd3-pickscore-fast": (
        "SD3.5-M, PickScore, Flow-GRPO-Fast: a 2-step SDE window in the first half, clip 1e-5",
        {
            **_SD3_REFERENCE,
            "rewards": {"pickscore": 1.0},
            "sampling": {**_SD3_REFERENCE["sampling"], "sde_window_size": 2, "sde_window_range": [0.0, 0.5]},
            "train": {**_SD3_REFERENCE["train"], "beta": 0.01, "clip_range": 1e-5},
            "prompts": {"train": "builtin:general_train", "eval": "builtin:general_test"},
        },
    ),
    "flux-pickscore": (
        "FLUX.1-dev, PickScore, bf16, embedded guidance 3.5, beta 0.01",
        {
            **_SD3_REFERENCE,
            "model": {"source": FLUX1_DEV, "dtype": "bfloat16"},
            "sampling": {**_SD3_REFERENCE["sampling"], "guidance_scale": 3.5, "max_sequence_length": 512},
            "rewards": {"pickscore": 1.0},
            "train": {**_SD3_REFERENCE["train"], "beta": 0.01, "mixed_precision": "bf16"},
            "prompts": {"train": "builtin:general_train", "eval": "builtin:general_test"},
            "eval": {**_SD3_REFERENCE["eval"], "guidance_scale": 3.5, "num_steps": 28},
        },
    ),
}


def preset_names() -> list[str]:
    return list(PRESETS)


def preset_dict(name: str) -> dict[str, Any]:
    """A deep copy of the preset's overrides, tagged with its name."""
    from flowgrpo_core.config import ConfigError

    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    data = copy.deepcopy(PRESETS[name][1])
    data["preset"] = name
    return data


def preset_description(name: str) -> str:
    return PRESETS[name][0]
