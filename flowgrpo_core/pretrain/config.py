"""What a shapes-world pre-training run does, and its command line (no torch import: ``flowgrpo --help``
stays fast)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace

from flowgrpo_core.prompts.vocabulary import TAGS


@dataclass(frozen=True)
class ShapesModelSpec:
    """Sizes of the shapes-world SD3 (defaults: the shipped model, ~3M parameters, 64 px)."""

    resolution: int = 64
    # 3 blocks: downsampling x4, so a 64 px scene is a 16 x 16 latent (8 x 8 tokens after 2 x 2 patches);
    # SD3's x8 leaves 4 x 4 tokens, too coarse to place four 12 px shapes
    vae_blocks: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 8
    patch_size: int = 2  # latent pixels per token side
    num_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    clip_hidden: int = 32
    t5_d_model: int = 64
    max_text_tokens: int = 16  # CLIP pads to this; also T5's max_sequence_length
    # scheduler shift, in training and sampling: flat renders are as redundant as SD3's 1024 px images, and
    # with shift 1 the text conditioning barely learns (it is decided at high noise, which shift 3 trains more)
    shift: float = 3.0


@dataclass(frozen=True)
class PretrainConfig:
    """What ``flowgrpo pretrain-shapes`` does; the main fields are command-line options."""

    seed: int = 0
    model: ShapesModelSpec = field(default_factory=ShapesModelSpec)
    vae_steps: int = 1500
    # a trained VAE to start phase 2 from (a pipeline folder or its vae/ folder) instead of phase 1: phases draw
    # from their own generators, so this gives the same transformer as the full run that trained that VAE
    vae_from: str | None = None
    # continue pre-training a saved model (its VAE, text encoders and transformer; a fresh optimiser and EMA)
    init_from: str | None = None
    # transformer learning rate after warm-up: constant (a k-step prefix of a run is the k-step run) or a cosine
    # down to a tenth at the last step
    lr_schedule: str = "constant"
    steps: int = 6000  # transformer steps
    minutes: float | None = None  # wall-clock budget for both phases (not reproducible across machines)
    vae_share: float = 0.3  # share of ``minutes`` given to the VAE
    vae_batch_size: int = 32
    batch_size: int = 8  # transformer phase: more, smaller steps learn faster per CPU-second here
    vae_learning_rate: float = 1e-3
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    ema_decay: float = 0.999
    vae_kl_weight: float = 1e-4  # per latent element, against per-pixel reconstruction errors
    vae_shape_weight: float = 4.0  # extra weight of pixels that differ from the background
    caption_dropout: float = 0.1
    tag_weights: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TAGS, 1.0))
    held_out: str | None = "builtin:shapes_test"  # no caption has the requirements of these prompts
    eval_every: int = (
        1000  # transformer steps between evaluations and checkpoints (out/step-N); 0: only at the end
    )
    eval_prompts: str = "builtin:shapes_test"  # "": no evaluation
    eval_images_per_prompt: int = 2
    eval_min_images_per_tag: int = 32  # as the shapes preset: every task judged on at least this many images
    eval_steps: int = 20
    guidance_scale: float = 4.5
    threads: int = 1
    device: str = "cpu"  # cpu, cuda or cuda:N
    # processes rendering scenes ahead of the training loop (a GPU outruns one CPU core); 0: rendered in the
    # training process. The data sequence depends on this number, so it is part of a run's recipe.
    workers: int = 0
    save_dtype: str = "float32"  # of the final folder (checkpoints stay float32); float16 halves it

    def __post_init__(self) -> None:
        for name in (
            "vae_steps",
            "steps",
            "vae_batch_size",
            "batch_size",
            "warmup_steps",
            "threads",
            "eval_images_per_prompt",
        ):
            if getattr(self, name) < (0 if name.endswith("steps") else 1):
                raise ValueError(f"pretrain-shapes: {name} must be positive, got {getattr(self, name)}")
        if self.save_dtype not in ("float32", "float16"):
            raise ValueError(
                f"pretrain-shapes: save_dtype must be float32 or float16, got {self.save_dtype!r}"
            )
        if self.workers < 0:
            raise ValueError(f"pretrain-shapes: workers must be >= 0, got {self.workers}")
        if not (self.device in ("cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"pretrain-shapes: device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.eval_min_images_per_tag < 0:
            raise ValueError(
                f"pretrain-shapes: eval_min_images_per_tag must be >= 0, got {self.eval_min_images_per_tag}"
            )
        if self.minutes is not None and self.minutes <= 0:
            raise ValueError(f"pretrain-shapes: minutes must be positive, got {self.minutes}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(
                f"pretrain-shapes: lr_schedule must be constant or cosine, got {self.lr_schedule!r}"
            )
        if self.init_from and self.vae_from:
            raise ValueError("pretrain-shapes: init_from brings its own VAE; do not give vae_from too")
        unknown = set(self.tag_weights) - set(TAGS)
        if unknown:
            raise ValueError(
                f"pretrain-shapes: unknown tags {sorted(unknown)} in tag_weights; tags: {', '.join(TAGS)}"
            )


DESCRIPTION = """Pre-train the shapes-world base model (a tiny SD3: MMDiT + CLIP/T5 + KL VAE) by rectified flow
on scenes rendered on the fly, and save it as a diffusers folder (safetensors) with pretrain.json (config,
losses, held-out accuracy during training). Step-bounded runs (--steps) are reproducible from the seed, bit for
bit with one thread; --minutes bounds wall time instead (machine-dependent)."""

EPILOG = """examples (the shipped shapes:sd3 is the first three, see its PROVENANCE.md):
  flowgrpo pretrain-shapes --out runs/shapes-a --steps 9000
  flowgrpo pretrain-shapes --out runs/shapes-b --init-from runs/shapes-a --seed 1 --steps 20000 --lr-schedule cosine --eval-every 5000
  flowgrpo pretrain-shapes --out runs/shapes-sd3 --init-from runs/shapes-b --steps 0 --save-dtype float16 --no-eval
  flowgrpo pretrain-shapes --out /tmp/g --device cuda --workers 12 --batch-size 128   # on a GPU
  flowgrpo pretrain-shapes --out /tmp/s --minutes 10 --eval-every 500
  flowgrpo pretrain-shapes --out /tmp/s --steps 20 --vae-steps 20 --no-eval
"""


def add_pretrain_shapes_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``pretrain-shapes`` to the ``flowgrpo`` command line (its handler is the caller's to set)."""
    d = PretrainConfig()
    p = subparsers.add_parser(
        "pretrain-shapes",
        help="pre-train the shapes-world base model (tiny SD3) on a CPU",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="folder for the diffusers pipeline (created)")
    p.add_argument(
        "--seed", type=int, default=d.seed, help=f"seed of weights, data and noise (default {d.seed})"
    )
    p.add_argument("--steps", type=int, default=d.steps, help=f"transformer steps (default {d.steps})")
    p.add_argument("--vae-steps", type=int, default=d.vae_steps, help=f"VAE steps (default {d.vae_steps})")
    p.add_argument(
        "--vae-from",
        metavar="DIR",
        default=None,
        help="skip phase 1 and use the trained VAE of DIR (a pipeline folder or its vae/ folder)",
    )
    p.add_argument(
        "--init-from",
        metavar="DIR",
        default=None,
        help="continue pre-training the model saved in DIR (skips phase 1; fresh optimiser and EMA)",
    )
    p.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        default=d.lr_schedule,
        help=f"transformer learning rate after warm-up (default {d.lr_schedule})",
    )
    p.add_argument(
        "--minutes",
        type=float,
        default=None,
        help=f"wall-clock budget of both phases (VAE: {round(100 * d.vae_share)}%%); the steps become upper bounds",
    )
    p.add_argument(
        "--patch-size",
        type=int,
        default=ShapesModelSpec().patch_size,
        help=f"latent pixels per transformer token side (default {ShapesModelSpec().patch_size})",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help=f"scenes per transformer step (default {d.batch_size})",
    )
    p.add_argument(
        "--vae-batch-size",
        type=int,
        default=d.vae_batch_size,
        help=f"scenes per VAE step (default {d.vae_batch_size})",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=d.learning_rate,
        help=f"transformer learning rate (default {d.learning_rate:g})",
    )
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=d.warmup_steps,
        help=f"linear learning-rate warm-up of both phases (default {d.warmup_steps})",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=d.eval_every,
        help=f"transformer steps between held-out evaluations and checkpoints (OUT/step-N), 0: only at the end (default {d.eval_every})",
    )
    p.add_argument(
        "--eval-prompts", default=d.eval_prompts, help=f"prompt set evaluated (default {d.eval_prompts})"
    )
    p.add_argument(
        "--eval-images-per-prompt",
        type=int,
        default=d.eval_images_per_prompt,
        help=f"images per evaluated prompt (default {d.eval_images_per_prompt})",
    )
    p.add_argument(
        "--eval-min-images-per-tag",
        type=int,
        default=d.eval_min_images_per_tag,
        help=f"more images in tasks with few prompts, up to this many per task (default {d.eval_min_images_per_tag})",
    )
    p.add_argument("--no-eval", action="store_true", help="skip every evaluation")
    p.add_argument(
        "--threads",
        type=int,
        default=d.threads,
        help=f"torch CPU threads; 1 is reproducible bit for bit (default {d.threads})",
    )
    p.add_argument("--device", default=d.device, help=f"cpu, cuda or cuda:N (default {d.device})")
    p.add_argument(
        "--workers",
        type=int,
        default=d.workers,
        help="processes rendering scenes ahead of training, for a GPU; part of the recipe: the data "
        f"sequence depends on it (default {d.workers}: in the training process)",
    )
    p.add_argument(
        "--save-dtype",
        choices=("float32", "float16"),
        default=d.save_dtype,
        help="weights of the saved folder; float16 halves it (--init-from DIR --steps 0 converts DIR)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    cfg = PretrainConfig(
        model=ShapesModelSpec(patch_size=args.patch_size),
        seed=args.seed,
        steps=args.steps,
        vae_steps=args.vae_steps,
        minutes=args.minutes,
        batch_size=args.batch_size,
        vae_batch_size=args.vae_batch_size,
        vae_from=args.vae_from,
        init_from=args.init_from,
        lr_schedule=args.lr_schedule,
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        eval_every=args.eval_every,
        eval_prompts=args.eval_prompts,
        eval_images_per_prompt=args.eval_images_per_prompt,
        eval_min_images_per_tag=args.eval_min_images_per_tag,
        threads=args.threads,
        device=args.device,
        workers=args.workers,
        save_dtype=args.save_dtype,
    )
    return replace(cfg, eval_every=0, eval_prompts="") if args.no_eval else cfg
