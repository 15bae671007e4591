"""The data and the two training phases of the shapes-world base model.

Scenes are rendered on the fly from GenEval metadata (``evaluation.shapes.render_scene``), so the data
is unlimited and deterministic from the seed; no caption has the requirements of a held-out prompt.

1. **VAE**: reconstruction of 64 px scenes (L1 + MSE on pixels, shapes weighed up against the grey
   background) plus a light KL on posterior samples, so that latents near the data also decode to clean
   shapes. The latent mean and std then become the VAE's ``shift_factor`` / ``scaling_factor``, as SD3's.
2. **Transformer**: rectified flow on the VAE latents: ``x_sigma = (1 - sigma) x0 + sigma noise``, target
   ``v = noise - x0``, sigma from SD3's logit-normal density shifted like the scheduler's, and 10 % empty
   captions so classifier-free guidance works. The text encoders learn jointly (a frozen random encoder
   would hand the MMDiT an arbitrary code of the prompt; learning one costs little at this size).

With a constant learning rate after warm-up and an EMA of the weights, the state after k steps of a run
of N steps is the final state of a run of k steps (same seed): one run's periodic evaluation shows what
every shorter budget gives.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from flowgrpo_core.ema import EMA
from flowgrpo_core.pretrain.config import PretrainConfig
from flowgrpo_core.prompts.generators import GenEvalGenerator
from flowgrpo_core.prompts.vocabulary import SHAPES_WORLD, TAGS, requirement_key, with_article

_BACKGROUND = 128 / 127.5 - 1.0  # the grey canvas of render_scene in [-1, 1]


class CaptionSampler:
    """GenEval-format metadata of random shapes-world captions, tags drawn with ``tag_weights``, never
    with the requirements of a held-out prompt."""

    def __init__(
        self,
        tag_weights: dict[str, float],
        held_out: Sequence[dict] = (),
        shapes: Sequence[str] = SHAPES_WORLD,
    ) -> None:
        unknown = set(tag_weights) - set(TAGS)
        if unknown:
            raise ValueError(f"unknown tags {sorted(unknown)}; tags: {', '.join(TAGS)}")
        self.tags = [t for t in TAGS if tag_weights.get(t, 0) > 0]
        weights = np.array([tag_weights[t] for t in self.tags], dtype=np.float64)
        self.probs = weights / weights.sum()
        self.shapes = tuple(shapes)
        self.generator = GenEvalGenerator(self.shapes, prefix="", uncolored=None)
        self.held_out = {requirement_key(m) for m in held_out}
        g = self.generator
        self.makers: dict[str, Callable[[np.random.Generator], dict]] = {
            "single_object": self._single_object,
            "two_object": g.two_object,
            "counting": g.counting,
            "colors": g.colors,
            "position": g.position,
            "color_attr": g.color_attr,
        }

    def _single_object(self, rng: np.random.Generator) -> dict:
        # GenEval's generator returns every class once; pre-training wants one at a time
        shape = self.shapes[rng.choice(len(self.shapes))]
        return self.generator.sample("single_object", [{"class": shape, "count": 1}], with_article(shape))

    def __call__(self, rng: np.random.Generator, count: int) -> list[dict]:
        out = []
        while len(out) < count:
            meta = self.makers[self.tags[rng.choice(len(self.tags), p=self.probs)]](rng)
            if requirement_key(meta) not in self.held_out:
                out.append(meta)
        return out


def render_batch(metadata: Sequence[dict], size: int, rng: np.random.Generator) -> torch.Tensor:
    """Scenes satisfying each caption: (B, 3, size, size) float32 in [-1, 1]."""
    from flowgrpo_core.evaluation.shapes import render_scene

    arrays = [np.asarray(render_scene(m, size=size, seed=rng).image, dtype=np.float32) for m in metadata]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


Batch = tuple[list[dict], torch.Tensor]  # captions' metadata, scenes (B, 3, size, size) in [-1, 1]


def scene_batches(
    sampler: CaptionSampler,
    batch_size: int,
    size: int,
    rng: np.random.Generator,
    workers: int = 0,
    seed: int = 0,
    stream: int = 0,
) -> Iterator[Batch]:
    """Endless batches of captions and the scenes drawn for them.

    ``workers=0``: drawn here from ``rng``, lazily, so the caller's own draws from ``rng`` between batches
    keep their place in the sequence. ``workers>0``: that many processes render ahead (a GPU outruns one
    CPU core), each from its own generator seeded by ``(seed, stream, worker)``; batches arrive from the
    workers in turn, so the sequence is fixed for a given number of workers."""
    if workers == 0:
        while True:
            metadata = sampler(rng, batch_size)
            yield metadata, render_batch(metadata, size, rng)
    from torch.utils.data import DataLoader

    loader = DataLoader(
        _SceneStream(sampler, batch_size, size, seed, stream),
        batch_size=None,
        num_workers=workers,
        collate_fn=_as_is,
        prefetch_factor=4,
        pin_memory=torch.cuda.is_available(),
    )
    yield from loader


class _SceneStream(torch.utils.data.IterableDataset):
    def __init__(self, sampler: CaptionSampler, batch_size: int, size: int, seed: int, stream: int) -> None:
        self.sampler, self.batch_size, self.size, self.seed, self.stream = (
            sampler,
            batch_size,
            size,
            seed,
            stream,
        )

    def __iter__(self) -> Iterator[Batch]:
        torch.set_num_threads(1)
        worker = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, self.stream, worker.id if worker else 0])
        while True:
            metadata = self.sampler(rng, self.batch_size)
            yield metadata, render_batch(metadata, self.size, rng)


def _as_is(batch: Batch) -> Batch:
    return batch


@dataclass
class Phase:
    """A step budget with an optional deadline on ``clock`` (wall time by default; a benchmark passes a
    CPU-time clock and may move the deadline to leave its evaluations out)."""

    steps: int
    deadline: float | None = None
    clock: Callable[[], float] = time.monotonic

    def done(self, step: int) -> bool:
        return step >= self.steps or (self.deadline is not None and self.clock() >= self.deadline)


def train_vae(
    vae,
    sampler: CaptionSampler,
    cfg: PretrainConfig,
    phase: Phase,
    rng: np.random.Generator,
    noise: torch.Generator,
    progress: bool = True,
    evaluate: Callable[[int], None] | None = None,
    evaluate_every: int = 0,
) -> list[float]:
    """Phase 1: reconstruction (L1 + MSE on pixels in [-1, 1]) + ``vae_kl_weight`` x KL per latent element,
    decoding posterior samples. Returns the loss per step; ``evaluate(step)`` runs every ``evaluate_every``."""
    vae.requires_grad_(True)
    device = next(vae.parameters()).device
    batches = scene_batches(
        sampler, cfg.vae_batch_size, cfg.model.resolution, rng, cfg.workers, cfg.seed, stream=1
    )
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_learning_rate, weight_decay=0.0)
    losses: list[float] = []
    bar = tqdm(total=phase.steps, desc="vae", disable=not progress)
    step = 0
    while not phase.done(step):
        for group in optimizer.param_groups:
            group["lr"] = cfg.vae_learning_rate * warmup_cosine(step, phase.steps, cfg.warmup_steps)
        images = next(batches)[1].to(device, non_blocking=True)
        posterior = vae.encode(images).latent_dist
        # noise from a CPU generator whatever the device: the same run on a GPU draws the same numbers
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=noise).to(device)
        recon = vae.decode(z).sample
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        # Shapes cover a few percent of the canvas: weigh their pixels up, or the grey background dominates
        # the loss and small shapes come back as blobs.
        weight = 1.0 + cfg.vae_shape_weight * ((images - _BACKGROUND).abs().amax(1, keepdim=True) > 0.05)
        error = recon - images
        loss = (weight * (error.abs() + error.pow(2))).mean() / weight.mean() + cfg.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        step += 1
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if evaluate is not None and evaluate_every and step % evaluate_every == 0:
            evaluate(step)
    bar.close()
    vae.requires_grad_(False)
    return losses


@torch.no_grad()
def set_latent_scale(
    vae, sampler: CaptionSampler, size: int, rng: np.random.Generator, batches: int = 8
) -> None:
    """SD3's convention: ``latents = (z - shift_factor) * scaling_factor`` has mean 0 and std 1."""
    device = next(vae.parameters()).device
    z = torch.cat(
        [
            vae.encode(render_batch(sampler(rng, 64), size, rng).to(device)).latent_dist.mode()
            for _ in range(batches)
        ]
    )
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))


def train_transformer(
    pipe,
    sampler: CaptionSampler,
    cfg: PretrainConfig,
    phase: Phase,
    rng: np.random.Generator,
    noise: torch.Generator,
    evaluate: Callable[[int], None] | None = None,
    progress: bool = True,
) -> list[float]:
    """Phase 2: rectified flow with caption dropout; the text encoders learn jointly. Returns the loss per
    step. ``evaluate(step)`` runs every ``eval_every`` steps with the EMA weights swapped in; the pipeline
    ends with the EMA weights."""
    modules = {
        "transformer": pipe.transformer,
        "te1": pipe.text_encoder,
        "te2": pipe.text_encoder_2,
        "te3": pipe.text_encoder_3,
    }
    params = {f"{m}.{k}": p for m, module in modules.items() for k, p in module.named_parameters()}
    for p in params.values():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.learning_rate, weight_decay=0.01)
    ema = EMA(params, cfg.ema_decay, update_interval=1)
    vae, spec = pipe.vae, cfg.model
    device = pipe.transformer.device
    batches = scene_batches(sampler, cfg.batch_size, spec.resolution, rng, cfg.workers, cfg.seed, stream=2)
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    losses: list[float] = []
    bar = tqdm(total=phase.steps, desc="transformer", disable=not progress)
    step = 0
    while not phase.done(step):
        for group in optimizer.param_groups:
            group["lr"] = cfg.learning_rate * (
                min(1.0, (step + 1) / cfg.warmup_steps)
                if cfg.lr_schedule == "constant"
                else warmup_cosine(step, phase.steps, cfg.warmup_steps)
            )
        metadata, images = next(batches)
        with torch.no_grad():
            x0 = (vae.encode(images.to(device, non_blocking=True)).latent_dist.mode() - shift) * scale
        drop = rng.random(len(metadata)) < cfg.caption_dropout
        prompts = ["" if d else m["prompt"] for m, d in zip(metadata, drop)]
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=x0.device,
            do_classifier_free_guidance=False,
            max_sequence_length=spec.max_text_tokens,
        )
        sigma = shifted_sigma(torch.sigmoid(torch.randn(len(metadata), generator=noise)), spec.shift).to(
            device
        )
        eps = torch.randn(x0.shape, generator=noise).to(device)
        s = sigma.view(-1, 1, 1, 1)
        velocity = pipe.transformer(
            hidden_states=(1 - s) * x0 + s * eps,
            timestep=sigma * 1000,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        loss = (velocity - (eps - x0)).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        optimizer.step()
        ema.step()
        losses.append(loss.item())
        step += 1
        bar.update()
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if evaluate is not None and cfg.eval_every and step % cfg.eval_every == 0 and not phase.done(step):
            with ema.swapped_in():
                evaluate(step)
    bar.close()
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(ema.shadow[name])
            p.requires_grad_(False)
    return losses


def shifted_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The scheduler's static shift ``s sigma / (1 + (s - 1) sigma)``, so training sees the sampler's sigmas."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then a cosine from 1 down to 0.1 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
