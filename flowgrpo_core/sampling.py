"""Roll-outs: sample images through a model adapter and keep what training needs (docs/algorithm.md sect. 3, 5).

A roll-out of T steps keeps, per image, the latents at every noise level, the log-prob of every
stochastic step, the sigmas and the prompt conditioning. Which steps are stochastic is a (B, T) mask:
all of them for Flow-GRPO, a window of 1-3 consecutive steps for Flow-GRPO-Fast (ODE elsewhere).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from flowgrpo_core.models.base import Conditioning, FlowAdapter
from flowgrpo_core.ode import clean_prediction, dpm2_step, first_order_step
from flowgrpo_core.sde import SDEType, deterministic_step, sde_step_with_logprob


@dataclass
class Trajectories:
    """N roll-outs of T steps. Tensors are float32 on the sampling device unless noted."""

    prompts: list[str]
    metadata: list[dict]
    cond: Conditioning
    latents: torch.Tensor  # (N, T+1, *latent): x at sigmas[0] (noise) ... sigmas[T] (the sample)
    log_probs: torch.Tensor  # (N, T): log-prob of each stochastic step, 0 for ODE steps
    sigmas: torch.Tensor  # (N, T+1)
    sde_mask: torch.Tensor  # (N, T) bool: which steps were stochastic
    images: torch.Tensor  # (N, 3, H, W) in [0, 1]
    step_means: torch.Tensor | None = None  # (N, T, *latent): SDE step means, kept for GRPO-Guard's RatioNorm

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, index: Sequence[int] | torch.Tensor) -> Trajectories:
        index = torch.as_tensor(index, dtype=torch.long)
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                out[f.name] = None
            elif isinstance(value, list):
                out[f.name] = [value[i] for i in index.tolist()]
            elif isinstance(value, Conditioning):
                out[f.name] = value.select(index.to(next(iter(value.tensors.values())).device))
            else:
                out[f.name] = value[index.to(value.device)]
        return Trajectories(**out)

    @staticmethod
    def cat(parts: Sequence[Trajectories]) -> Trajectories:
        out = {}
        for f in fields(Trajectories):
            values = [getattr(p, f.name) for p in parts]
            if values[0] is None:
                out[f.name] = None
            elif isinstance(values[0], list):
                out[f.name] = [x for v in values for x in v]
            elif isinstance(values[0], Conditioning):
                out[f.name] = Conditioning.cat(values)
            else:
                out[f.name] = torch.cat(values)
        return Trajectories(**out)


def sde_window_mask(batch: int, num_steps: int, window_size: int, start: int) -> torch.Tensor:
    """(batch, num_steps) bool mask with steps [start, start + window_size) stochastic (all if size 0)."""
    mask = torch.zeros(batch, num_steps, dtype=torch.bool)
    if window_size == 0:
        mask[:] = True
    else:
        if not 0 <= start <= num_steps - window_size:
            raise ValueError(
                f"window start {start} out of range for {num_steps} steps and size {window_size}"
            )
        mask[:, start : start + window_size] = True
    return mask


def sample_window_start(bounds: tuple[int, int], window_size: int, generator: torch.Generator) -> int:
    """A uniformly random start for a Fast window inside steps [lo, hi)."""
    lo, hi = bounds
    return int(torch.randint(lo, hi - window_size + 1, (1,), generator=generator))


@dataclass(frozen=True)
class SamplingSpec:
    """How a roll-out samples: image side, number of steps, guidance, the SDE and the text encoding."""

    resolution: int
    num_steps: int
    guidance_scale: float
    noise_level: float = 0.0  # `a` of the SDE on the stochastic steps
    sde_type: SDEType = "sde"
    negative_prompt: str = ""
    max_sequence_length: int = 128  # T5 tokens
    # the noise-free steps: 'euler' (or CPS at noise 0 for sde_type 'cps'), or 'dpm2' (DPM-Solver++ 2M, only
    # for roll-outs without a stochastic step: DiffusionNFT's)
    ode_solver: str = "euler"

    @classmethod
    def of(cls, sampling) -> SamplingSpec:
        """From a config's ``sampling`` section (anything with these fields)."""
        return cls(
            sampling.resolution,
            sampling.num_steps,
            sampling.guidance_scale,
            sampling.noise_level,
            sampling.sde_type,
            sampling.negative_prompt,
            sampling.max_sequence_length,
        )


def rollout(
    adapter: FlowAdapter,
    prompts: Sequence[str],
    seeds: Sequence[int],
    spec: SamplingSpec,
    sde_mask: torch.Tensor,
    *,
    metadata: Sequence[dict] | None = None,
    store_means: bool = False,
    autocast_dtype: torch.dtype | None = None,
) -> Trajectories:
    """Sample B images, one generator per image (seeded by ``seeds``) for its initial and step noise, so an
    image does not depend on the batch it was drawn in.

    Args:
        prompts: B prompts.
        seeds: B seeds.
        spec: how to sample (size, steps, guidance, SDE, text encoding).
        sde_mask: (B, T) bool, which steps are stochastic; the rest are noise-free steps (the Euler ODE step,
            or for 'cps' the CPS step at noise level 0, as the reference takes them).
        store_means: keep the SDE step means (needed by RatioNorm).
        autocast_dtype: run the model under autocast in this dtype (mixed precision), or None.
    Returns:
        Trajectories of B images.
    """
    batch = len(prompts)
    if len(seeds) != batch or tuple(sde_mask.shape) != (batch, spec.num_steps):
        raise ValueError(
            f"need {batch} seeds and a ({batch}, {spec.num_steps}) mask, got {len(seeds)} and {tuple(sde_mask.shape)}"
        )
    if spec.ode_solver == "dpm2" and bool(sde_mask.any()):
        raise ValueError("the dpm2 solver samples noise-free roll-outs only: the mask has stochastic steps")
    with adapter.inference():  # no graph: inference_mode, or no_grad under ZeRO-3
        device = adapter.device
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        cond = adapter.encode_prompts(
            prompts, spec.negative_prompt, spec.guidance_scale, spec.max_sequence_length
        )
        sigmas = adapter.sigmas(spec.num_steps, spec.resolution, spec.resolution).to(device)
        x = adapter.initial_noise(generators, spec.resolution, spec.resolution).float()
        sde_mask = sde_mask.to(device)

        latents, log_probs, means = [x], torch.zeros(batch, spec.num_steps, device=device), []
        previous_x0 = None  # dpm2's clean prediction of the step before
        for i in range(spec.num_steps):
            sigma, sigma_next = sigmas[i].expand(batch), sigmas[i + 1].expand(batch)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                velocity = adapter.predict_velocity(
                    x, sigma, cond, spec.guidance_scale, spec.resolution, spec.resolution
                )
            stochastic = sde_mask[:, i]
            if stochastic.any():
                step = sde_step_with_logprob(
                    velocity,
                    x,
                    sigma,
                    sigma_next,
                    spec.noise_level,
                    generator=generators,
                    sde_type=spec.sde_type,
                )
                x_next, mean = step.prev_sample, step.prev_sample_mean
                if not stochastic.all():
                    still = deterministic_step(velocity, x, sigma, sigma_next, spec.sde_type)
                    x_next = torch.where(_rows(stochastic, x), x_next, still)
                log_probs[:, i] = torch.where(stochastic, step.log_prob, 0.0)
            elif spec.ode_solver == "dpm2":
                x0 = clean_prediction(velocity, x, sigma)
                if previous_x0 is None or i == spec.num_steps - 1:  # first order at both ends, as the authors
                    x_next = mean = first_order_step(x0, x, sigma, sigma_next)
                else:
                    x_next = mean = dpm2_step(
                        x0, previous_x0, x, sigmas[i - 1].expand(batch), sigma, sigma_next
                    )
                previous_x0 = x0
            else:
                x_next = mean = deterministic_step(velocity, x, sigma, sigma_next, spec.sde_type)
            if store_means:
                means.append(mean)
            x = x_next.float()
            latents.append(x)

        images = adapter.decode(x, spec.resolution, spec.resolution)
        return Trajectories(
            prompts=list(prompts),
            metadata=list(metadata) if metadata is not None else [{} for _ in prompts],
            cond=cond,
            latents=torch.stack(latents, dim=1),
            log_probs=log_probs,
            sigmas=sigmas.unsqueeze(0).expand(batch, -1).contiguous(),
            sde_mask=sde_mask,
            images=images,
            step_means=torch.stack(means, dim=1) if store_means else None,
        )


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1, *([1] * (like.ndim - 1)))


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [0, 1] -> B PIL RGB images."""
    from PIL import Image

    array = (
        (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    )
    return [Image.fromarray(a) for a in array]
