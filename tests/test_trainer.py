"""The training loop on the tiny SD3: on-policy ratio, KL, Fast windows, exact resume, NaN handling."""

import re
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from family_checks import straight_and_resumed, without_times

from flowgrpo_core.config import load_config
from flowgrpo_core.rewards import Reward, RewardOutput, build_rewards
from flowgrpo_core.trainer import FlowGRPOTrainer
from flowgrpo_core.transitions import trained_steps

FAST = [
    "train.checkpoint_every=0",
    "sampling.groups_per_epoch=2",
    "sampling.group_size=4",
    "sampling.num_steps=4",
]


def _trainer(tmp_path, *overrides, reward=None, name="run"):
    cfg = load_config("tiny", overrides=[*FAST, *overrides])
    return FlowGRPOTrainer(cfg, tmp_path / name, reward=reward, progress=False)


def test_one_batch_one_step_is_exactly_on_policy(tmp_path):
    # One sampling batch and one optimiser step per epoch: every ratio is computed before the update.
    trainer = _trainer(
        tmp_path, "sampling.batch_size=8", "train.optimizer_steps_per_epoch=1", "train.beta=0.1"
    )
    (metrics,) = trainer.train(epochs=1)
    assert metrics["train/ratio_min"] == 1.0 and metrics["train/ratio_max"] == 1.0
    assert metrics["train/approx_kl"] == 0.0 and metrics["train/clipfrac"] == 0.0
    # LoRA starts at B = 0, so the policy equals the reference: the KL is exactly 0 before the update.
    assert metrics["train/kl"] == 0.0
    assert metrics["train/trained_samples"] == 8


def test_updates_move_log_probs_along_the_advantages(tmp_path):
    trainer = _trainer(
        tmp_path,
        "sampling.batch_size=8",
        "train.optimizer_steps_per_epoch=1",
        "train.beta=0",
        "train.lora=false",
        "train.learning_rate=1e-3",
        "train.clip_range=10",
    )
    generator = torch.Generator().manual_seed(0)
    epoch = trainer.sample_and_score(generator)
    samples = epoch.local
    advantages, _ = trainer.advantages(epoch.prompts, epoch.rewards)
    steps = trained_steps(samples.sde_mask, trainer.config.trained_steps_per_sample)
    index = torch.arange(len(samples))

    def log_probs():
        with torch.no_grad():
            return torch.stack(
                [
                    trainer.objective.loss(samples, index, steps[:, k], advantages).ratio.log()
                    for k in range(steps.shape[1])
                ],
                1,
            ).sum(1)

    assert torch.equal(log_probs(), torch.zeros(len(samples)))
    trainer.train_on(samples, advantages, generator)
    moved = log_probs()
    assert float((advantages * moved).sum()) > 0
    assert np.corrcoef(advantages.numpy(), moved.numpy())[0, 1] > 0.5


def test_fast_window_trains_only_its_steps(tmp_path):
    trainer = _trainer(
        tmp_path, "sampling.num_steps=8", "sampling.sde_window_size=2", "sampling.sde_window_range=[0.0, 0.5]"
    )
    (metrics,) = trainer.train(epochs=1)
    samples = trainer.last_samples
    windows = set()
    for row_mask, row_logp in zip(samples.sde_mask, samples.log_probs):
        steps = torch.nonzero(row_mask).flatten().tolist()
        assert len(steps) == 2 and steps[1] == steps[0] + 1 and 0 <= steps[0] <= 2  # inside the first half
        assert torch.all(row_logp[~row_mask] == 0) and torch.all(row_logp[row_mask] != 0)
        windows.update(steps)
    trained = {int(k.rsplit("_", 1)[1]) for k in metrics if k.startswith("train/ratio_mean/step_")}
    assert trained and trained <= windows
    assert torch.equal(
        trained_steps(samples.sde_mask, trainer.config.trained_steps_per_sample),
        torch.stack([torch.nonzero(m).flatten() for m in samples.sde_mask]),
    )


def test_full_flow_grpo_trains_the_first_fraction_of_steps(tmp_path):
    trainer = _trainer(tmp_path, "sampling.num_steps=8", "train.timestep_fraction=0.5")
    (metrics,) = trainer.train(epochs=1)
    trained = sorted(int(k.rsplit("_", 1)[1]) for k in metrics if k.startswith("train/ratio_mean/step_"))
    assert trained == [0, 1, 2, 3]


def _state(trainer):
    return {name: p.detach().clone() for name, p in trainer.trainable.items()}


_WATCHED = [
    "eval.every_epochs=1",
    "eval.metrics=[brightness]",
    "eval.during_training_prompts=4",
    "eval.num_steps=4",
]


@pytest.mark.parametrize(
    "variant",
    [
        [],
        ["train.lora=false", "train.beta=0.05"],
        ["train.ratio_norm=true", "train.grad_reweight=true"],
        [*_WATCHED, "train.keep_best=brightness"],
    ],
)
def test_interrupted_and_resumed_run_ends_with_the_same_parameters(tmp_path, variant):
    opts = ["train.checkpoint_every=1", "train.ema_update_interval=1", "train.stat_buffer_size=8", *variant]
    make = lambda *overrides, name: _trainer(tmp_path, *overrides, name=name)  # noqa: E731
    straight, second = straight_and_resumed(make, *opts, epochs=4, stop_at=2)
    assert straight.tracker.state_dict() == second.tracker.state_dict()
    assert without_times(straight.watch.records) == without_times(second.watch.records)
    assert straight.watch.best == second.watch.best
    a = _state(straight)
    assert any(
        not torch.equal(a[k], _state(_trainer(tmp_path, *opts, name="fresh"))[k]) for k in a
    )  # it did train


def test_evaluation_during_training_leaves_the_trajectory_bit_identical(tmp_path):
    # evaluations after every epoch (EMA weights swapped in, ODE sampling, rewards) against none at all
    off = _trainer(tmp_path, "train.beta=0.05", name="off")
    on = _trainer(tmp_path, "train.beta=0.05", *_WATCHED, "train.keep_best=brightness", name="on")
    off.train(epochs=2)
    on.train(epochs=2)
    assert [int(r["epoch"]) for r in on.watch.records] == [0, 1, 2] and not off.watch.records
    assert all(torch.equal(off.trainable[k], on.trainable[k]) for k in off.trainable)
    assert all(torch.equal(off.ema.shadow[k], on.ema.shadow[k]) for k in off.trainable)
    assert [h["train/loss"] for h in off.history] == [h["train/loss"] for h in on.history]
    # the model is left as training needs it: eval mode, the LoRA adapter active, the trained weights in place
    assert not on.adapter.transformer.training and on.adapter.lora_adapter_name is not None
    assert torch.equal(_images(on), _images(off))


def _images(trainer):
    from flowgrpo_core.sampling import SamplingSpec, rollout, sde_window_mask

    spec = SamplingSpec(64, 4, 4.5, max_sequence_length=32)
    return rollout(
        trainer.adapter, ["a photo of a cat"], [0], spec, sde_window_mask(1, 4, 1, 0) & False
    ).images


def test_resume_refuses_a_changed_config(tmp_path):
    _trainer(tmp_path, "train.checkpoint_every=1", name="r").train(epochs=1)
    other = _trainer(tmp_path, "train.checkpoint_every=1", "train.beta=0.5", name="r")
    with pytest.raises(ValueError, match=r"config changed \(train.beta: 0.01 -> 0.5\)"):
        other.resume()


def test_checkpoints_are_pruned_and_atomic(tmp_path):
    trainer = _trainer(tmp_path, "train.checkpoint_every=1", "train.keep_checkpoints=2")
    trainer.train(epochs=3)
    names = sorted(p.name for p in trainer.checkpoint_dir.iterdir())
    assert names == ["epoch-000002", "epoch-000003"]
    (trainer.checkpoint_dir / "epoch-000009.tmp").mkdir()  # a crash mid-write leaves only a .tmp
    assert _trainer(tmp_path, "train.checkpoint_every=1", "train.keep_checkpoints=2").resume() is True
    fresh = _trainer(tmp_path, "train.checkpoint_every=1", "train.keep_checkpoints=2")
    fresh.resume()
    assert fresh.epoch == 3


class _NaNForFirstImage(Reward):
    name = "nan_first"

    def score(self, images: Sequence, prompts: Sequence[str], metadata: Sequence[dict]) -> RewardOutput:
        scores = build_rewards({"jpeg_compressibility": 1.0})(images, prompts).scores
        scores[0] = np.nan
        return RewardOutput(scores)


def test_nonfinite_rewards_are_dropped_and_counted(tmp_path):
    trainer = _trainer(tmp_path, "sampling.batch_size=4", reward=_NaNForFirstImage())
    (metrics,) = trainer.train(epochs=1)
    assert metrics["train/nonfinite_rewards"] == 2  # first image of each of the two batches
    assert metrics["train/trained_samples"] <= 6 and np.isfinite(metrics["reward/total"])
    assert all(torch.isfinite(p).all() for p in trainer.trainable.values())


def test_nonfinite_loss_and_gradients_are_skipped_never_applied(tmp_path):
    trainer = _trainer(tmp_path, "train.beta=0", "train.lora=false", "train.optimizer_steps_per_epoch=1")
    generator = torch.Generator().manual_seed(0)
    samples = trainer.sample_and_score(generator).local
    before = _state(trainer)
    nan_adv = torch.full((len(samples),), float("nan"))
    metrics = trainer.train_on(samples, nan_adv, generator)
    assert metrics["train/skipped_loss_steps"] > 0 and metrics["train/trained_samples"] == len(samples)
    huge = torch.zeros(len(samples))
    huge[0] = 3e38  # the loss (a mean) stays finite, its gradient overflows
    metrics = trainer.train_on(samples, huge, generator)
    assert metrics["train/skipped_optimizer_steps"] == 1
    after = _state(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert trainer.counters["skipped_optimizer_steps"] == 1


def test_exported_policy_reproduces_the_trained_model(tmp_path):
    from flowgrpo_core.models import adapter_for
    from flowgrpo_core.models.tiny import build_tiny_sd3
    from flowgrpo_core.sampling import SamplingSpec, rollout, sde_window_mask

    trainer = _trainer(tmp_path, "train.learning_rate=0.05", "train.ema=false")
    trainer.train(epochs=2)
    policy = trainer.save_policy(tmp_path / "policy")
    assert {p.name for p in policy.iterdir()} >= {
        "pytorch_lora_weights.safetensors",
        "config.yaml",
        "metrics.json",
    }

    def images(adapter):
        spec = SamplingSpec(64, 4, 4.5, max_sequence_length=32)
        return rollout(adapter, ["a photo of a cat"], [0], spec, sde_window_mask(1, 4, 1, 0) & False).images

    pipe = build_tiny_sd3(seed=0)
    pipe.load_lora_weights(policy, adapter_name="grpo")
    assert torch.equal(images(adapter_for(pipe)), images(trainer.adapter))


def test_seeded_tiny_run_raises_the_jpeg_reward(tmp_path):
    """The `tiny` preset, 10 epochs: the policy beats the base on the same 32 held-out seeds (paired, so the
    sampling noise cancels) and the training reward rises."""
    from flowgrpo_core.sampling import SamplingSpec, rollout, sde_window_mask, to_pil

    cfg = load_config("tiny", overrides=["train.checkpoint_every=0"])
    trainer = FlowGRPOTrainer(cfg, tmp_path / "learn", progress=False)
    history = trainer.train(epochs=10)
    s, n = cfg.sampling, 32
    prompts = [trainer.prompts.prompts[i % 8] for i in range(n)]

    def ode_rewards():
        spec = SamplingSpec(
            s.resolution, s.num_steps, s.guidance_scale, max_sequence_length=s.max_sequence_length
        )
        t = rollout(
            trainer.adapter,
            prompts,
            list(range(1000, 1000 + n)),
            spec,
            sde_window_mask(n, s.num_steps, 1, 0) & False,
        )
        return trainer.reward(to_pil(t.images), prompts).scores

    policy = ode_rewards()
    with trainer.adapter.reference_model():
        base = ode_rewards()
    diff = policy - base
    assert diff.mean() > 3 * diff.std() / np.sqrt(n), (
        f"policy - base = {diff.mean():.4f} ± {diff.std() / np.sqrt(n):.4f}"
    )
    rewards = [m["reward/total"] for m in history]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3])


def test_an_epoch_without_signal_trains_nothing(tmp_path):
    trainer = _trainer(tmp_path)
    generator = torch.Generator().manual_seed(0)
    samples = trainer.sample_and_score(generator).local
    before = _state(trainer)
    metrics = trainer.train_on(samples, torch.zeros(len(samples)), generator)
    assert metrics["train/trained_samples"] == 0 and metrics["train/loss"] == 0.0
    assert trainer.global_step == 0 and all(torch.equal(before[k], v) for k, v in _state(trainer).items())


def test_flux_adapter_trains_exactly_on_policy(tmp_path):
    # FLUX: packed latents, embedded guidance, no CFG batch doubling.
    trainer = _trainer(
        tmp_path,
        "model.source=tiny:flux",
        "sampling.guidance_scale=3.5",
        "sampling.batch_size=8",
        "train.optimizer_steps_per_epoch=1",
        "train.lora_target_modules=[]",
    )
    (metrics,) = trainer.train(epochs=1)
    assert (
        metrics["train/ratio_min"] == 1.0 and metrics["train/ratio_max"] == 1.0 and metrics["train/kl"] == 0.0
    )
    assert trainer.last_samples.latents.shape[2:] == (16, 16)  # (tokens, 4 x channels)
    trainer.train(epochs=2)
    assert any(p.abs().sum() > 0 for n, p in trainer.trainable.items() if "lora_B" in n)


def test_reference_means_in_one_forward_equal_one_forward_per_step(tmp_path):
    # The reference model's forwards are batched over a micro-batch's trained steps; on a CPU that gives the
    # same bits as one forward per step, so the KL (and the loss) is what the per-step computation gives.
    trainer = _trainer(tmp_path, "train.beta=0.1", "train.lora=false", "train.learning_rate=1e-2")
    generator = torch.Generator().manual_seed(0)
    epoch = trainer.sample_and_score(generator)
    samples = epoch.local
    advantages, _ = trainer.advantages(epoch.prompts, epoch.rewards)
    trainer.train_on(samples, advantages, generator)  # move the policy away from the reference
    index = torch.arange(4)
    steps = trained_steps(samples.sde_mask, trainer.config.trained_steps_per_sample)[index]
    cond = samples.cond.select(index)
    batched = trainer.objective.reference_means(samples, index, steps, cond)
    for k in range(steps.shape[1]):
        with torch.no_grad():
            alone = trainer.objective.score(
                samples, index, steps[:, k], cond, reference=True
            ).prev_sample_mean
        assert torch.equal(batched[:, k], alone)
        with_batch = trainer.objective.loss(
            samples, index, steps[:, k], advantages[index], cond, batched[:, k]
        )
        per_step = trainer.objective.loss(samples, index, steps[:, k], advantages[index], cond)
        assert with_batch.kl > 0 and torch.equal(with_batch.loss, per_step.loss)


def test_batched_reference_forwards_train_exactly_like_one_forward_per_step(tmp_path):
    runs = [
        _trainer(tmp_path, "train.beta=0.1", f"train.batch_reference_steps={flag}", name=str(flag))
        for flag in (True, False)
    ]
    histories = [run.train(epochs=2) for run in runs]
    assert histories[0][-1]["train/kl"] > 0
    assert [h["train/loss"] for h in histories[0]] == [h["train/loss"] for h in histories[1]]
    assert all(torch.equal(runs[0].trainable[k], runs[1].trainable[k]) for k in runs[0].trainable)


_NO_CUDA = not torch.cuda.is_available()


@pytest.mark.parametrize(
    ("device", "problem"),
    [
        pytest.param(
            "cuda", "is not available", marks=pytest.mark.skipif(not _NO_CUDA, reason="CUDA is here")
        ),
        (f"cuda:{torch.cuda.device_count()}", "is not available"),  # cuda:0 on a machine without CUDA
        pytest.param(
            "mps",
            "is not available",
            marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="a Mac"),
        ),
        ("gpu0", "is not a usable device name"),
        ("meta", "is not a usable device name"),
    ],
)
def test_a_device_this_machine_lacks_is_refused_before_the_model_loads(
    tmp_path, monkeypatch, device, problem
):
    import flowgrpo_core.trainer as trainer_module
    from flowgrpo_core.devices import available_devices

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not load for an unavailable device")

    monkeypatch.setattr(trainer_module, "load_model", no_model)
    cfg = load_config("tiny", overrides=[*FAST, f"train.device={device}"])
    with pytest.raises(ValueError, match=rf"train\.device: .*{device!r} {problem}") as caught:
        FlowGRPOTrainer(cfg, tmp_path / "run", progress=False)
    assert ", ".join(available_devices()) in str(caught.value) and "cpu" in str(caught.value)


def test_cpu_and_auto_are_accepted(tmp_path):
    from flowgrpo_core.devices import require_device

    assert require_device("cpu") == torch.device("cpu")
    assert require_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert _trainer(tmp_path, "train.device=cpu").device == torch.device("cpu")


def test_a_gpu_index_beyond_the_machine_lists_the_gpus_there_are(monkeypatch):
    from flowgrpo_core import devices

    # a two-GPU machine, as torch would describe it (torch.device itself needs no GPU)
    monkeypatch.setattr(devices.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(devices.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(devices.torch.backends.cuda, "is_built", lambda: True)
    assert devices.require_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(
        ValueError,
        match=re.escape(
            "train.device: device 'cuda:7' is not available (this machine has 2 CUDA GPU(s)); "
            "available devices: cpu, cuda:0, cuda:1"
        ),
    ):
        devices.require_device("cuda:7", "train.device")
