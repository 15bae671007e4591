"""Where the wall time of ``flowgrpo run --preset tiny`` goes: stage start-up, MLflow logging, orchestration
and real work, and the share that is overhead (target: under 25%).

Every stage run records ``stage/startup_s`` (process creation -> stage start: interpreter, imports, KFP
executor), ``stage/seconds`` (the stage's body) and ``stage/work_s`` (its real work: building/copying the
model, starting servers, probing, training, evaluating). Bookkeeping inside a stage (MLflow params,
metrics, artifacts, registration) is ``seconds - work_s``; what remains of the wall time is kfp.local's
orchestration between tasks.

    python benchmarks/pipeline_overhead.py [--set train.epochs=10]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from flowgrpo_core.stages import PipelineContext
from pipelines.runner import run_local


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", help="preset to run (default: tiny, the `make run` job)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    args = parser.parse_args()

    from mlflow.tracking import MlflowClient

    root = Path(tempfile.mkdtemp(prefix="flowgrpo-overhead-"))
    pipeline_args = PipelineContext(
        preset=args.preset,
        overrides=list(args.overrides),
        tracking_uri=f"sqlite:///{root}/mlflow.db",
        workdir=str(root / "work"),
    )
    result = run_local(pipeline_args, pipeline_root=str(root / "kfp"))
    client = MlflowClient()
    parent = client.get_run(result.parent_run_id)
    stages = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    rows, totals = [], {"startup": 0.0, "mlflow": 0.0, "work": 0.0}
    for run in sorted(stages, key=lambda r: r.info.start_time):
        m = run.data.metrics
        stage = run.data.tags["stage"]
        # registering a model is MLflow bookkeeping, not work
        work = 0.0 if stage == "register_model" else m.get("stage/work_s", 0.0)
        startup, body = m.get("stage/startup_s", 0.0), m.get("stage/seconds", 0.0)
        rows.append((stage, startup, body - work, work))
        totals["startup"] += startup
        totals["mlflow"] += body - work
        totals["work"] += work
    wall = result.seconds
    orchestration = max(0.0, wall - sum(totals.values()))
    print(
        f"flowgrpo run --preset {args.preset} {' '.join('--set ' + o for o in args.overrides)}: {wall:.1f} s wall"
    )
    print(f"{'stage':24} {'start-up (s)':>12} {'MLflow+misc (s)':>16} {'work (s)':>9}")
    for stage, startup, mlflow_s, work in rows:
        print(f"{stage:24} {startup:>12.1f} {mlflow_s:>16.1f} {work:>9.1f}")
    print(
        f"{'total':24} {totals['startup']:>12.1f} {totals['mlflow']:>16.1f} {totals['work']:>9.1f}   orchestration {orchestration:.1f} s"
    )
    overhead = wall - totals["work"]
    print(
        f"overhead (start-up + MLflow + orchestration): {overhead:.1f} s = {overhead / wall:.0%} of the wall time (target < 25%)"
    )


if __name__ == "__main__":
    main()
