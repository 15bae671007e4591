"""Epoch time of this checkout against an earlier commit, on the same work, side by side in one run.

The earlier commit is checked out into a temporary git worktree; each round runs one process per side (this
checkout first, then the other, alternating which goes first), each training ``--epochs`` epochs after a
warm-up epoch, and records every epoch's time. Prints the median epoch, sampling and training time of each
side over all rounds and their ratio.

"The same work" needs the same computations on both sides: ``--set`` overrides apply to this checkout,
``--baseline-set`` to the other (a changed default is undone with an override). The default pair compares
the `tiny` preset with the baseline at a138f6c, where the exact KL and dropping zero-advantage samples were
the defaults.

    python benchmarks/epoch_time.py [--baseline a138f6c] [--preset tiny] [--rounds 6] [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs inside each side's process, importing that side's flowgrpo_core: only APIs both sides have.
WORKER = """
import contextlib, io, json, sys
from flowgrpo_core.config import load_config
from flowgrpo_core.trainer import FlowGRPOTrainer
preset, epochs, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = load_config(preset, overrides=["train.checkpoint_every=0", *sys.argv[4:]])
trainer = FlowGRPOTrainer(cfg, out, progress=False)
with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
    history = trainer.train(epochs=epochs + 1)[1:]
print(json.dumps([{k: m[f"time/{k}"] for k in ("epoch_s", "sample_s", "train_s")} for m in history]))
"""

DEFAULT_BASELINE = "a138f6c"
# what a138f6c did by default and this checkout does only when asked
DEFAULT_SAME_WORK = ["train.kl_form=exact", "train.zero_advantage=drop"]


def run_side(
    source: Path, preset: str, epochs: int, overrides: list[str], out: Path
) -> list[dict[str, float]]:
    env = {**os.environ, "PYTHONPATH": str(source)}
    result = subprocess.run(
        [sys.executable, "-c", WORKER, preset, str(epochs), str(out), *overrides],
        cwd=tempfile.gettempdir(),
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode:
        raise SystemExit(f"{source}: the worker failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--baseline", default=DEFAULT_BASELINE, help=f"commit to compare with (default {DEFAULT_BASELINE})"
    )
    parser.add_argument("--preset", default="tiny", help="preset both sides run (default tiny)")
    parser.add_argument("--rounds", type=int, default=6, help="processes per side, alternating (default 6)")
    parser.add_argument(
        "--epochs", type=int, default=4, help="timed epochs per process, after a warm-up epoch"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help=f"override for this checkout (default, against {DEFAULT_BASELINE}: {' '.join(DEFAULT_SAME_WORK)})",
    )
    parser.add_argument(
        "--baseline-set",
        dest="baseline_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override for the baseline",
    )
    args = parser.parse_args()
    overrides = (
        args.overrides
        if args.overrides is not None
        else (DEFAULT_SAME_WORK if args.baseline == DEFAULT_BASELINE else [])
    )
    with tempfile.TemporaryDirectory(prefix="flowgrpo-baseline-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), args.baseline],
            check=True,
        )
        try:
            times: dict[str, list[dict[str, float]]] = {"this checkout": [], args.baseline: []}
            sides = [("this checkout", ROOT, overrides), (args.baseline, tree, args.baseline_overrides)]
            for r in range(args.rounds):
                for name, source, sets in sides if r % 2 == 0 else sides[::-1]:
                    times[name] += run_side(
                        source, args.preset, args.epochs, sets, Path(tmp) / f"out-{r}-{len(times[name])}"
                    )
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    print(f"preset {args.preset}, {args.rounds} processes x {args.epochs} epochs per side, medians")
    print(
        f"this checkout: {' '.join(overrides) or '(no overrides)'}; {args.baseline}: {' '.join(args.baseline_overrides) or '(no overrides)'}"
    )
    print(f"{'side':16} {'epoch (s)':>10} {'sample (s)':>11} {'train (s)':>10}")
    med = {name: {k: statistics.median(m[k] for m in rows) for k in rows[0]} for name, rows in times.items()}
    for name, m in med.items():
        print(f"{name:16} {m['epoch_s']:>10.3f} {m['sample_s']:>11.3f} {m['train_s']:>10.3f}")
    ours, base = med["this checkout"], med[args.baseline]
    print(
        f"ratio (this / {args.baseline}): epoch {ours['epoch_s'] / base['epoch_s']:.3f}x, "
        f"sampling {ours['sample_s'] / base['sample_s']:.3f}x, training {ours['train_s'] / base['train_s']:.3f}x"
    )


if __name__ == "__main__":
    main()
