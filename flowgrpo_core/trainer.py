"""The Flow-GRPO loop (docs/algorithm.md sect. 3-6): sample groups -> score -> advantages -> train.

Every random choice of an epoch (prompts, noise seeds, Fast windows, shuffles) comes from a generator
seeded by ``(seed, epoch)``; together with the weights, optimiser, EMA and stat tracker saved in a
checkpoint, that makes an interrupted and resumed run end with the same parameters as an
uninterrupted one.

Under torchrun every rank draws the same global plan from that generator, samples and scores only its
own batches, and gathers the rewards so that all ranks compute the same advantages. Optimiser steps are
defined over global sets of samples: each rank back-propagates its share, normalised by the global size,
and the gradients are summed over ranks. N processes therefore take the same steps as one process with
the same global batch (up to floating-point summation order).

The epoch's roll-outs are :mod:`flowgrpo_core.rollouts`, the optimiser step :mod:`flowgrpo_core.optimization`.
The objective is an object with one interface (which weights sample and with which solver, which samples and
steps are trained, the loss of each, what follows an epoch, what a checkpoint keeps): Flow-GRPO's loss of a
trained transition, :class:`flowgrpo_core.transitions.TransitionScorer`, or DiffusionNFT's
(``train.algorithm: nft``), :class:`flowgrpo_core.nft_objective.NFTObjective`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from flowgrpo_core.advantages import PerPromptStatTracker, epoch_advantages, samples_to_train
from flowgrpo_core.checkpoint import (
    CheckpointWriteError,
    check_resumable,
    load_checkpoint,
    load_latest_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from flowgrpo_core.config import FlowGRPOConfig
from flowgrpo_core.devices import require_device
from flowgrpo_core.distributed import DistributedContext, split_evenly
from flowgrpo_core.ema import EMA
from flowgrpo_core.loss import LossOutput, loss_statistics
from flowgrpo_core.models import FlowAdapter, load_model
from flowgrpo_core.nft_objective import NFTObjective
from flowgrpo_core.optimization import build_backend
from flowgrpo_core.policy import export_weights
from flowgrpo_core.prompts import PromptSet, load_prompts, tag_groups
from flowgrpo_core.rewards import Reward, RewardOutput, build_rewards
from flowgrpo_core.rollouts import EpochSamples, plan_epoch, sample_and_score
from flowgrpo_core.sampling import Trajectories, to_pil
from flowgrpo_core.transitions import TransitionScorer
from flowgrpo_core.watch import ProxyGoldWatch

EpochCallback = Callable[["FlowGRPOTrainer", dict[str, float]], None]
_AUTOCAST = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class _Accumulated:
    """Loss statistics of an epoch's terms on this rank, each weighted by its samples (so they do not depend on
    how samples fall into micro-batches), and the ratios per trained step."""

    sums: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    count: int = 0
    per_step: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    compute_s: float = 0.0

    def add(self, out: LossOutput, samples: int, steps: torch.Tensor) -> None:
        for key, value in out.metrics().items():
            self.sums[key] += value * samples
        self.count += samples
        if out.ratio is not None:  # an objective without likelihood ratios (NFT) has none
            for j, r in zip(steps.tolist(), out.ratio.tolist()):
                self.per_step[j].append(r)


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a torch device (``auto``: CUDA when there is one); a device this machine lacks
    is refused with the ones it has."""
    return require_device(name, "train.device")


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
        gold: Mapping[str, Reward] | None = None,
    ) -> None:
        self.config = config
        self.output_dir = Path(output_dir)
        # checked before anything is loaded; under torchrun, again for this rank's own GPU
        self.dist = DistributedContext.from_env(resolve_device(config.train.device).type)
        self.device = resolve_device(str(self.dist.device(config.train.device)))
        if config.batches_per_epoch % self.dist.world_size:
            raise ValueError(
                f"{config.batches_per_epoch} sampling batches per epoch cannot be shared by {self.dist.world_size} "
                "processes: make group_size x groups_per_epoch / batch_size a multiple of the world size"
            )
        if config.train.deepspeed_stage == 3 and self.dist.enabled and config.eval.every_epochs:
            # ZeRO-3 gathers weights in every forward, a collective: ranks must run the same forwards, and the
            # held-out evaluation gives a rank one more prompt than another when they do not divide evenly
            raise ValueError(
                "eval.every_epochs: evaluations during training are not supported with train.deepspeed_stage 3 "
                "on several processes yet; evaluate after training (the evaluate stage), or use stage 2"
            )
        self.callbacks = list(callbacks)
        self.progress = progress and self.dist.is_main
        res = config.sampling.resolution
        self.prompts = prompts or load_prompts(config.prompts.train)
        if config.prompts.balance_tags:
            tag_groups(self.prompts)  # an untagged prompt fails here, before the model loads
        self.reward = reward or build_rewards(config.rewards)
        self.adapter = adapter or load_model(
            config.model.source, config.model.revision, config.model.component_dtypes()
        )
        self.adapter.check_resolution(res, res)
        self.adapter.text_encoders_on_cpu = config.model.text_encoders_on_cpu
        self.adapter.to(self.device)
        self.trainable = self._setup_policy()

        t = config.train
        self.backend = build_backend(
            t,
            self.adapter.transformer,
            list(self.trainable.values()),
            self.dist,
            self.device,
            config.sampling.batch_size,
        )
        self.adapter.training_wrapper = self.backend.training_wrapper  # DeepSpeed's engine, or None
        self.adapter.partitioned = self.backend.partitions_parameters  # ZeRO-3
        with self.backend.gathered(self.trainable.values()):
            self.ema = EMA(self.trainable, t.ema_decay, t.ema_update_interval) if t.ema else None
        self.tracker = PerPromptStatTracker(global_std=t.global_std, buffer_size=t.stat_buffer_size)
        self.autocast_dtype = _AUTOCAST[t.mixed_precision]
        self.objective: TransitionScorer | NFTObjective = (
            NFTObjective(self.adapter, config.sampling, t, self.autocast_dtype, self.trainable)
            if t.algorithm == "nft"
            else TransitionScorer(self.adapter, config.sampling, t, self.autocast_dtype)
        )
        self.epoch = 0
        self.global_step = 0
        self.history: list[dict[str, float]] = []
        self.counters = {"skipped_loss_steps": 0, "skipped_optimizer_steps": 0, "nonfinite_rewards": 0}
        self.last_samples: Trajectories | None = None  # this rank's roll-outs of the last epoch
        self.last_prompts: list[str] = []  # the last epoch's prompts, all ranks
        self.last_rewards: RewardOutput | None = None  # the last epoch's scores, all ranks, every component
        # held-out evaluations during training (eval.every_epochs), the hacking monitor, keep-best; gold: the
        # eval.metrics as the evaluate stage builds them (reward servers' clients), else built in-process
        self.watch = ProxyGoldWatch(config, self.reward, gold, self.dist, self.output_dir, self._log)

    def _setup_policy(self) -> dict[str, torch.nn.Parameter]:
        t = self.config.train
        transformer = self.adapter.transformer
        if t.lora:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(t.seed)  # LoRA's gaussian init draws from the global RNG
                self.adapter.add_lora(t.lora_rank, t.lora_alpha, t.lora_init, t.lora_target_modules or None)
        else:
            if t.uses_reference:
                self.adapter.keep_reference_copy()
            self.adapter.unfreeze()
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
        """Run until ``epochs`` epochs are done in total (default: config.train.epochs), or until the hacking
        monitor stops the run (``train.stop_on_hacking``)."""
        target = self.config.train.epochs if epochs is None else epochs
        every = self.config.train.checkpoint_every
        self._log(
            f"[flowgrpo] {self.config.describe()}"
            + (f"; {self.dist.world_size} processes" if self.dist.enabled else "")
        )
        if self.watch.stopped_at is not None:  # resumed after the hacking monitor stopped the run
            return self.history
        if self.watch.due(self.epoch) and self.epoch < target:  # the policy before the first epoch it trains
            self.watch.evaluate(self)
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
            clipfrac = metrics.get("train/clipfrac")  # Flow-GRPO's; NFT has no ratio to clip
            self._log(
                f"[flowgrpo] epoch {epoch}: reward {metrics['reward/total']:.4f} ± {metrics['reward/total/std']:.4f}  "
                f"kl {metrics['train/kl']:.3g}  "
                + (
                    f"clipfrac {clipfrac:.3f}"
                    if clipfrac is not None
                    else f"loss {metrics['train/loss']:.4g}"
                )
                + f"  {metrics['time/epoch_s']:.1f}s"
            )
            if self.watch.due(self.epoch):  # before the checkpoint, which keeps the monitor's state
                self.watch.evaluate(self)
            stop = self.watch.stopped_at is not None
            # Checkpoint before the callbacks: a kill in between loses a log line, which the resume can
            # replay from the checkpoint's history, never an epoch of training.
            if (every and self.epoch % every == 0) or self.epoch == target or stop:
                self.save_checkpoint()
            if self.dist.is_main:
                for callback in self.callbacks:
                    callback(self, metrics)
            if stop:
                break
        return self.history

    def _log(self, line: str) -> None:
        if self.dist.is_main:
            tqdm.write(line)

    def run_epoch(self, epoch: int) -> dict[str, float]:
        start = time.perf_counter()
        generator = epoch_generator(self.config.train.seed, epoch)
        epoch_samples = self.sample_and_score(generator)
        sampled = time.perf_counter()
        advantages, reward_metrics = self.advantages(epoch_samples.prompts, epoch_samples.rewards)
        finite = torch.from_numpy(np.isfinite(epoch_samples.rewards.scores))
        train_metrics = self.train_on(
            epoch_samples.local, advantages, generator, epoch_samples.indices, finite
        )
        train_metrics |= self.objective.end_epoch(self.global_step)  # NFT: the old policy's soft update
        self.last_samples, self.last_prompts = epoch_samples.local, epoch_samples.prompts
        self.last_rewards = epoch_samples.rewards
        end = time.perf_counter()
        return {
            "epoch": float(epoch),
            **reward_metrics,
            **train_metrics,
            **epoch_samples.timing,
            "time/sample_s": sampled - start,
            "time/train_s": end - sampled,
            "time/epoch_s": end - start,
        }

    def sample_and_score(self, generator: torch.Generator) -> EpochSamples:
        """This rank's share of the epoch's plan, sampled and scored; every rank's rewards."""
        plan = plan_epoch(self.config, self.prompts, generator)
        with self.objective.sampling_weights():  # NFT samples with its old policy
            return sample_and_score(
                self.adapter,
                self.reward,
                self.config,
                plan,
                self.dist,
                self.autocast_dtype,
                self.progress,
                ode_solver=self.objective.ode_solver,
            )

    def advantages(self, prompts: list[str], scores: RewardOutput) -> tuple[torch.Tensor, dict[str, float]]:
        """Group-relative advantages; samples with a non-finite reward get advantage 0 and are not trained."""
        raw = {k: v for k, v in scores.details.items() if k.endswith("/raw")}
        advantages, metrics = epoch_advantages(
            self.tracker, prompts, scores.scores, raw, self.config.train.adv_clip_max
        )
        self.counters["nonfinite_rewards"] += int(metrics["train/nonfinite_rewards"])
        return torch.as_tensor(advantages, dtype=torch.float32), metrics

    def train_on(
        self,
        samples: Trajectories,
        advantages: torch.Tensor,
        generator: torch.Generator,
        indices: torch.Tensor | None = None,
        finite: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """Inner epochs over the samples the objective trains (Flow-GRPO: ``train.zero_advantage``; NFT: all),
        in ``train.optimizer_steps_per_epoch`` optimiser steps each.

        Args:
            samples: this rank's trajectories.
            advantages: (N,) advantages of all samples of the epoch (every rank's).
            indices: (n_local,) global index of each local sample (default: all, single process).
            finite: (N,) bool, samples whose reward was finite (default: all); the others are never trained.
        """
        t = self.config.train
        indices = torch.arange(len(samples)) if indices is None else indices
        local_position = {int(g): pos for pos, g in enumerate(indices.tolist())}
        rank_of_sample = (
            torch.arange(len(advantages)) // self.config.sampling.batch_size
        ) % self.dist.world_size
        per_rank = self.config.batches_per_epoch // self.dist.world_size
        keep = samples_to_train(
            advantages, self.objective.zero_advantage, rank_of_sample, per_rank, generator, eligible=finite
        )
        stats, grad_norms, skipped_before = _Accumulated(), [], dict(self.counters)
        for _ in range(t.num_inner_epochs):
            # Flow-GRPO: the stochastic steps; NFT: noise levels and noise drawn afresh every inner epoch
            steps = self.objective.trained_steps(
                samples, indices, len(advantages), self.config.trained_steps_per_sample, generator
            )
            # the same order on every rank; unshuffled, the optimiser steps take the samples in sampling order
            order = keep[torch.randperm(len(keep), generator=generator)] if t.shuffle_samples else keep
            for window in split_evenly(order.tolist(), t.optimizer_steps_per_epoch):
                mine = torch.tensor(
                    [local_position[g] for g in window if g in local_position], dtype=torch.long
                )
                self.accumulate(samples, mine, len(window), advantages[indices[mine]], steps, stats)
                grad_norms.append(self.optimizer_step())
        return self._train_metrics(stats, grad_norms, len(keep), skipped_before)

    def accumulate(
        self,
        samples: Trajectories,
        mine: torch.Tensor,
        window_size: int,
        advantages: torch.Tensor,
        steps: torch.Tensor,
        stats: _Accumulated,
    ) -> None:
        """Back-propagate this rank's share of one optimiser step: its samples ``mine`` (local indices) with
        their ``advantages``, at their trained ``steps`` (n_local, K), in micro-batches of the sampling batch
        size. Each sample-step weighs ``1 / (window_size x K)``, whatever its rank."""
        k_steps = steps.shape[1]
        batch = self.config.sampling.batch_size
        micro = [
            (m, advantages[i : i + batch]) for i, m in zip(range(0, len(mine), batch), mine.split(batch))
        ]
        # A backend that reduces gradients inside backward needs the same number of backward calls on every
        # rank, and ZeRO-3 (which gathers each layer's weights in every forward and backward) the same forwards
        # in the same order: a rank with fewer samples pads with whole zero-weighted micro-batches of its first
        # sample, which run the same code as real ones (a synthetic zero loss would fire the hooks in another
        # order). Every rank's calls are a multiple of K.
        calls = self.backend.backward_calls(len(micro) * k_steps)
        padding = [(torch.zeros(1, dtype=torch.long), None)] * ((calls - len(micro) * k_steps) // k_steps)
        done, started = 0, time.perf_counter()
        for index, local_adv in tqdm(
            micro + padding, desc="training", leave=False, disable=not self.progress
        ):
            real = local_adv is not None
            weight = len(index) / (window_size * k_steps) if real else 0.0
            local_adv = local_adv if real else torch.zeros(len(index))
            # each term is back-propagated before the objective builds the next
            for k, out in enumerate(self.objective.losses(samples, index, steps[index], local_adv)):
                done += 1
                if not torch.isfinite(out.loss):
                    self.counters["skipped_loss_steps"] += int(real)
                    self._backward_nonfinite(out.loss, samples, steps, last=done == calls)
                    continue
                self.backend.backward(out.loss * weight, last=done == calls)
                if real:
                    stats.add(out, len(index), steps[index, k])
        stats.compute_s += time.perf_counter() - started

    def _backward_nonfinite(
        self, loss: torch.Tensor, samples: Trajectories, steps: torch.Tensor, last: bool
    ) -> None:
        """A non-finite loss is not trained on. A backend that counts backward calls still gets one: the
        padding loss, or under ZeRO-3 (where another forward on one rank would desynchronise the ranks'
        gathers) this loss zeroed, whose gradients may then be non-finite and skip the whole step on every
        rank."""
        if not self.backend.pads_backward_calls:
            return
        if self.backend.partitions_parameters:
            self.backend.backward(loss.nan_to_num(0.0, 0.0, 0.0) * 0.0, last=last)
        else:
            self.backend.backward(self.objective.padding_loss(samples, steps), last=last)

    def _train_metrics(
        self, stats: _Accumulated, grad_norms: list[float], kept: int, skipped_before: dict[str, int]
    ) -> dict[str, float]:
        """Loss statistics over every rank's terms; counters summed over ranks."""
        skipped_optimizer = (
            self.counters["skipped_optimizer_steps"] - skipped_before["skipped_optimizer_steps"]
        )
        skipped_loss = self.counters["skipped_loss_steps"] - skipped_before["skipped_loss_steps"]
        parts = self.dist.all_gather_objects(
            (dict(stats.sums), stats.count, dict(stats.per_step), skipped_loss)
        )
        all_skipped = sum(p[3] for p in parts)
        # the same on every rank
        self.counters["skipped_loss_steps"] = skipped_before["skipped_loss_steps"] + all_skipped
        finite_norms = [g for g in grad_norms if math.isfinite(g)]
        return {
            **loss_statistics([p[:3] for p in parts], self.objective.logged),
            "train/grad_norm": float(np.mean(finite_norms)) if finite_norms else 0.0,
            "train/trained_samples": float(kept),
            "train/skipped_loss_steps": float(all_skipped),
            "train/skipped_optimizer_steps": float(skipped_optimizer),  # the same on every rank
            "time/forward_backward_s": stats.compute_s,
        }

    def optimizer_step(self) -> float:
        """One optimiser step through the backend, then the EMA. A non-finite gradient norm skips the step
        (counted), never applies it; every rank sees the same norm, so they skip alike."""
        norm, applied = self.backend.step()
        if not applied:
            self.counters["skipped_optimizer_steps"] += 1
            return norm
        self.global_step += 1
        if self.ema is not None:
            with self.backend.gathered(self.trainable.values()):
                self.ema.step()
        return norm

    # ---- checkpoints and export ----

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def save_checkpoint(self) -> Path | None:
        """Written by rank 0 (every rank holds the same state); the others wait until it is complete. With
        DeepSpeed, every rank first writes its optimiser partition into the same staging folder. A checkpoint
        rank 0 cannot write (``CheckpointWriteError``: disk full, no permission) fails every rank alike, with
        rank 0's message, instead of leaving the others waiting for it."""
        staged = self.backend.save_partitions(self.checkpoint_dir, self.epoch)
        policy = self.backend.snapshot(self.trainable)  # every rank: under ZeRO-3 a gather
        if not self.dist.is_main:
            failure = self.dist.all_gather_objects(None)[0]  # rank 0's outcome; waits until it is written
            if failure is not None:
                raise CheckpointWriteError(f"rank 0: {failure}")
            return None
        state = {
            "epoch": self.epoch,
            "global_step": self.global_step,
            **self.backend.state_dict(),  # "optimizer" and "scaler"
            "tracker": self.tracker.state_dict(),
            "rng": rng_state(),
            "history": self.history,
            "watch": self.watch.state_dict(),
            "objective": self.objective.state_dict(),  # NFT: the old policy's weights
            "counters": dict(self.counters),
            "ema_counters": {"optimizer_steps": self.ema.optimizer_steps, "updates": self.ema.updates}
            if self.ema
            else {},
        }
        try:
            path = save_checkpoint(
                self.checkpoint_dir,
                self.epoch,
                policy,
                state,
                self.config.to_yaml(),
                ema=self.ema.shadow if self.ema else None,
                keep=self.config.train.keep_checkpoints,
                staged=staged,
            )
        except CheckpointWriteError as error:
            self.dist.all_gather_objects(str(error))
            raise
        self.dist.all_gather_objects(None)
        self.watch.prune()  # the kept weights this checkpoint no longer needs
        return path

    def resume(self, path: str | Path | None = None) -> bool:
        """Restore the newest intact (or the given) checkpoint; returns False when there is none.

        A corrupt newer checkpoint is skipped with a warning naming the file at fault; when none is intact,
        or the given one is corrupt, a ``CorruptCheckpoint`` error names the folder or the file.
        """
        if path is not None:
            path, ckpt = Path(path), load_checkpoint(path)
        else:
            # every rank verifies and picks the same checkpoint; rank 0 alone reports the corrupt ones
            warn = logging.getLogger(__name__).warning if self.dist.is_main else (lambda _message: None)
            found = load_latest_checkpoint(self.checkpoint_dir, warn=warn)
            if found is None:
                return False
            path, ckpt = found
        check_resumable(ckpt["config_yaml"], self.config.flat(), path)
        missing = set(self.trainable) ^ set(ckpt["policy"])
        if missing:
            raise ValueError(
                f"checkpoint {path} does not match the model's trainable weights: {sorted(missing)[:5]}"
            )
        with torch.no_grad(), self.backend.gathered(self.trainable.values(), modify=True):
            for name, param in self.trainable.items():
                param.copy_(ckpt["policy"][name])
        state = ckpt["state"]
        self.backend.load_state_dict(state, Path(path))
        self.tracker.load_state_dict(state["tracker"])
        if self.ema is not None:
            if ckpt["ema"] is None:
                raise ValueError(f"checkpoint {path} has no EMA weights but train.ema is on")
            self.ema.load_state_dict({"shadow": ckpt["ema"], **state["ema_counters"]})
        set_rng_state(state["rng"])
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        self.history = [dict(h) for h in state["history"]]
        self.watch.load_state_dict(state.get("watch"))
        self.objective.load_state_dict(state.get("objective", {}))
        self.counters.update({k: int(v) for k, v in state["counters"].items()})
        self._log(f"[flowgrpo] resumed from {path} at epoch {self.epoch}")
        return True

    def close(self) -> None:
        """After training and export, on every rank: stop the backend and leave the process group."""
        self.backend.close()
        self.dist.close()

    def evaluation_weights(self) -> contextlib.AbstractContextManager:
        """The weights the policy is judged by: the EMA weights swapped in when EMA is on."""
        if self.ema is None:
            return contextlib.nullcontext()
        return self.ema.swapped_in(lambda: self.backend.gathered(self.trainable.values(), modify=True))

    def save_policy(self, directory: str | Path) -> Path:
        """The trained policy: LoRA weights in diffusers format (or the full transformer), the EMA version
        in ``ema/``, the resolved config and the metric history; with evaluations during training, the
        weights of the epoch keep-best or stop-on-hacking chose, ``heldout.json`` and the proxy-vs-gold plot;
        and the last epoch's images (this rank's, up to 16) as ``last_epoch.png`` in the run folder. Written
        by rank 0 only (every rank calls it: under ZeRO-3 the weights are gathered for it)."""
        directory = Path(directory)
        with self.backend.gathered(
            self.trainable.values()
        ):  # whole weights; rank 0's swaps below are discarded
            if not self.dist.is_main:
                return directory
            directory.mkdir(parents=True, exist_ok=True)
            with self.watch.exported_weights(
                self.trainable, self.ema
            ):  # keep-best's or the last good epoch's
                export_weights(self.adapter, directory)
                if self.ema is not None:
                    with self.ema.swapped_in():
                        export_weights(self.adapter, directory / "ema")
        self.watch.write(directory, self.epoch)
        (directory / "config.yaml").write_text(self.config.to_yaml())
        (directory / "metrics.json").write_text(json.dumps(self.history, indent=1))
        if self.last_samples is not None:
            from flowgrpo_core.tracking import image_grid

            images = to_pil(self.last_samples.images[:16])
            grid = image_grid([images[i : i + 8] for i in range(0, len(images), 8)])
            grid.save(self.output_dir / "last_epoch.png")  # beside the checkpoints, outside the policy
        return directory
