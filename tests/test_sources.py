"""Where reward weights come from: local files and folders, s3:// (moto on 127.0.0.1, cached), hub ids."""

from __future__ import annotations

import pytest
import torch
from reward_fixtures import moto_s3

from flowgrpo_core.sources import (
    WeightsSourceError,
    load_state_dict,
    resolve_file,
    resolve_folder,
    resolve_weights,
)


def test_s3_prefix_and_object_are_downloaded_once_then_served_from_the_cache(tmp_path, monkeypatch):
    from flowgrpo_core.storage import s3_client, upload_folder

    monkeypatch.setenv("FLOWGRPO_CACHE", str(tmp_path / "cache"))  # the cache outlives the S3 server below

    source = tmp_path / "weights"
    (source / "sub").mkdir(parents=True)
    torch.save({"w": torch.arange(3.0)}, source / "head.pth")
    (source / "sub" / "config.json").write_text("{}")
    with moto_s3(tmp_path):
        s3_client().create_bucket(Bucket="bucket")
        upload_folder(source, "s3://bucket/models/v1")
        folder = resolve_folder("s3://bucket/models/v1")
        single = resolve_weights("s3://bucket/models/v1/head.pth", "ignored.pth")
        inside = resolve_file("s3://bucket/models/v1", "sub/config.json")
        with pytest.raises(WeightsSourceError, match="must not contain"):
            resolve_folder("s3://bucket/../etc")
    # the S3 server is gone: the cache alone answers now
    assert resolve_folder("s3://bucket/models/v1") == folder and (folder / ".complete").is_file()
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        ".complete",
        "head.pth",
        "sub/config.json",
    ]
    assert torch.equal(load_state_dict(single)["w"], torch.arange(3.0)) and inside.read_text() == "{}"


def test_local_sources(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "ckpt.pt")
    assert resolve_weights(str(tmp_path / "ckpt.pt"), "other.pt") == tmp_path / "ckpt.pt"
    assert resolve_weights(str(tmp_path), "ckpt.pt") == tmp_path / "ckpt.pt"
    assert torch.equal(
        load_state_dict(tmp_path / "ckpt.pt")["w"], torch.ones(2)
    )  # {"state_dict": ...} unwrapped
    with pytest.raises(WeightsSourceError, match="not found in folder"):
        resolve_file(str(tmp_path), "missing.pt")


def test_hub_id_offline_names_the_source(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        WeightsSourceError, match=r"cannot fetch 'nobody/no-such-model' from the hub \(HF_HUB_OFFLINE is set"
    ):
        resolve_folder("nobody/no-such-model")
