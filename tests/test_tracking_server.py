"""Stages against a real MLflow tracking server whose artifacts live in S3 (a moto_server process)."""

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from flowgrpo_core.stages import PipelineContext
from flowgrpo_core.stages.download import download_model
from flowgrpo_core.stages.train import train_grpo


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(url)


@pytest.fixture()
def mlflow_server_on_s3(tmp_path, monkeypatch):
    s3_port, mlflow_port = _port(), _port()
    s3_url = f"http://127.0.0.1:{s3_port}"
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_S3_ENDPOINT_URL": s3_url,
    }
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = None
    try:
        _wait(s3_url + "/moto-api/")
        import boto3

        boto3.client(
            "s3",
            endpoint_url=s3_url,
            aws_access_key_id="k",
            aws_secret_access_key="s",
            region_name="us-east-1",
        ).create_bucket(Bucket="mlflow")
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{tmp_path}/server.db",
                "--artifacts-destination",
                "s3://mlflow/artifacts",
                "--host",
                "127.0.0.1",
                "--port",
                str(mlflow_port),
                "--workers",
                "1",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        tracking = f"http://127.0.0.1:{mlflow_port}"
        _wait(tracking + "/health")
        yield tracking, s3_url
    finally:
        if server is not None:
            os.killpg(server.pid, 15)
            server.wait(timeout=20)
        moto.terminate()
        moto.wait(timeout=10)


def test_stages_log_to_a_tracking_server_with_s3_artifacts(tmp_path, mlflow_server_on_s3):
    import boto3
    from mlflow.tracking import MlflowClient

    tracking, s3_url = mlflow_server_on_s3
    ctx = PipelineContext(
        preset="tiny",
        overrides=["serving.mode=inline", "train.epochs=1", "sampling.num_steps=4"],
        kfp_run_id="server-run",
        tracking_uri=tracking,
        experiment="",
        workdir=str(tmp_path / "work"),
    )
    download_model(ctx, tmp_path / "model")
    train_grpo(ctx, tmp_path / "model", None, tmp_path / "policy")

    client = MlflowClient(tracking_uri=tracking)
    experiment = client.get_experiment_by_name("tiny")
    stages = client.search_runs(
        [experiment.experiment_id], "tags.`kfp.run_id` = 'server-run' and tags.stage != ''"
    )
    assert sorted(r.data.tags["stage"] for r in stages) == ["download_model", "train_grpo"]
    train = next(r for r in stages if r.data.tags["stage"] == "train_grpo")
    assert [m.step for m in client.get_metric_history(train.info.run_id, "reward/total")] == [0]
    s3 = boto3.client(
        "s3", endpoint_url=s3_url, aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1"
    )
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow", Prefix="artifacts/")["Contents"]]
    assert any(k.endswith(f"{train.info.run_id}/artifacts/reward_curve.png") for k in keys)
    assert any(k.endswith("policy/pytorch_lora_weights.safetensors") for k in keys)
