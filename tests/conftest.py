"""Shared fixtures. Tests never reach a model hub: HF_HUB_OFFLINE is set for the whole session."""

import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def tiny_sd3_folder(tmp_path_factory):
    """The tiny SD3 saved as a diffusers folder, as download_model would write it."""
    from flowgrpo_core.models.tiny import build_tiny_sd3

    folder = tmp_path_factory.mktemp("tiny-sd3")
    build_tiny_sd3(seed=0).save_pretrained(folder)
    return folder


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    """``cache(folder, repo_id)`` lays ``folder`` out as huggingface_hub caches a download
    (``models--org--name/snapshots/<commit>``, ``refs/main``) in an offline cache of this test's own."""

    def cache(folder, repo_id: str) -> str:
        commit = "0123456789abcdef0123456789abcdef01234567"
        repo = tmp_path / "hub" / ("models--" + repo_id.replace("/", "--"))
        shutil.copytree(folder, repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        return repo_id

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture()
def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
