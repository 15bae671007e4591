"""download_model from every kind of source, with a verified sha256 manifest."""

import hashlib
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flowgrpo_core.models import ModelSourceError
from flowgrpo_core.stages import PipelineContext
from flowgrpo_core.stages.download import download_model


def _ctx(tmp_path, source, revision=""):
    run_id = hashlib.sha1(f"{source}@{revision}".encode()).hexdigest()[:8]  # one pipeline run per source
    return PipelineContext(
        preset="tiny",
        overrides=[],
        kfp_run_id=run_id,
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        experiment="dl",
        workdir=str(tmp_path / "work"),
        model_source=source,
        model_revision=revision,
    )


def _check_manifest(folder: Path) -> dict:
    meta = json.loads((folder / "manifest.json").read_text())
    on_disk = {
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != "manifest.json"
    }
    assert set(meta["files"]) == on_disk and "model_index.json" in on_disk
    for name, entry in meta["files"].items():
        assert entry["sha256"] == hashlib.sha256((folder / name).read_bytes()).hexdigest()
        assert entry["bytes"] == (folder / name).stat().st_size
    return meta


@pytest.mark.parametrize(("source", "family"), [("tiny:sd3", "sd3"), ("tiny:flux", "flux")])
def test_tiny_models_are_built_and_saved(tmp_path, source, family):
    meta = download_model(_ctx(tmp_path, source), tmp_path / "out")
    assert meta["family"] == family and meta["source"] == source
    assert _check_manifest(tmp_path / "out")["family"] == family


def test_local_folder(tmp_path, tiny_sd3_folder):
    meta = download_model(_ctx(tmp_path, str(tiny_sd3_folder)), tmp_path / "out")
    assert meta["family"] == "sd3" and meta["num_files"] == len(_check_manifest(tmp_path / "out")["files"])


def test_hub_id_and_revision_from_the_offline_cache(tmp_path, tiny_sd3_folder, monkeypatch):
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "hub" / "models--acme--tiny-sd3"
    shutil.copytree(tiny_sd3_folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "v1").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    meta = download_model(_ctx(tmp_path, "acme/tiny-sd3", "v1"), tmp_path / "out")
    assert meta["revision"] == "v1" and meta["family"] == "sd3"
    _check_manifest(tmp_path / "out")
    with pytest.raises(
        ModelSourceError,
        match=r"cannot download model 'acme/tiny-sd3' at revision 'v2': .*HF_HUB_OFFLINE is set",
    ):
        download_model(_ctx(tmp_path, "acme/tiny-sd3", "v2"), tmp_path / "out2")


def test_unreachable_hub_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "2")
    with pytest.raises(ModelSourceError, match="cannot download model 'acme/missing'"):
        download_model(_ctx(tmp_path, "acme/missing"), tmp_path / "out")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def moto_server():
    """A real S3-compatible server process on 127.0.0.1."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    yield url
    process.terminate()
    process.wait(timeout=10)


def test_s3_prefix_through_boto3(tmp_path, tiny_sd3_folder, moto_server, monkeypatch):
    import boto3

    from flowgrpo_core.storage import upload_folder

    for var, value in {
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", moto_server)  # the variable MLflow users already set
    monkeypatch.setenv("FLOWGRPO_CACHE", str(tmp_path / "cache"))
    boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket="weights")
    upload_folder(tiny_sd3_folder, "s3://weights/base/tiny-sd3")
    meta = download_model(_ctx(tmp_path, "s3://weights/base/tiny-sd3"), tmp_path / "out")
    assert meta["family"] == "sd3"
    manifest = _check_manifest(tmp_path / "out")
    assert (
        manifest["files"]["model_index.json"]["sha256"]
        == hashlib.sha256((tiny_sd3_folder / "model_index.json").read_bytes()).hexdigest()
    )
    with pytest.raises(ModelSourceError, match="no objects under s3://weights/nothing"):
        download_model(_ctx(tmp_path, "s3://weights/nothing"), tmp_path / "out3")


def test_unsupported_pipeline_class_is_named(tmp_path, tiny_sd3_folder):
    folder = tmp_path / "odd"
    shutil.copytree(tiny_sd3_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="pipeline class 'StableDiffusionXLPipeline' is not supported"):
        download_model(_ctx(tmp_path, str(folder)), tmp_path / "out")
