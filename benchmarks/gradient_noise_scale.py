"""Is one epoch's policy gradient signal or noise? The gradient noise scale of the training objective at the initial
weights, for the whole gradient and per denoising step (flowgrpo_core/noise_scale.py): Flow-GRPO's clipped
objective, or with ``train.algorithm: nft`` (``--preset shapes-nft``) DiffusionNFT's loss, per noise level.

Samples ``--batches`` independent epochs of the preset (different prompts drawn, different noise), computes
each epoch's gradient of the objective over every trained step (weighted as in training), and
estimates the true gradient's energy |G|^2 from the dot products between epochs. B_noise is the number of
images at which one step's signal equals its noise; a preset whose optimiser steps use far fewer images
moves the policy mostly at random. With ``--prompts`` the epochs draw only those training prompts.

    python benchmarks/gradient_noise_scale.py [--preset shapes] [--batches 8] [--prompts "three circles"]
        [--set rewards='{jpeg_compressibility: 1.0}'] [--set sampling.groups_per_epoch=16]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
from collections import defaultdict

import torch

from flowgrpo_core.config import load_config
from flowgrpo_core.noise_scale import NoiseScale, gradient_noise_scale
from flowgrpo_core.prompts import PromptSet, load_prompts
from flowgrpo_core.trainer import FlowGRPOTrainer, epoch_generator


def named_prompts(source: str, names: list[str]) -> PromptSet:
    try:
        return load_prompts(source).named(names)
    except KeyError as error:
        raise SystemExit(f"{source}: {error.args[0]}") from None


def epoch_gradients(trainer: FlowGRPOTrainer, epoch: int) -> tuple[dict[int, torch.Tensor], int]:
    """One epoch's gradient of the objective at the current weights, split by denoising step:
    ``{step: (P,) float32}`` (their sum is the epoch's gradient), and the number of images."""
    generator = epoch_generator(trainer.config.train.seed, epoch)
    with contextlib.redirect_stderr(io.StringIO()):
        epoch_samples = trainer.sample_and_score(generator)
    advantages, _ = trainer.advantages(epoch_samples.prompts, epoch_samples.rewards)
    samples = epoch_samples.local
    # Flow-GRPO: the stochastic steps; NFT: the noise levels (and noise) it would train on this epoch
    objective = trainer.objective
    every = torch.arange(len(samples))
    steps = objective.trained_steps(
        samples, every, len(samples), trainer.config.trained_steps_per_sample, generator
    )
    params = list(trainer.trainable.values())
    weight = 1.0 / (len(samples) * steps.shape[1])  # as train_on: each sample-step weighs 1 / (N x K)
    per_step: dict[int, torch.Tensor] = defaultdict(lambda: torch.zeros(sum(p.numel() for p in params)))
    for index in torch.arange(len(samples)).split(trainer.config.sampling.batch_size):
        for k in range(steps.shape[1]):
            for j in steps[index, k].unique().tolist():
                rows = index[steps[index, k] == j]
                for p in params:
                    p.grad = None
                out = objective.step_loss(samples, rows, k, steps[rows, k], advantages[rows])
                (out.loss * len(rows) * weight).backward()
                per_step[j] += torch.cat([p.grad.flatten() for p in params]).detach().cpu()
    for p in params:
        p.grad = None
    return dict(per_step), len(samples)


def _row(name: str, scale: NoiseScale) -> str:
    if scale.detected:
        images = f"{scale.images:,.0f}"
    else:
        images = f"> {scale.images_lower_bound:,.0f} (no signal detected)"
    return f"| {name} | {scale.cosine:+.3f} | {scale.signal:.2e} ± {scale.signal_se:.1e} | {scale.noise:.2e} | {images} |"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="shapes")
    parser.add_argument("--batches", type=int, default=8, help="independent epochs (default 8, at least 3)")
    parser.add_argument("--prompts", nargs="+", metavar="PROMPT", help="draw only these training prompts")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override of the preset (repeatable)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = parser.parse_args()
    if args.batches < 3:
        parser.error("--batches must be at least 3")
    torch.set_num_threads(args.threads)
    overrides = ["prompts.balance_tags=false", *args.overrides] if args.prompts else args.overrides
    cfg = load_config(args.preset, overrides=overrides)
    prompts = named_prompts(cfg.prompts.train, args.prompts) if args.prompts else None
    print(cfg.describe(), flush=True)
    with tempfile.TemporaryDirectory() as out:
        trainer = FlowGRPOTrainer(cfg, out, prompts=prompts, progress=False)
        sigmas = trainer.adapter.sigmas(
            cfg.sampling.num_steps, cfg.sampling.resolution, cfg.sampling.resolution
        )
        epochs = []
        for b in range(args.batches):
            grads, images = epoch_gradients(trainer, b)
            epochs.append(grads)
            print(f"epoch {b + 1}/{args.batches}: {images} images, steps {sorted(grads)}", flush=True)
    every_step = sorted(set.intersection(*(set(g) for g in epochs)))
    whole = gradient_noise_scale(torch.stack([sum(g.values()) for g in epochs]), images)
    print(f"\n{args.batches} independent epochs of {images} images at the initial weights\n")
    print(
        "| gradient | cosine between epochs | signal |G|^2 | noise per epoch | noise scale B_noise (images) |"
    )
    print("|---|---|---|---|---|")
    print(_row("whole epoch", whole))
    for j in every_step:
        step = gradient_noise_scale(torch.stack([g[j] for g in epochs]), images)
        print(_row(f"step {j} (sigma {float(sigmas[j]):.3f})", step))
    per_update = images // cfg.train.optimizer_steps_per_epoch
    bound = whole.images if whole.detected else whole.images_lower_bound
    print(
        f"\nan optimiser step uses {per_update} images; B_noise is {'' if whole.detected else 'at least '}"
        f"{bound / per_update:,.0f}x that"
    )


if __name__ == "__main__":
    main()
