"""Proxy vs gold during training (README "Proxy vs gold"): the trainer's own evaluation hook.

Every ``eval.every_epochs`` epochs, and once before the first, the policy (its EMA weights when EMA is on) is
judged on held-out prompts (:class:`flowgrpo_core.heldout.HeldOutEvaluator`): the training reward (the proxy)
and every ``eval.metrics`` metric (gold). The reward-hacking monitor (:mod:`flowgrpo_core.monitoring`) reads
the records; an alarm is logged, and with ``train.stop_on_hacking`` it ends the run. The policy exported at
the end is the final one, or the evaluated one ``train.keep_best`` names, or after an alarm the last one
evaluated before it; the weights of those candidates are kept on disk (``<run>/kept/``) until the export.

An evaluation leaves training as it found it: it draws no number from the epoch's generator, restores every
global RNG stream afterwards, and swaps the EMA weights back out, so a run ends with the same weights with or
without evaluations (tested).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from flowgrpo_core.checkpoint import rng_state, set_rng_state
from flowgrpo_core.config import FlowGRPOConfig
from flowgrpo_core.distributed import DistributedContext
from flowgrpo_core.evaluation.compare import Metric
from flowgrpo_core.heldout import PROXY, HeldOutEvaluator, headline, series
from flowgrpo_core.monitoring import hacking_alarms
from flowgrpo_core.policy import HELDOUT_FILE, PROXY_GOLD_PLOT

if TYPE_CHECKING:
    from flowgrpo_core.ema import EMA

log = logging.getLogger(__name__)


def best_epoch(records: list[dict[str, float]], metric: str) -> int | None:
    """Epochs trained at the record where ``metric``'s :func:`~flowgrpo_core.heldout.headline` value is
    highest (the earliest of equals); None when there is no finite value."""
    scored = [(headline(r, metric)[0], -r["epoch"]) for r in records]
    finite = [(v, e) for v, e in scored if v == v and abs(v) != float("inf")]
    return int(-max(finite)[1]) if finite else None


class ProxyGoldWatch:
    """Owned by the trainer; inert when ``eval.every_epochs`` is 0.

    Args:
        proxy: the training reward.
        gold: ``{name: metric}`` for ``eval.metrics``, built as the evaluate stage builds them (a reward
            server's client when one runs); a name missing here is computed in-process.
        folder: the run's folder; candidate weights go to ``folder/kept``.
    """

    def __init__(
        self,
        config: FlowGRPOConfig,
        proxy: Metric,
        gold: Mapping[str, Metric] | None,
        dist: DistributedContext,
        folder: Path,
        say=print,
    ) -> None:
        self.config, self.dist, self.say = config, dist, say
        self.every = config.eval.every_epochs
        self.gold_names = list(config.eval.metrics)
        self._metrics = {PROXY: proxy, **(gold or {})}
        # judges the policy (adapter -> record); built at the first evaluation, so that gold metrics load
        # (detectors, CLIP) only when one is due
        self.evaluator: Callable[[Any], dict[str, float]] | None = None
        self.kept_dir = Path(folder) / "kept"
        self.records: list[dict[str, float]] = []
        self.alarms: list[dict[str, Any]] = []
        self.best: int | None = None  # epoch of train.keep_best's best record
        self.last_good: int | None = None  # the latest evaluation without an alarm
        self.stopped_at: int | None = None

    # ---- during training ----

    def due(self, epochs_trained: int) -> bool:
        done = any(int(r["epoch"]) == epochs_trained for r in self.records)
        return bool(self.every) and epochs_trained % self.every == 0 and not done and self.stopped_at is None

    def evaluate(self, trainer) -> dict[str, float]:
        """Judge the trainer's policy after ``trainer.epoch`` epochs; update the monitor and the candidates."""
        started = time.perf_counter()
        streams = rng_state()  # evaluation must not move the global streams training draws from
        try:
            with trainer.evaluation_weights():
                record = (self.evaluator or self._build_evaluator())(trainer.adapter)
        finally:
            set_rng_state(streams)
        epoch = trainer.epoch
        record = {"epoch": float(epoch), **record, "time/eval_s": time.perf_counter() - started}
        self.records.append(record)
        alarms = self._alarms()
        record["monitor/hacking"] = float(bool(alarms))
        self.say(self.describe(record))
        for alarm in alarms:
            if self.dist.is_main:  # every rank reaches the same verdict; one says it
                log.warning("[flowgrpo] WARNING %s", alarm.describe())
            self.alarms.append(alarm.to_dict())
        t = self.config.train
        if alarms and t.stop_on_hacking:
            self.stopped_at = epoch
            self.say(
                f"[flowgrpo] stopping (train.stop_on_hacking); the last good policy is epoch {self.last_good}"
            )
        elif not alarms:
            self.last_good = epoch
        if t.keep_best is not None and self.stopped_at is None:
            self.best = best_epoch(self.records, t.keep_best)
        if epoch in self._candidates():
            self._keep(epoch, trainer.backend.snapshot(trainer.trainable), trainer.ema)  # every rank
        return record

    def _candidates(self) -> set[int]:
        """Epochs whose weights the export may still need: keep-best's best, and with stop-on-hacking the
        last good one."""
        t = self.config.train
        wanted = {self.best} if t.keep_best is not None else set()
        wanted |= {self.last_good} if t.stop_on_hacking else set()
        return wanted - {None}

    def _build_evaluator(self) -> HeldOutEvaluator:
        from flowgrpo_core.rewards import build_reward

        missing = {m: build_reward(m) for m in self.gold_names if m not in self._metrics}
        self.evaluator = HeldOutEvaluator(self.config, {**self._metrics, **missing}, self.dist)
        return self.evaluator

    def _alarms(self):
        e = self.config.eval
        return hacking_alarms(
            [int(r["epoch"]) for r in self.records],
            series(self.records, PROXY),
            {m: series(self.records, m) for m in self.gold_names},
            e.hacking_window,
            e.hacking_standard_errors,
        )

    def describe(self, record: dict[str, float]) -> str:
        parts = [f"{PROXY} (proxy) {_estimate(record, PROXY)}"] + [
            f"{m} {_estimate(record, m)}" for m in self.gold_names
        ]
        return (
            f"[flowgrpo] held-out after {int(record['epoch'])} epochs: {' | '.join(parts)}  "
            f"{record['time/eval_s']:.1f}s"
        )

    # ---- the candidates' weights ----

    def _path(self, epoch: int) -> Path:
        return self.kept_dir / f"epoch-{epoch:06d}.safetensors"

    def _keep(self, epoch: int, trainable: Mapping[str, torch.Tensor], ema: EMA | None) -> None:
        """Write the weights of epoch ``epoch`` (rank 0; every rank holds the same), whole or not at all."""
        if not self.dist.is_main:
            return
        from safetensors.torch import save_file

        tensors = {f"policy/{n}": p.detach().cpu().clone().contiguous() for n, p in trainable.items()}
        if ema is not None:
            tensors |= {f"ema/{n}": v.detach().cpu().clone().contiguous() for n, v in ema.shadow.items()}
        self.kept_dir.mkdir(parents=True, exist_ok=True)
        partial = self._path(epoch).with_suffix(".partial")
        save_file(tensors, str(partial))
        os.replace(partial, self._path(epoch))

    def prune(self) -> None:
        """Delete the kept weights no candidate needs any more. Called after a checkpoint is written, so the
        newest checkpoint's candidates always remain on disk."""
        if not self.dist.is_main or not self.kept_dir.is_dir():
            return
        wanted = {self._path(e).name for e in self._candidates()}
        for path in self.kept_dir.iterdir():
            if path.name not in wanted:
                path.unlink()

    def exported_epoch(self) -> int | None:
        """The evaluated epoch whose weights are exported instead of the final ones, or None."""
        if self.config.train.keep_best is not None:
            return self.best
        return self.last_good if self.stopped_at is not None else None

    @contextlib.contextmanager
    @torch.no_grad()
    def exported_weights(self, trainable: Mapping[str, torch.Tensor], ema: EMA | None) -> Iterator[None]:
        """The exported epoch's weights (and EMA) swapped in for the export, then the current ones back."""
        epoch = self.exported_epoch()
        if epoch is None:
            yield
            return
        from safetensors.torch import load_file

        kept = load_file(str(self._path(epoch)))
        backup = {n: p.detach().clone() for n, p in trainable.items()}
        shadow = ema.shadow if ema is not None else None
        for n, p in trainable.items():
            p.copy_(kept[f"policy/{n}"])
        if ema is not None:
            ema.shadow = {n: kept[f"ema/{n}"].to(v.device) for n, v in shadow.items()}
        try:
            yield
        finally:
            for n, p in trainable.items():
                p.copy_(backup[n])
            if ema is not None:
                ema.shadow = shadow

    # ---- the record of the run ----

    def summary(self, final_epoch: int) -> dict[str, Any]:
        exported = self.exported_epoch()
        reason = "the last epoch"
        if exported is not None and self.config.train.keep_best is not None:
            reason = f"train.keep_best: the best {self.config.train.keep_best}"
        elif exported is not None:
            reason = "train.stop_on_hacking: the last evaluation before the alarm"
        return {
            "proxy": PROXY,
            "gold": self.gold_names,
            "keep_best": self.config.train.keep_best,
            "final_epoch": final_epoch,
            "exported_epoch": final_epoch if exported is None else exported,
            "exported_because": reason,
            "best_epoch": self.best,
            "last_good_epoch": self.last_good,
            "stopped_at": self.stopped_at,
            "alarms": self.alarms,
            "records": self.records,
        }

    def write(self, directory: Path, final_epoch: int) -> None:
        """``heldout.json`` (:meth:`summary`) and the proxy-vs-gold plot into the policy folder."""
        if not self.records:
            return
        from flowgrpo_core.tracking import proxy_gold_curve

        summary = self.summary(final_epoch)
        (directory / HELDOUT_FILE).write_text(json.dumps(summary, indent=1))
        proxy_gold_curve(
            [int(r["epoch"]) for r in self.records],
            {f"{PROXY} (proxy)": series(self.records, PROXY)},
            {m: series(self.records, m) for m in self.gold_names},
            directory / PROXY_GOLD_PLOT,
            alarm_epochs=sorted({a["epoch"] for a in self.alarms}),
            exported_epoch=summary["exported_epoch"],
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "alarms": self.alarms,
            "best": self.best,
            "last_good": self.last_good,
            "stopped_at": self.stopped_at,
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        self.records = [dict(r) for r in state.get("records", [])]
        self.alarms = [dict(a) for a in state.get("alarms", [])]
        self.best, self.last_good = state.get("best"), state.get("last_good")
        self.stopped_at = state.get("stopped_at")
        for epoch in self._candidates():
            if not self._path(epoch).is_file():
                raise FileNotFoundError(
                    f"the weights kept from epoch {epoch} ({self._path(epoch)}) are missing: the checkpoint "
                    "resumed from needs them for the policy it will export"
                )


def _estimate(record: dict[str, float], name: str) -> str:
    value, se = headline(record, name)
    return f"{value:.4f} ± {se:.4f}"
