"""The ``flowgrpo train`` command line: its arguments, the command every training process runs when the
training stage launches several (one per GPU with torchrun, or a PyTorchJob's nodes), and the check that
such a command parses, in seconds, before any process or pod starts.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

TRAIN_DESCRIPTION = (
    "Train with Flow-GRPO in this process: prints the reward of every epoch, writes resumable checkpoints to "
    "OUT/checkpoints and the trained policy (LoRA or full weights, EMA, config) to OUT/policy."
)


def add_config_arguments(parser: argparse.ArgumentParser, config_file: bool = True) -> None:
    """--preset / --config / --set, shared by every command that builds a config. Without ``config_file``
    (the pipeline commands: a run carries its config as parameters, and a file would not travel) no
    --config."""
    title = "preset, then YAML file, then --set overrides" if config_file else "preset, then --set overrides"
    group = parser.add_argument_group(f"configuration ({title})")
    group.add_argument(
        "--preset", default="tiny", help="named preset to start from (see `flowgrpo presets`; default: tiny)"
    )
    if config_file:
        group.add_argument(
            "--config", metavar="FILE", help="YAML file merged over the preset (same keys as `--show-config`)"
        )
    group.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set train.beta=0 --set 'rewards={ocr: 1.0}' (value parsed as YAML; repeatable)",
    )


def add_train_arguments(train: argparse.ArgumentParser) -> None:
    """The options of ``flowgrpo train``."""
    add_config_arguments(train)
    train.add_argument("--epochs", type=int, help="total number of epochs (overrides train.epochs)")
    train.add_argument(
        "--out", default="runs/train", help="run folder for checkpoints and the policy (default: runs/train)"
    )
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT")
    train.add_argument(
        "--endpoints",
        metavar="FILE",
        help="reward servers to score with: the launch stage's JSON {name: {url, weight}} (default: in-process rewards)",
    )
    train.add_argument(
        "--show-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bars (logs stay)")


def _escape(arg: str) -> str:
    # Kubernetes expands $(VAR) in command arguments; a literal one in a user's override must survive
    return arg.replace("$(", "$$(")


def train_arguments(
    preset: str, overrides: Sequence[str], out_dir: str, endpoints_file: str | None = None, escape=lambda a: a
) -> list[str]:
    """``-m flowgrpo_core.cli train ...`` as every training process runs it (resuming, so a retry continues)."""
    command = ["-m", "flowgrpo_core.cli", "train", "--preset", escape(preset)]
    for override in overrides:
        command += ["--set", escape(override)]
    if endpoints_file:
        command += ["--endpoints", escape(endpoints_file)]
    return [*command, "--out", escape(out_dir), "--resume", "--no-progress"]


def torchrun_command(
    nodes: int,
    procs_per_node: int,
    preset: str,
    overrides: Sequence[str],
    out_dir: str,
    endpoints_file: str | None = None,
) -> list[str]:
    """The training command of every node. The training operator sets MASTER_ADDR / MASTER_PORT (the
    Master pod's Service) and RANK (the pod's index: 0 for the Master, 1.. for the Workers) in each pod;
    Kubernetes substitutes ``$(VAR)`` from the container's environment before starting it."""
    launcher = [
        "torchrun",
        f"--nnodes={nodes}",
        f"--nproc_per_node={procs_per_node}",
        "--node_rank=$(RANK)",
        "--master_addr=$(MASTER_ADDR)",
        "--master_port=$(MASTER_PORT)",
    ]
    return [*launcher, *train_arguments(preset, overrides, out_dir, endpoints_file, escape=_escape)]


def check_command(command: list[str]) -> None:
    """Parse the nodes' ``flowgrpo train`` arguments with this image's own CLI (the nodes run the same
    image): an option it does not know fails here, in seconds, not on every node after scheduling."""
    import contextlib
    import io

    parser = argparse.ArgumentParser(prog="flowgrpo train")
    add_train_arguments(parser)
    arguments = command[command.index("flowgrpo_core.cli") + 1 :]
    if arguments[:1] != ["train"]:
        raise ValueError(f"not a `flowgrpo train` command line: {' '.join(arguments[:3])}")
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            parser.parse_args(arguments[1:])
    except SystemExit:
        last = (errors.getvalue().strip().splitlines() or ["?"])[-1]
        raise ValueError(f"`flowgrpo train` refuses the training nodes' command line: {last}") from None
