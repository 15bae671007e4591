"""Trained transitions (docs/algorithm.md sect. 4-6): a stored step ``x_j -> x_{j+1}`` of a roll-out, scored
again under the current policy (with a graph) or the frozen reference, and its clipped GRPO loss.

The roll-out recorded ``x_j``, ``x_{j+1}`` and the old log-prob of that step; training asks the policy how
likely the same step is now. Which steps are trained is :func:`trained_steps`; the loss of B samples at one
step each is :meth:`TransitionScorer.loss`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from flowgrpo_core.config import SamplingConfig, TrainConfig
from flowgrpo_core.loss import LOGGED, LossOutput, grpo_loss, guard_step_weight
from flowgrpo_core.models import Conditioning, FlowAdapter
from flowgrpo_core.sampling import Trajectories
from flowgrpo_core.sde import SDEStep, gaussian_kl, kl_std, sde_std_t, sde_step_with_logprob


def trained_steps(sde_mask: torch.Tensor, k: int) -> torch.Tensor:
    """(N, k) step indices trained per sample: its first ``k`` stochastic steps, in schedule order.

    Args:
        sde_mask: (N, T) bool, which steps of each roll-out were stochastic.
    """
    order = torch.argsort((~sde_mask).int(), dim=1, stable=True)
    return order[:, :k].cpu()


class TransitionScorer:
    """Scores stored transitions through ``adapter`` with the sampling settings they were drawn with: Flow-GRPO's
    objective, behind the interface the trainer shares with :class:`flowgrpo_core.nft_objective.NFTObjective`."""

    ode_solver = None  # SDE roll-outs, from the current policy
    logged = LOGGED

    def __init__(
        self,
        adapter: FlowAdapter,
        sampling: SamplingConfig,
        train: TrainConfig,
        autocast_dtype: torch.dtype | None,
    ) -> None:
        self.adapter, self.sampling, self.train, self.autocast_dtype = (
            adapter,
            sampling,
            train,
            autocast_dtype,
        )

    def score(
        self,
        samples: Trajectories,
        i: torch.Tensor,
        j: torch.Tensor,
        cond: Conditioning,
        reference: bool = False,
    ) -> SDEStep:
        """The step ``x_j -> x_{j+1}`` of samples ``i`` (n,) at steps ``j`` (n,) under the current policy (with a
        graph) or, with ``reference``, under the reference model."""
        s = self.sampling
        dev = samples.latents.device
        x, x_next = samples.latents[i, j], samples.latents[i, j + 1]
        sigma, sigma_next = samples.sigmas[i, j], samples.sigmas[i, j + 1]
        model = self.adapter.reference_model() if reference else contextlib.nullcontext()
        autocast = torch.autocast(
            dev.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        )
        with model, autocast:
            velocity = self.adapter.predict_velocity(
                x, sigma, cond, s.guidance_scale, s.resolution, s.resolution
            )
        return sde_step_with_logprob(
            velocity, x, sigma, sigma_next, s.noise_level, prev_sample=x_next, sde_type=s.sde_type
        )

    def reference_means(
        self, samples: Trajectories, index: torch.Tensor, steps: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        """The reference model's step means of B samples at each of their K trained steps, in one forward over
        B x K samples. The reference enters only the KL and carries no graph, so its forwards need not be
        batched like the policy's (whose batch must equal the sampling batch for the ratio to start at 1);
        on a CPU the batched forward gives the same bits as K forwards of B (tested).

        Args:
            index: (B,) local sample indices; steps: (B, K) their trained steps; cond: their conditioning.
        Returns:
            (B, K, *latent) float32.
        """
        dev = samples.latents.device
        b, k = steps.shape
        repeated = Conditioning({name: v.repeat_interleave(k, 0) for name, v in cond.tensors.items()})
        with self.adapter.inference():
            step = self.score(
                samples, index.to(dev).repeat_interleave(k), steps.to(dev).flatten(), repeated, reference=True
            )
        return step.prev_sample_mean.unflatten(0, (b, k))

    def loss(
        self,
        samples: Trajectories,
        index: torch.Tensor,
        step: torch.Tensor,
        advantages: torch.Tensor,
        cond: Conditioning | None = None,
        reference_mean: torch.Tensor | None = None,
    ) -> LossOutput:
        """The loss of B samples ``index`` (B,), each at its own trained step ``step`` (B,), with their
        ``advantages`` (B,). ``cond`` is their conditioning and ``reference_mean`` (B, *latent) the reference
        model's step means, when the caller already has them (see :meth:`reference_means`)."""
        s, t = self.sampling, self.train
        dev = samples.latents.device
        i, j = index.to(dev), step.to(dev)
        sigma, sigma_next = samples.sigmas[i, j], samples.sigmas[i, j + 1]
        cond = samples.cond.select(i) if cond is None else cond
        current = self.score(samples, i, j, cond)
        kl = None
        if t.beta > 0:
            if reference_mean is None:
                with self.adapter.inference():
                    reference_mean = self.score(samples, i, j, cond, reference=True).prev_sample_mean
            std = kl_std(sigma, sigma_next, s.noise_level, current.std, t.kl_form, s.sde_type)
            kl = gaussian_kl(current.prev_sample_mean, reference_mean, std)
        guard = {}
        if t.ratio_norm:
            guard = {
                "mean": current.prev_sample_mean,
                "old_mean": samples.step_means[i, j],
                "std_t": sde_std_t(sigma, sigma_next, s.noise_level),
                "sqrt_dt": torch.sqrt(sigma.float() - sigma_next.float()),
            }
        return grpo_loss(
            current.log_prob,
            samples.log_probs[i, j],
            advantages.to(dev),
            t.clip_bounds(),
            beta=t.beta,
            kl=kl,
            ratio_norm=t.ratio_norm,
            ratio_norm_bias=t.ratio_norm_bias,
            **guard,
            step_weight=guard_step_weight(sigma, sigma_next) if t.grad_reweight else None,
        )

    def padding_loss(self, samples: Trajectories, steps: torch.Tensor) -> torch.Tensor:
        """The real loss graph of the first sample, weighted 0: gradients of exactly 0, reached through the same
        modules in the same order as a real backward (for backends that need equal backward calls per rank)."""
        index = torch.zeros(1, dtype=torch.long)
        return self.loss(samples, index, steps[index, 0], torch.zeros(1)).loss * 0.0

    # ---- the trainer's interface (shared with NFTObjective) ----

    @property
    def zero_advantage(self) -> str:
        return self.train.zero_advantage

    def sampling_weights(self) -> contextlib.AbstractContextManager[None]:
        """Roll-outs come from the current policy."""
        return contextlib.nullcontext()

    def trained_steps(
        self, samples: Trajectories, indices: torch.Tensor, total: int, k: int, generator: torch.Generator
    ) -> torch.Tensor:
        """(n_local, K): each sample's first K stochastic steps (:func:`trained_steps`); draws nothing."""
        return trained_steps(samples.sde_mask, k)

    def losses(
        self, samples: Trajectories, index: torch.Tensor, steps: torch.Tensor, advantages: torch.Tensor
    ) -> Iterator[LossOutput]:
        """The loss of B samples ``index`` (B,) at each of their K trained steps ``steps`` (B, K), one at a time;
        with a KL term, the reference's step means of all K steps first, in one forward
        (``train.batch_reference_steps``)."""
        cond = samples.cond.select(index.to(samples.latents.device))  # the same for every step
        reference = None
        if self.train.beta > 0 and self.train.batch_reference_steps:
            reference = self.reference_means(samples, index, steps, cond)
        for k in range(steps.shape[1]):
            ref_k = reference[:, k] if reference is not None else None
            yield self.loss(samples, index, steps[:, k], advantages, cond, ref_k)

    def step_loss(
        self, samples: Trajectories, index: torch.Tensor, k: int, step: torch.Tensor, advantages: torch.Tensor
    ) -> LossOutput:
        """The loss of B samples at their ``k``-th trained step ``step`` (B,)."""
        return self.loss(samples, index, step, advantages)

    def end_epoch(self, global_step: int) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
