"""DiffusionNFT in the trainer (docs/algorithm.md sect. 11): the old policy it samples with, and the loss of a
micro-batch of clean samples at their drawn noise levels.

:class:`NFTObjective` offers the trainer the same interface as :class:`flowgrpo_core.transitions.TransitionScorer`
(Flow-GRPO's): which weights sample and with which solver, which samples and steps are trained, the loss of each
trained step, what happens after an epoch, and what a checkpoint keeps. The arithmetic is :mod:`flowgrpo_core.nft`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from flowgrpo_core.config import SamplingConfig, TrainConfig
from flowgrpo_core.ema import swapped_weights
from flowgrpo_core.models import Conditioning, FlowAdapter
from flowgrpo_core.nft import forward_noising, nft_loss, old_policy_decay, optimality_probability
from flowgrpo_core.sampling import Trajectories

# the per-epoch training statistics NFT logs (train/<name>)
NFT_LOGGED = ("loss", "policy_loss", "kl", "positive_loss", "negative_loss", "old_deviation")


class OldPolicy:
    """The sampling policy: a copy of the trainable weights (LoRA or full), soft-updated towards them after
    every epoch, ``old <- d old + (1 - d) theta``. Kept in float32 beside the parameters."""

    def __init__(self, parameters: dict[str, nn.Parameter]) -> None:
        self.parameters = parameters
        self.weights = {name: p.detach().float().clone() for name, p in parameters.items()}

    def swapped_in(self) -> contextlib.AbstractContextManager[None]:
        """The old weights in the model for the duration (no graph may be built inside)."""
        return swapped_weights(self.parameters, self.weights)

    @torch.no_grad()
    def update(self, decay: float) -> None:
        for name, param in self.parameters.items():
            old = self.weights[name]
            old.copy_(old * decay + param.detach().float() * (1.0 - decay))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: w.detach().cpu().clone() for name, w in self.weights.items()}

    def load_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        missing = set(self.weights) ^ set(weights)
        if missing:
            raise ValueError(f"old policy does not match the trainable weights: {sorted(missing)[:5]}")
        for name, w in weights.items():
            self.weights[name].copy_(w)


@dataclass
class NFTOutput:
    """``loss`` carries the graph; the rest are detached scalars for logging."""

    loss: torch.Tensor
    policy_loss: torch.Tensor  # mean (r L+ + (1 - r) L-) c / beta
    kl: torch.Tensor  # mean over samples of the element mean (v_theta - v_ref)^2 (0 without a KL term)
    positive_loss: torch.Tensor  # mean L+
    negative_loss: torch.Tensor  # mean L-
    old_deviation: torch.Tensor  # mean (v_theta - v_old)^2: how far the policy moved from the sampling one
    ratio: None = None  # no likelihood ratios (Flow-GRPO's per-step statistics)

    def metrics(self) -> dict[str, float]:
        return {name: float(getattr(self, name).detach()) for name in NFT_LOGGED}


class NFTObjective:
    """DiffusionNFT's training objective over ``adapter``'s trainable ``parameters``."""

    # every sample with a finite reward is trained: an average one (r = 1/2) pulls towards the old policy
    zero_advantage = "keep"
    logged = NFT_LOGGED

    def __init__(
        self,
        adapter: FlowAdapter,
        sampling: SamplingConfig,
        train: TrainConfig,
        autocast_dtype: torch.dtype | None,
        parameters: dict[str, nn.Parameter],
    ) -> None:
        self.adapter, self.sampling, self.train, self.autocast_dtype = (
            adapter,
            sampling,
            train,
            autocast_dtype,
        )
        self.old = OldPolicy(parameters)
        self.ode_solver = train.nft_solver
        self._noise_seeds = torch.zeros(0, 0, dtype=torch.long)  # (n_local, K) of the current inner epoch

    def sampling_weights(self) -> contextlib.AbstractContextManager[None]:
        """Roll-outs come from the old policy."""
        return self.old.swapped_in()

    def trained_steps(
        self, samples: Trajectories, indices: torch.Tensor, total: int, k: int, generator: torch.Generator
    ) -> torch.Tensor:
        """(n_local, K) noise levels (indices into the roll-out's sigmas 0 .. T-1) of each local sample: K of
        the T without repetition, in random order, as the authors draw them; and a noise seed per (sample,
        level). Both are drawn for all ``total`` samples of the epoch from ``generator``, so every rank draws
        the same and a sample's draws do not depend on the rank holding it.

        Args:
            indices: (n_local,) global indices of this rank's samples.
        """
        num_steps = samples.sigmas.shape[1] - 1
        levels = torch.rand(total, num_steps, generator=generator).argsort(dim=1)[:, :k]
        seeds = torch.randint(0, 2**62, (total, k), generator=generator)
        self._noise_seeds = seeds[indices]
        return levels[indices]

    def _noise(self, index: torch.Tensor, k: int, like: torch.Tensor) -> torch.Tensor:
        """(B, *latent) standard normal noise, one generator per (sample, trained level)."""
        shape = like.shape[1:]
        draws = [
            torch.randn(shape, generator=torch.Generator().manual_seed(int(seed)))
            for seed in self._noise_seeds[index.cpu(), k].tolist()
        ]
        return torch.stack(draws).to(like.device)

    def _velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        s = self.sampling
        autocast = torch.autocast(
            x_t.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        )
        with autocast:
            return self.adapter.predict_velocity(x_t, t, cond, s.guidance_scale, s.resolution, s.resolution)

    def step_loss(
        self,
        samples: Trajectories,
        index: torch.Tensor,
        k: int,
        step: torch.Tensor,
        advantages: torch.Tensor,
        cond: Conditioning | None = None,
    ) -> NFTOutput:
        """The loss of B samples ``index`` (B,), each noised to its ``k``-th trained level ``step`` (B,), with their
        ``advantages`` (B,)."""
        t = self.train
        dev = samples.latents.device
        i = index.to(dev)
        cond = samples.cond.select(i) if cond is None else cond
        x0 = samples.latents[i, -1]
        sigma = samples.sigmas[i, step.to(dev)]
        x_t = forward_noising(x0, self._noise(index, k, x0), sigma)
        with torch.no_grad():
            with self.old.swapped_in():  # before the graph is built: the swap writes into the parameters
                v_old = self._velocity(x_t, sigma, cond).float()
            v_ref = None
            if t.nft_kl_beta > 0:
                with self.adapter.reference_model():
                    v_ref = self._velocity(x_t, sigma, cond).float()
        v_theta = self._velocity(x_t, sigma, cond)
        r = optimality_probability(advantages.to(dev), t.adv_clip_max)
        terms = nft_loss(v_theta, v_old, x_t, sigma, x0, r, t.nft_beta, t.adv_clip_max)
        policy_loss = terms.loss.mean()
        if v_ref is not None:
            kl = (v_theta.float() - v_ref).pow(2).flatten(1).mean(dim=1).mean()
            loss = policy_loss + t.nft_kl_beta * kl
        else:
            kl, loss = torch.zeros((), device=dev), policy_loss
        return NFTOutput(
            loss=loss,
            policy_loss=policy_loss.detach(),
            kl=kl.detach(),
            positive_loss=terms.positive.mean(),
            negative_loss=terms.negative.mean(),
            old_deviation=(v_theta.detach().float() - v_old).pow(2).mean(),
        )

    def losses(
        self, samples: Trajectories, index: torch.Tensor, steps: torch.Tensor, advantages: torch.Tensor
    ) -> Iterator[NFTOutput]:
        """The loss of B samples ``index`` (B,) at each of their K trained levels ``steps`` (B, K), one at a time
        (each is back-propagated before the next is built)."""
        cond = samples.cond.select(index.to(samples.latents.device))
        for k in range(steps.shape[1]):
            yield self.step_loss(samples, index, k, steps[:, k], advantages, cond)

    def padding_loss(self, samples: Trajectories, steps: torch.Tensor) -> torch.Tensor:
        """The first sample's real loss graph weighted 0 (see TransitionScorer.padding_loss)."""
        index = torch.zeros(1, dtype=torch.long)
        return self.step_loss(samples, index, 0, steps[index, 0], torch.zeros(1)).loss * 0.0

    def end_epoch(self, global_step: int) -> dict[str, float]:
        """The old policy's soft update after the epoch's ``global_step``-th optimiser step."""
        t = self.train
        decay = old_policy_decay(global_step, t.nft_decay_flat_steps, t.nft_decay_rate, t.nft_decay_max)
        self.old.update(decay)
        return {"train/old_policy_decay": decay}

    def state_dict(self) -> dict:
        return {"old_policy": self.old.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "old_policy" not in state:
            raise ValueError("the checkpoint holds no NFT old policy (was it written by a GRPO run?)")
        self.old.load_state_dict(state["old_policy"])
