"""Config loading: presets, YAML, overrides, and errors that name the field before any model loads."""

import re
from typing import get_args

import pytest
from pydantic import BaseModel

from flowgrpo_core.config import ConfigError, FlowGRPOConfig, load_config, parse_override
from flowgrpo_core.presets import PRESETS


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_loads(name):
    cfg = load_config(name)
    assert cfg.preset == name
    assert cfg.sampling.images_per_epoch % cfg.sampling.batch_size == 0


# The official configs (flow_grpo config/grpo.py, upstream 2025-11-04) in our field names. Upstream's
# per-GPU batch arithmetic is turned into ours: images per epoch = prompts x group, batches of the per-GPU
# batch size, two optimiser steps per epoch.
_SD3 = {
    "model.source": "stabilityai/stable-diffusion-3.5-medium",
    "model.dtype": "float32",
    "model.text_encoder_dtype": "float16",
    "model.vae_dtype": "float32",
    "sampling.resolution": 512,
    "sampling.num_steps": 10,
    "sampling.guidance_scale": 4.5,
    "sampling.noise_level": 0.7,
    "sampling.sde_type": "sde",
    "sampling.sde_window_size": 0,
    "sampling.group_size": 24,
    "sampling.groups_per_epoch": 48,
    "sampling.batch_size": 9,
    "sampling.max_sequence_length": 128,
    "sampling.negative_prompt": "",
    "train.learning_rate": 3e-4,
    "train.adam_betas": [0.9, 0.999],
    "train.weight_decay": 1e-4,
    "train.adam_epsilon": 1e-8,
    "train.max_grad_norm": 1.0,
    "train.optimizer_steps_per_epoch": 2,
    "train.num_inner_epochs": 1,
    "train.clip_range": 1e-4,
    "train.adv_clip_max": 5.0,
    "train.kl_form": "reference",
    "train.timestep_fraction": 0.99,
    "train.global_std": True,
    "train.stat_buffer_size": 0,
    "train.lora": True,
    "train.lora_rank": 32,
    "train.lora_alpha": 64.0,
    "train.lora_init": "gaussian",
    "train.lora_target_modules": [],
    "train.ema": True,
    "train.ema_decay": 0.9,
    "train.ema_update_interval": 8,
    "train.mixed_precision": "fp16",
    "train.gradient_checkpointing": False,
    "train.zero_advantage": "refill",
    "train.shuffle_samples": True,
    "train.ratio_norm": False,
    "train.grad_reweight": False,
    "train.seed": 42,
    "eval.num_steps": 40,
    "eval.guidance_scale": 4.5,
}
_SD3_FAST = _SD3 | {
    "sampling.guidance_scale": 1.0,
    "eval.guidance_scale": 1.0,
    "sampling.sde_type": "cps",
    "sampling.noise_level": 0.8,
    "sampling.sde_window_size": 3,
    "sampling.sde_window_range": [0.0, 0.5],
    "train.beta": 0.0,
    "train.clip_range": 1e-5,
    "train.shuffle_samples": False,
}
_FLUX = _SD3 | {
    "model.source": "black-forest-labs/FLUX.1-dev",
    "model.text_encoder_dtype": "bfloat16",
    "sampling.num_steps": 6,
    "sampling.guidance_scale": 3.5,
    "sampling.noise_level": 0.9,
    "sampling.batch_size": 3,
    "train.beta": 0.0,
    "train.lora_rank": 64,
    "train.lora_alpha": 128.0,
    "train.mixed_precision": "bf16",
    "train.zero_advantage": "keep",
    "eval.num_steps": 28,
    "eval.guidance_scale": 3.5,
    "train.lora_target_modules": [
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    ],
}
# pickscore_qwenimage (its train_qwenimage.py): upstream keeps float32 copies of the transformer and the text
# encoder that FSDP casts to bf16 for every forward; ours are stored in bf16 (README "Differences from
# flow_grpo"), so model.dtype and model.text_encoder_dtype are not in the row. LoRA targets: the family's (empty
# list), pinned against upstream's list in tests/test_qwenimage.py.
_QWEN = {k: v for k, v in _SD3.items() if k not in ("model.dtype", "model.text_encoder_dtype")} | {
    "model.source": "Qwen/Qwen-Image",
    "sampling.guidance_scale": 4.0,
    "sampling.negative_prompt": " ",
    "sampling.noise_level": 1.2,
    "sampling.sde_window_size": 2,
    "sampling.sde_window_range": [0.0, 0.5],
    "sampling.group_size": 16,
    "sampling.groups_per_epoch": 32,
    "sampling.batch_size": 4,
    "sampling.max_sequence_length": 512,
    "train.beta": 0.0,
    "train.timestep_fraction": 1.0,
    "train.lora_rank": 64,
    "train.lora_alpha": 128.0,
    "train.ema": False,
    "train.mixed_precision": "bf16",
    "train.gradient_checkpointing": True,
    "train.zero_advantage": "keep",
    "train.shuffle_samples": False,
    "eval.num_steps": 50,
    "eval.guidance_scale": 4.0,
    "eval.batch_size": 4,
}
# pickscore_bagel_lora (its train_bagel.py): everything in bf16 as upstream loads it (no text encoder: Bagel's is
# the transformer); upstream's num_steps / eval_num_steps count timesteps including the final 0, so its 15 and 50
# are our T = 14 and 49; prompts are not truncated upstream (ours: 512 tokens); evaluation on the first 512 test
# prompts. LoRA targets: the family's (empty list), pinned against upstream's list in tests/test_bagel.py.
_BAGEL = {k: v for k, v in _SD3.items() if k != "model.text_encoder_dtype"} | {
    "model.source": "ByteDance-Seed/BAGEL-7B-MoT",
    "model.dtype": "bfloat16",
    "model.vae_dtype": "bfloat16",
    "sampling.num_steps": 14,
    "sampling.guidance_scale": 4.0,
    "sampling.noise_level": 1.3,
    "sampling.sde_window_size": 2,
    "sampling.sde_window_range": [0.0, 0.5],
    "sampling.group_size": 16,
    "sampling.groups_per_epoch": 48,
    "sampling.batch_size": 6,
    "sampling.max_sequence_length": 512,
    "train.learning_rate": 1e-4,
    "train.clip_range": 1e-5,
    "train.beta": 0.0,
    "train.global_std": False,
    "train.timestep_fraction": 1.0,
    "train.lora_rank": 64,
    "train.lora_alpha": 128.0,
    "train.ema": False,
    "train.mixed_precision": "bf16",
    "train.gradient_checkpointing": True,
    "train.zero_advantage": "keep",
    "train.shuffle_samples": False,
    "eval.num_steps": 49,
    "eval.guidance_scale": 4.0,
    "eval.num_prompts": 512,
}
# config/grpo_guard.py (its train_sd3_GRPO_Guard.py): the SD3 reference with RatioNorm (`rationorm`, the batch
# shift) and the gradient reweight it applies with it, lr 1e-4, beta 0, the group's std, eval_freq = save_freq =
# 30. `highclip_range` is set upstream (equal to clip_range) but read by no script: ours stays unset.
_GUARD = _SD3 | {
    "train.learning_rate": 1e-4,
    "train.beta": 0.0,
    "train.global_std": False,
    "train.ratio_norm": True,
    "train.ratio_norm_bias": "batch",
    "train.grad_reweight": True,
    "train.clip_range_low": None,
    "train.clip_range_high": None,
    "train.highclip_range": None,
    "train.checkpoint_every": 30,
    "eval.every_epochs": 30,
    "eval.batch_size": 16,
}
UPSTREAM = {
    "sd3-geneval": _SD3 | {"train.beta": 0.04, "rewards.geneval": 1.0},  # geneval_sd3
    "sd3-ocr": _SD3 | {"train.beta": 0.04, "rewards.ocr": 1.0},  # general_ocr_sd3
    "sd3-pickscore": _SD3 | {"train.beta": 0.01, "rewards.pickscore": 1.0},  # pickscore_sd3
    "sd3-geneval-fast": _SD3_FAST | {"rewards.geneval": 1.0},  # geneval_sd3_fast_nocfg
    # pickscore_sd3_fast_nocfg: 64 prompts x 18 images
    "sd3-pickscore-fast": _SD3_FAST
    | {"sampling.group_size": 18, "sampling.groups_per_epoch": 64, "rewards.pickscore": 1.0},
    "flux-pickscore": _FLUX | {"rewards.pickscore": 1.0},  # pickscore_flux
    "flux-pickscore-fast": _FLUX
    | {  # pickscore_flux_fast
        "sampling.sde_type": "cps",
        "sampling.noise_level": 0.8,
        "sampling.sde_window_size": 3,
        "sampling.sde_window_range": [0.0, 0.5],
        "train.clip_range": 1e-5,
        "train.global_std": False,
        "train.shuffle_samples": False,
        "rewards.pickscore": 1.0,
    },
    "qwenimage-pickscore": _QWEN | {"rewards.pickscore": 1.0},  # pickscore_qwenimage
    # our variants: pickscore_qwenimage's fields with another reward (upstream has no such Qwen-Image config)
    "qwenimage-ocr": _QWEN | {"rewards.ocr": 1.0},
    "qwenimage-geneval": _QWEN | {"rewards.geneval": 1.0},
    "bagel-pickscore-lora": _BAGEL | {"rewards.pickscore": 1.0},  # pickscore_bagel_lora
    # pickscore_bagel: full fine-tuning (of the generation expert), a 3-step window
    "bagel-pickscore": _BAGEL
    | {"train.lora": False, "sampling.sde_window_size": 3, "rewards.pickscore": 1.0},
    # general_ocr_sd3_rationorm: reward_fn {ocr: 1, pickscore: 0}, the 0-weighted pickscore our gold metric
    "sd3-ocr-guard": _GUARD
    | {"train.clip_range": 2e-6, "rewards.ocr": 1.0, "rewards.pickscore": 0.0, "eval.metrics": ["pickscore"]},
    # pickscore_hps_sd3_ratio_norm: reward_fn {pickscore: 1}
    "sd3-pickscore-guard": _GUARD | {"train.clip_range": 4e-6, "rewards.pickscore": 1.0, "eval.metrics": []},
    # geneval_sd3_rationorm: reward_fn {geneval: 1, pickscore: 0}, test batch 14
    "sd3-geneval-guard": _GUARD
    | {
        "train.clip_range": 2e-6,
        "rewards.geneval": 1.0,
        "rewards.pickscore": 0.0,
        "eval.metrics": ["pickscore"],
        "eval.batch_size": 14,
    },
}


@pytest.mark.parametrize("name", list(UPSTREAM))
def test_reference_presets_carry_the_official_hyper_parameters(name):
    flat = load_config(name).flat()
    differ = {k: (flat.get(k), v) for k, v in UPSTREAM[name].items() if flat.get(k) != v}
    assert not differ, f"{name}: (ours, upstream) {differ}"
    assert [k for k in flat if k.startswith("rewards.")] == [
        k for k in UPSTREAM[name] if k.startswith("rewards.")
    ]


def test_reference_batch_arithmetic_and_windows():
    geneval = load_config("sd3-geneval")
    assert geneval.trained_steps_per_sample == 9 and geneval.batches_per_epoch == 128  # int(10 * 0.99) of 10
    # upstream draws a Fast window start with randint(0, T // 2 - size): steps 0-2 for T = 10, 0 for FLUX's T = 6
    assert load_config("sd3-pickscore-fast").sampling.window_bounds() == (0, 5)
    assert load_config("flux-pickscore-fast").sampling.window_bounds() == (0, 3)
    assert load_config("flux-pickscore").trained_steps_per_sample == 5
    assert load_config("sd3-pickscore-fast").trained_steps_per_sample == 3
    # our CFG variant of Fast differs from upstream's runnable preset in the guidance only
    cfg_variant = load_config("sd3-pickscore-fast-cfg").flat()
    fast = load_config("sd3-pickscore-fast").flat()
    assert {k for k in fast if fast[k] != cfg_variant[k]} == {
        "preset",
        "sampling.guidance_scale",
        "eval.guidance_scale",
    }


@pytest.mark.parametrize(
    ("num_steps", "bounds"), [(3, (0, 1)), (7, (0, 3)), (10, (0, 5)), (11, (0, 5)), (15, (0, 7))]
)
def test_fast_window_range_is_counted_in_whole_steps_like_upstream(num_steps, bounds):
    cfg = load_config("tiny", overrides=[f"sampling.num_steps={num_steps}", "sampling.sde_window_size=1"])
    assert cfg.sampling.window_bounds() == bounds == (0, num_steps // 2)


def test_overrides_are_typed_and_replace_reward_mixes():
    cfg = load_config(
        "tiny", overrides=["train.beta=0", "sampling.resolution=128", "rewards={jpeg_incompressibility: 2}"]
    )
    assert cfg.train.beta == 0.0 and cfg.sampling.resolution == 128
    assert cfg.rewards == {"jpeg_incompressibility": 2.0}


def test_yaml_file_merges_over_the_preset(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  beta: 0.2\nsampling:\n  group_size: 8\n")
    cfg = load_config("tiny", path, ["train.beta=0.3"])
    assert cfg.train.beta == 0.3 and cfg.sampling.group_size == 8 and cfg.train.lora_rank == 8


def test_yaml_round_trip(tmp_path):
    cfg = load_config("sd3-pickscore-fast")
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(None, path) == cfg


@pytest.mark.parametrize(
    ("override", "field", "hint"),
    [
        ("train.beta=-1", "train.beta", "greater than or equal to 0"),
        ("sampling.group_size=1", "sampling.group_size", "greater than or equal to 2"),
        ("sampling.resolution=72", "sampling.resolution", "not divisible by the model's factor 16"),
        ("rewards={nope: 1}", "rewards", "unknown reward 'nope'"),
        ("train.betta=0.1", "train.betta", "unknown key"),
        ("sampling.batch_size=5", "sampling.batch_size", "must divide"),
        ("train.lora_rank=abc", "train.lora_rank", "integer"),
        ("sampling.sde_window_size=8", "sampling", "does not fit"),
        ("eval.metrics=[bogus]", "bogus", "unknown reward"),
        (
            "tracking.gate_standard_errors=2",
            "tracking.gate_standard_errors",
            "needs a gate metric with a standard error",
        ),
    ],
)
def test_invalid_values_fail_at_load_time_naming_the_field(override, field, hint):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", overrides=[override])
    assert field in str(info.value) and hint in str(info.value)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.learning_rate=inf", "train.learning_rate"),  # YAML reads a string, pydantic a float
        ("train.beta=.inf", "train.beta"),
        ("rewards={jpeg_incompressibility: .nan}", "rewards.jpeg_incompressibility"),
        ("train.adam_betas=[0.9, .nan]", "train.adam_betas.1"),
    ],
)
def test_non_finite_numbers_are_refused_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=rf"{re.escape(field)}: Input should be a finite number"):
        load_config("tiny", overrides=[override])


def _float_fields(model: type[BaseModel] = FlowGRPOConfig, prefix: str = "") -> list[str]:
    """Dotted paths of every field that holds floats, alone or inside a tuple or dict."""
    out = []
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            out += _float_fields(info.annotation, f"{prefix}{name}.")
        elif _holds_float(info.annotation):
            out.append(prefix + name)
    return out


def _holds_float(annotation) -> bool:
    return annotation is float or any(_holds_float(arg) for arg in get_args(annotation))


def _with_bad_number(value, bad: str) -> str:
    """``value`` (a field's current value) as YAML with ``bad`` in place of its (first) number."""
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join([bad, *map(str, value[1:])]) + "]"
    if isinstance(value, dict):
        return "{" + f"{next(iter(value))}: {bad}" + "}"
    return bad


def test_every_float_field_refuses_nan_and_infinities():
    fields = _float_fields()
    assert {"train.learning_rate", "train.adam_betas", "rewards", "serving.startup_timeout_s"} <= set(fields)
    cfg = load_config("tiny")
    for field in fields:
        value = cfg
        for part in field.split("."):
            value = getattr(value, part)
        for bad in (".nan", ".inf", "-.inf", "nan", "inf"):
            with pytest.raises(
                ConfigError, match=rf"{re.escape(field)}(\.\w+)?: Input should be a finite number"
            ):
                load_config("tiny", overrides=[f"{field}={_with_bad_number(value, bad)}"])


@pytest.mark.parametrize("text", ["train.beta", "=3", "train..beta=1", "train.beta=[1"])
def test_malformed_overrides(text):
    with pytest.raises(ConfigError, match="override"):
        parse_override(text)


def test_unknown_preset_and_missing_file():
    with pytest.raises(ConfigError, match=r"unknown preset .nope.*tiny"):
        load_config("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("tiny", "/no/such/file.yaml")


def test_flat_params_for_mlflow():
    flat = load_config("tiny").flat()
    assert flat["train.beta"] == 0.01 and flat["rewards.jpeg_incompressibility"] == 1.0
    assert flat["model.source"] == "tiny:sd3"


@pytest.mark.parametrize(
    ("overrides", "field", "hint"),
    [
        (["eval.metrics=[bogus]"], "eval.metrics", "unknown reward 'bogus'"),
        (["eval.every_epochs=11"], "eval.every_epochs", "larger than the run (train.epochs=10)"),
        (["train.keep_best=brightness"], "train.keep_best", "needs evaluations during training"),
        (
            ["eval.every_epochs=2", "eval.metrics=[brightness]", "train.keep_best=ocr"],
            "train.keep_best",
            "'ocr' is not evaluated",
        ),
        (
            ["eval.every_epochs=2", "train.stop_on_hacking=true"],
            "train.stop_on_hacking",
            "needs a gold metric",
        ),
        (
            ["eval.every_epochs=6", "eval.metrics=[brightness]", "train.stop_on_hacking=true"],
            "train.stop_on_hacking",
            "1 evaluations after the base's are fewer than eval.hacking_window=2",
        ),
    ],
)
def test_evaluation_during_training_refuses_what_could_never_take_effect(overrides, field, hint):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", overrides=overrides)
    assert f"{field}: " in str(info.value) and hint in str(info.value)
