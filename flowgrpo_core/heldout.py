"""A policy judged on held-out prompts as the ``evaluate`` stage judges it (docs/algorithm.md sect. 8): ODE
sampling with ``eval.*`` settings, image ``i`` seeded ``eval.seed + i``, every metric through
:func:`flowgrpo_core.evaluation.compare.side_metrics`. During training (``eval.every_epochs``) the images are
shared over the ranks and the scores gathered, so every rank holds the same record.

A record holds, under ``heldout/``, the proxy (the training reward, named ``reward``) and every gold metric
(``eval.metrics``): ``<m>_mean`` and ``<m>_mean_se``, and for GenEval-type metrics
``<m>/accuracy/overall`` and ``.../overall_se``; :func:`headline` picks the number a metric is judged by.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flowgrpo_core.config import FlowGRPOConfig
from flowgrpo_core.distributed import DistributedContext, shard
from flowgrpo_core.evaluation.compare import Metric, expand_prompts, generate, side_metrics
from flowgrpo_core.models import FlowAdapter
from flowgrpo_core.prompts import PromptSet, load_prompts

PREFIX = "heldout"
PROXY = "reward"  # the training reward on held-out prompts, named as the evaluate stage names it


def sampling_settings(config: FlowGRPOConfig) -> dict[str, Any]:
    """How the evaluate stage and the evaluations during training sample: noise-free, ``eval.num_steps``
    steps at ``eval.guidance_scale``, the training resolution, negative prompt and text length."""
    e, s = config.eval, config.sampling
    return dict(
        resolution=s.resolution,
        num_steps=e.num_steps,
        guidance_scale=e.guidance_scale,
        batch_size=e.batch_size,
        negative_prompt=s.negative_prompt,
        max_sequence_length=s.max_sequence_length,
        sde_type=s.sde_type,
    )


def evaluation_prompts(config: FlowGRPOConfig, count: int) -> PromptSet:
    """The first ``count`` prompts of ``prompts.eval`` (all of them when it holds fewer)."""
    prompts = load_prompts(config.prompts.eval)
    return prompts.take(list(range(min(count, len(prompts)))))


def headline(record: Mapping[str, float], name: str, prefix: str = PREFIX) -> tuple[float, float]:
    """``(value, standard error)`` a metric is judged by: its accuracy over tasks when it gives per-image
    verdicts (GenEval), else its mean."""
    accuracy = f"{prefix}/{name}/accuracy/overall"
    if accuracy in record:
        return record[accuracy], record.get(accuracy + "_se", float("nan"))
    return record[f"{prefix}/{name}_mean"], record.get(f"{prefix}/{name}_mean_se", float("nan"))


def series(records: Sequence[Mapping[str, float]], name: str) -> list[tuple[float, float]]:
    """:func:`headline` of ``name`` in every record."""
    return [headline(r, name) for r in records]


class HeldOutEvaluator:
    """Scores a policy on the first ``eval.during_training_prompts`` prompts of ``prompts.eval``.

    Args:
        metrics: ``{"reward": the training reward, <gold name>: metric, ...}``, each called on every rank's
            own images.
    """

    def __init__(
        self, config: FlowGRPOConfig, metrics: Mapping[str, Metric], dist: DistributedContext | None = None
    ) -> None:
        e = config.eval
        prompt_set = evaluation_prompts(config, e.during_training_prompts or e.num_prompts)
        self.prompts, self.metadata = expand_prompts(prompt_set, e.images_per_prompt, e.min_images_per_tag)
        self.seeds = [e.seed + i for i in range(len(self.prompts))]
        self.tags = [str(m.get("tag", "all")) for m in self.metadata]
        self.metrics = dict(metrics)
        self.settings = sampling_settings(config)
        self.dist = dist or DistributedContext()

    def __call__(self, adapter: FlowAdapter) -> dict[str, float]:
        """The record of the weights ``adapter`` holds now (the same on every rank)."""
        mine = shard(len(self.prompts), self.dist.rank, self.dist.world_size)
        prompts, metadata = self.prompts[mine], self.metadata[mine]
        local = None
        if prompts:
            images = generate(adapter, prompts, self.seeds[mine], **self.settings)
            local = {}
            for name, metric in self.metrics.items():
                out = metric(images, prompts, metadata)
                local[name] = (np.asarray(out.scores, dtype=np.float64), dict(out.details))
        parts = [part for part in self.dist.all_gather_objects(local) if part is not None]
        record: dict[str, float] = {}
        for name in self.metrics:
            scores = np.concatenate([part[name][0] for part in parts])
            # a detail every rank reported (verdicts, tags), joined in rank order like the scores
            keys = [k for k in parts[0][name][1] if all(k in part[name][1] for part in parts)]
            details = {key: [v for part in parts for v in part[name][1][key]] for key in keys}
            record |= side_metrics(name, scores, details, self.tags, self.prompts, PREFIX)[0]
        return record
