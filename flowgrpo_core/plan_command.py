"""``flowgrpo plan``: the memory a run needs per GPU, whether it fits, and the settings that would make it fit,
before any weight is loaded or any pod is scheduled (the arithmetic: :mod:`flowgrpo_core.memory_plan`)."""

from __future__ import annotations

import argparse

from flowgrpo_core.config import FlowGRPOConfig
from flowgrpo_core.memory_plan import (
    HEADROOM,
    GiB,
    MemoryEstimate,
    ModelShape,
    RunSettings,
    estimate,
    gib,
    make_fit,
)
from flowgrpo_core.train_command import add_config_arguments

PLAN_DESCRIPTION = (
    "Estimate the accelerator memory per GPU of a run (frozen weights, trainable weights, gradients, optimiser "
    "states, EMA, text encoders, VAE, and the activations of the sampling and training batches, with and without "
    "activation checkpointing) from the model's architecture, say whether it fits, and if not the first settings "
    "that would (ZeRO stage, offload, checkpointing, batch). Exit status 0: it fits; 1: it does not; 2: the "
    "request is impossible (e.g. more GPUs than sampling batches per epoch)."
)
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def add_plan_parser(sub) -> argparse.ArgumentParser:
    plan = sub.add_parser(
        "plan",
        help="estimate the GPU memory of a run per GPU and whether it fits, before it starts",
        description=PLAN_DESCRIPTION,
    )
    add_config_arguments(plan)
    plan.add_argument("--gpus", type=int, default=1, help="GPUs per node (default 1)")
    plan.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    plan.add_argument(
        "--gpu-memory", type=float, default=80.0, metavar="GIB", help="memory of one GPU in GiB (default 80)"
    )
    plan.set_defaults(func=run_plan)
    return plan


def run_settings(cfg: FlowGRPOConfig, world_size: int, gpu_memory_gib: float) -> RunSettings:
    """What the plan reads of a config, on ``world_size`` GPUs of ``gpu_memory_gib``."""
    m, s, t = cfg.model, cfg.sampling, cfg.train
    return RunSettings(
        world_size=world_size,
        gpu_memory_gib=gpu_memory_gib,
        resolution=s.resolution,
        batch_size=s.batch_size,
        images_per_epoch=s.images_per_epoch,
        guidance_scale=s.guidance_scale,
        lora=t.lora,
        beta=t.beta,
        ema=t.ema,
        stage=t.deepspeed_stage,
        offload_optimizer=t.offload_optimizer,
        offload_params=t.offload_params,
        gradient_checkpointing=t.gradient_checkpointing,
        text_encoders_on_cpu=m.text_encoders_on_cpu,
        mixed_precision=t.mixed_precision,
        weight_bytes=_BYTES[m.dtype],
        text_encoder_bytes=_BYTES[m.text_encoder_dtype or m.dtype],
        vae_bytes=_BYTES[m.vae_dtype or m.dtype],
    )


def plan_shape(cfg: FlowGRPOConfig) -> tuple[ModelShape, str]:
    from flowgrpo_core.models.sizes import model_shape

    t = cfg.train
    return model_shape(
        cfg.model.source,
        t.lora_rank if t.lora else 0,
        t.lora_target_modules,
        cfg.sampling.max_sequence_length,
        cfg.model.revision,
    )


def describe(model: ModelShape, run: RunSettings, plan: MemoryEstimate) -> list[str]:
    """The table of one estimate, GiB per GPU."""
    lines = [f"  {'per GPU (GiB)':34s} {'sampling':>9s} {'training':>9s}"]
    for name, value in plan.resident.items():
        lines.append(f"  {name:34s} {gib(value):>9s} {gib(value):>9s}")
    for name, value in plan.sampling.items():
        lines.append(f"  {name:34s} {gib(value):>9s} {'':>9s}")
    for name, value in plan.training.items():
        lines.append(f"  {name:34s} {'':>9s} {gib(value):>9s}")
    lines.append(f"  {'peak':34s} {gib(plan.sampling_peak):>9s} {gib(plan.training_peak):>9s}")
    without, with_ = plan.training_activations[False], plan.training_activations[True]
    lines.append(
        f"  training activations: {gib(without)} without activation checkpointing, {gib(with_)} with it "
        f"(train.gradient_checkpointing: {'on' if run.gradient_checkpointing else 'off'})"
    )
    return lines


def verdict(plan: MemoryEstimate) -> str:
    usable = plan.capacity / GiB
    word = "fits" if plan.fits else "does NOT fit"
    return f"{word}: peak {plan.peak / GiB:.1f} GiB of {usable:.1f} usable ({100 * (1 - HEADROOM):.0f}% of the GPU)"


def check_cluster_plan(
    preset: str, overrides: list[str], gpus: int, nodes: int, gpu_memory_gib: float
) -> str:
    """``compile``/``submit --gpu-memory``: the verdict of the plan of the job the cluster will run
    (``max(gpus, 1) x nodes`` training processes); raises ``ValueError`` naming the settings that would fit
    when it would not."""
    from flowgrpo_core.config import load_config

    cfg = load_config(preset, overrides=overrides)
    world = max(gpus, 1) * nodes
    model, _ = plan_shape(cfg)
    run = run_settings(cfg, world, gpu_memory_gib)
    plan = estimate(model, run)
    if plan.fits:
        return verdict(plan)
    fix = make_fit(model, run)
    advice = (
        f"it would with {' '.join('--set ' + c for c in fix[0])}"
        if fix is not None
        else "nothing the plan tries makes it fit"
    )
    raise ValueError(
        f"--gpu-memory: the run {verdict(plan)} on {world} GPU(s) of {gpu_memory_gib:g} GiB; {advice} "
        f"(`flowgrpo plan` shows the table)"
    )


def run_plan(args: argparse.Namespace) -> int:
    from flowgrpo_core.config import load_config

    cfg = load_config(args.preset, args.config, list(args.overrides))
    for name, value in (("--gpus", args.gpus), ("--nodes", args.nodes), ("--gpu-memory", args.gpu_memory)):
        if value <= 0:
            raise ValueError(f"{name}: must be positive, got {value:g}")
    world = args.gpus * args.nodes
    run = run_settings(cfg, world, args.gpu_memory)
    model, origin = plan_shape(cfg)
    plan = estimate(model, run)  # refuses an impossible request first
    trained = model.lora_params if run.lora else model.fully_trained_params
    print(
        f"[flowgrpo] plan for {cfg.preset}: {cfg.model.source} (architecture from {origin}) on {args.nodes} "
        f"node(s) x {args.gpus} GPU(s) of {args.gpu_memory:g} GiB"
    )
    print(
        f"  transformer {_count(model.transformer_params)} parameters ({model.blocks} blocks, width {model.width}); "
        f"trained {_count(trained)} ({'LoRA r' + str(cfg.train.lora_rank) if run.lora else 'full fine-tuning'}); "
        f"text encoders "
        f"{_count(model.text_encoder_params)}; VAE {_count(model.vae_params)}; "
        f"{model.image_tokens(run.resolution) + model.text_tokens} tokens per image at {run.resolution}px"
    )
    print(
        f"  ZeRO stage {run.stage}, offload optimizer {run.offload_optimizer}, offload weights {run.offload_params}, "
        f"batch {run.batch_size}, {cfg.train.mixed_precision} precision"
    )
    print("\n".join(describe(model, run, plan)))
    print(f"[flowgrpo] {verdict(plan)}")
    if plan.fits:
        return 0
    fix = make_fit(model, run)
    if fix is None:
        print("[flowgrpo] nothing the plan tries makes it fit: use GPUs with more memory, or more of them")
        return 1
    changes, fitted, fitted_plan = fix
    print(f"[flowgrpo] it would fit with: {' '.join('--set ' + c for c in changes)}")
    print("\n".join(describe(model, fitted, fitted_plan)))
    print(f"[flowgrpo] then: {verdict(fitted_plan)}")
    return 1


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)
