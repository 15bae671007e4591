"""Named presets: small dicts of what differs from the defaults in ``config.py``.

The reference presets carry the hyper-parameters of the official flow_grpo configs (``config/grpo.py`` of
upstream as of 2025-11-04), field by field; where a value differs, README "Differences from flow_grpo"
says why. Upstream trains on 32 GPUs; on fewer devices the same prompts and images per epoch are kept by
running more sampling batches per epoch, which the derived batch arithmetic does automatically.

What every SD3.5-Medium reference preset shares (``geneval_sd3``, ``pickscore_sd3``, ``general_ocr_sd3``):
512 px, T = 10 roll-out steps (9 trained), 40 evaluation steps, CFG 4.5, noise level 0.7, 24 images per
prompt x 48 prompts, batches of 9, T5 prompts of 128 tokens, clip range 1e-4, advantages clipped at 5,
the epoch's std, LoRA r32/alpha 64 on the joint-attention projections, lr 3e-4, two optimiser steps per
epoch, EMA, the transformer and VAE in float32 under fp16 autocast with float16 text encoders, and the KL
on the reference's scale (``train.kl_form: reference``, the config default).
"""

from __future__ import annotations

from typing import Any

from flowgrpo_core.models.base import JOINT_ATTENTION_PROJECTIONS, JOINT_FEED_FORWARDS

SD35_MEDIUM = "stabilityai/stable-diffusion-3.5-medium"
FLUX1_DEV = "black-forest-labs/FLUX.1-dev"
QWEN_IMAGE = "Qwen/Qwen-Image"
BAGEL_7B = "ByteDance-Seed/BAGEL-7B-MoT"


def _merge(base: dict[str, Any], **sections: dict[str, Any]) -> dict[str, Any]:
    """``base`` with each named section updated (one level deep); other sections are shared, not copied."""
    out = dict(base)
    for name, values in sections.items():
        out[name] = {**base.get(name, {}), **values}
    return out


_SD3_REFERENCE: dict[str, Any] = {
    "model": {
        "source": SD35_MEDIUM,
        "dtype": "float32",
        "text_encoder_dtype": "float16",
        "vae_dtype": "float32",
    },
    "sampling": {
        "resolution": 512,
        "num_steps": 10,
        "guidance_scale": 4.5,
        "noise_level": 0.7,
        "group_size": 24,
        "groups_per_epoch": 48,
        "batch_size": 9,
        "max_sequence_length": 128,
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
        "checkpoint_every": 20,
        "device": "auto",
    },
    # the whole test set, as upstream evaluates (the builtin sets hold 553, 1018 and 1000 prompts)
    "eval": {"num_steps": 40, "guidance_scale": 4.5, "batch_size": 16, "num_prompts": 2048},
}

# Flow-GRPO-Fast as upstream runs it (``*_sd3_fast_nocfg``, its sd3_fast.sh): no CFG in training or evaluation,
# coefficient-preserving steps at noise 0.8, a 3-step SDE window starting in steps 0-2, no KL, clip 1e-5, and
# the samples trained in sampling order
_SD3_FAST_NOCFG: dict[str, Any] = _merge(
    _SD3_REFERENCE,
    sampling={
        "guidance_scale": 1.0,
        "sde_type": "cps",
        "noise_level": 0.8,
        "sde_window_size": 3,
        "sde_window_range": [0.0, 0.5],
    },
    train={"beta": 0.0, "clip_range": 1e-5, "shuffle_samples": False},
    eval={"guidance_scale": 1.0},
)

# ``pickscore_flux``: FLUX.1-dev with its embedded guidance 3.5, T = 6 (5 trained) at noise 0.9, no KL, LoRA
# r64/alpha 128 on attention and feed-forward layers, batches of 3, the transformer in float32 under bf16
# autocast with bfloat16 text encoders, 28 evaluation steps, and every sample trained (the FLUX scripts do
# not drop zero-advantage samples)
_FLUX_REFERENCE: dict[str, Any] = _merge(
    _SD3_REFERENCE,
    model={"source": FLUX1_DEV, "text_encoder_dtype": "bfloat16"},
    sampling={"num_steps": 6, "guidance_scale": 3.5, "noise_level": 0.9, "batch_size": 3},
    train={
        "beta": 0.0,
        "lora_rank": 64,
        "lora_alpha": 128.0,
        "mixed_precision": "bf16",
        "zero_advantage": "keep",
        "lora_target_modules": [*JOINT_ATTENTION_PROJECTIONS, *JOINT_FEED_FORWARDS],
        # upstream launches FLUX with accelerate's DeepSpeed ZeRO-2 config; `flowgrpo plan`: 77 GiB per 80 GB
        # GPU without it, 53 with it
        "deepspeed_stage": 2,
    },
    eval={"num_steps": 28, "guidance_scale": 3.5},
)

# ``pickscore_qwenimage`` (its train_qwenimage.py): true CFG 4 with the negative prompt " ", T = 10 at noise 1.2
# with a 2-step SDE window in the first half (Flow-GRPO-Fast, plain `sde` steps), 16 images x 32 prompts in
# batches of 4, no KL, no EMA, LoRA r64/alpha 128 on the family's targets (attention and both streams'
# feed-forwards: ``train.lora_target_modules`` empty), activation checkpointing, bf16, every sample trained in
# sampling order, prompts of up to 512 tokens, 50 evaluation steps in batches of 4. The frozen weights are
# held in bfloat16 (upstream: float32 copies that FSDP casts to bf16 for compute; README "Differences"), and
# sharded with DeepSpeed ZeRO-3 where upstream uses FSDP.
_QWEN_REFERENCE: dict[str, Any] = _merge(
    _SD3_REFERENCE,
    model={"source": QWEN_IMAGE, "dtype": "bfloat16", "text_encoder_dtype": "bfloat16"},
    sampling={
        "guidance_scale": 4.0,
        "negative_prompt": " ",
        "noise_level": 1.2,
        "sde_window_size": 2,
        "sde_window_range": [0.0, 0.5],
        "group_size": 16,
        "groups_per_epoch": 32,
        "batch_size": 4,
        "max_sequence_length": 512,
    },
    train={
        "beta": 0.0,
        "timestep_fraction": 1.0,  # upstream's default; a Fast window trains its steps whatever the fraction
        "lora_rank": 64,
        "lora_alpha": 128.0,
        "ema": False,
        "mixed_precision": "bf16",
        "gradient_checkpointing": True,
        "zero_advantage": "keep",
        "shuffle_samples": False,
        # upstream shards Qwen-Image fully (FSDP) with the optimiser offloaded: ZeRO-3 with optimiser offload
        # here; `flowgrpo plan` on 8 x 80 GB: 66 GiB per GPU without them (10% headroom leaves 72), 28 with them
        "deepspeed_stage": 3,
        "offload_optimizer": True,
    },
    eval={"num_steps": 50, "guidance_scale": 4.0, "batch_size": 4},
)

# ``pickscore_bagel_lora`` (its train_bagel.py): text CFG 4 with the global renorm, 15 timesteps = T 14 at noise
# 1.3 with a 2-step SDE window in the first half (Flow-GRPO-Fast, plain `sde` steps), 16 images x 48 prompts in
# batches of 6, per-prompt std, clip 1e-5, lr 1e-4, no KL, no EMA, LoRA r64/alpha 128 on the generation
# expert (``train.lora_target_modules`` empty: the family's), activation checkpointing, bf16, every sample
# trained in sampling order, 50 evaluation timesteps (T 49) on the first 512 test prompts. The schedule's shift 3
# and the renorm are the adapter's (models/bagel). ``pickscore_bagel`` (full fine-tuning of the generation
# expert) differs in its 3-step window. Upstream runs both under FSDP full sharding with the optimiser offloaded;
# `flowgrpo plan` on 8 x 80 GB (72 GiB usable): the LoRA run peaks at 34 GiB as it is, so it keeps plain
# torch; full fine-tuning (6.5B trained parameters, AdamW in float32) peaks at 117 GiB unsharded and at 44 with
# ZeRO-2 (gradients and optimiser states sharded), the cheapest stage that fits, so its preset sets that.
_BAGEL_REFERENCE: dict[str, Any] = _merge(
    _SD3_REFERENCE,
    model={"source": BAGEL_7B, "dtype": "bfloat16", "vae_dtype": "bfloat16"},
    sampling={
        "num_steps": 14,
        "guidance_scale": 4.0,
        "noise_level": 1.3,
        "sde_window_size": 2,
        "sde_window_range": [0.0, 0.5],
        "group_size": 16,
        "groups_per_epoch": 48,
        "batch_size": 6,
        "max_sequence_length": 512,  # upstream does not truncate prompts
    },
    train={
        "learning_rate": 1e-4,
        "clip_range": 1e-5,
        "beta": 0.0,
        "global_std": False,
        "timestep_fraction": 1.0,
        "lora_rank": 64,
        "lora_alpha": 128.0,
        "ema": False,
        "mixed_precision": "bf16",
        "gradient_checkpointing": True,
        "zero_advantage": "keep",
        "shuffle_samples": False,
    },
    eval={"num_steps": 49, "guidance_scale": 4.0, "batch_size": 4, "num_prompts": 512},
)

_PICKSCORE = {
    "rewards": {"pickscore": 1.0},
    "prompts": {"train": "builtin:general_train", "eval": "builtin:general_test"},
}
_GENEVAL = {
    "rewards": {"geneval": 1.0},
    "prompts": {"train": "builtin:geneval_train", "eval": "builtin:geneval_test"},
}
_OCR = {"rewards": {"ocr": 1.0}, "prompts": {"train": "builtin:ocr_train", "eval": "builtin:ocr_test"}}

# GRPO-Guard as upstream runs it (``config/grpo_guard.py``, its train_sd3_GRPO_Guard.py): the SD3.5-M reference
# with RatioNorm (the shift per micro-batch) and the 1/(-dt) gradient reweight, lr 1e-4, beta 0, the group's std,
# evaluation and checkpoints every 30 epochs on the whole test set. Upstream's `highclip_range` (equal to the clip
# range) is read by no script: train.highclip_range stays unset. The clip range and the reward mix differ per task;
# a 0-weighted pickscore is scored on every image as upstream logs it, and is the gold metric during training.
_SD3_GUARD: dict[str, Any] = _merge(
    _SD3_REFERENCE,
    train={
        "learning_rate": 1e-4,
        "beta": 0.0,
        "global_std": False,
        "ratio_norm": True,
        "ratio_norm_bias": "batch",
        "grad_reweight": True,
        "checkpoint_every": 30,
    },
    eval={"every_epochs": 30, "batch_size": 16},
)


# the shapes world (`make run`): the packaged pre-trained tiny SD3, GenEval rules judged by a colour-segmentation
# detector
_SHAPES: dict[str, Any] = {
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
        # the shapes benchmarks in the README were measured with the exact KL and all zero-advantage
        # samples dropped; kept so that those numbers stay reproducible
        "kl_form": "exact",
        "zero_advantage": "drop",
        "lora": True,
        "lora_rank": 16,
        "lora_alpha": 32.0,
        "lora_target_modules": [*JOINT_ATTENTION_PROJECTIONS, *JOINT_FEED_FORWARDS],
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
    "tracking": {
        "gate_metric": "eval/policy/shapes_geneval/accuracy/overall",
        "gate_standard_errors": 2.0,
    },
}


def _without(section: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in section.items() if k not in keys}


# DiffusionNFT in the shapes world: the shapes preset without its Flow-GRPO settings (clip, KL, zero-advantage
# handling), sampling CFG-free with the DPM-Solver++(2M) ODE as the paper trains, the held-out evaluation
# unchanged (so base accuracies compare with the Flow-GRPO runs'). The NFT settings are the authors' GenEval ones
# except nft_kl_beta: 0 saves the reference forward (a third of the training forwards on a CPU); at the authors'
# 1e-4 the KL term is below 1e-6 of the policy loss in tiny runs.
_SHAPES_NFT: dict[str, Any] = {
    **_SHAPES,
    "sampling": {**_SHAPES["sampling"], "guidance_scale": 1.0},
    "train": {
        **_without(_SHAPES["train"], "clip_range", "beta", "kl_form", "zero_advantage"),
        "algorithm": "nft",
        "nft_kl_beta": 0.0,
    },
}


# ``sd3_geneval`` of DiffusionNFT (NVlabs/DiffusionNFT config/nft.py, as of its initial commit 24af555): SD3.5-M
# CFG-free (guidance 1 in sampling and evaluation), 10 DPM-Solver++(2M) ODE steps from the old policy, 9 noise
# levels trained per image (timestep_fraction 0.99), beta 1, the old policy's decay_type 1 (0, 0.001, 0.5), KL 1e-4,
# 24 images x 48 prompts in batches of 9 with one optimiser step per epoch (gradient_step_per_epoch 1), lr 3e-4,
# LoRA r32/alpha 64 on the joint-attention projections, EMA 0.9 updated every step, fp16 autocast, the epoch's
# std, 40 evaluation steps in batches of 14, checkpoints every 30 epochs (save_freq). Upstream trains on 8 GPUs.
_SD3_GENEVAL_NFT: dict[str, Any] = {
    **_merge(
        _SD3_REFERENCE,
        sampling={"guidance_scale": 1.0},
        train={
            "algorithm": "nft",
            "optimizer_steps_per_epoch": 1,
            "ema_update_interval": 1,
            "checkpoint_every": 30,
            "nft_beta": 1.0,
            "nft_kl_beta": 1e-4,
            "nft_decay_flat_steps": 0,
            "nft_decay_rate": 1e-3,
            "nft_decay_max": 0.5,
            "nft_solver": "dpm2",
        },
        eval={"guidance_scale": 1.0, "batch_size": 14},
    ),
    **_GENEVAL,
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
        _SHAPES,
    ),
    "shapes-nft": (
        "shapes world with DiffusionNFT: CFG-free ODE roll-outs of a soft-updated old policy, a reward-weighted "
        "flow-matching loss; the shapes preset's model, reward, prompts and evaluation",
        _SHAPES_NFT,
    ),
    "sd3-geneval": (
        "SD3.5-M, GenEval reward, beta 0.04 (upstream geneval_sd3; reference: GenEval 0.63 -> 0.95)",
        {**_merge(_SD3_REFERENCE, train={"beta": 0.04}, eval={"batch_size": 14}), **_GENEVAL},
    ),
    "sd3-geneval-nft": (
        "SD3.5-M, GenEval, DiffusionNFT as its authors run it: CFG-free, DPM-Solver++(2M), beta 1, old-policy "
        "decay (0, 0.001, 0.5), KL 1e-4, one optimiser step per epoch (NVlabs/DiffusionNFT sd3_geneval)",
        _SD3_GENEVAL_NFT,
    ),
    "sd3-ocr": (
        "SD3.5-M, OCR reward, beta 0.04 (upstream general_ocr_sd3; reference: OCR accuracy 0.59 -> 0.92)",
        {**_merge(_SD3_REFERENCE, train={"beta": 0.04}), **_OCR},
    ),
    "sd3-pickscore": (
        "SD3.5-M, PickScore reward, beta 0.01 (upstream pickscore_sd3)",
        {**_merge(_SD3_REFERENCE, train={"beta": 0.01}), **_PICKSCORE},
    ),
    "sd3-geneval-fast": (
        "SD3.5-M, GenEval, Flow-GRPO-Fast as upstream runs it: no CFG, CPS at noise 0.8, a 3-step window in the "
        "first half, clip 1e-5, beta 0 (upstream geneval_sd3_fast_nocfg)",
        {**_merge(_SD3_FAST_NOCFG, eval={"batch_size": 14}), **_GENEVAL},
    ),
    "sd3-pickscore-fast": (
        "SD3.5-M, PickScore, Flow-GRPO-Fast as upstream runs it: no CFG, CPS at noise 0.8, a 3-step window in "
        "the first half, 18 images x 64 prompts, clip 1e-5, beta 0 (upstream pickscore_sd3_fast_nocfg)",
        {**_merge(_SD3_FAST_NOCFG, sampling={"group_size": 18, "groups_per_epoch": 64}), **_PICKSCORE},
    ),
    "sd3-pickscore-fast-cfg": (
        "our variant, not an upstream config: sd3-pickscore-fast with CFG 4.5 in training and evaluation",
        {
            **_merge(
                _SD3_FAST_NOCFG,
                sampling={"group_size": 18, "groups_per_epoch": 64, "guidance_scale": 4.5},
                eval={"guidance_scale": 4.5},
            ),
            **_PICKSCORE,
        },
    ),
    "flux-pickscore": (
        "FLUX.1-dev, PickScore, T=6 at noise 0.9, beta 0, LoRA r64 on attention + FF (upstream pickscore_flux)",
        {**_FLUX_REFERENCE, **_PICKSCORE},
    ),
    "flux-pickscore-fast": (
        "FLUX.1-dev, PickScore, Flow-GRPO-Fast: CPS at noise 0.8, the 3-step window at steps 0-2, clip 1e-5, "
        "per-group std (upstream pickscore_flux_fast)",
        {
            **_merge(
                _FLUX_REFERENCE,
                sampling={
                    "sde_type": "cps",
                    "noise_level": 0.8,
                    "sde_window_size": 3,
                    "sde_window_range": [0.0, 0.5],
                },
                train={"clip_range": 1e-5, "global_std": False, "shuffle_samples": False},
            ),
            **_PICKSCORE,
        },
    ),
    "qwenimage-pickscore": (
        "Qwen-Image, PickScore, true CFG 4, T=10 at noise 1.2 with a 2-step window in the first half, beta 0, "
        "LoRA r64 on attention + both streams' FF, 16 x 32 (upstream pickscore_qwenimage)",
        {**_QWEN_REFERENCE, **_PICKSCORE},
    ),
    "qwenimage-ocr": (
        "our variant, not an upstream config: qwenimage-pickscore's settings with the OCR reward and prompts",
        {**_QWEN_REFERENCE, **_OCR},
    ),
    "qwenimage-geneval": (
        "our variant, not an upstream config: qwenimage-pickscore's settings with the GenEval reward and prompts",
        {**_QWEN_REFERENCE, **_GENEVAL},
    ),
    "bagel-pickscore-lora": (
        "Bagel-7B, PickScore, text CFG 4 with renorm, T=14 at noise 1.3 with a 2-step window in the first half, "
        "beta 0, clip 1e-5, LoRA r64 on the generation expert, 16 x 48 (upstream pickscore_bagel_lora)",
        {**_BAGEL_REFERENCE, **_PICKSCORE},
    ),
    "bagel-pickscore": (
        "Bagel-7B, PickScore, full fine-tuning of the generation expert, a 3-step window; otherwise as "
        "bagel-pickscore-lora (upstream pickscore_bagel)",
        {
            **_merge(
                _BAGEL_REFERENCE, sampling={"sde_window_size": 3}, train={"lora": False, "deepspeed_stage": 2}
            ),
            **_PICKSCORE,
        },
    ),
    "sd3-ocr-guard": (
        "SD3.5-M, OCR, GRPO-Guard: RatioNorm + gradient reweight, lr 1e-4, clip 2e-6, beta 0; PickScore (weight 0) "
        "as gold every 30 epochs (upstream general_ocr_sd3_rationorm)",
        {
            **_merge(_SD3_GUARD, train={"clip_range": 2e-6}, eval={"metrics": ["pickscore"]}),
            **_OCR,
            "rewards": {"ocr": 1.0, "pickscore": 0.0},
        },
    ),
    "sd3-pickscore-guard": (
        "SD3.5-M, PickScore, GRPO-Guard: RatioNorm + gradient reweight, lr 1e-4, clip 4e-6, beta 0 (upstream "
        "pickscore_hps_sd3_ratio_norm)",
        {**_merge(_SD3_GUARD, train={"clip_range": 4e-6}), **_PICKSCORE},
    ),
    "sd3-geneval-guard": (
        "SD3.5-M, GenEval, GRPO-Guard: RatioNorm + gradient reweight, lr 1e-4, clip 2e-6, beta 0; PickScore "
        "(weight 0) as gold every 30 epochs (upstream geneval_sd3_rationorm)",
        {
            **_merge(
                _SD3_GUARD, train={"clip_range": 2e-6}, eval={"metrics": ["pickscore"], "batch_size": 14}
            ),
            **_GENEVAL,
            "rewards": {"geneval": 1.0, "pickscore": 0.0},
        },
    ),
}


def preset_names() -> list[str]:
    return list(PRESETS)


def preset_description(name: str) -> str:
    return PRESETS[name][0]
