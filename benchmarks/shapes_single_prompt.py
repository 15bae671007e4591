"""Can Flow-GRPO teach the shapes-world base model one prompt? A diagnostic for the shapes benchmark (issue 7).

Trains the ``shapes`` preset (plus ``--set`` overrides) on the training prompts named on the command line only,
and prints each epoch's mean SDE reward, then the ODE strict accuracy and reward on those prompts (fixed seeds,
``--images`` per prompt, the EMA weights when EMA is on) every ``--eval-every`` epochs. With one prompt the epoch
reward is free of the prompt-draw noise of the full benchmark, so a flat curve means the policy is not learning.

    python benchmarks/shapes_single_prompt.py "three circles" [--epochs 30] [--set sampling.num_steps=6 ...]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time

import numpy as np
import torch

from flowgrpo_core.config import load_config
from flowgrpo_core.evaluation.compare import generate
from flowgrpo_core.prompts import PromptSet, load_prompts
from flowgrpo_core.rewards.geneval import ShapesGenEvalReward
from flowgrpo_core.trainer import FlowGRPOTrainer


def chosen_prompts(names: list[str]) -> PromptSet:
    """The named prompts of ``builtin:shapes_train``, with their GenEval metadata."""
    try:
        return load_prompts("builtin:shapes_train").named(names)
    except KeyError as error:
        raise SystemExit(f"builtin:shapes_train: {error.args[0]}") from None


def ode_accuracy(trainer: FlowGRPOTrainer, prompts: PromptSet, images: int) -> tuple[float, float]:
    """(strict accuracy, mean reward) of ``images`` ODE samples per prompt, seeds 0..N-1."""
    cfg = trainer.config
    texts = [p for p in prompts.prompts for _ in range(images)]
    meta = [m for m in prompts.metadata for _ in range(images)]
    with trainer.evaluation_weights():
        pictures = generate(
            trainer.adapter,
            texts,
            list(range(len(texts))),
            resolution=cfg.sampling.resolution,
            num_steps=cfg.eval.num_steps,
            guidance_scale=cfg.eval.guidance_scale,
            batch_size=cfg.eval.batch_size,
            max_sequence_length=cfg.sampling.max_sequence_length,
        )
    scored = ShapesGenEvalReward(score="strict")(pictures, texts, meta)
    return float(np.mean(scored.scores)), float(np.mean(scored.details["fraction"]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("prompts", nargs="+", help="training prompts of builtin:shapes_train")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument(
        "--eval-every", type=int, default=10, help="epochs between ODE evaluations (default 10)"
    )
    parser.add_argument(
        "--images", type=int, default=32, help="ODE images per prompt per evaluation (default 32)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override of the shapes preset (repeatable)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompts = chosen_prompts(args.prompts)
    cfg = load_config("shapes", overrides=["prompts.balance_tags=false", *args.overrides])
    print(cfg.describe(), flush=True)
    with tempfile.TemporaryDirectory() as out:
        trainer = FlowGRPOTrainer(cfg, out, prompts=prompts, progress=False)
        accuracy, reward = ode_accuracy(trainer, prompts, args.images)
        print(f"epoch 0: ODE accuracy {accuracy:.3f}, ODE reward {reward:.3f}", flush=True)
        started = time.monotonic()
        for epoch in range(args.epochs):
            with contextlib.redirect_stderr(io.StringIO()):
                metrics = trainer.run_epoch(epoch)
            trainer.history.append(metrics)
            trainer.epoch = epoch + 1
            print(
                f"epoch {epoch + 1}: SDE reward {metrics['reward/total']:.3f}  kl {metrics['train/kl']:.4f}  "
                f"clipfrac {metrics['train/clipfrac']:.3f}  ({time.monotonic() - started:.0f} s)",
                flush=True,
            )
            if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
                accuracy, reward = ode_accuracy(trainer, prompts, args.images)
                print(f"epoch {epoch + 1}: ODE accuracy {accuracy:.3f}, ODE reward {reward:.3f}", flush=True)
        rewards = [m["reward/total"] for m in trainer.history]
        half = len(rewards) // 2
        print(
            f"SDE reward: first half {np.mean(rewards[:half]):.3f}, second half {np.mean(rewards[half:]):.3f}"
        )


if __name__ == "__main__":
    main()
