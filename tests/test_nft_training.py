"""DiffusionNFT in the training loop (train.algorithm: nft) on the tiny models: old-policy sampling with the ODE,
the loss on a fixed batch going down, exact resume, every model family, LoRA and full fine-tuning. The whole DAG
with NFT runs in tests/test_mlflow_user.py, beside a Flow-GRPO run on the same database."""

import itertools

import pytest
import torch
from family_checks import straight_and_resumed

from flowgrpo_core.config import ConfigError, load_config
from flowgrpo_core.trainer import FlowGRPOTrainer

NFT = [
    "train.algorithm=nft",
    "train.checkpoint_every=0",
    "sampling.groups_per_epoch=2",
    "sampling.group_size=4",
    "sampling.num_steps=4",
    "sampling.guidance_scale=1",  # CFG-free, as the paper trains
]


def _trainer(tmp_path, *overrides, name="run"):
    cfg = load_config("tiny", overrides=[*NFT, *overrides])
    return FlowGRPOTrainer(cfg, tmp_path / name, progress=False)


def _state(trainer):
    return {name: p.detach().clone() for name, p in trainer.trainable.items()}


def test_nft_samples_noise_free_roll_outs_and_starts_at_the_old_policy(tmp_path):
    trainer = _trainer(tmp_path, "sampling.batch_size=8", "train.optimizer_steps_per_epoch=1")
    (metrics,) = trainer.train(epochs=1)
    samples = trainer.last_samples
    assert not samples.sde_mask.any() and torch.equal(samples.log_probs, torch.zeros_like(samples.log_probs))
    # one optimiser step: every term is computed with the trained policy equal to the old one
    assert metrics["train/old_deviation"] == 0.0
    assert metrics["train/trained_samples"] == 8  # every sample is trained, zero advantage or not
    assert metrics["train/old_policy_decay"] == pytest.approx(1e-3)  # min(0.001 x 1 step, 0.5)
    assert not any(k.startswith("train/ratio") or k == "train/clipfrac" for k in metrics)


def test_roll_outs_come_from_the_old_policy(tmp_path):
    # d = min(1 x steps, 1) = 1: the old policy never moves, so epoch 1's images are the base model's
    frozen = ["train.nft_decay_rate=1", "train.nft_decay_max=1"]
    trainer = _trainer(tmp_path, *frozen, "train.learning_rate=0.05", name="trained")
    base = _trainer(tmp_path, *frozen, name="base")
    trainer.train(epochs=1)
    assert any(not torch.equal(a, b) for a, b in zip(_state(trainer).values(), _state(base).values()))
    generator = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    images = trainer.sample_and_score(generator()).local.images
    assert torch.equal(images, base.sample_and_score(generator()).local.images)
    # the current policy's own images differ (it has moved)
    trainer.objective.old.update(0.0)
    assert not torch.equal(trainer.sample_and_score(generator()).local.images, images)


def test_nft_loss_on_a_fixed_batch_decreases(tmp_path):
    trainer = _trainer(tmp_path, "train.learning_rate=3e-3", "train.nft_kl_beta=0")
    epoch = trainer.sample_and_score(torch.Generator().manual_seed(0))
    samples = epoch.local
    advantages, _ = trainer.advantages(epoch.prompts, epoch.rewards)
    assert advantages.abs().sum() > 0

    def fixed_batch_loss() -> float:  # the same levels and noise every time: a fixed regression problem
        steps = trainer.objective.trained_steps(
            samples, torch.arange(len(samples)), len(samples), 3, torch.Generator().manual_seed(1)
        )
        index = torch.arange(len(samples))
        with torch.no_grad():
            return sum(float(out.loss) for out in trainer.objective.losses(samples, index, steps, advantages))

    losses = [fixed_batch_loss()]
    for _ in range(4):
        trainer.train_on(samples, advantages, torch.Generator().manual_seed(1))  # the old policy stays put
        losses.append(fixed_batch_loss())
    assert losses[-1] < losses[0]
    assert sum(b < a for a, b in itertools.pairwise(losses)) >= 3, losses


@pytest.mark.parametrize(
    "variant",
    [
        [],
        [
            "train.lora=false",
            "train.nft_kl_beta=0.05",
            "train.learning_rate=1e-3",
            "train.nft_solver=euler",
            "train.num_inner_epochs=2",
        ],
    ],
)
def test_interrupted_and_resumed_nft_run_ends_with_the_same_parameters(tmp_path, variant):
    opts = ["train.checkpoint_every=1", "train.ema_update_interval=1", "train.nft_decay_rate=0.2", *variant]
    make = lambda *overrides, name: _trainer(tmp_path, *overrides, name=name)  # noqa: E731
    straight, second = straight_and_resumed(make, *opts, epochs=4, stop_at=2)
    a = _state(straight)
    old_a, old_b = straight.objective.old.weights, second.objective.old.weights
    assert all(torch.equal(old_a[k], old_b[k]) for k in a)
    assert any(not torch.equal(old_a[k], a[k]) for k in a)  # the soft update lags behind the policy


@pytest.mark.parametrize(
    "family",
    [
        ["model.source=tiny:flux", "sampling.guidance_scale=3.5", "train.lora_target_modules=[]"],
        ["model.source=tiny:qwenimage", "sampling.negative_prompt=' '", "train.lora_target_modules=[]"],
        ["model.source=tiny:qwenimage", "train.lora=false", "train.learning_rate=1e-3"],
    ],
)
def test_every_model_family_trains_with_nft(tmp_path, family):
    trainer = _trainer(tmp_path, *family)
    before = _state(trainer)
    history = trainer.train(epochs=2)
    assert all(torch.isfinite(torch.tensor(h["train/loss"])) for h in history)
    assert history[0]["train/skipped_loss_steps"] == 0 and history[1]["train/skipped_optimizer_steps"] == 0
    assert any(not torch.equal(before[k], v) for k, v in _state(trainer).items())


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["train.algorithm=ppo"], "train.algorithm"),
        (["train.algorithm=nft", "train.clip_range=0.5"], "train.clip_range"),
        (["train.algorithm=nft", "train.beta=0.5"], "train.beta"),
        (["train.algorithm=nft", "sampling.sde_window_size=2"], "sampling.sde_window_size"),
        (["train.algorithm=nft", "train.ratio_norm=true"], "train.ratio_norm"),
        (["train.algorithm=nft", "train.zero_advantage=drop"], "train.zero_advantage"),
        (["train.algorithm=nft", "sampling.noise_level=1.0"], "sampling.noise_level"),
        (["train.nft_beta=0.1"], "train.nft_beta"),
        (["train.nft_solver=euler"], "train.nft_solver"),
        (["train.algorithm=nft", "train.nft_beta=0"], "train.nft_beta"),
        (["train.algorithm=nft", "train.deepspeed_stage=3"], "train.deepspeed_stage"),
    ],
)
def test_settings_the_other_algorithm_would_ignore_are_refused_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=rf"\n  {field}: "):
        load_config("tiny", overrides=overrides)


def test_switching_a_grpo_preset_to_nft_keeps_its_unused_settings_quietly():
    cfg = load_config("shapes", overrides=["train.algorithm=nft"])
    assert cfg.train.zero_advantage == "drop" and cfg.train.algorithm == "nft"
    # an NFT preset's baseline is the defaults: a GRPO setting changed on it is refused
    with pytest.raises(ConfigError, match=r"train\.clip_range"):
        load_config("shapes-nft", overrides=["train.clip_range=0.5"])
    # and back: an NFT preset switched to Flow-GRPO keeps its NFT settings unused, the same rule
    assert load_config("shapes-nft", overrides=["train.algorithm=grpo"]).train.nft_kl_beta == 0.0


def test_two_gloo_processes_train_nft_as_one_process(tmp_path):
    # under torchrun every rank draws the same levels and noise seeds for its samples and samples with the same
    # old policy; the gradients are summed as for Flow-GRPO (tests/test_distributed.py's launcher)
    from test_distributed import _history, _train, _weights

    nft = ("--set", "train.algorithm=nft", "--set", "sampling.guidance_scale=1")
    _train(tmp_path / "one", 1, *nft)
    result = _train(tmp_path / "two", 2, *nft)
    assert "2 processes" in result.stdout + result.stderr
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert any(v.abs().sum() > 0 for k, v in one.items() if "lora_B" in k)  # it trained
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=0, atol=1e-4)
    (a,), (b,) = _history(tmp_path / "one"), _history(tmp_path / "two")
    assert a["reward/total"] == b["reward/total"] and a["train/trained_samples"] == b["train/trained_samples"]
    for key in ("train/grad_norm", "train/loss", "train/positive_loss", "train/old_policy_decay"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
