"""What every stage shares: the run's identity, its config, its work folder and its MLflow stage run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from flowgrpo_core.config import FlowGRPOConfig, load_config
from flowgrpo_core.tracking import DEFAULT_TRACKING_URI, stage_run


@dataclass
class PipelineContext:
    """The pipeline parameters every stage receives."""

    preset: str = "tiny"
    overrides: list[str] = field(default_factory=list)
    kfp_run_id: str = "local"
    tracking_uri: str = DEFAULT_TRACKING_URI
    experiment: str = ""  # default: the preset name
    # shared folder for checkpoints and reward-server pid files, keyed by run id (a PVC on a cluster)
    workdir: str = "flowgrpo-runs/work"
    model_source: str = ""  # overrides model.source when set
    model_revision: str = ""
    _config: FlowGRPOConfig | None = field(default=None, init=False, repr=False, compare=False)

    def config(self) -> FlowGRPOConfig:
        """The resolved config (preset, overrides, model source), computed once per stage and shared."""
        if self._config is None:
            extra = []
            if self.model_source:
                extra.append(f"model.source={json.dumps(self.model_source)}")
            if self.model_revision:
                extra.append(f"model.revision={json.dumps(self.model_revision)}")
            self._config = load_config(self.preset, overrides=[*self.overrides, *extra])
        return self._config

    @property
    def experiment_name(self) -> str:
        return self.experiment or self.preset

    @property
    def run_dir(self) -> Path:
        return Path(self.workdir) / self.kfp_run_id

    @contextmanager
    def stage(self, name: str) -> Iterator[object]:
        config = self.config()
        tags = {"flowgrpo.preset": self.preset, "flowgrpo.model_source": config.model.source}
        with stage_run(
            name, self.kfp_run_id, self.tracking_uri, self.experiment_name, config.tracking.run_name, tags
        ) as run:
            yield run


def read_endpoints(path: str | Path | None) -> dict[str, str]:
    """``{name: url}`` from the launch stage's endpoints JSON (``{name: {"url", "weight"}}``)."""
    if not path or not Path(path).is_file():
        return {}
    data = json.loads(Path(path).read_text())
    return {name: entry["url"] for name, entry in data.items() if entry.get("url")}


def build_training_reward(config: FlowGRPOConfig, endpoints: dict[str, str]):
    """The weighted reward of the config, each component behind its server when one was launched."""
    from flowgrpo_core.rewards import build_rewards
    from flowgrpo_core.serving.client import RemoteReward

    return build_rewards(config.rewards, endpoints, RemoteReward)


def build_metric(name: str, endpoints: dict[str, str]):
    from flowgrpo_core.rewards import build_reward
    from flowgrpo_core.serving.client import RemoteReward

    return RemoteReward(name, endpoints[name]) if name in endpoints else build_reward(name)
