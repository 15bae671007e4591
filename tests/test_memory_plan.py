"""The memory plan (`flowgrpo plan`): closed-form terms, the ladder that makes a run fit, refusals, parameter
counts read from architectures, and the activation estimates against peaks measured on the CPU."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from flowgrpo_core import memory_plan as mp
from flowgrpo_core.cli import main
from flowgrpo_core.config import load_config
from flowgrpo_core.models.sizes import lora_parameters, model_shape
from flowgrpo_core.plan_command import plan_shape, run_settings

GB = mp.GiB
SHAPE = mp.ModelShape(
    family="sd3",
    transformer_params=1_000_000_000,
    block_params=40_000_000,
    blocks=20,
    width=1000,
    lora_params=10_000_000,
    text_encoder_params=2_000_000_000,
    vae_params=100_000_000,
    vae_channels=128,
    pixels_per_token=16,
    text_tokens=100,
    true_cfg=True,
)
RUN = mp.RunSettings(
    world_size=4,
    gpu_memory_gib=80,
    resolution=320,  # 400 image tokens + 100 text tokens
    batch_size=2,
    images_per_epoch=64,
    guidance_scale=4.5,
    lora=True,
    beta=0.0,
    ema=True,
    stage=0,
    offload_optimizer=False,
    offload_params=False,
    gradient_checkpointing=False,
    text_encoders_on_cpu=False,
    mixed_precision="no",
    weight_bytes=2,
    text_encoder_bytes=2,
    vae_bytes=4,
)


def test_resident_terms_in_closed_form():
    r = mp.estimate(SHAPE, RUN).resident
    assert r["frozen weights"] == 2e9
    assert r["trainable weights"] == r["gradients"] == r["EMA"] == 4e7
    assert r["optimiser states"] == 8e7
    assert r["reference copy"] == 0 and "ZeRO-3 gathered layers" not in r
    assert r["text encoders"] == 4e9 and r["VAE"] == 4e8


def test_zero_stages_and_offload_divide_what_they_partition():
    by_stage = {s: mp.estimate(SHAPE, replace(RUN, stage=s)).resident for s in (1, 2, 3)}
    assert by_stage[1]["optimiser states"] == 8e7 / 4 and by_stage[1]["gradients"] == 4e7
    assert by_stage[2]["gradients"] == 4e7 / 4 and by_stage[2]["frozen weights"] == 2e9
    assert by_stage[3]["frozen weights"] == 2e9 / 4 and by_stage[3]["trainable weights"] == 4e7 / 4
    assert by_stage[3]["ZeRO-3 gathered layers"] == 2 * 4e7 * 2
    off = mp.estimate(SHAPE, replace(RUN, stage=3, offload_optimizer=True, offload_params=True)).resident
    assert (
        off["frozen weights"] == off["trainable weights"] == off["gradients"] == off["optimiser states"] == 0
    )
    assert off["EMA"] == 4e7  # the EMA stays whole on every rank
    # DeepSpeed in bf16 casts the module to 16 bits and keeps float32 master weights in the optimiser
    bf16 = mp.estimate(SHAPE, replace(RUN, stage=1, mixed_precision="bf16")).resident
    assert bf16["trainable weights"] == 2e7 and bf16["optimiser states"] == 1e7 * 12 / 4


def test_full_fine_tuning_trains_every_weight_and_keeps_a_reference_for_the_kl():
    r = mp.estimate(SHAPE, replace(RUN, lora=False, beta=0.04)).resident
    assert r["frozen weights"] == 0 and r["trainable weights"] == 4e9 and r["optimiser states"] == 8e9
    assert r["reference copy"] == 2e9


def test_activations_in_closed_form():
    values = 2 * 2 * 500 * 1000  # batch x CFG x tokens x width
    plan = mp.estimate(SHAPE, RUN)
    a = mp.TRAIN_FACTOR["sd3"]
    assert plan.training_activations[False] == values * 4 * (20 * a + mp.BACKWARD_FACTOR)
    assert plan.training_activations[True] == values * 4 * (20 + a + mp.BACKWARD_FACTOR)
    assert plan.sampling["activations (sampling batch)"] == values * 4 * mp.SAMPLE_FACTOR["sd3"]
    assert plan.sampling["VAE decoding"] == 2 * 320**2 * 128 * mp.VAE_FACTOR["sd3"] * 4
    flux = replace(SHAPE, family="flux", true_cfg=False)  # embedded guidance: one forward per image
    assert mp.forward_values(flux, RUN) == values // 2
    assert mp.estimate(SHAPE, replace(RUN, text_encoders_on_cpu=True)).resident["text encoders"] == 0


def test_the_ladder_stops_at_the_first_setting_that_fits():
    # 2.5 GiB: ZeRO-3 (frozen weights / 4) is needed, offload is not
    need = replace(RUN, gpu_memory_gib=2.5)
    assert not mp.estimate(SHAPE, need).fits
    changes, fitted, plan = mp.make_fit(SHAPE, need)
    assert changes == [
        "train.deepspeed_stage=2",
        "train.gradient_checkpointing=true",
        "model.text_encoders_on_cpu=true",
        "train.deepspeed_stage=3",
    ]
    assert plan.fits and fitted.stage == 3 and not fitted.offload_optimizer
    assert mp.make_fit(SHAPE, RUN)[0] == []  # fits as it is
    # on a tiny GPU only a smaller batch helps after everything is offloaded, and it must share out evenly
    tiny = mp.make_fit(SHAPE, replace(RUN, gpu_memory_gib=1.2, batch_size=8))
    assert tiny is not None and tiny[0][-1].startswith("sampling.batch_size=")
    assert 64 % tiny[1].batch_size == 0 and (64 // tiny[1].batch_size) % 4 == 0
    assert mp.make_fit(SHAPE, replace(RUN, gpu_memory_gib=0.01)) is None


def test_impossible_requests_are_refused_with_the_reason():
    with pytest.raises(mp.ImpossibleRun, match="64 processes but only 32 sampling batches"):
        mp.estimate(SHAPE, replace(RUN, world_size=64))
    with pytest.raises(mp.ImpossibleRun, match="cannot be shared by 3 processes"):
        mp.estimate(SHAPE, replace(RUN, world_size=3))


def test_cli_refuses_more_gpus_than_sampling_batches(capsys):
    assert main(["plan", "--preset", "tiny", "--gpus", "4", "--nodes", "2"]) == 2
    err = capsys.readouterr().err
    assert "8 processes but only 4 sampling batches (16 images in batches of 4)" in err


def test_cli_says_what_fits(capsys):
    assert main(["plan", "--preset", "tiny", "--gpus", "2"]) == 0
    assert "fits: peak" in capsys.readouterr().out
    code = main(["plan", "--preset", "flux-pickscore", "--gpus", "8", "--gpu-memory", "24"])
    out = capsys.readouterr().out
    assert code == 1 and "does NOT fit" in out  # the preset has ZeRO-2 already
    assert "it would fit with: --set train.gradient_checkpointing=true" in out


@pytest.mark.parametrize(
    "preset",
    ["flux-pickscore", "qwenimage-pickscore", "sd3-geneval", "bagel-pickscore-lora", "bagel-pickscore"],
)
def test_reference_presets_fit_eight_80_gb_gpus(preset):
    cfg = load_config(preset)
    shape, origin = plan_shape(cfg)
    assert "published" in origin  # no hub access here
    assert mp.estimate(shape, run_settings(cfg, 8, 80)).fits


def test_bagel_full_fine_tuning_needs_its_presets_zero_2_on_eight_80_gb_gpus():
    """Without sharding, AdamW over the 6.5B parameters of the generation expert does not fit 80 GB; ZeRO-2
    (the preset's) is the first step of the ladder that does."""
    cfg = load_config("bagel-pickscore", overrides=["train.deepspeed_stage=0"])
    shape, _ = plan_shape(cfg)
    run = run_settings(cfg, 8, 80)
    assert not mp.estimate(shape, run).fits
    assert mp.make_fit(shape, run)[0] == ["train.deepspeed_stage=2"]
    assert load_config("bagel-pickscore").train.deepspeed_stage == 2
    # no step for the text encoders Bagel does not have
    one = mp.make_fit(shape, run_settings(cfg, 1, 80))[0]
    assert "model.text_encoders_on_cpu=true" not in one and one[-1] == "train.offload_optimizer=true"
    lora = load_config("bagel-pickscore-lora")
    lora_shape, _ = plan_shape(lora)
    fix = mp.make_fit(lora_shape, run_settings(lora, 8, 24))[0]
    assert fix == ["train.deepspeed_stage=2", "train.deepspeed_stage=3"]


def test_counts_come_from_the_architecture(tmp_path):
    """A folder's config.json files instantiated on the meta device count what the built model holds."""
    from flowgrpo_core.models import load_model

    adapter = load_model("tiny:qwenimage")
    adapter.pipeline.save_pretrained(tmp_path / "qwen")
    built, _ = model_shape("tiny:qwenimage", 8, ["to_q", "ff.net.2"])
    read, origin = model_shape(str(tmp_path / "qwen"), 8, ["to_q", "ff.net.2"])
    assert built == read and "config.json" in origin
    assert built.transformer_params == sum(p.numel() for p in adapter.transformer.parameters())
    # the LoRA count is what peft attaches
    adapter.add_lora(8, 16.0, target_modules=["to_q", "ff.net.2"])
    attached = sum(p.numel() for p in adapter.transformer.parameters() if p.requires_grad)
    assert built.lora_params == attached
    assert lora_parameters(torch.nn.Sequential(torch.nn.Linear(3, 5)), ["0"], 2) == 2 * (3 + 5)


def test_bagel_counts_come_from_its_checkpoint_folder(tmp_path):
    """A Bagel checkpoint folder (llm_config.json and safetensors headers, no model_index.json) counts what the
    built tiny:bagel holds; the LoRA count on the generation expert is what peft attaches, and full
    fine-tuning counts the generation expert only, as the adapter unfreezes it."""
    from flowgrpo_core.models import load_model

    adapter = load_model("tiny:bagel")
    adapter.pipeline.save_pretrained(tmp_path / "bagel")
    built, _ = model_shape("tiny:bagel", 8)
    read, origin = model_shape(str(tmp_path / "bagel"), 8)
    assert built == read and "llm_config.json" in origin
    assert built.family == "bagel" and built.blocks == 2 and built.width == 32
    assert built.transformer_params == sum(p.numel() for p in adapter.transformer.parameters())
    assert built.vae_params == sum(p.numel() for p in adapter.pipeline.vae.parameters())
    assert built.pixels_per_token == 16 and built.text_encoder_params == 0
    adapter.unfreeze()
    unfrozen = sum(p.numel() for p in adapter.transformer.parameters() if p.requires_grad)
    assert 0 < built.fully_trained_params == unfrozen < built.transformer_params
    adapter.add_lora(8, 16.0)
    attached = sum(p.numel() for p in adapter.transformer.parameters() if p.requires_grad)
    assert built.lora_params == attached > 0
    # SD3 names translate to the generation expert's layers, as for peft
    aliased, _ = model_shape("tiny:bagel", 8, ["attn.to_q", "ff.net.0.proj", "attn.add_q_proj"])
    fresh = load_model("tiny:bagel")
    fresh.add_lora(8, 16.0, target_modules=["attn.to_q", "ff.net.0.proj", "attn.add_q_proj"])
    assert aliased.lora_params == sum(p.numel() for p in fresh.transformer.parameters() if p.requires_grad)


def test_published_configs_give_the_published_sizes():
    """FLUX.1-dev's transformer is the 12B model its card announces, Qwen-Image's the 20B one."""
    flux, _ = model_shape("black-forest-labs/FLUX.1-dev", 64)
    qwen, _ = model_shape("Qwen/Qwen-Image", 64)
    assert 11.8e9 < flux.transformer_params < 12.0e9 and flux.blocks == 57
    assert 20.3e9 < qwen.transformer_params < 20.5e9 and 8.2e9 < qwen.text_encoder_params < 8.4e9
    # Bagel-7B-MoT: two 7B experts sharing the embedding (14B with the ViT and lm_head it never builds), the
    # generation expert alone 6.5B; 512 px images are 32 x 32 tokens
    bagel, origin = model_shape("ByteDance-Seed/BAGEL-7B-MoT", 64)
    assert "published" in origin and bagel.blocks == 28 and bagel.width == 3584
    assert 13.5e9 < bagel.transformer_params < 13.7e9 and 6.4e9 < bagel.fully_trained_params < 6.6e9
    assert bagel.image_tokens(512) == 1024 and 83e6 < bagel.vae_params < 85e6


_BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_plan.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("memory_plan_bench", _BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.mark.parametrize(
    "name",
    [
        "tiny sd3 128px",
        "tiny sd3 128px ckpt",
        "tiny flux 128px",
        "tiny qwenimage 128px",
        "tiny bagel 128px",
        "mid sd3 128px",
    ],
)
def test_estimates_within_a_quarter_of_the_measured_peaks(bench, name):
    case = next(c for c in bench.CASES if c.name == name)
    torch.set_num_threads(1)
    result = bench.measure(case)
    # Bagel's VAE is FLUX.1's and planned with FLUX's factor; the tiny one (one width at every level) is not
    parts = ("training", "sampling") if case.family == "bagel" else ("training", "sampling", "vae")
    for part in parts:
        ratio = result[f"estimated/{part}"] / result[f"measured/{part}"]
        assert 0.75 <= ratio <= 1.25, (part, ratio)


def test_compile_checks_the_plan_of_the_cluster_job(tmp_path, capsys):
    """compile --gpu-memory: the preset's ZeRO stage and offload travel with it; a job that would not fit its
    GPUs is refused before it is compiled, naming the settings that would fit."""
    out = tmp_path / "qwen.yaml"
    args = ["compile", "--preset", "qwenimage-pickscore", "--gpus", "8", "--gpu-memory", "80", "-o", str(out)]
    assert main(args) == 0 and out.is_file()
    assert "memory plan: fits" in capsys.readouterr().out
    small = tmp_path / "flux.yaml"
    args = ["compile", "--preset", "flux-pickscore", "--gpus", "8", "--gpu-memory", "24", "-o", str(small)]
    assert main(args) == 2 and not small.exists()
    assert "it would with --set train.gradient_checkpointing=true" in capsys.readouterr().err


def test_a_hub_model_in_the_cache_is_read_from_its_configs(tiny_sd3_folder, hub_cache):
    """A hub id whose files are cached is planned from them, not from the published configs."""
    repo = hub_cache(tiny_sd3_folder, "stabilityai/stable-diffusion-3.5-medium")
    cached, origin = model_shape(repo, 8)
    assert "cache" in origin and cached == model_shape(str(tiny_sd3_folder), 8)[0]


def test_a_cached_bagel_checkpoint_is_read_from_its_files(tmp_path, hub_cache):
    """The Bagel hub id whose checkpoint is cached is planned from its llm_config.json and headers, not from
    the published config."""
    from flowgrpo_core.models import load_model

    load_model("tiny:bagel").pipeline.save_pretrained(tmp_path / "bagel")
    repo = hub_cache(tmp_path / "bagel", "ByteDance-Seed/BAGEL-7B-MoT")
    cached, origin = model_shape(repo, 8)
    assert "cache" in origin and cached == model_shape("tiny:bagel", 8)[0]
