"""The MLflow model registry: one registered model per family, versions tagged with their evaluation,
aliases ``candidate`` (every new version) and ``champion`` (moved only through the gate).

Registration is idempotent per pipeline run: registering the same run again returns its version.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from flowgrpo_core import __version__

CANDIDATE, CHAMPION = "candidate", "champion"


@dataclass
class Registration:
    name: str
    version: str
    created: bool
    gate_passed: bool
    gate_reason: str
    champion: str | None


def gate(
    value: float, reference: float, margin: float, standard_error: float = 0.0, standard_errors: float = 0.0
) -> tuple[bool, str]:
    """Whether ``value`` beats ``reference`` by more than ``margin`` and, with ``standard_errors`` = k > 0,
    by more than k x ``standard_error`` (the standard error of the difference)."""
    if not math.isfinite(value):
        return False, f"gate metric is {value}"
    noise = standard_errors * standard_error
    passed = value > reference + max(margin, noise)  # a tie is no reason to change the model users get
    verb = "passes" if passed else "fails"
    extra = f", and {standard_errors:g} x standard error {standard_error:.3g}" if standard_errors else ""
    return passed, f"{verb}: {value:.6g} vs required > {reference:.6g} + margin {margin:g}{extra}"


def _is_write_conflict(error: Exception) -> bool:
    """Whether an MLflow error is another writer's row winning a uniqueness race (sqlite, MySQL, PostgreSQL
    word it differently)."""
    text = str(error).lower()
    return any(
        word in text for word in ("unique constraint", "integrityerror", "duplicate", "already exists")
    )


def _set_alias(client, name: str, alias: str, version, attempts: int = 6) -> None:
    """``set_registered_model_alias`` that survives a concurrent registration. MLflow reads the alias row,
    then inserts it when absent: two pipelines registering in the same moment can both insert, and the
    second fails on the uniqueness constraint. The row exists by then, so trying again updates it."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            client.set_registered_model_alias(name, alias, str(version))
            return
        except MlflowException as error:
            if attempt == attempts - 1 or not _is_write_conflict(error):
                raise
            time.sleep(0.1 * (attempt + 1))


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, tags={"flowgrpo": "policy registry"})
        except MlflowException as error:  # another pipeline created it after our look: that is fine
            if not _is_write_conflict(error):
                raise


def _champion(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def policy_signature(config):
    """What the registered pyfunc takes and returns (``mlflow_model.py``), with the policy's evaluation
    settings as the params' defaults: prompts in (a ``prompt`` column, an optional ``seed`` column), one row
    per prompt out with the image as base64 PNG text."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    e, s = config.eval, config.sampling
    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "seed", required=False)]),
        outputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "seed"), ColSpec("string", "image")]),
        params=ParamSchema(
            [
                ParamSpec("seed", "long", 0),
                ParamSpec("num_steps", "long", e.num_steps),
                ParamSpec("guidance_scale", "double", float(e.guidance_scale)),
                ParamSpec("resolution", "long", s.resolution),
            ]
        ),
    )


# the example shown in the registry and written as serving_input_example.json (`mlflow models predict -i`)
INPUT_EXAMPLE_PROMPTS = ["a photo of a cat", "a red car left of a dog"]


def log_pyfunc(staged: Path, config, run_id: str, artifact_path: str = "policy") -> str:
    """Save the pyfunc (signature, input example) and log it under the run's ``artifact_path``; returns its
    ``runs:/`` URI. Saved, then logged as artifacts, rather than ``mlflow.pyfunc.log_model``: that one checks
    the input example by loading the model and generating images, which for a real base model means
    gigabytes of weights and minutes of sampling inside the registration step."""
    import mlflow
    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        mlflow.pyfunc.save_model(
            Path(tmp) / artifact_path,
            python_model=str(Path(__file__).with_name("mlflow_model.py")),
            artifacts={"policy": str(staged)},
            pip_requirements=[f"flowgrpo=={__version__}"],
            signature=policy_signature(config),
            input_example=(pd.DataFrame({"prompt": INPUT_EXAMPLE_PROMPTS}), {"seed": 0}),
        )
        mlflow.tracking.MlflowClient().log_artifacts(run_id, str(Path(tmp) / artifact_path), artifact_path)
    return f"runs:/{run_id}/{artifact_path}"


def register_policy(
    policy_dir: str | Path,
    base_source: str,
    base_revision: str | None,
    model_name: str,
    eval_metrics: dict[str, float],
    gate_metric: str,
    gate_margin: float,
    kfp_run_id: str,
    extra_tags: dict[str, str] | None = None,
    gate_standard_errors: float = 0.0,
) -> Registration:
    """Log the policy as a pyfunc model in the active run, register it, set ``candidate``, and move
    ``champion`` when ``gate_metric`` beats the current champion's (or, with no champion yet, the base
    model's value of the same metric) by ``gate_margin`` and by ``gate_standard_errors`` standard errors of
    the difference (from ``<gate_metric>_se``)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if gate_metric not in eval_metrics:
        raise ValueError(
            f"gate metric {gate_metric!r} is not among the evaluation metrics: {sorted(eval_metrics)[:12]}"
        )
    base_metric = gate_metric.replace("/policy/", "/base/")
    value_se, base_se = f"{gate_metric}_se", f"{base_metric}_se"
    if gate_standard_errors and value_se not in eval_metrics:
        raise ValueError(
            f"tracking.gate_standard_errors={gate_standard_errors:g} needs {value_se!r} among the evaluation metrics"
        )
    _ensure_registered_model(client, model_name)

    found = client.search_model_versions(
        f"name='{model_name}' and tags.`flowgrpo.kfp_run_id` = '{kfp_run_id}'"
    )
    created = not found
    if found:
        version = found[0]
    else:
        from flowgrpo_core.config import load_config

        run_id = mlflow.active_run().info.run_id
        with tempfile.TemporaryDirectory() as tmp:
            staged = Path(tmp) / "policy"
            shutil.copytree(policy_dir, staged)
            (staged / "base.json").write_text(json.dumps({"source": base_source, "revision": base_revision}))
            source = log_pyfunc(staged, load_config(None, staged / "config.yaml"), run_id)
        value = float(eval_metrics[gate_metric])
        version = client.create_model_version(
            model_name,
            source=source,
            run_id=run_id,
            tags={
                "flowgrpo.kfp_run_id": kfp_run_id,
                "base.source": base_source,
                "base.revision": base_revision or "",
                "gate.metric": gate_metric,
                "gate.value": repr(value),
                "gate.margin": repr(gate_margin),
                "gate.base_value": repr(float(eval_metrics.get(base_metric, math.nan))),
                "gate.standard_errors": repr(float(gate_standard_errors)),
                "gate.value_se": repr(float(eval_metrics.get(value_se, 0.0))),
                "gate.base_value_se": repr(float(eval_metrics.get(base_se, 0.0))),
                **(extra_tags or {}),
            },
        )
    _set_alias(client, model_name, CANDIDATE, version.version)
    passed, reason = promote(model_name, version.version)
    champion = _champion(client, model_name)
    return Registration(
        model_name, str(version.version), created, passed, reason, str(champion.version) if champion else None
    )


def promote(model_name: str, version: str | int, force: bool = False) -> tuple[bool, str]:
    """Move ``champion`` to ``version`` if its recorded gate metric beats the current champion's (or the base
    model's, with no champion) by the recorded margin; ``force`` skips the gate. Returns (moved, reason).

    The registry has no compare-and-set, so two pipelines can judge against the same champion and both move
    it. After moving it, the champion is read back: if another version took it in between, this one is
    judged again against that version, so the later of two concurrent registrations keeps the better one."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    candidate = client.get_model_version(model_name, str(version))
    tags = candidate.tags
    if "gate.metric" not in tags:
        raise ValueError(
            f"{model_name} version {version} has no recorded gate metric (not registered by flowgrpo?)"
        )
    for _ in range(3):
        champion = _champion(client, model_name)
        if champion is not None and str(champion.version) == str(version):
            return True, f"version {version} already is the champion"
        passed, reason = _judge(tags, champion)
        if not (passed or force):
            client.set_model_version_tag(model_name, str(version), "gate.decision", "failed")
            return False, reason
        _set_alias(client, model_name, CHAMPION, version)
        client.set_model_version_tag(
            model_name, str(version), "gate.decision", "forced" if force and not passed else "passed"
        )
        now = _champion(client, model_name)
        if force or now is None or str(now.version) == str(version):
            return True, reason + (" [forced]" if force and not passed else "")
    return False, reason + f" (champion moved to v{now.version} by a concurrent registration)"


def _judge(tags: dict[str, str], champion) -> tuple[bool, str]:
    """The gate for a version's tags against the current ``champion`` (a ModelVersion or None)."""
    value, margin = float(tags["gate.value"]), float(tags.get("gate.margin", "0"))
    k, value_se = float(tags.get("gate.standard_errors", "0")), float(tags.get("gate.value_se", "0"))
    if champion is not None and champion.tags.get("gate.metric") == tags["gate.metric"]:
        reference, against = float(champion.tags["gate.value"]), f"champion v{champion.version}"
        reference_se = float(champion.tags.get("gate.value_se", "0"))
    else:
        reference, against = float(tags.get("gate.base_value", "nan")), "the base model"
        reference_se = float(tags.get("gate.base_value_se", "0"))
        if not math.isfinite(reference):
            reference, against = -math.inf, "nothing (no champion, no base value)"
    passed, reason = gate(value, reference, margin, math.hypot(value_se, reference_se), k)
    return passed, f"{tags['gate.metric']} {reason} (against {against})"
