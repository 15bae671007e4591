"""The Flow-GRPO loop (ALGORITHM.md sect. 3-6): sample groups -> score -> advantages -> train.

Every random choice of an epoch (prompts, noise seeds, Fast windows, shuffles) comes from a generator
seeded by ``(seed, epoch)``; together with the weights, optimiser, EMA and stat tracker saved in a
checkpoint, that makes an interrupted and resumed run end with the same parameters as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from flowgrpo_core.advantages import PerPromptStatTracker, clip_advantages, group_stats
from flowgrpo_core.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from flowgrpo_core.config import FlowGRPOConfig
from flowgrpo_core.ema import EMA
from flowgrpo_core.loss import LossOutput, grpo_loss, guard_step_weight
from flowgrpo_core.models import FlowAdapter, load_model
from flowgrpo_core.prompts import PromptSet, draw_prompts, load_prompts
from flowgrpo_core.rewards import Reward, RewardOutput, build_rewards
from flowgrpo_core.sampling import Trajectories, rollout, sample_window_start, sde_window_mask, to_pil
from flowgrpo_core.sde import gaussian_kl, kl_std, sde_step_with_logprob

EpochCallback = Callable[["FlowGRPOTrainer", dict[str, float]], None]
_AUTOCAST = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}
# Changing these between a run and its resume cannot change what was already computed.
_RESUMABLE_FIELDS = {"train.epochs", "train.checkpoint_every", "train.keep_checkpoints", "train.device"}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class FlowGRPOTrainer:
    """Owns the policy, optimiser, EMA and stat tracker of one run; ``train()`` returns per-epoch metrics."""

    def __init__(
        self,
        config: FlowGRPOConfig,
        output_dir: str | Path,
        adapter: FlowAdapter | None = None,
        reward: Reward | None = None,
        prompts: PromptSet | None = None,
        callbacks: Sequence[EpochCallback] = (),
        progress: bool = True,
    ) -> None:
        self.config = config
        self.output_dir = Path(output_dir)
        self.device = resolve_device(config.train.device)
        self.callbacks = list(callbacks)
        self.progress = progress
        res = config.sampling.resolution
        self.prompts = prompts or load_prompts(config.prompts.train)
        self.reward = reward or build_rewards(config.rewards)
        self.adapter = adapter or load_model(config.model.source, config.model.revision, config.model.dtype)
        self.adapter.check_resolution(res, res)
        self.adapter.to(self.device)
        self.trainable = self._setup_policy()

        t = config.train
        self.optimizer = torch.optim.AdamW(
            list(self.trainable.values()),
            lr=t.learning_rate,
            betas=t.adam_betas,
            weight_decay=t.weight_decay,
            eps=t.adam_epsilon,
        )
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=t.mixed_precision == "fp16" and self.device.type == "cuda"
        )
        self.ema = EMA(self.trainable, t.ema_decay, t.ema_update_interval) if t.ema else None
        self.tracker = PerPromptStatTracker(global_std=t.global_std, buffer_size=t.stat_buffer_size)
        self.autocast_dtype = _AUTOCAST[t.mixed_precision]
        self.epoch = 0
        self.global_step = 0
        self.history: list[dict[str, float]] = []
        self.counters = {"skipped_loss_steps": 0, "skipped_optimizer_steps": 0, "nonfinite_rewards": 0}
        self.last_samples: Trajectories | None = None
        self.last_rewards: RewardOutput | None = None  # the epoch's raw scores, with every component

    def _setup_policy(self) -> dict[str, torch.nn.Parameter]:
        t = self.config.train
        transformer = self.adapter.transformer
        if t.lora:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(t.seed)  # LoRA's gaussian init draws from the global RNG
                self.adapter.add_lora(t.lora_rank, t.lora_alpha, t.lora_init, t.lora_target_modules or None)
        else:
            if t.beta > 0:
                self.adapter.keep_reference_copy()
            transformer.requires_grad_(True)
        if t.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        # Eval mode in training too: sampling ran in eval mode, and the ratio must start at exactly 1.
        transformer.eval()
        trainable = {name: p for name, p in transformer.named_parameters() if p.requires_grad}
        for p in trainable.values():
            p.data = p.data.float()  # optimiser state and updates in float32, whatever the base dtype
        return trainable

    # ---- the loop ----

    def train(self, epochs: int | None = None) -> list[dict[str, float]]:
        """Run until ``epochs`` epochs are done in total (default: config.train.epochs)."""
        target = self.config.train.epochs if epochs is None else epochs
        every = self.config.train.checkpoint_every
        tqdm.write(f"[flowgrpo] {self.config.describe()}")
        for epoch in tqdm(
            range(self.epoch, target),
            desc="epochs",
            disable=not self.progress,
            initial=self.epoch,
            total=target,
        ):
            metrics = self.run_epoch(epoch)
            self.epoch = epoch + 1
            self.history.append(metrics)
            tqdm.write(
                f"[flowgrpo] epoch {epoch}: reward {metrics['reward/total']:.4f} ± {metrics['reward/total/std']:.4f}  "
                f"kl {metrics['train/kl']:.3g}  clipfrac {metrics['train/clipfrac']:.3f}  {metrics['time/epoch_s']:.1f}s"
            )
            # Checkpoint before the callbacks: a kill in between loses a log line, which the resume can
            # replay from the checkpoint's history, never an epoch of training.
            if (every and self.epoch % every == 0) or self.epoch == target:
                self.save_checkpoint()
            for callback in self.callbacks:
                callback(self, metrics)
        return self.history

    def run_epoch(self, epoch: int) -> dict[str, float]:
        start = time.perf_counter()
        generator = epoch_generator(self.config.train.seed, epoch)
        samples, scores = self.sample_and_score(generator)
        sampled = time.perf_counter()
        advantages, reward_metrics = self.advantages(samples.prompts, scores)
        train_metrics = self.train_on(samples, advantages, generator)
        self.last_samples, self.last_rewards = samples, scores
        end = time.perf_counter()
        return {
            "epoch": float(epoch),
            **reward_metrics,
            **train_metrics,
            "time/sample_s": sampled - start,
            "time/train_s": end - sampled,
            "time/epoch_s": end - start,
        }

    def sample_and_score(self, generator: torch.Generator) -> tuple[Trajectories, RewardOutput]:
        """Roll out ``groups_per_epoch`` prompts x ``group_size`` images; rewards of a batch are computed in a
        worker thread while the next batch samples (reward servers answer over HTTP meanwhile)."""
        s = self.config.sampling
        chosen = self.prompts.take(draw_prompts(self.prompts, s.groups_per_epoch, generator))
        prompts = [p for p in chosen.prompts for _ in range(s.group_size)]
        metadata = [m for m in chosen.metadata for _ in range(s.group_size)]
        seeds = torch.randint(0, 2**62, (len(prompts),), generator=generator).tolist()
        parts, futures = [], []
        with ThreadPoolExecutor(max_workers=1) as pool:
            for b in tqdm(
                range(self.config.batches_per_epoch), desc="sampling", leave=False, disable=not self.progress
            ):
                sl = slice(b * s.batch_size, (b + 1) * s.batch_size)
                start = (
                    sample_window_start(s.window_bounds(), s.sde_window_size, generator)
                    if s.sde_window_size
                    else 0
                )
                part = rollout(
                    self.adapter, prompts[sl], seeds[sl],
                    resolution=s.resolution, num_steps=s.num_steps, guidance_scale=s.guidance_scale,
                    noise_level=s.noise_level, sde_mask=sde_window_mask(len(prompts[sl]), s.num_steps, s.sde_window_size, start),
                    negative_prompt=s.negative_prompt, max_sequence_length=s.max_sequence_length, sde_type=s.sde_type,
                    metadata=metadata[sl], store_means=self.config.train.ratio_norm, autocast_dtype=self.autocast_dtype,
                )  # fmt: skip
                parts.append(part)
                futures.append(pool.submit(self.reward, to_pil(part.images), part.prompts, part.metadata))
            outputs = [f.result() for f in futures]
        details = {k: [v for o in outputs for v in o.details.get(k, [])] for k in outputs[0].details}
        return Trajectories.cat(parts), RewardOutput(np.concatenate([o.scores for o in outputs]), details)

    def advantages(self, prompts: list[str], scores: RewardOutput) -> tuple[torch.Tensor, dict[str, float]]:
        """Group-relative advantages; samples with a non-finite reward get advantage 0 and are not trained."""
        t = self.config.train
        rewards = scores.scores
        finite = np.isfinite(rewards)
        self.counters["nonfinite_rewards"] += int((~finite).sum())
        if t.stat_buffer_size == 0:
            self.tracker.clear()
        advantages = np.zeros(len(rewards))
        kept_prompts = [p for p, ok in zip(prompts, finite) if ok]
        if finite.any():
            advantages[finite] = clip_advantages(
                self.tracker.update(kept_prompts, rewards[finite]), t.adv_clip_max
            )
        metrics = {
            "reward/total": float(np.mean(rewards[finite])) if finite.any() else float("nan"),
            "reward/total/std": float(np.std(rewards[finite])) if finite.any() else float("nan"),
            "train/nonfinite_rewards": float((~finite).sum()),
            "train/advantage_abs_mean": float(np.abs(advantages).mean()),
        }
        stats = group_stats(kept_prompts, rewards[finite])
        metrics["train/zero_variance_share"] = stats.zero_variance_share
        for key, values in scores.details.items():
            if key.endswith("/raw"):
                name = key[: -len("/raw")]
                raw = np.asarray(values, dtype=np.float64)[finite]
                component = group_stats(kept_prompts, raw)
                metrics[f"reward/{name}/mean"] = float(raw.mean()) if raw.size else float("nan")
                metrics[f"reward/{name}/std"] = float(raw.std()) if raw.size else float("nan")
                metrics[f"reward/{name}/within_group_std"] = component.mean_within_group_std
                metrics[f"reward/{name}/zero_variance_share"] = component.zero_variance_share
        return torch.as_tensor(advantages, dtype=torch.float32), metrics

    def trained_steps(self, sde_mask: torch.Tensor) -> torch.Tensor:
        """(N, K) step indices trained per sample: its first K stochastic steps, in schedule order."""
        k = self.config.trained_steps_per_sample
        order = torch.argsort((~sde_mask).int(), dim=1, stable=True)
        return order[:, :k].cpu()

    def train_on(
        self, samples: Trajectories, advantages: torch.Tensor, generator: torch.Generator
    ) -> dict[str, float]:
        t = self.config.train
        keep = torch.nonzero(advantages != 0).flatten()
        steps = self.trained_steps(samples.sde_mask)
        sums: dict[str, float] = defaultdict(float)
        count = 0
        per_step: dict[int, list[float]] = defaultdict(list)
        grad_norms: list[float] = []
        skipped_before = dict(self.counters)
        for _ in range(t.num_inner_epochs):
            shuffled = keep[torch.randperm(len(keep), generator=generator)]
            micro = [
                m for m in shuffled.split(self.config.sampling.batch_size) if len(m)
            ]  # none when all A = 0
            for window in _split_evenly(micro, t.optimizer_steps_per_epoch):
                n_terms = len(window) * steps.shape[1]
                for index in tqdm(window, desc="training", leave=False, disable=not self.progress):
                    for k in range(steps.shape[1]):
                        out = self.step_loss(samples, index, steps[index, k], advantages[index])
                        if not torch.isfinite(out.loss):
                            self.counters["skipped_loss_steps"] += 1
                            continue
                        self.scaler.scale(out.loss / n_terms).backward()
                        for key, value in out.metrics().items():
                            sums[key] += value
                        count += 1
                        for j, r in zip(steps[index, k].tolist(), out.ratio.tolist()):
                            per_step[j].append(r)
                grad_norms.append(self.optimizer_step())
        names = ("loss", "policy_loss", "kl", "clipfrac", "approx_kl", "ratio_mean", "ratio_min", "ratio_max")
        metrics = {f"train/{k}": sums[k] / count if count else 0.0 for k in names}
        if count:
            metrics["train/ratio_min"] = min(r for v in per_step.values() for r in v)
            metrics["train/ratio_max"] = max(r for v in per_step.values() for r in v)
        for j, ratios in sorted(per_step.items()):
            metrics[f"train/ratio_mean/step_{j}"] = float(np.mean(ratios))
        finite_norms = [g for g in grad_norms if math.isfinite(g)]
        metrics["train/grad_norm"] = float(np.mean(finite_norms)) if finite_norms else 0.0
        metrics["train/trained_samples"] = float(len(keep))
        for key in ("skipped_loss_steps", "skipped_optimizer_steps"):
            metrics[f"train/{key}"] = float(self.counters[key] - skipped_before[key])
        return metrics

    def step_loss(
        self, samples: Trajectories, index: torch.Tensor, step: torch.Tensor, advantages: torch.Tensor
    ) -> LossOutput:
        """The loss of B samples, each at its own trained step ``step`` (B,) of its trajectory."""
        s, t = self.config.sampling, self.config.train
        dev = samples.latents.device
        i, j = index.to(dev), step.to(dev)
        x, x_next = samples.latents[i, j], samples.latents[i, j + 1]
        sigma, sigma_next = samples.sigmas[i, j], samples.sigmas[i, j + 1]
        cond = samples.cond.select(i)

        def step_with(adapter_ctx) -> Any:
            with (
                adapter_ctx,
                torch.autocast(dev.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None),
            ):
                velocity = self.adapter.predict_velocity(
                    x, sigma, cond, s.guidance_scale, s.resolution, s.resolution
                )
            return sde_step_with_logprob(
                velocity, x, sigma, sigma_next, s.noise_level, prev_sample=x_next, sde_type=s.sde_type
            )

        current = step_with(contextlib.nullcontext())
        kl = None
        if t.beta > 0:
            with torch.no_grad():
                reference = step_with(self.adapter.reference_model())
            std = kl_std(sigma, sigma_next, s.noise_level, current.std, t.kl_form, s.sde_type)
            kl = gaussian_kl(current.prev_sample_mean, reference.prev_sample_mean, std)
        return grpo_loss(
            current.log_prob, samples.log_probs[i, j], advantages.to(dev), t.clip_range, beta=t.beta, kl=kl,
            ratio_norm=t.ratio_norm, mean=current.prev_sample_mean,
            old_mean=samples.step_means[i, j] if t.ratio_norm else None, step_std=current.std,
            step_weight=guard_step_weight(sigma, sigma_next) if t.grad_reweight else None,
        )  # fmt: skip

    def optimizer_step(self) -> float:
        """Clip, step, update EMA. A non-finite gradient norm skips the step (counted), never applies it."""
        self.scaler.unscale_(self.optimizer)
        norm = float(
            torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), self.config.train.max_grad_norm)
        )
        if not math.isfinite(norm):
            self.counters["skipped_optimizer_steps"] += 1
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.update()
            return norm
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        if self.ema is not None:
            self.ema.step()
        return norm

    # ---- checkpoints and export ----

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def save_checkpoint(self) -> Path:
        state = {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "tracker": self.tracker.state_dict(),
            "rng": rng_state(),
            "history": self.history,
            "counters": dict(self.counters),
            "ema_counters": {"optimizer_steps": self.ema.optimizer_steps, "updates": self.ema.updates}
            if self.ema
            else {},
        }
        return save_checkpoint(
            self.checkpoint_dir, self.epoch, dict(self.trainable), state, self.config.to_yaml(),
            ema=self.ema.shadow if self.ema else None, keep=self.config.train.keep_checkpoints,
        )  # fmt: skip

    def resume(self, path: str | Path | None = None) -> bool:
        """Restore the latest (or the given) checkpoint; returns False when there is none."""
        path = Path(path) if path is not None else latest_checkpoint(self.checkpoint_dir)
        if path is None:
            return False
        ckpt = load_checkpoint(path)
        self._check_compatible(ckpt["config_yaml"], path)
        missing = set(self.trainable) ^ set(ckpt["policy"])
        if missing:
            raise ValueError(
                f"checkpoint {path} does not match the model's trainable weights: {sorted(missing)[:5]}"
            )
        with torch.no_grad():
            for name, param in self.trainable.items():
                param.copy_(ckpt["policy"][name])
        state = ckpt["state"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.tracker.load_state_dict(state["tracker"])
        if self.ema is not None:
            if ckpt["ema"] is None:
                raise ValueError(f"checkpoint {path} has no EMA weights but train.ema is on")
            self.ema.load_state_dict({"shadow": ckpt["ema"], **state["ema_counters"]})
        set_rng_state(state["rng"])
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        self.history = [dict(h) for h in state["history"]]
        self.counters.update({k: int(v) for k, v in state["counters"].items()})
        tqdm.write(f"[flowgrpo] resumed from {path} at epoch {self.epoch}")
        return True

    def _check_compatible(self, saved_yaml: str, path: Path) -> None:
        import yaml

        from flowgrpo_core.config import flatten

        saved = flatten(yaml.safe_load(saved_yaml))
        current = self.config.flat()
        differ = sorted(
            k for k in set(saved) | set(current)
            if saved.get(k) != current.get(k) and k not in _RESUMABLE_FIELDS and not k.startswith("tracking.")
        )  # fmt: skip
        if differ:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differ[:8])
            raise ValueError(f"cannot resume from {path}: the config changed ({details})")

    def save_policy(self, directory: str | Path) -> Path:
        """The trained policy: LoRA weights in diffusers format (or the full transformer), the EMA version
        in ``ema/``, the resolved config and the metric history."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._export_weights(directory)
        if self.ema is not None:
            with self.ema.swapped_in():
                self._export_weights(directory / "ema")
        (directory / "config.yaml").write_text(self.config.to_yaml())
        (directory / "metrics.json").write_text(json.dumps(self.history, indent=1))
        return directory

    def _export_weights(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        if self.adapter.lora_adapter_name is not None:
            self.adapter.save_lora(directory)
        else:
            self.adapter.transformer.save_pretrained(directory / "transformer")


def _split_evenly(items: list, parts: int) -> list[list]:
    """Split into ``min(parts, len)`` contiguous chunks whose sizes differ by at most one."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for p in range(parts):
        end = start + size + (1 if p < extra else 0)
        out.append(items[start:end])
        start = end
    return [chunk for chunk in out if chunk]
