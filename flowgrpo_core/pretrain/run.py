"""A whole pre-training run: VAE, latent scale, transformer, held-out evaluations, and the saved folder."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from flowgrpo_core.pretrain.config import PretrainConfig
from flowgrpo_core.pretrain.flow_matching import (
    CaptionSampler,
    Phase,
    render_batch,
    set_latent_scale,
    train_transformer,
    train_vae,
)
from flowgrpo_core.pretrain.shapes_model import build_shapes_sd3


def shapes_accuracy(
    adapter,
    prompt_set,
    *,
    images_per_prompt: int = 1,
    min_images_per_tag: int = 0,
    num_steps: int = 20,
    guidance_scale: float = 4.5,
    seed: int = 0,
    batch_size: int = 32,
    max_sequence_length: int = 16,
) -> dict[str, float]:
    """Shapes-world GenEval accuracy of ODE samples: ``{tag: accuracy, ..., "overall": mean over tags,
    "overall_se": its standard error}``, strict rules, judged by the shapes detector. Resolution: the VAE's
    ``sample_size``."""
    from flowgrpo_core.evaluation.compare import geneval_accuracy
    from flowgrpo_core.rewards.geneval import ShapesGenEvalReward

    report = geneval_accuracy(
        adapter,
        prompt_set,
        ShapesGenEvalReward(score="strict"),
        resolution=adapter.pipeline.vae.config.sample_size,
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        batch_size=batch_size,
        seed=seed,
        images_per_prompt=images_per_prompt,
        min_images_per_tag=min_images_per_tag,
        max_sequence_length=max_sequence_length,
    )
    return {**report.per_tag, "overall": report.overall, "overall_se": report.standard_error}


@torch.no_grad()
def reconstruction_accuracy(vae, metadata: Sequence[dict], size: int, seed: int = 0) -> float:
    """Share of rendered scenes whose VAE reconstruction (posterior mean) the detector still judges correct:
    the ceiling the generator can reach through this VAE."""
    from flowgrpo_core.rewards.geneval import ShapesGenEvalReward
    from flowgrpo_core.sampling import to_pil

    images = render_batch(metadata, size, np.random.default_rng(seed)).to(next(vae.parameters()).device)
    recon = vae.decode(vae.encode(images).latent_dist.mode()).sample
    pil = to_pil((recon / 2 + 0.5).clamp(0, 1))
    return float(
        np.mean(
            ShapesGenEvalReward(score="strict")(pil, [m["prompt"] for m in metadata], list(metadata)).scores
        )
    )


@dataclass
class PretrainResult:
    out: Path
    vae_losses: list[float]
    losses: list[float]
    evaluations: list[dict[str, Any]]  # {"step", "seconds", <tag>: accuracy, "overall", "overall_se"}
    reconstruction_accuracy: float
    seconds: float


def pretrain_shapes(cfg: PretrainConfig, out: str | Path, progress: bool = True) -> PretrainResult:
    """Pre-train the shapes-world SD3 and save it as a diffusers folder (safetensors) in ``out``, with
    ``pretrain.json`` (config, losses every 50 steps, evaluations)."""
    from flowgrpo_core.models import adapter_for
    from flowgrpo_core.prompts import load_prompts

    torch.set_num_threads(cfg.threads)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"pretrain-shapes: device {cfg.device} requested but torch {torch.__version__} sees no CUDA GPU"
        )
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # no effect on a CPU
    start = time.monotonic()
    out = Path(out)
    eval_set = load_prompts(cfg.eval_prompts) if cfg.eval_prompts else None  # bad names fail before training
    held_out = load_prompts(cfg.held_out).metadata if cfg.held_out else []
    sampler = CaptionSampler(cfg.tag_weights, held_out)
    pipe = build_shapes_sd3(cfg.model, seed=cfg.seed).to(
        cfg.device
    )  # built on the CPU: the same weights anywhere
    deadline = start + 60 * cfg.minutes if cfg.minutes else None
    vae_deadline = start + 60 * cfg.minutes * cfg.vae_share if cfg.minutes else None

    if cfg.init_from:
        load_trained_parts(pipe, cfg.init_from)
        vae_losses = []
    elif cfg.vae_from:
        pipe.vae, vae_losses = load_trained_vae(cfg.vae_from, pipe.vae.config), []
    else:
        vae_losses = train_vae(
            pipe.vae, sampler, cfg, Phase(cfg.vae_steps, vae_deadline), *_streams(cfg.seed), progress
        )
        set_latent_scale(pipe.vae, sampler, cfg.model.resolution, np.random.default_rng(cfg.seed + 1))
    pipe.to(cfg.device)  # a loaded VAE arrives on the CPU
    recon = reconstruction_accuracy(
        pipe.vae, sampler(np.random.default_rng(cfg.seed + 2), 200), cfg.model.resolution
    )
    tqdm.write(f"[pretrain-shapes] VAE: {len(vae_losses)} steps, reconstructions judged correct: {recon:.1%}")

    adapter = adapter_for(pipe)
    evaluations: list[dict[str, Any]] = []

    def evaluate(step: int) -> None:
        if eval_set is None:
            return
        acc = shapes_accuracy(
            adapter,
            eval_set,
            images_per_prompt=cfg.eval_images_per_prompt,
            min_images_per_tag=cfg.eval_min_images_per_tag,
            num_steps=cfg.eval_steps,
            guidance_scale=cfg.guidance_scale,
            max_sequence_length=cfg.model.max_text_tokens,
        )
        evaluations.append({"step": step, "seconds": round(time.monotonic() - start, 1), **acc})
        tqdm.write(
            f"[pretrain-shapes] step {step}: {cfg.eval_prompts} "
            + "  ".join(f"{k} {v:.2f}" for k, v in acc.items())
        )

    def checkpoint_and_evaluate(step: int) -> None:
        # a checkpoint (EMA weights) at every periodic evaluation: a stopped run loses little
        pipe.save_pretrained(out / f"step-{step}", safe_serialization=True)
        evaluate(step)

    losses = train_transformer(
        pipe, sampler, cfg, Phase(cfg.steps, deadline), *_streams(cfg.seed), checkpoint_and_evaluate, progress
    )
    evaluate(len(losses))
    seconds = time.monotonic() - start
    out.mkdir(parents=True, exist_ok=True)
    # float16 halves the folder; the model is loaded back in float32 for sampling and training
    pipe.to(dtype=getattr(torch, cfg.save_dtype)).save_pretrained(out, safe_serialization=True)
    record = {
        "config": asdict(cfg),
        "vae_steps_done": len(vae_losses),
        "steps_done": len(losses),
        "seconds": round(seconds, 1),
        "reconstruction_accuracy": recon,
        "evaluations": evaluations,
        "vae_loss_every_50": vae_losses[::50],
        "loss_every_50": losses[::50],
        "torch": torch.__version__,
    }
    source = cfg.init_from or cfg.vae_from
    if source and (Path(source) / "pretrain.json").is_file():  # the whole chain of runs stays in one record
        record["started_from"] = json.loads((Path(source) / "pretrain.json").read_text())
    (out / "pretrain.json").write_text(json.dumps(record, indent=1))
    tqdm.write(f"[pretrain-shapes] saved {out} after {seconds / 60:.1f} min")
    return PretrainResult(out, vae_losses, losses, evaluations, recon, seconds)


def load_trained_vae(folder: str | Path, expected) -> Any:
    """The VAE saved by an earlier run (its pipeline folder or the ``vae/`` inside), checked against the sizes
    this run builds (``expected``: the fresh VAE's config)."""
    from diffusers import AutoencoderKL

    folder = Path(folder)
    folder = folder / "vae" if (folder / "vae" / "config.json").is_file() else folder
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"vae_from: {folder} has no config.json (expected a pipeline folder or its vae/ folder)"
        )
    vae = AutoencoderKL.from_pretrained(folder)
    for key in ("block_out_channels", "latent_channels", "sample_size", "layers_per_block"):
        if list(np.atleast_1d(vae.config[key])) != list(np.atleast_1d(expected[key])):
            raise ValueError(
                f"vae_from: {folder} has {key}={vae.config[key]}, this model needs {expected[key]}"
            )
    return vae.eval().requires_grad_(False)


def load_trained_parts(pipe, folder: str | Path) -> None:
    """Load the VAE, text encoders and transformer of a saved shapes-world pipeline into ``pipe`` (same sizes)."""
    from diffusers import StableDiffusion3Pipeline

    if not (Path(folder) / "model_index.json").is_file():
        raise FileNotFoundError(f"init_from: {folder} is not a saved pipeline (no model_index.json)")
    saved = StableDiffusion3Pipeline.from_pretrained(folder)
    pipe.vae = load_trained_vae(folder, pipe.vae.config)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer"):
        try:
            getattr(pipe, name).load_state_dict(getattr(saved, name).state_dict())
        except RuntimeError as error:
            raise ValueError(f"init_from: {folder}/{name} does not fit this model's sizes: {error}") from None


def _streams(seed: int) -> tuple[np.random.Generator, torch.Generator]:
    """Fresh data and noise generators for a phase: the transformer phase does not depend on how many
    steps the VAE phase took (a ``--minutes`` budget)."""
    return np.random.default_rng(seed), torch.Generator().manual_seed(seed)
