"""What every stage shares: the run's identity, its config, its work folder and its MLflow stage run."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from flowgrpo_core.config import FlowGRPOConfig, load_config
from flowgrpo_core.tracking import (
    DEFAULT_TRACKING_URI,
    check_reachable,
    comparable_params,
    parent_run_name,
    stage_run,
)

DEFAULT_WORKDIR = "flowgrpo-runs/work"


@dataclass(kw_only=True)
class PipelineContext:
    """The pipeline's parameters, defined here once, and what a stage derives from them.

    KFP reads a component's inputs from its Python signature, so the pipeline function and each component
    list these names again; ``tests/test_pipeline.py`` checks every such list against these fields (names,
    types, and the pipeline's defaults). Everything else builds the context by keyword: components with
    :meth:`from_arguments`, the CLI and tests by name.
    """

    preset: str = "tiny"
    overrides: list[str] = field(default_factory=list)  # dotted config overrides, key=value
    model_source: str = ""  # overrides model.source when set
    model_revision: str = ""
    tracking_uri: str = DEFAULT_TRACKING_URI
    experiment: str = ""  # default: the preset name
    # shared folder for checkpoints and reward-server pid files, keyed by run id (a PVC on a cluster)
    workdir: str = DEFAULT_WORKDIR
    # The run's identity (work folder, MLflow runs, cluster objects); empty: KFP's job id. An earlier run's id
    # continues that run: its checkpoints, its MLflow runs (``flowgrpo run --resume``).
    run_id: str = ""
    kfp_run_id: str = "local"  # KFP's job id, set by KFP for every run; not a parameter a user passes
    _config: FlowGRPOConfig | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any]) -> PipelineContext:
        """The context of a component's arguments (its ``locals()``): the fields by name; other names (the
        component's artifacts) are not the context's."""
        values = {f.name: arguments[f.name] for f in fields(cls) if f.init}
        return cls(**{**values, "overrides": list(values["overrides"])})

    def pipeline_arguments(self) -> dict[str, Any]:
        """The arguments a pipeline run is given: every field but the run id, which KFP supplies."""
        return {name: getattr(self, name) for name in PIPELINE_ARGUMENTS} | {
            "overrides": list(self.overrides)
        }

    def validate(self, check_tracking: bool = True) -> FlowGRPOConfig:
        """The resolved config, after checking the model source and the tracking URI (and, with
        ``check_tracking``, for a run on this machine, that an HTTP tracking server answers and that a hub
        model is in the cache when the hub is offline); raises ConfigError / ModelSourceError / ValueError /
        ConnectionError naming what is wrong."""
        # imports diffusers: only when validating
        from flowgrpo_core.models.loading import parse_source, resolve_folder
        from flowgrpo_core.sources import hub_offline

        config = self.config()
        source = parse_source(config.model.source)
        if not self.tracking_uri.startswith(("sqlite:///", "http://", "https://", "file:", "databricks")):
            raise ValueError(
                f"tracking URI {self.tracking_uri!r}: expected sqlite:///path.db, http(s)://host or file:/path"
            )
        if check_tracking and self.tracking_uri.startswith(("http://", "https://")):
            check_reachable(self.tracking_uri)
        if (
            check_tracking and source.kind == "hub" and hub_offline()
        ):  # a local run: the cache decides, cheaply
            resolve_folder(config.model.source, config.model.revision)
        return config

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
    def identity(self) -> str:
        """The run's identity: ``run_id`` when given, else KFP's job id."""
        return self.run_id or self.kfp_run_id

    @property
    def run_dir(self) -> Path:
        return Path(self.workdir) / self.identity

    def parent_tags(self) -> dict[str, str]:
        """Tags of the run's parent MLflow run, whichever process creates it."""
        return {"flowgrpo.preset": self.preset, "flowgrpo.model_source": self.config().model.source}

    def parent_name(self) -> str:
        """The parent run's name: ``tracking.run_name``, else preset, model and a short id."""
        config = self.config()
        return config.tracking.run_name or parent_run_name(self.preset, config.model.source, self.identity)

    def parent_params(self) -> dict[str, str]:
        """The parent run's params: the resolved config, the same keys for every preset."""
        return comparable_params(self.config())

    @contextmanager
    def stage(self, name: str) -> Iterator[object]:
        with stage_run(
            name,
            self.identity,
            self.tracking_uri,
            self.experiment_name,
            self.parent_name(),
            self.parent_tags(),
            self.parent_params(),
        ) as run:
            yield run


# what each parameter means, for the compiled pipeline (the KFP UI shows it beside the run form)
PARAMETER_DESCRIPTIONS = {
    "preset": "named preset the config starts from (`flowgrpo presets`), e.g. sd3-geneval",
    "overrides": "config overrides applied over the preset, 'section.field=value' strings (values are YAML), "
    'e.g. ["train.beta=0", "train.epochs=100"]',
    "model_source": "base model, overriding the config's model.source: tiny:sd3|flux|qwenimage, a diffusers "
    "folder, s3://bucket/prefix or a hub id; empty: the config's",
    "model_revision": "hub revision (branch, tag or commit) of the base model; empty: the config's",
    "tracking_uri": "MLflow tracking URI, e.g. http://mlflow.mlflow.svc:5000 (a sqlite file is local to each "
    "step's pod unless it lies on the shared volume)",
    "experiment": "MLflow experiment; empty: the preset name",
    "workdir": "folder for checkpoints and reward-server pid files, keyed by run id (a PVC path on a cluster, "
    "so that a retried training step resumes)",
    "run_id": "the run's identity (work folder, MLflow runs, cluster objects); empty: KFP's job id. An earlier "
    "run's id continues that run",
    "kfp_run_id": "KFP's job id, filled in by the pipeline",
}

# every parameter of the pipeline (and of each component); the pipeline's own arguments lack the run id
PIPELINE_PARAMETERS = tuple(f.name for f in fields(PipelineContext) if f.init)
PIPELINE_ARGUMENTS = tuple(name for name in PIPELINE_PARAMETERS if name != "kfp_run_id")


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


def build_gold_metrics(config: FlowGRPOConfig, endpoints: dict[str, str]) -> dict:
    """``{name: reward}`` for ``eval.metrics``, each behind its server when one was launched: what the
    evaluate stage and the evaluations during training score with besides the training reward."""
    return {name: build_metric(name, endpoints) for name in config.eval.metrics}


def build_metric(name: str, endpoints: dict[str, str]):
    from flowgrpo_core.rewards import build_reward
    from flowgrpo_core.serving.client import RemoteReward

    return RemoteReward(name, endpoints[name]) if name in endpoints else build_reward(name)
