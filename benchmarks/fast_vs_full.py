"""Epoch time of Flow-GRPO-Fast (a 2-step SDE window) vs full Flow-GRPO (SDE on every step) on one config.

Both run in this process on the same model and prompts; the first epoch of each is a warm-up. Prints
sampling and training time per epoch and the Fast / full ratio. Roll-outs cost the same T forwards in
both; training costs the window's steps instead of ``int(T * timestep_fraction)``.

    python benchmarks/fast_vs_full.py [--preset tiny] [--epochs 3] [--window 2]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics

from flowgrpo_core.config import load_config
from flowgrpo_core.trainer import FlowGRPOTrainer


def epoch_times(preset: str, overrides: list[str], epochs: int) -> dict[str, float]:
    cfg = load_config(preset, overrides=["train.checkpoint_every=0", *overrides])
    trainer = FlowGRPOTrainer(cfg, "/tmp/flowgrpo-bench-fast", progress=False)
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        history = trainer.train(epochs=epochs + 1)[1:]
    return {
        key: statistics.median(m[f"time/{key}"] for m in history)
        for key in ("sample_s", "train_s", "epoch_s")
    } | {"trained_steps": cfg.trained_steps_per_sample}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", help="preset both runs start from (default: tiny)")
    parser.add_argument(
        "--epochs", type=int, default=3, help="timed epochs per method, after one warm-up epoch"
    )
    parser.add_argument("--window", type=int, default=2, help="Fast SDE window size (default 2)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra override for both runs",
    )
    args = parser.parse_args()
    full = epoch_times(args.preset, args.overrides, args.epochs)
    fast = epoch_times(
        args.preset,
        [*args.overrides, f"sampling.sde_window_size={args.window}", "train.clip_range=1e-5"],
        args.epochs,
    )
    print(f"preset {args.preset}, median of {args.epochs} epochs after a warm-up")
    print(f"{'method':24} {'trained steps':>13} {'sample (s)':>11} {'train (s)':>10} {'epoch (s)':>10}")
    for name, r in (("Flow-GRPO (full)", full), (f"Flow-GRPO-Fast (window {args.window})", fast)):
        print(
            f"{name:24} {r['trained_steps']:>13} {r['sample_s']:>11.3f} {r['train_s']:>10.3f} {r['epoch_s']:>10.3f}"
        )
    print(
        f"Fast / full: epoch {fast['epoch_s'] / full['epoch_s']:.3f}x, training {fast['train_s'] / full['train_s']:.3f}x"
    )


if __name__ == "__main__":
    main()
