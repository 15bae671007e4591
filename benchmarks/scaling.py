"""Epoch time of the trainer with 1 vs 2 processes (torchrun, gloo on CPU, or NCCL on GPUs) on the same
global batch, and where each epoch's time goes: roll-outs, waiting for rewards, the reward gather, forward +
backward, and the rest (advantages, all-reduce, optimiser).

On a CPU machine the processes share the cores: each gets cores / processes threads, so the ratio shows what
sharding the work buys over intra-op threading, not what more hardware would.

    python benchmarks/scaling.py [--epochs 4] [--set sampling.groups_per_epoch=8]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(processes: int, epochs: int, overrides: list[str], extra: list[str]) -> list[dict[str, float]]:
    out = Path(tempfile.mkdtemp(prefix=f"flowgrpo-scaling-{processes}-"))
    threads = max(1, (os.cpu_count() or 1) // processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={processes}",
        "--master_addr=127.0.0.1",
        f"--master_port={_port()}",
        "-m",
        "flowgrpo_core.cli",
        "train",
        "--preset",
        "tiny",
        "--epochs",
        str(epochs + 1),
        "--out",
        str(out),
        "--no-progress",
        "--set",
        "train.checkpoint_every=0",
        *extra,
    ]
    for override in overrides:
        command += ["--set", override]
    subprocess.run(command, env=env, check=True, capture_output=True)
    return json.loads((out / "policy" / "metrics.json").read_text())[1:]  # the first epoch warms up


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=4, help="timed epochs per run, after one warm-up epoch")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override for both runs",
    )
    parser.add_argument(
        "--deepspeed", type=int, default=0, choices=[0, 1, 2], help="train.deepspeed_stage for both runs"
    )
    args = parser.parse_args()
    extra = ["--set", f"train.deepspeed_stage={args.deepspeed}"]
    keys = [
        "time/epoch_s",
        "time/rollout_s",
        "time/reward_wait_s",
        "time/gather_s",
        "time/forward_backward_s",
    ]
    # means, so that the parts add up to the epoch time
    results = {
        n: {k: statistics.fmean(m[k] for m in run(n, args.epochs, args.overrides, extra)) for k in keys}
        for n in (1, 2)
    }
    print(
        f"tiny preset {' '.join(args.overrides)}, {os.cpu_count()} cores, mean of {args.epochs} epochs (rank 0's view)"
    )
    print(
        f"{'processes':>9} {'epoch (s)':>10} {'roll-out':>9} {'reward wait':>12} {'gather':>7} {'fwd+bwd':>8} {'other':>7}"
    )
    for n, r in results.items():
        other = r["time/epoch_s"] - sum(r[k] for k in keys[1:])
        print(
            f"{n:>9} {r['time/epoch_s']:>10.3f} {r['time/rollout_s']:>9.3f} {r['time/reward_wait_s']:>12.3f} "
            f"{r['time/gather_s']:>7.3f} {r['time/forward_backward_s']:>8.3f} {other:>7.3f}"
        )
    print(
        f"2 processes / 1 process: epoch time {results[2]['time/epoch_s'] / results[1]['time/epoch_s']:.2f}x"
    )


if __name__ == "__main__":
    main()
