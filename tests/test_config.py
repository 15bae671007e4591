"""Config loading: presets, YAML, overrides, and errors that name the field before any model loads."""

import pytest

from flowgrpo_core.config import ConfigError, load_config, parse_override
from flowgrpo_core.presets import PRESETS


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_loads(name):
    cfg = load_config(name)
    assert cfg.preset == name
    assert cfg.sampling.images_per_epoch % cfg.sampling.batch_size == 0


def test_reference_presets_carry_the_algorithm_md_values():
    for name in ("sd3-geneval", "sd3-ocr", "sd3-pickscore", "sd3-pickscore-fast", "flux-pickscore"):
        cfg = load_config(name)
        s, t = cfg.sampling, cfg.train
        assert (s.resolution, s.num_steps, s.noise_level, s.group_size, s.groups_per_epoch, s.batch_size) == (
            512,
            10,
            0.7,
            24,
            48,
            9,
        )
        assert (t.adv_clip_max, t.timestep_fraction, t.global_std, t.lora, t.lora_rank, t.lora_alpha) == (
            5,
            0.99,
            True,
            True,
            32,
            64,
        )
        assert (t.learning_rate, t.ema, cfg.eval.num_steps if name != "flux-pickscore" else 40) == (
            3e-4,
            True,
            40,
        )
    assert load_config("sd3-geneval").train.beta == 0.04 and load_config("sd3-geneval").rewards == {
        "geneval": 1.0
    }
    assert load_config("sd3-ocr").train.beta == 0.04 and load_config("sd3-ocr").rewards == {"ocr": 1.0}
    assert load_config("sd3-pickscore").train.beta == 0.01
    fast = load_config("sd3-pickscore-fast")
    assert (
        fast.sampling.sde_window_size == 2
        and fast.train.clip_range == 1e-5
        and fast.trained_steps_per_sample == 2
    )
    flux = load_config("flux-pickscore")
    assert flux.model.dtype == "bfloat16" and flux.model.source == "black-forest-labs/FLUX.1-dev"
    assert load_config("sd3-geneval").model.dtype == "float16"
    # full Flow-GRPO trains int(10 * 0.99) = 9 of the 10 steps
    assert load_config("sd3-geneval").trained_steps_per_sample == 9
    assert load_config("sd3-geneval").batches_per_epoch == 128


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
        ("tracking.gate_standard_errors=2", "tracking.gate_standard_errors", "needs a gate metric with a standard error"),
    ],
)
def test_invalid_values_fail_at_load_time_naming_the_field(override, field, hint):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", overrides=[override])
    assert field in str(info.value) and hint in str(info.value)


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
