"""``flowgrpo``: the command line. Every sub-command explains itself with ``--help``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

EPILOG = """examples:
  flowgrpo presets
  flowgrpo train --preset tiny --epochs 3 --out runs/x
  flowgrpo train --preset sd3-ocr --set train.beta=0 --set sampling.batch_size=4 --out runs/ocr
  flowgrpo train --preset tiny --out runs/x --resume        # continue from the latest checkpoint
"""

# Extra sub-commands contributed by other parts of the package: each adds its parser to `subparsers`.
_EXTENSIONS: list[str] = [
    "flowgrpo_core.serving.commands:add_serve_reward_parser",
    "pipelines.commands:add_pipeline_parsers",
]


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--preset / --config / --set, shared by every command that builds a config."""
    group = parser.add_argument_group("configuration (preset, then YAML file, then --set overrides)")
    group.add_argument(
        "--preset", default="tiny", help="named preset to start from (see `flowgrpo presets`; default: tiny)"
    )
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


def config_from_args(args: argparse.Namespace, extra: Sequence[str] = ()):
    from flowgrpo_core.config import load_config

    return load_config(args.preset, args.config, [*args.overrides, *extra])


def _cmd_presets(args: argparse.Namespace) -> int:
    from flowgrpo_core.config import load_config
    from flowgrpo_core.presets import preset_description, preset_names

    for name in preset_names():
        cfg = load_config(name)
        s, t = cfg.sampling, cfg.train
        rewards = ", ".join(f"{k} {v:g}" for k, v in cfg.rewards.items())
        print(f"{name}\n    {preset_description(name)}")
        print(
            f"    model {cfg.model.source} ({cfg.model.dtype}) | {s.resolution}px, T={s.num_steps}, cfg {s.guidance_scale:g}, "
            f"noise {s.noise_level:g}{', Fast window ' + str(s.sde_window_size) if s.sde_window_size else ''}"
        )
        print(
            f"    reward {rewards} | group {s.group_size} x {s.groups_per_epoch} prompts, batch {s.batch_size} | "
            f"beta {t.beta:g}, clip {t.clip_range:g}, lr {t.learning_rate:g}, "
            f"{'LoRA r' + str(t.lora_rank) + '/a' + format(t.lora_alpha, 'g') if t.lora else 'full fine-tuning'}"
        )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from flowgrpo_core.checkpoint import latest_checkpoint
    from flowgrpo_core.trainer import FlowGRPOTrainer

    extra = [f"train.epochs={args.epochs}"] if args.epochs is not None else []
    cfg = config_from_args(args, extra)
    if args.show_config:
        print(cfg.to_yaml(), end="")
        return 0
    out = Path(args.out)
    if latest_checkpoint(out / "checkpoints") is not None and not args.resume:
        raise ValueError(
            f"{out} already holds checkpoints: pass --resume to continue that run, or choose another --out"
        )
    trainer = FlowGRPOTrainer(cfg, out, progress=not args.no_progress)
    if args.resume and not trainer.resume():
        print(f"[flowgrpo] no checkpoint in {out / 'checkpoints'}; starting from scratch", file=sys.stderr)
    history = trainer.train()
    policy = trainer.save_policy(out / "policy")
    if history:
        first, last = history[0]["reward/total"], history[-1]["reward/total"]
        print(f"[flowgrpo] reward {first:.4f} -> {last:.4f} over {len(history)} epochs; policy in {policy}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowgrpo",
        description="Flow-GRPO for flow-matching text-to-image models (SD3, FLUX), as a Kubeflow pipeline tracked in MLflow.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    presets = sub.add_parser(
        "presets", help="list the named presets and their key values", description="List the presets."
    )
    presets.set_defaults(func=_cmd_presets)

    train = sub.add_parser(
        "train",
        help="train a policy with Flow-GRPO in this process (no pipeline, no MLflow)",
        description="Train with Flow-GRPO in this process: prints the reward of every epoch, writes resumable "
        "checkpoints to OUT/checkpoints and the trained policy (LoRA or full weights, EMA, config) to OUT/policy.",
    )
    add_config_arguments(train)
    train.add_argument("--epochs", type=int, help="total number of epochs (overrides train.epochs)")
    train.add_argument(
        "--out", default="runs/train", help="run folder for checkpoints and the policy (default: runs/train)"
    )
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT")
    train.add_argument(
        "--show-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bars (logs stay)")
    train.set_defaults(func=_cmd_train)

    for spec in _EXTENSIONS:
        _load_extension(spec)(sub)
    return parser


def _load_extension(spec: str) -> Callable[[argparse._SubParsersAction], None]:
    import importlib

    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as error:
        if error.name and module.startswith(error.name):
            return lambda sub: None  # that part of the package is not installed
        raise


def main(argv: Sequence[str] | None = None) -> int:
    from flowgrpo_core.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        print(f"flowgrpo {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
