"""One epoch of roll-outs (docs/algorithm.md sect. 3): the global plan, this rank's batches sampled and scored,
and every rank's rewards gathered.

The plan (prompts, one noise seed per image, one Fast-window start per sampling batch) is drawn from the
epoch's generator and is the same on every rank; rank ``r`` of ``W`` samples batches ``r, r + W, ...`` of it.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from flowgrpo_core.config import FlowGRPOConfig
from flowgrpo_core.distributed import DistributedContext
from flowgrpo_core.models import FlowAdapter
from flowgrpo_core.prompts import PromptSet, draw_prompts
from flowgrpo_core.rewards import Reward, RewardOutput
from flowgrpo_core.sampling import (
    SamplingSpec,
    Trajectories,
    rollout,
    sample_window_start,
    sde_window_mask,
    to_pil,
)


@dataclass
class EpochPlan:
    """What every rank samples in an epoch, drawn identically on each."""

    images: PromptSet  # N = groups_per_epoch x group_size prompts, each group's copies adjacent
    seeds: list[int]  # (N,) one noise seed per image
    window_starts: list[int]  # one Fast-window start per sampling batch (0 without a window)


@dataclass
class EpochSamples:
    """One epoch's roll-outs as a rank sees them."""

    local: Trajectories  # this rank's roll-outs
    indices: torch.Tensor  # (n_local,) their global indices
    prompts: list[str]  # all N prompts of the epoch, every rank's
    rewards: RewardOutput  # all N rewards in global order, every component
    timing: dict[str, float]


def plan_epoch(config: FlowGRPOConfig, prompts: PromptSet, generator: torch.Generator) -> EpochPlan:
    """``groups_per_epoch`` prompts repeated ``group_size`` times, their seeds and the batches' windows."""
    s = config.sampling
    chosen = prompts.take(draw_prompts(prompts, s.groups_per_epoch, generator, config.prompts.balance_tags))
    images = PromptSet(
        [p for p in chosen.prompts for _ in range(s.group_size)],
        [m for m in chosen.metadata for _ in range(s.group_size)],
    )
    seeds = torch.randint(0, 2**62, (len(images),), generator=generator).tolist()
    starts = [
        sample_window_start(s.window_bounds(), s.sde_window_size, generator) if s.sde_window_size else 0
        for _ in range(config.batches_per_epoch)
    ]
    return EpochPlan(images, seeds, starts)


def sample_and_score(
    adapter: FlowAdapter,
    reward: Reward,
    config: FlowGRPOConfig,
    plan: EpochPlan,
    dist: DistributedContext,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    ode_solver: str | None = None,
) -> EpochSamples:
    """Roll out this rank's batches of ``plan`` and score them, then gather every rank's rewards. A batch's
    rewards are computed in a worker thread while the next batch samples (reward servers answer over HTTP
    meanwhile). ``ode_solver``: None for the config's SDE roll-outs (Flow-GRPO), else noise-free roll-outs
    with that solver (DiffusionNFT)."""
    s = config.sampling
    spec = SamplingSpec.of(s)
    if ode_solver is not None:
        spec = dataclasses.replace(spec, ode_solver=ode_solver)
    parts, futures, indices = [], [], []
    rollout_s = 0.0
    with ThreadPoolExecutor(max_workers=1) as pool:
        mine = range(dist.rank, config.batches_per_epoch, dist.world_size)
        for b in tqdm(mine, desc="sampling", leave=False, disable=not progress):
            sl = slice(b * s.batch_size, (b + 1) * s.batch_size)
            started = time.perf_counter()
            part = rollout(
                adapter,
                plan.images.prompts[sl],
                plan.seeds[sl],
                spec,
                sde_window_mask(s.batch_size, s.num_steps, s.sde_window_size, plan.window_starts[b])
                if ode_solver is None
                else torch.zeros(s.batch_size, s.num_steps, dtype=torch.bool),
                metadata=plan.images.metadata[sl],
                store_means=config.train.ratio_norm,
                autocast_dtype=autocast_dtype,
            )
            rollout_s += time.perf_counter() - started
            parts.append(part)
            indices += range(sl.start, sl.stop)
            futures.append(pool.submit(reward, to_pil(part.images), part.prompts, part.metadata))
        waited = time.perf_counter()
        outputs = [f.result() for f in futures]
        reward_wait_s = time.perf_counter() - waited
    local = RewardOutput(
        np.concatenate([o.scores for o in outputs]),
        {k: [v for o in outputs for v in o.details.get(k, [])] for k in outputs[0].details},
    )
    gathered = time.perf_counter()
    rewards = gather_rewards(dist, indices, local, len(plan.images))
    timing = {
        "time/rollout_s": rollout_s,
        "time/reward_wait_s": reward_wait_s,
        "time/gather_s": time.perf_counter() - gathered,
    }
    return EpochSamples(Trajectories.cat(parts), torch.tensor(indices), plan.images.prompts, rewards, timing)


def gather_rewards(
    dist: DistributedContext, indices: list[int], local: RewardOutput, total: int
) -> RewardOutput:
    """Every rank's scores and details, placed at their global ``indices`` among ``total``."""
    scores = np.full(total, np.nan)
    details: dict[str, list] = {k: [None] * total for k in local.details}
    for rank_indices, rank_scores, rank_details in dist.all_gather_objects(
        (indices, local.scores, local.details)
    ):
        scores[rank_indices] = rank_scores
        for key, values in rank_details.items():
            for i, v in zip(rank_indices, values):
                details.setdefault(key, [None] * total)[i] = v
    return RewardOutput(scores, details)
