"""The reward-hacking monitor (docs/algorithm.md sect. 8): the proxy (the training reward on held-out prompts)
rose while a gold metric fell, by more than the evaluation's noise.

Over a window of ``w`` evaluations, from evaluation ``a = n - w`` to the latest ``n``, an alarm for gold
metric ``g`` when

    proxy_n > proxy_a    and    g_a - g_n > k * sqrt(se(g_a)^2 + se(g_n)^2)

(the standard error of the difference of two independent estimates). A fall within ``k`` standard errors is
what re-evaluating the same policy can give; a proxy that falls too is a policy getting worse, not one
exploiting its reward. Pure arithmetic on numbers: the trainer's watch (``watch.py``) feeds it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

Estimate = tuple[float, float]  # (value, standard error)


@dataclass(frozen=True)
class Alarm:
    """Gold metric ``metric`` fell while the proxy rose, from the evaluation after ``since`` epochs to the
    one after ``epoch`` epochs."""

    metric: str
    since: int
    epoch: int
    proxy_rise: float
    gold_fall: float
    standard_errors: float  # gold_fall over the standard error of the difference

    def describe(self) -> str:
        return (
            f"reward hacking? from epoch {self.since} to {self.epoch} the proxy rose by {self.proxy_rise:.4g} "
            f"while {self.metric} fell by {self.gold_fall:.4g} ({self.standard_errors:.1f} standard errors)"
        )

    def to_dict(self) -> dict:
        return asdict(self)


def hacking_alarms(
    epochs: Sequence[int],
    proxy: Sequence[Estimate],
    gold: Mapping[str, Sequence[Estimate]],
    window: int,
    standard_errors: float,
) -> list[Alarm]:
    """The alarms raised at the latest evaluation.

    Args:
        epochs: (n,) epochs trained at each evaluation, in order.
        proxy: (n,) the proxy's ``(value, standard error)`` at each evaluation.
        gold: ``{metric: (n,) (value, standard error)}``.
        window: ``w``, how many evaluations back the latest one is compared with; no alarm before ``w + 1``
            evaluations.
        standard_errors: ``k``.
    Returns:
        One alarm per gold metric that fell, in ``gold``'s order; empty when the proxy did not rise. A nan
        anywhere compares false: no alarm.
    """
    if len(proxy) <= window:
        return []
    a, n = len(proxy) - 1 - window, len(proxy) - 1
    rise = proxy[n][0] - proxy[a][0]
    if not rise > 0:
        return []
    alarms = []
    for name, values in gold.items():
        (before, se_before), (after, se_after) = values[a], values[n]
        fall, noise = before - after, math.hypot(se_before, se_after)
        if fall > standard_errors * noise:
            z = fall / noise if noise > 0 else math.inf
            alarms.append(Alarm(name, int(epochs[a]), int(epochs[n]), rise, fall, z))
    return alarms
