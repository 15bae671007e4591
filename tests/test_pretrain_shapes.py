"""`flowgrpo pretrain-shapes` (issue 7): the world's tokenizers, held-out captions, a short run end to end, and
reproducibility from the seed. None of these needs the packaged model."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np
import pytest

from flowgrpo_core.evaluation.compare import generate
from flowgrpo_core.models import load_model
from flowgrpo_core.pretrain.config import (
    PretrainConfig,
    ShapesModelSpec,
    add_pretrain_shapes_parser,
    config_from_args,
)
from flowgrpo_core.pretrain.flow_matching import (
    CaptionSampler,
    Phase,
    scene_batches,
    shifted_sigma,
    warmup_cosine,
)
from flowgrpo_core.pretrain.run import pretrain_shapes
from flowgrpo_core.pretrain.shapes_model import shapes_clip_tokenizer, shapes_t5_tokenizer, world_words
from flowgrpo_core.prompts import load_prompts
from flowgrpo_core.prompts.vocabulary import requirement_key

SHAPES_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def test_world_words_are_single_tokens():
    clip, t5 = shapes_clip_tokenizer(), shapes_t5_tokenizer()
    for word in world_words():
        assert clip.tokenize(word) == [word + "</w>"]
        assert t5.tokenize(word) == ["▁" + word]
    prompt = "a purple triangle left of two crosses"
    assert len(clip(prompt).input_ids) == 2 + len(prompt.split())  # start + words + end


def test_caption_sampler_holds_out_the_test_requirements():
    test = load_prompts("builtin:shapes_test").metadata
    sampler = CaptionSampler(dict.fromkeys(SHAPES_TAGS, 1.0), test)
    drawn = sampler(np.random.default_rng(0), 3000)
    assert {m["tag"] for m in drawn} == set(SHAPES_TAGS)
    assert not {requirement_key(m) for m in drawn} & {requirement_key(m) for m in test}
    with pytest.raises(ValueError, match="unknown tags"):
        CaptionSampler({"counting": 1.0, "colour": 1.0})


def test_pretrain_shapes_command_trains_and_saves_a_loadable_model(tmp_path):
    parser = argparse.ArgumentParser()
    add_pretrain_shapes_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "pretrain-shapes",
            "--out",
            str(tmp_path),
            "--steps",
            "40",
            "--vae-steps",
            "40",
            "--batch-size",
            "8",
            "--vae-batch-size",
            "8",
            "--warmup-steps",
            "5",
            "--no-eval",
            "--seed",
            "3",
        ]
    )
    cfg = config_from_args(args)
    assert (cfg.steps, cfg.vae_steps, cfg.seed, cfg.eval_prompts) == (40, 40, 3, "")
    result = pretrain_shapes(cfg, tmp_path, progress=False)
    assert len(result.vae_losses) == len(result.losses) == 40
    assert np.mean(result.vae_losses[-10:]) < 0.8 * np.mean(result.vae_losses[:10])
    assert np.mean(result.losses[-10:]) < 0.8 * np.mean(result.losses[:10])
    assert (tmp_path / "pretrain.json").is_file()
    adapter = load_model(str(tmp_path))
    vae = adapter.pipeline.vae.config
    assert vae.scaling_factor != 1.0 and vae.shift_factor != 0.0  # set from the trained latents
    assert generate(
        adapter,
        ["a circle"],
        [0],
        resolution=64,
        num_steps=4,
        guidance_scale=4.5,
        batch_size=1,
        max_sequence_length=16,
    )[0].size == (64, 64)


def test_pretraining_is_reproducible_from_its_seed(tmp_path):
    import torch

    cfg = PretrainConfig(
        vae_steps=3,
        steps=3,
        batch_size=4,
        vae_batch_size=4,
        warmup_steps=2,
        eval_prompts="",
        eval_every=0,
        seed=1,
    )
    a = pretrain_shapes(cfg, tmp_path / "a", progress=False)
    b = pretrain_shapes(cfg, tmp_path / "b", progress=False)
    assert a.losses == b.losses and a.vae_losses == b.vae_losses
    for name in (
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # phase 2 from a's trained VAE is phase 2 of a: the phases draw from their own generators
    c = pretrain_shapes(replace(cfg, vae_from=str(tmp_path / "a")), tmp_path / "c", progress=False)
    assert c.losses == a.losses and c.vae_losses == []
    for name in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder_3/model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()
    # continuing from a's saved model keeps its VAE and trains its transformer further
    d = pretrain_shapes(
        replace(cfg, init_from=str(tmp_path / "a"), steps=2, seed=2), tmp_path / "d", progress=False
    )
    assert len(d.losses) == 2 and d.vae_losses == []
    assert (tmp_path / "a" / "vae/diffusion_pytorch_model.safetensors").read_bytes() == (
        tmp_path / "d" / "vae/diffusion_pytorch_model.safetensors"
    ).read_bytes()
    # zero more steps in float16: the same weights in half the bytes, and the record of the run it came from
    pretrain_shapes(
        replace(cfg, init_from=str(tmp_path / "d"), steps=0, save_dtype="float16"),
        tmp_path / "h",
        progress=False,
    )
    full, half = (load_model(str(tmp_path / x)).pipeline.transformer.state_dict() for x in ("d", "h"))
    assert all(half[k].dtype == torch.float32 and torch.equal(half[k], full[k].half().float()) for k in full)
    name = "transformer/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "h" / name).stat().st_size < 0.6 * (tmp_path / "d" / name).stat().st_size
    record = json.loads((tmp_path / "h" / "pretrain.json").read_text())
    assert record["steps_done"] == 0 and record["started_from"]["steps_done"] == 2
    assert record["started_from"]["started_from"]["steps_done"] == 3  # d came from a
    with pytest.raises(ValueError, match="transformer does not fit"):
        pretrain_shapes(
            replace(cfg, init_from=str(tmp_path / "a"), model=ShapesModelSpec(patch_size=1)),
            tmp_path / "e",
            progress=False,
        )
    with pytest.raises(ValueError, match="latent_channels=8, this model needs 4"):
        pretrain_shapes(
            replace(cfg, vae_from=str(tmp_path / "a"), model=ShapesModelSpec(latent_channels=4)),
            tmp_path / "d",
            progress=False,
        )


def test_scene_batches_are_fixed_for_a_number_of_workers():
    import torch

    test = load_prompts("builtin:shapes_test").metadata
    sampler = CaptionSampler(dict.fromkeys(SHAPES_TAGS, 1.0), test)

    def take(workers: int, n: int = 3):
        batches = scene_batches(sampler, 4, 64, np.random.default_rng(0), workers=workers, seed=5, stream=2)
        return [next(batches) for _ in range(n)]

    two, again = take(2), take(2)
    assert [m for m, _ in two] == [m for m, _ in again]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(two, again))
    assert two[0][1].shape == (4, 3, 64, 64) and two[0][1].min() >= -1 and two[0][1].max() <= 1
    assert two[0][0] != two[1][0]  # the workers draw different captions
    held = {requirement_key(m) for m in test}
    assert not {requirement_key(m) for batch, _ in two for m in batch} & held
    # in-process batches draw from the caller's generator only when asked for, so its other draws keep their place
    rng = np.random.default_rng(0)
    lazy = scene_batches(sampler, 4, 64, rng)
    first = next(lazy)[0]
    direct = np.random.default_rng(0)
    assert first == sampler(direct, 4)


def test_a_long_run_keeps_checkpoints_and_workers_runs_are_reproducible(tmp_path):
    cfg = PretrainConfig(
        vae_steps=2,
        steps=3,
        batch_size=4,
        vae_batch_size=4,
        warmup_steps=2,
        eval_prompts="",
        eval_every=2,
        seed=1,
        workers=2,
    )
    a = pretrain_shapes(cfg, tmp_path / "a", progress=False)
    b = pretrain_shapes(cfg, tmp_path / "b", progress=False)
    assert a.losses == b.losses and len(a.losses) == 3
    name = "transformer/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (
        load_model(str(tmp_path / "a" / "step-2")).family == "sd3"
    )  # the checkpoint of the evaluation at step 2
    assert not (tmp_path / "a" / "step-3").exists()  # the last step is the folder itself


def test_a_phase_ends_at_its_steps_or_its_deadline_on_its_clock():
    now = [0.0]
    phase = Phase(steps=10, deadline=5.0, clock=lambda: now[0])
    assert not phase.done(3)
    assert phase.done(10)
    now[0] = 5.0
    assert phase.done(3)
    phase.deadline = 7.0  # a benchmark moves it on to leave its evaluations out
    assert not phase.done(3)


def test_schedules_match_the_scheduler_and_the_warmup():
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    unshifted = torch.linspace(1.0, 0.1, 10)
    scheduler.set_timesteps(sigmas=unshifted.numpy())  # the scheduler applies its static shift to these
    assert torch.allclose(shifted_sigma(unshifted, 3.0), scheduler.sigmas[:-1].float(), atol=1e-6)
    assert shifted_sigma(torch.tensor([0.5]), 3.0).item() == pytest.approx(0.75)
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1) and warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0) and warmup_cosine(100, 100, 10) == pytest.approx(
        0.1
    )


def test_bad_pretrain_settings_fail_before_training():
    with pytest.raises(ValueError, match="batch_size must be positive"):
        PretrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="unknown tags"):
        PretrainConfig(tag_weights={"colour": 1.0})
    with pytest.raises(ValueError, match="device must be cpu, cuda or cuda:N"):
        PretrainConfig(device="tpu")
    with pytest.raises(ValueError, match="save_dtype must be float32 or float16"):
        PretrainConfig(save_dtype="bfloat16")
    with pytest.raises(ValueError, match="workers must be >= 0"):
        PretrainConfig(workers=-1)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"device cuda requested but .* sees no CUDA GPU"):
            pretrain_shapes(PretrainConfig(device="cuda"), "/nonexistent", progress=False)
    with pytest.raises(ValueError, match="unknown prompt set 'builtin:nope'"):
        pretrain_shapes(
            PretrainConfig(steps=1, vae_steps=1, eval_prompts="builtin:nope"), "/nonexistent", progress=False
        )
