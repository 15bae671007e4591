"""Base vs policy on held-out prompts (docs/algorithm.md sect. 8): deterministic ODE sampling with the same
seeds for both, so every difference comes from the weights; paired statistics per metric and per task.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from flowgrpo_core.evaluation.geneval import GenEvalReport, summarize_verdicts
from flowgrpo_core.models.base import FlowAdapter
from flowgrpo_core.prompts import PromptSet
from flowgrpo_core.sampling import SamplingSpec, rollout, to_pil
from flowgrpo_core.sde import SDEType


class Metric(Protocol):
    """What a comparison scores images with: any reward (``rewards.Reward``); evaluation sits below the
    rewards, so it names only what it calls."""

    name: str

    def __call__(self, images: Sequence[Any], prompts: Sequence[str], metadata: Sequence[dict]) -> Any:
        """An output with ``scores`` (B,) and ``details`` ({key: B values})."""


@dataclass
class Comparison:
    metrics: dict[str, float]
    table: str  # Markdown
    grids: dict[str, object] = field(default_factory=dict)  # task -> PIL image (base row above policy row)
    rows: list[dict] = field(default_factory=list)  # per image: prompt, tag, seed, base/policy scores
    summaries: dict[str, str] = field(default_factory=dict)  # e.g. GenEval's text summary per metric and side


@torch.no_grad()
def generate(
    adapter: FlowAdapter,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    resolution: int,
    num_steps: int,
    guidance_scale: float,
    batch_size: int,
    negative_prompt: str = "",
    max_sequence_length: int = 256,
    sde_type: SDEType = "sde",
) -> list:
    """Noise-free samples, one seeded generator per image: Euler ODE steps, or for ``sde_type='cps'`` the CPS
    step at noise level 0 as the reference evaluates its CPS runs (the same up to rounding). Returns PIL images."""
    spec = SamplingSpec(
        resolution, num_steps, guidance_scale, 0.0, sde_type, negative_prompt, max_sequence_length
    )
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        seeds_chunk = list(seeds[start : start + batch_size])
        out = rollout(adapter, chunk, seeds_chunk, spec, torch.zeros(len(chunk), num_steps, dtype=torch.bool))
        images += to_pil(out.images)
    return images


def images_per_prompt_plan(
    tags: Sequence[str], images_per_prompt: int, min_images_per_tag: int = 0
) -> list[int]:
    """Images to draw for each prompt: ``images_per_prompt``, raised for the prompts of a task with few
    prompts so that every task gets at least ``min_images_per_tag`` images. The overall accuracy is a mean
    over tasks, so a task with one prompt would otherwise weigh as much as fifty prompts on a few images."""
    counts = Counter(tags)
    return [max(images_per_prompt, -(-min_images_per_tag // counts[tag])) for tag in tags]


def expand_prompts(
    prompt_set: PromptSet, images_per_prompt: int, min_images_per_tag: int
) -> tuple[list[str], list[dict]]:
    """Prompts and metadata repeated as :func:`images_per_prompt_plan` says, prompt by prompt."""
    tags = [str(m.get("tag", "all")) for m in prompt_set.metadata]
    plan = images_per_prompt_plan(tags, images_per_prompt, min_images_per_tag)
    prompts = [p for p, n in zip(prompt_set.prompts, plan) for _ in range(n)]
    metadata = [m for m, n in zip(prompt_set.metadata, plan) for _ in range(n)]
    return prompts, metadata


def geneval_accuracy(
    adapter: FlowAdapter,
    prompt_set: PromptSet,
    reward: Metric,
    *,
    resolution: int,
    num_steps: int,
    guidance_scale: float,
    batch_size: int,
    seed: int = 0,
    images_per_prompt: int = 1,
    min_images_per_tag: int = 0,
    max_sequence_length: int = 256,
) -> GenEvalReport:
    """GenEval accuracy of one model's ODE samples, per task and overall (the mean over tasks), from the
    per-image verdicts (``details["correct"]``) of a GenEval-type ``reward``. Seeds and images per prompt as
    in :func:`compare`."""
    prompts, metadata = expand_prompts(prompt_set, images_per_prompt, min_images_per_tag)
    images = generate(
        adapter,
        prompts,
        [seed + i for i in range(len(prompts))],
        resolution=resolution,
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        batch_size=batch_size,
        max_sequence_length=max_sequence_length,
    )
    reports = _verdict_reports(
        reward(images, prompts, metadata).details, [m["tag"] for m in metadata], prompts
    )
    if "correct" not in reports:
        raise ValueError(
            f"reward {reward.name!r} gives no per-image verdicts (details['correct']): not a GenEval reward"
        )
    return reports["correct"]


def compare(
    adapter: FlowAdapter,
    prompt_set: PromptSet,
    metrics: Mapping[str, Metric],
    *,
    resolution: int,
    num_steps: int,
    guidance_scale: float,
    batch_size: int,
    seed: int = 0,
    images_per_prompt: int = 1,
    min_images_per_tag: int = 0,
    negative_prompt: str = "",
    max_sequence_length: int = 256,
    sde_type: SDEType = "sde",
    grid_columns: int = 8,
) -> Comparison:
    """Score base (``adapter.reference_model()``) and policy images of the same prompts and seeds.

    Metric keys (:func:`side_metrics` for each side): ``eval/base/<m>_mean``, ``eval/policy/<m>_mean`` with
    their standard errors ``..._mean_se``, ``eval/delta/<m>`` (policy - base),
    ``eval/win_rate/<m>`` (share of images where the policy scores higher), and per task tag (metadata
    ``tag``) ``eval/base/<m>/<tag>`` and ``eval/policy/<m>/<tag>``. A metric that reports per-image verdicts
    (``details["correct"]``, as GenEval does) also gets its accuracy the way the benchmark reports it:
    ``eval/<side>/<m>/accuracy/<tag>``, ``eval/<side>/<m>/accuracy/overall`` (the mean over tasks) and its
    binomial standard error ``eval/<side>/<m>/accuracy/overall_se``.
    Each prompt gets ``images_per_prompt`` images, more in tasks with few prompts (``min_images_per_tag``);
    image ``i`` of the expanded list has seed ``seed + i``.
    """
    from flowgrpo_core.tracking import image_grid

    prompts, metadata = expand_prompts(prompt_set, images_per_prompt, min_images_per_tag)
    seeds = [seed + i for i in range(len(prompts))]
    kwargs = dict(
        resolution=resolution,
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        batch_size=batch_size,
        negative_prompt=negative_prompt,
        max_sequence_length=max_sequence_length,
        sde_type=sde_type,
    )
    policy_images = generate(adapter, prompts, seeds, **kwargs)
    with adapter.reference_model():
        base_images = generate(adapter, prompts, seeds, **kwargs)

    tags = [str(m.get("tag", "all")) for m in metadata]
    groups = {"all": np.arange(len(prompts))} | _by_tag(tags)
    out: dict[str, float] = {}
    rows = [{"prompt": p, "tag": t, "seed": s} for p, t, s in zip(prompts, tags, seeds)]
    table = ["| metric | task | base | policy | delta | win rate |", "|---|---|---|---|---|---|"]
    summaries: dict[str, str] = {}
    for name, reward in metrics.items():
        base_out, policy_out = (
            reward(base_images, prompts, metadata),
            reward(policy_images, prompts, metadata),
        )
        base, policy = base_out.scores, policy_out.scores
        for side, result in (("base", base_out), ("policy", policy_out)):
            side_out, side_summaries = side_metrics(
                name, result.scores, result.details, tags, prompts, f"eval/{side}"
            )
            out |= side_out
            summaries |= {f"{label}_{side}": text for label, text in side_summaries.items()}
        for row, b, p in zip(rows, base, policy):
            row[f"base/{name}"], row[f"policy/{name}"] = float(b), float(p)
        out[f"eval/delta/{name}"] = float(np.mean(policy - base))
        out[f"eval/win_rate/{name}"] = float(np.mean(policy > base))
        for tag, idx in groups.items():
            b, p = base[idx], policy[idx]
            table.append(
                f"| {name} | {tag} | {np.mean(b):.4f} | {np.mean(p):.4f} | {np.mean(p - b):+.4f} | {np.mean(p > b):.0%} |"
            )
    grids = {
        tag: image_grid(
            [[base_images[i] for i in idx[:grid_columns]], [policy_images[i] for i in idx[:grid_columns]]],
            ["base", "policy"],
        )
        for tag, idx in groups.items()
    }
    for key in sorted(
        k for k in out if "/accuracy/" in k and k.startswith("eval/policy/") and not k.endswith("_se")
    ):
        base_key = key.replace("eval/policy/", "eval/base/", 1)
        table.append(
            f"| {key.removeprefix('eval/policy/')} | | {out[base_key]:.4f} | {out[key]:.4f} | {out[key] - out[base_key]:+.4f} | |"
        )
    return Comparison(metrics=out, table="\n".join(table) + "\n", grids=grids, rows=rows, summaries=summaries)


def side_metrics(
    name: str,
    scores: np.ndarray,
    details: Mapping[str, list],
    tags: Sequence[str],
    prompts: Sequence[str],
    prefix: str,
) -> tuple[dict[str, float], dict[str, str]]:
    """One model's images scored by one metric, as metrics under ``prefix`` (``eval/policy`` in the evaluate
    stage, ``heldout`` during training): ``<name>_mean`` and its standard error ``<name>_mean_se``, the mean
    per task tag ``<name>/<tag>``, and for per-image verdicts (``details["correct"]``, as GenEval gives) the
    accuracy ``<label>/accuracy/<tag>``, ``.../overall`` (the mean over tasks) and ``.../overall_se``. Also
    GenEval's text summary per verdict label.

    Args:
        scores: (N,) the metric's scores; details: its per-image details (N values each); tags, prompts: N.
    """
    scores = np.asarray(scores, dtype=np.float64)
    out = {
        f"{prefix}/{name}_mean": float(np.mean(scores)),
        f"{prefix}/{name}_mean_se": mean_standard_error(scores),
    }
    for tag, idx in _by_tag(tags).items():
        out[f"{prefix}/{name}/{tag}"] = float(np.mean(scores[idx]))
    summaries = {}
    for key, report in _verdict_reports(details, tags, prompts).items():
        label = name if key == "correct" else f"{name}/{key.removesuffix('/correct')}"
        out |= report.metrics(prefix=f"{prefix}/{label}/accuracy")
        summaries[label] = report.to_text()
    return out, summaries


def mean_standard_error(values: np.ndarray) -> float:
    """The standard error of the mean of (N,) ``values``, ``std / sqrt(N)`` with the unbiased std; nan for N < 2."""
    if len(values) < 2:
        return float("nan")
    return float(np.std(values, ddof=1) / np.sqrt(len(values)))


def _verdict_reports(details: Mapping[str, list], tags: Sequence[str], prompts: Sequence[str]) -> dict:
    """GenEval-style reports for every ``correct`` / ``<component>/correct`` verdict list in ``details``."""
    found = {}
    for key, values in details.items():
        if key == "correct" or key.endswith("/correct"):
            tag_key = key[: -len("correct")] + "tag"
            verdict_tags = [str(t) for t in details.get(tag_key, tags)]
            found[key] = summarize_verdicts(
                verdict_tags, [bool(v) for v in values], [f"{t}\n{p}" for t, p in zip(verdict_tags, prompts)]
            )
    return found


def _by_tag(tags: Sequence[str]) -> dict[str, np.ndarray]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, tag in enumerate(tags):
        groups[tag].append(i)
    if set(groups) == {"all"}:
        return {}
    return {t: np.array(v) for t, v in sorted(groups.items())}
