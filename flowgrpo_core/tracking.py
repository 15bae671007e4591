"""MLflow conventions (docs/architecture.md): one parent run per pipeline run, a nested run per stage, flattened
params, per-epoch metrics, image grids and plots. Every stage goes through these few functions.

The parent run is found by its ``kfp.run_id`` tag, so stages in separate processes (or pods) attach to
the same parent without passing run ids around, and a retried stage reuses its own stage run.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil

DEFAULT_TRACKING_URI = "sqlite:///flowgrpo-runs/mlflow.db"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
# what the MLflow UI shows an experiment as: the training view (runs, charts, models), not the GenAI one
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
_METRIC_KEY = re.compile(r"[^0-9A-Za-z_\-. /]")


def default_tracking_uri() -> str:
    """Where runs go when no ``--tracking-uri`` is given: ``$MLFLOW_TRACKING_URI`` as for every MLflow tool,
    else a sqlite file under ``flowgrpo-runs/``."""
    return os.environ.get(TRACKING_URI_ENV, "").strip() or DEFAULT_TRACKING_URI


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for any other store."""
    return Path(tracking_uri[len("sqlite:///") :]) if tracking_uri.startswith("sqlite:///") else None


def check_store_exists(tracking_uri: str) -> None:
    """For commands that read what runs wrote (``promote``): a sqlite database that is not there is a wrong
    URI, not an empty store to create."""
    db = sqlite_path(tracking_uri)
    if db is not None and not db.is_file():
        raise FileNotFoundError(
            f"no MLflow database at {db} ({tracking_uri}): pass --tracking-uri or set {TRACKING_URI_ENV}"
        )


def artifact_root_for(tracking_uri: str) -> str | None:
    """Where a new experiment's artifacts go: beside a sqlite file (``mlartifacts/``), else the server's default."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///") :])
        return (db.parent.resolve() / "mlartifacts").as_uri()
    return None


def configure(tracking_uri: str) -> None:
    """Point MLflow at ``tracking_uri``; fail fast with a clear message when it cannot be reached."""
    import mlflow

    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    elif tracking_uri.startswith(("http://", "https://")):
        check_reachable(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)


def check_reachable(tracking_uri: str, timeout_s: float = 5.0) -> None:
    import urllib.error
    import urllib.request

    url = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            if response.status != 200:
                raise ConnectionError(f"HTTP {response.status}")
    except (OSError, urllib.error.URLError, ConnectionError) as error:
        raise ConnectionError(f"MLflow tracking server {tracking_uri} is not reachable ({error})") from None


def ensure_experiment(name: str, tracking_uri: str) -> str:
    """The experiment's id, created on first use and marked as model training for the UI."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is None:
        return client.create_experiment(
            name, artifact_location=artifact_root_for(tracking_uri), tags=EXPERIMENT_KIND
        )
    if not EXPERIMENT_KIND.items() <= found.tags.items():  # made by an older flowgrpo or by hand
        for key, value in EXPERIMENT_KIND.items():
            client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


def find_runs(experiment_id: str, **tags: str) -> list:
    from mlflow.tracking import MlflowClient

    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return MlflowClient().search_runs(
        [experiment_id], filter_string=query, order_by=["attributes.start_time ASC"]
    )


def short_id(identity: str) -> str:
    """A few characters that tell a pipeline run apart in run names: the random tail of a local id
    (``local-20261203-153145-5766db`` -> ``5766db``), the head of KFP's job id (a UUID)."""
    if identity.startswith("local-"):
        return identity.rsplit("-", 1)[-1]
    return identity.replace("-", "")[:8] or "run"


def parent_run_name(preset: str, model_source: str, identity: str) -> str:
    """``<preset>-<model>-<short id>``, e.g. ``tiny-sd3-5766db``, ``sd3-ocr-stable-diffusion-3.5-medium-1a2b3c4d``:
    what the run is, readable in the runs table and in chart legends."""
    model = model_source.rstrip("/").rsplit("/", 1)[-1].removeprefix("tiny:").split("@")[0] or "model"
    return f"{preset}-{model}-{short_id(identity)}"


def stage_run_name(stage: str, identity: str) -> str:
    """Stage runs carry their pipeline run's short id first, so the stages of one run sort together and
    chart legends say which run a curve is from: ``5766db-train_grpo``."""
    return f"{short_id(identity)}-{stage}"


def parent_run_id(
    experiment_id: str,
    kfp_run_id: str,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
) -> str:
    """The pipeline run's parent MLflow run, created on first use with ``params`` (what runs are compared
    by: :func:`comparable_params`)."""
    from mlflow.tracking import MlflowClient

    existing = find_runs(experiment_id, **{"kfp.run_id": kfp_run_id, "flowgrpo.role": "pipeline"})
    if existing:
        return existing[0].info.run_id
    client = MlflowClient()
    run = client.create_run(
        experiment_id,
        run_name=run_name or f"flowgrpo-{short_id(kfp_run_id)}",
        tags={"kfp.run_id": kfp_run_id, "flowgrpo.role": "pipeline", **(tags or {})},
    )
    _log_params(client, run.info.run_id, params or {})
    return run.info.run_id


def _log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = sorted(params.items())
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per call
        client.log_batch(run_id, params=[Param(k, v) for k, v in items[start : start + 100]])


@contextlib.contextmanager
def stage_run(
    stage: str,
    kfp_run_id: str,
    tracking_uri: str,
    experiment: str,
    run_name: str | None = None,
    parent_tags: dict[str, str] | None = None,
    parent_params: dict[str, str] | None = None,
) -> Iterator[Any]:
    """A nested MLflow run for one stage under the pipeline's parent run; a retry of the stage reuses it."""
    import mlflow

    configure(tracking_uri)
    experiment_id = ensure_experiment(experiment, tracking_uri)
    parent = parent_run_id(experiment_id, kfp_run_id, run_name, parent_tags, parent_params)
    previous = find_runs(experiment_id, **{"kfp.run_id": kfp_run_id, "stage": stage})
    tags = {"kfp.run_id": kfp_run_id, "stage": stage, "mlflow.parentRunId": parent}
    if previous:
        run = mlflow.start_run(run_id=previous[-1].info.run_id)
    else:
        run = mlflow.start_run(
            experiment_id=experiment_id, run_name=stage_run_name(stage, kfp_run_id), tags=tags
        )
    with run:
        # Start-up (interpreter, imports, KFP executor) and the stage's whole duration, for the overhead split.
        log_metrics({"stage/startup_s": time.time() - psutil.Process().create_time()})
        started = time.perf_counter()
        yield run
        log_metrics({"stage/seconds": time.perf_counter() - started})


@contextlib.contextmanager
def timed_work() -> Iterator[None]:
    """Time a stage's real work (training, sampling, copying) as ``stage/work_s``; the rest is bookkeeping."""
    started = time.perf_counter()
    yield
    log_metrics({"stage/work_s": time.perf_counter() - started})


def finish_parent(
    tracking_uri: str, experiment: str, kfp_run_id: str, status: str = "FINISHED"
) -> str | None:
    from mlflow.tracking import MlflowClient

    configure(tracking_uri)
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = find_runs(found.experiment_id, **{"kfp.run_id": kfp_run_id, "flowgrpo.role": "pipeline"})
    if not runs:
        return None
    client.set_terminated(runs[0].info.run_id, status=status)
    return runs[0].info.run_id


def terminate_runs(tracking_uri: str, experiment: str, kfp_run_id: str, status: str = "KILLED") -> list[str]:
    """Mark every still RUNNING MLflow run of pipeline run ``kfp_run_id`` (its parent and its stage runs)
    ``status``; returns their run ids. For a pipeline that was stopped before its stages could close them."""
    from mlflow.tracking import MlflowClient

    configure(tracking_uri)
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    marked = []
    for run in find_runs(found.experiment_id, **{"kfp.run_id": kfp_run_id}):
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status=status)
            marked.append(run.info.run_id)
    return marked


def owner_tag() -> str:
    """``host:pid:start time`` of this process, so a later process can tell whether it is still alive."""
    import socket

    me = psutil.Process()
    return f"{socket.gethostname()}:{me.pid}:{me.create_time():.3f}"


def owner_alive(tag: str) -> bool | None:
    """Whether the process an :func:`owner_tag` names still runs; None when it is another machine's."""
    import socket

    try:
        host, pid, created = tag.rsplit(":", 2)
        pid, created_s = int(pid), float(created)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    try:
        return abs(psutil.Process(pid).create_time() - created_s) < 0.01  # a reused pid is another process
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False


def orphaned_pipeline_runs(experiment: str) -> list:
    """Parent runs of this machine's local pipelines that are RUNNING although the process that ran them
    (tag ``flowgrpo.owner``) is gone: killed too hard to close its runs."""
    from mlflow.tracking import MlflowClient

    found = MlflowClient().get_experiment_by_name(experiment)
    if found is None:
        return []
    return [
        run
        for run in find_runs(found.experiment_id, **{"flowgrpo.role": "pipeline"})
        if run.info.status == "RUNNING" and owner_alive(run.data.tags.get("flowgrpo.owner", "")) is False
    ]


def metric_key(name: str) -> str:
    return _METRIC_KEY.sub("_", name)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log finite metrics (MLflow rejects NaN on some stores; a missing point is honest)."""
    import mlflow

    clean = {
        metric_key(k): float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and math.isfinite(float(v))
    }
    if clean:
        mlflow.log_metrics(clean, step=step)


def log_to_parent(metrics: dict[str, float], tags: dict[str, str] | None = None) -> None:
    """Log ``metrics`` (and ``tags``) on the active stage run's parent, the pipeline run: the headline
    numbers runs are compared by (final training reward, evaluation deltas, the gate), beside the stage's."""
    import mlflow
    from mlflow.entities import Metric, RunTag

    parent = mlflow.active_run().data.tags.get("mlflow.parentRunId")
    if not parent:
        return
    now = int(time.time() * 1000)
    clean = [
        Metric(metric_key(k), float(v), now, 0)
        for k, v in metrics.items()
        if isinstance(v, int | float) and math.isfinite(float(v))
    ]
    mlflow.tracking.MlflowClient().log_batch(
        parent, metrics=clean, tags=[RunTag(k, v) for k, v in (tags or {}).items()]
    )


def evaluation_headline(metrics: dict[str, float]) -> dict[str, float]:
    """What a pipeline run's evaluation is compared by: per metric the policy's and the base's mean, their
    difference and the win rate; per metric and task (and per GenEval accuracy) the difference
    ``eval/delta/<metric>/<task>`` = policy - base."""
    out = {
        k: v
        for k, v in metrics.items()
        if k.startswith(("eval/delta/", "eval/win_rate/"))
        or (k.startswith(("eval/policy/", "eval/base/")) and k.endswith("_mean") and k.count("/") == 2)
    }
    for key, value in metrics.items():
        base = key.replace("eval/policy/", "eval/base/", 1)
        if (
            key.startswith("eval/policy/")
            and key.count("/") >= 3
            and not key.endswith("_se")
            and base in metrics
        ):
            out[key.replace("eval/policy/", "eval/delta/", 1)] = value - metrics[base]
    return out


def comparable_params(config) -> dict[str, str]:
    """The resolved config as MLflow params with the same keys for every preset and reward mix: the
    flattened config, its rewards as one ``rewards`` param (``name=weight, ...``) instead of a key per
    reward, values cut to MLflow's 6000 characters."""
    flat = {k: v for k, v in config.flat().items() if not k.startswith("rewards.")}
    flat["rewards"] = ", ".join(f"{name}={weight:g}" for name, weight in sorted(config.rewards.items()))
    return {k: ("" if v is None else str(v))[:6000] for k, v in flat.items()}


def log_config(config) -> None:
    """Flattened config as params (:func:`comparable_params`) and config.yaml, on the active run."""
    import mlflow

    _log_params(mlflow.tracking.MlflowClient(), mlflow.active_run().info.run_id, comparable_params(config))
    mlflow.log_text(config.to_yaml(), "config.yaml")


def image_grid(rows: Sequence[Sequence[Any]], labels: Sequence[str] | None = None, cell: int | None = None):
    """A grid of PIL images, one list per row, with an optional label (a caption, wrapped) left of each row."""
    import textwrap

    from PIL import Image, ImageDraw

    rows = [list(r) for r in rows if len(r)]
    if not rows:
        raise ValueError("image_grid needs at least one image")
    size = cell or max(max(im.width, im.height) for r in rows for im in r)
    label_w = 160 if labels else 0
    ncols = max(len(r) for r in rows)
    grid = Image.new("RGB", (label_w + ncols * size, len(rows) * size), "white")
    draw = ImageDraw.Draw(grid)
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image.convert("RGB").resize((size, size)), (label_w + x * size, y * size))
        if labels:
            lines = textwrap.wrap(str(labels[y]), 24)[: max(1, size // 11)]  # the default font: ~6x11 px
            top = y * size + max(0, (size - 11 * len(lines)) // 2)
            draw.multiline_text((4, top), "\n".join(lines), fill="black", spacing=1)
    return grid


def captioned_samples(images: Sequence[Any], prompts: Sequence[str], rows: int = 4, columns: int = 8):
    """An epoch's samples as a grid: one row per prompt (its group's images side by side, consecutive in
    ``images``), captioned with the prompt; at most ``rows`` prompts and ``columns`` images each."""
    groups: list[tuple[str, list]] = []
    for image, prompt in zip(images, prompts):
        if groups and groups[-1][0] == prompt:
            groups[-1][1].append(image)
        elif len(groups) < rows:
            groups.append((prompt, [image]))
    return image_grid([g[:columns] for _, g in groups], [p for p, _ in groups])


def log_prompt_set(prompt_set, spec: str, context: str) -> None:
    """Dataset lineage: the prompt set ``spec`` (``builtin:name`` or a file) as an MLflow dataset input of
    the active run and of its parent (the pipeline run), with ``context`` (training, evaluation). Its
    digest tells two runs on different prompts apart."""
    import mlflow
    import pandas as pd
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.entities import DatasetInput, InputTag

    frame = pd.DataFrame(
        {"prompt": prompt_set.prompts, "tag": [m.get("tag", "") for m in prompt_set.metadata]}
    )
    name = spec.removeprefix("builtin:") if spec.startswith("builtin:") else Path(spec).name
    # the set as flowgrpo's loader read it (prompts.train / prompts.eval); a file path is not portable
    # across pods, the spec and the digest are
    source = CodeDatasetSource(tags={"flowgrpo.prompt_set": spec})
    dataset = mlflow.data.from_pandas(frame, source=source, name=name)
    mlflow.log_input(dataset, context=context)
    parent = mlflow.active_run().data.tags.get("mlflow.parentRunId")
    if parent:
        tag = InputTag(key="mlflow.data.context", value=context)
        mlflow.tracking.MlflowClient().log_inputs(
            parent, datasets=[DatasetInput(dataset=dataset._to_mlflow_entity(), tags=[tag])]
        )


def reward_curve(history: Sequence[dict[str, float]], path: str | os.PathLike) -> Path:
    """PNG of the mean reward (with its std band) and the KL over epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(h["epoch"]) for h in history]
    mean = [h["reward/total"] for h in history]
    std = [h.get("reward/total/std", 0.0) for h in history]
    fig, (ax_r, ax_kl) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax_r.plot(epochs, mean, marker="o", label="reward")
    ax_r.fill_between(
        epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2
    )
    ax_r.set(xlabel="epoch", ylabel="reward", title="mean reward ± std")
    ax_kl.plot(epochs, [h.get("train/kl", 0.0) for h in history], marker="o", color="tab:red")
    ax_kl.set(xlabel="epoch", ylabel="KL", title="KL to the base model")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def proxy_gold_curve(
    epochs: Sequence[int],
    proxy: dict[str, Sequence[tuple[float, float]]],
    gold: dict[str, Sequence[tuple[float, float]]],
    path: str | os.PathLike,
    alarm_epochs: Sequence[int] = (),
    exported_epoch: int | None = None,
) -> Path:
    """PNG of the held-out evaluations during training: the proxy (left) and the gold metrics (right), each
    ``(value, standard error)`` per evaluation as a point with a ±1 standard-error bar, over epochs trained;
    a red dashed line at each hacking alarm, a grey dotted line at the exported epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharex=True)
    for ax, curves, title in ((axes[0], proxy, "proxy"), (axes[1], gold, "gold")):
        for name, points in curves.items():
            values = [v for v, _ in points]
            errors = [0.0 if se != se else se for _, se in points]  # nan: no bar
            ax.errorbar(epochs, values, yerr=errors, marker="o", capsize=3, label=name)
        for i, epoch in enumerate(alarm_epochs):
            label = "hacking alarm" if i == 0 else None
            ax.axvline(epoch, color="tab:red", linestyle="--", linewidth=1, label=label)
        if exported_epoch is not None:
            ax.axvline(exported_epoch, color="grey", linestyle=":", linewidth=1.5, label="exported epoch")
        ax.set(xlabel="epochs trained", title=f"{title} on held-out prompts (± 1 s.e.)")
        if curves:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
