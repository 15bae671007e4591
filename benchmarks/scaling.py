"""Epoch time and peak memory of the trainer with 1 vs 2 processes (torchrun, gloo on CPU, or NCCL on GPUs) on
the same global batch, for plain torch, DeepSpeed ZeRO-2 and ZeRO-3 (with and without CPU offload), and where
each epoch's time goes: roll-outs, waiting for rewards, the reward gather, forward + backward, and the rest
(advantages, all-reduce, optimiser).

On a CPU machine the processes share the cores: each gets cores / processes threads, so the ratio shows what
sharding the work buys over intra-op threading, not what more hardware would; and "offload" moves nothing
(the weights are in CPU memory already) but runs DeepSpeed's offload code. Peak memory is the largest peak
RSS of the run's processes (``getrusage(RUSAGE_CHILDREN)`` of a fresh wrapper process per run): Python and
the libraries take most of it at these sizes, so compare the rows, not the absolute numbers.

    python benchmarks/scaling.py [--epochs 4] [--set sampling.groups_per_epoch=8]
    python benchmarks/scaling.py --backends plain zero2 zero3 zero3-offload --model tiny mid --epochs 1

``mid`` is a random SD3 of 74M transformer parameters (benchmarks/memory_plan.py), saved to a folder first.
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


BACKENDS = {
    "plain": ["train.deepspeed_stage=0"],
    "zero2": ["train.deepspeed_stage=2"],
    "zero3": ["train.deepspeed_stage=3"],
    "zero3-offload": ["train.deepspeed_stage=3", "train.offload_optimizer=true", "train.offload_params=true"],
}
KEYS = ["time/epoch_s", "time/rollout_s", "time/reward_wait_s", "time/gather_s", "time/forward_backward_s"]
# a fresh process whose only child is torchrun: its children's peak RSS is the largest of the run's processes
_WRAPPER = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def run(
    processes: int, epochs: int, overrides: list[str], threads: int | None = None
) -> tuple[list[dict[str, float]], float]:
    """The timed epochs' metrics (after one warm-up epoch) and the peak RSS in MiB of the largest process;
    ``threads`` per process (default: the cores shared out)."""
    out = Path(tempfile.mkdtemp(prefix=f"flowgrpo-scaling-{processes}-"))
    threads = threads or max(1, (os.cpu_count() or 1) // processes)
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
    ]
    for override in overrides:
        command += ["--set", override]
    wrapped = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *command], env=env, check=True, capture_output=True, text=True
    )
    peak_mib = int(wrapped.stdout.split()[-1]) / 1024  # Linux reports KiB
    return json.loads((out / "policy" / "metrics.json").read_text())[1:], peak_mib


def mid_model() -> str:
    """A folder holding the mid-size random SD3 of benchmarks/memory_plan.py."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from memory_plan import CASES, build

    folder = Path(tempfile.mkdtemp(prefix="flowgrpo-mid-sd3-"))
    build(next(c for c in CASES if c.mid_size)).save_pretrained(folder)
    return str(folder)


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
        help="override for every run",
    )
    parser.add_argument(
        "--backends", nargs="+", default=["plain"], choices=list(BACKENDS), help="optimisation backends"
    )
    parser.add_argument("--model", nargs="+", default=["tiny"], choices=["tiny", "mid"], help="models")
    parser.add_argument(
        "--threads",
        type=int,
        help="threads per process (default: cores / processes; 1 keeps a loaded machine's OpenMP from "
        "oversubscribing the cores)",
    )
    parser.add_argument(
        "--mid-set",
        dest="mid_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra overrides for the mid-size model only (e.g. a smaller epoch)",
    )
    args = parser.parse_args()
    print(
        f"tiny preset {' '.join(args.overrides)}, {os.cpu_count()} cores, "
        f"{args.threads or 'cores / processes'} thread(s) per process, mean of {args.epochs} epoch(s) "
        "(rank 0's view), peak RSS of the largest process"
    )
    print(
        f"{'model':>5} {'backend':>14} {'procs':>5} {'epoch (s)':>10} {'roll-out':>9} {'reward wait':>12} "
        f"{'gather':>7} {'fwd+bwd':>8} {'other':>7} {'peak MiB':>9} {'vs 1 plain':>11}"
    )
    for model in args.model:
        source = [] if model == "tiny" else [f"model.source={mid_model()}", *args.mid_overrides]
        base = None
        for backend in args.backends:
            for n in (1, 2):
                metrics, peak = run(
                    n, args.epochs, [*args.overrides, *source, *BACKENDS[backend]], args.threads
                )
                # means, so that the parts add up to the epoch time
                r = {k: statistics.fmean(m[k] for m in metrics) for k in KEYS}
                base = base or (r["time/epoch_s"], peak)
                other = r["time/epoch_s"] - sum(r[k] for k in KEYS[1:])
                print(
                    f"{model:>5} {backend:>14} {n:>5} {r['time/epoch_s']:>10.3f} {r['time/rollout_s']:>9.3f} "
                    f"{r['time/reward_wait_s']:>12.3f} {r['time/gather_s']:>7.3f} "
                    f"{r['time/forward_backward_s']:>8.3f} {other:>7.3f} {peak:>9.0f} "
                    f"{r['time/epoch_s'] / base[0]:>5.2f}x/{peak / base[1]:.2f}x",
                    flush=True,
                )
    print("vs 1 plain: epoch time / peak memory relative to the model's first row")


if __name__ == "__main__":
    main()
