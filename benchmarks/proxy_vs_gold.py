"""Proxy vs gold in the shapes world (issue 19; the curves in the README's "Proxy vs gold"): train on a reward
that can be hacked and watch the monitor catch it.

The ``shapes`` preset's pre-trained model (``shapes:sd3``) trains on ``jpeg_incompressibility``, the JPEG size
of the image: noise and busy texture raise it whatever the prompt asked for. The gold metric is the shapes
world's GenEval accuracy (``shapes_geneval``: strict rules, judged by the colour-segmentation detector, the
mean over the six tasks with its standard error). Every ``--every`` epochs, and once before the first, the
trainer evaluates the policy's EMA weights on the first ``--prompts`` prompts of ``shapes_test`` with the
preset's evaluation (ODE sampling, 20 steps, fixed seeds, at least ``--min-per-task`` images per task), and
the hacking monitor compares each evaluation with the one ``eval.hacking_window`` evaluations before it.

The run uses the trainer's own hooks (``eval.every_epochs``, ``train.keep_best``), so what it prints is what a
training stage logs to MLflow. It trains to the end (``train.stop_on_hacking`` off) to show the curves after
the alarm; with ``--stop`` it stops at the alarm instead and exports the last good epoch. Evaluations do not
change the training trajectory (tests/test_trainer.py), so both runs are the same up to the alarm.

    python benchmarks/proxy_vs_gold.py [--epochs 20] [--every 2] [--stop] [--plot docs/proxy_vs_gold_shapes.png]
        [--set KEY=VALUE] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from flowgrpo_core.config import load_config
from flowgrpo_core.heldout import PROXY, headline
from flowgrpo_core.policy import PROXY_GOLD_PLOT
from flowgrpo_core.trainer import FlowGRPOTrainer

GOLD = "shapes_geneval"
# large steps without a KL: the setting in which this small model's images degrade fastest (README "Shapes
# world": lr 1e-2 collapses GenEval accuracy within tens of epochs), so the hacking shows in minutes on a CPU
HACKABLE = [
    "rewards={jpeg_incompressibility: 1.0}",
    f"eval.metrics=[{GOLD}]",
    f"train.keep_best={GOLD}",
    "train.beta=0",
    "train.learning_rate=1e-2",
    "train.clip_range=1e-2",
    "train.checkpoint_every=0",
    # the gold falls over several evaluations, not between two: window 3 (6 epochs at --every 2)
    "eval.hacking_window=3",
]


def table(summary: dict) -> str:
    """Markdown: one row per evaluation, proxy and gold with their standard errors, alarms marked."""
    alarm_epochs = {a["epoch"] for a in summary["alarms"]}
    rows = [
        f"| epochs trained | {PROXY} (proxy: JPEG kB) | {GOLD} accuracy (gold) | alarm |",
        "|---|---|---|---|",
    ]
    for record in summary["records"]:
        epoch = int(record["epoch"])
        (p, p_se), (g, g_se) = headline(record, PROXY), headline(record, GOLD)
        mark = "**alarm**" if epoch in alarm_epochs else ""
        rows.append(f"| {epoch} | {p:.3f} ± {p_se:.3f} | {g:.3f} ± {g_se:.3f} | {mark} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="shapes")
    parser.add_argument("--epochs", type=int, default=20, help="epochs to train (default 20)")
    parser.add_argument("--every", type=int, default=2, help="epochs between evaluations (default 2)")
    parser.add_argument("--prompts", type=int, default=24, help="held-out prompts evaluated (default 24)")
    parser.add_argument(
        "--min-per-task", type=int, default=16, help="at least this many images per task (default 16)"
    )
    parser.add_argument("--stop", action="store_true", help="train.stop_on_hacking: stop at the first alarm")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="more overrides"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--plot", metavar="PNG", help="copy the proxy-vs-gold plot here")
    parser.add_argument("--json", metavar="PATH", help="write the run's heldout.json here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = [
        *HACKABLE,
        f"train.epochs={args.epochs}",
        f"eval.every_epochs={args.every}",
        f"eval.during_training_prompts={args.prompts}",
        f"eval.min_images_per_tag={args.min_per_task}",
        f"train.stop_on_hacking={str(args.stop).lower()}",
        *args.overrides,
    ]
    config = load_config(args.preset, overrides=overrides)
    e = config.eval
    print(f"preset {args.preset} with {' '.join(overrides)}")
    print(
        f"monitor: an alarm when the proxy rose and {GOLD} fell by more than {e.hacking_standard_errors:g} "
        f"standard errors over {e.hacking_window} evaluations\n"
    )
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as out:
        trainer = FlowGRPOTrainer(config, out, progress=False)
        trainer.train()
        policy = trainer.save_policy(Path(out) / "policy")
        summary = trainer.watch.summary(trainer.epoch)
        if args.plot:
            shutil.copyfile(policy / PROXY_GOLD_PLOT, args.plot)
    print(f"\nwall time {(time.monotonic() - started) / 60:.1f} min, {trainer.epoch} epochs\n")
    print(table(summary) + "\n")
    for alarm in summary["alarms"]:
        print(f"alarm at epoch {alarm['epoch']}: {alarm['metric']} fell {alarm['standard_errors']:.1f} s.e.")
    first = min((a["epoch"] for a in summary["alarms"]), default=None)
    if first is None:
        print("no alarm")
    elif not args.stop:
        last_good = max(int(r["epoch"]) for r in summary["records"] if int(r["epoch"]) < first)
        print(
            f"with train.stop_on_hacking the run stops after epoch {first}; the last good epoch is {last_good}"
        )
    print(f"exported: epoch {summary['exported_epoch']} ({summary['exported_because']})")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
