"""A real `flowgrpo run` stopped by Ctrl-C or killed outright: nothing keeps running, no MLflow run stays
RUNNING, and the same command with --resume continues training from its checkpoint. Two runs at once on one
database each report their own parent run and model version."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

OVERRIDES = [
    "train.epochs=4",
    "train.checkpoint_every=1",
    "calibration.epochs=1",
    "eval.num_prompts=4",
    "eval.num_steps=4",
]


def _start(root: Path, *extra: str, experiment: str = "interrupts") -> subprocess.Popen:
    args = [sys.executable, "-m", "flowgrpo_core.cli", "run", "--experiment", experiment]
    args += ["--tracking-uri", f"sqlite:///{root}/mlflow.db", "--workdir", str(root / "work")]
    args += ["--pipeline-root", str(root / "kfp")]
    for override in OVERRIDES:
        args += ["--set", override]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    log = open(root / f"run-{time.monotonic_ns()}.log", "w+")  # noqa: SIM115 (read back after the run)
    process = subprocess.Popen(
        [*args, *extra], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    process.log = log
    return process


def _output(process: subprocess.Popen) -> str:
    process.log.flush()
    process.log.seek(0)
    return process.log.read()


def _wait_for_checkpoint(root: Path, process: subprocess.Popen, timeout_s: float = 300) -> Path:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = sorted((root / "work").glob("*/train/checkpoints/epoch-000001/trainer_state.pt"))
        if found:
            return found[0].parents[3]  # the run's folder, named by its run id
        assert process.poll() is None, _output(process)
        time.sleep(0.2)
    raise AssertionError("no checkpoint in time:\n" + _output(process))


def _servers_of(root: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "flowgrpo_core.serving" in cmdline and str(root) in cmdline:
            found.append(process)
    return found


def _in_group(pgid: int) -> list[int]:
    pids = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                pids.append(process.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return pids


def _runs(root: Path, experiment: str = "interrupts") -> list:
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    found = MlflowClient().get_experiment_by_name(experiment)
    return MlflowClient().search_runs([found.experiment_id]) if found else []


def _wait_gone(check, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not check():
            return True
        time.sleep(0.2)
    return False


def test_ctrl_c_stops_everything_and_marks_the_runs_killed(tmp_path):
    run = _start(tmp_path)
    run_dir = _wait_for_checkpoint(tmp_path, run)
    assert _servers_of(tmp_path), "the reward server should be up during training"
    os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    try:
        code = run.wait(timeout=60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    out = _output(run)
    assert code == 130, out
    assert f"--resume {run_dir.name}" in out and "marked KILLED" in out
    assert _wait_gone(lambda: _servers_of(tmp_path), 10), "a reward server outlived the run"
    assert _wait_gone(lambda: _in_group(run.pid), 10), "a step's process outlived the run"
    statuses = {r.info.run_name: r.info.status for r in _runs(tmp_path)}
    assert "RUNNING" not in statuses.values(), statuses
    parent = next(r for r in _runs(tmp_path) if r.data.tags.get("flowgrpo.role") == "pipeline")
    assert parent.info.status == "KILLED" and parent.data.tags["kfp.run_id"] == run_dir.name


@pytest.mark.timeout(1500)  # three pipelines, two of them at once on two cores: several minutes
def test_a_hard_kill_leaves_no_server_and_the_resumed_run_continues_beside_another(tmp_path):
    first = _start(tmp_path)
    run_dir = _wait_for_checkpoint(tmp_path, first)
    os.killpg(first.pid, signal.SIGKILL)  # the orchestrator and its step die without a word
    first.wait(timeout=30)
    # the reward server runs in its own session, out of the killed group: it must notice its owner is gone
    assert _wait_gone(lambda: _servers_of(tmp_path), 15), "the reward server outlived its killed pipeline"
    assert any(r.info.status == "RUNNING" for r in _runs(tmp_path))  # nobody could close them

    resumed = _start(tmp_path, "--resume", run_dir.name)
    time.sleep(2)  # so the two do not start in the same second (ids differ anyway; this spreads the load)
    other = _start(tmp_path)
    outputs = []
    for process in (resumed, other):
        try:
            assert process.wait(timeout=900) == 0, _output(process)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        outputs.append(_output(process))
    resumed_out, other_out = outputs
    assert f"continuing run {run_dir.name}" in resumed_out
    assert "training resumed from its checkpoint at epoch" in resumed_out
    assert re.search(rf"run {run_dir.name} was killed without closing", resumed_out + other_out)

    def reported(out: str) -> tuple[str, str]:
        parent = re.search(r"parent run (\w+)", out).group(1)
        version = re.search(r"registered model version: (\S+)", out).group(1)
        return parent, version

    (parent_a, version_a), (parent_b, version_b) = reported(resumed_out), reported(other_out)
    assert parent_a != parent_b and version_a != version_b
    runs = {r.info.run_id: r for r in _runs(tmp_path)}
    assert runs[parent_a].data.tags["kfp.run_id"] == run_dir.name  # the killed run's own parent, continued
    assert runs[parent_a].info.status == runs[parent_b].info.status == "FINISHED"
    assert not [r.info.run_name for r in runs.values() if r.info.status == "RUNNING"]
    assert not _servers_of(tmp_path)


@pytest.mark.parametrize("resume", ["nothing-here", "last"])
def test_resume_refuses_a_run_that_left_nothing(tmp_path, resume):
    command = [sys.executable, "-m", "flowgrpo_core.cli", "run", "--resume", resume]
    command += ["--workdir", str(tmp_path / "w"), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    out = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "--resume" in out.stderr, out.stderr
