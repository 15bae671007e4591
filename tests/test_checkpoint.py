"""Checkpoints that are damaged after they were written, and checkpoints that cannot be written: a corrupt
newest checkpoint is reported by file and the run resumes from the newest intact one; a full disk or a
read-only folder is said in words, leaving the earlier checkpoints as they were."""

import errno
import json
import logging
import os
import re
import shutil

import pytest
import torch

from flowgrpo_core import checkpoint as ckpt_module
from flowgrpo_core.checkpoint import (
    MANIFEST,
    CheckpointWriteError,
    CorruptCheckpoint,
    load_checkpoint,
    load_latest_checkpoint,
    save_checkpoint,
)
from flowgrpo_core.config import load_config
from flowgrpo_core.trainer import FlowGRPOTrainer

OVERRIDES = [
    "train.checkpoint_every=1",
    "train.keep_checkpoints=3",
    "sampling.groups_per_epoch=2",
    "sampling.group_size=4",
    "sampling.num_steps=4",
]


def _trainer(run_dir):
    return FlowGRPOTrainer(load_config("tiny", overrides=OVERRIDES), run_dir, progress=False)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run with checkpoints after epochs 1 and 2 (trained once, copied by each test)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    _trainer(run).train(epochs=2)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-000001", "epoch-000002"]
    return run


@pytest.fixture()
def run(trained_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {
    "policy.safetensors": _truncate,
    "trainer_state.pt": _truncate,
    "ema.safetensors": lambda path: path.write_bytes(b""),
    "config.yaml": lambda path: path.write_text("train: [epochs: 1\n  beta: {\n"),
}


def _drop_manifests(run):
    """The run as written before checkpoints had a manifest."""
    for folder in (run / "checkpoints").iterdir():
        (folder / MANIFEST).unlink()


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "no-manifest"])
@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(run, caplog, name, manifest):
    if not manifest:
        _drop_manifests(run)  # then each file is checked by loading it
    damaged = run / "checkpoints" / "epoch-000002" / name
    CORRUPTIONS[name](damaged)
    trainer = _trainer(run)
    with caplog.at_level(logging.WARNING):
        assert trainer.resume() is True
    assert trainer.epoch == 1
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("flowgrpo_core")]
    assert len(warnings) == 1 and f"skipping corrupt checkpoint epoch-000002: {damaged}: " in warnings[0]
    previous = load_checkpoint(run / "checkpoints" / "epoch-000001")
    assert all(torch.equal(p, previous["policy"][k]) for k, p in trainer.trainable.items())


def test_no_intact_checkpoint_is_an_error_naming_the_folder(run):
    for epoch in (1, 2):
        _truncate(run / "checkpoints" / f"epoch-00000{epoch}" / "trainer_state.pt")
    with pytest.raises(
        CorruptCheckpoint, match=re.escape(f"{run / 'checkpoints'}: none of its 2 checkpoints is intact")
    ):
        _trainer(run).resume()


def test_an_explicitly_requested_corrupt_checkpoint_is_an_error_not_a_fallback(run):
    damaged = run / "checkpoints" / "epoch-000001" / "ema.safetensors"
    damaged.write_bytes(b"")
    trainer = _trainer(run)
    with pytest.raises(CorruptCheckpoint, match=re.escape(f"{damaged}: has 0 bytes")):
        trainer.resume(run / "checkpoints" / "epoch-000001")
    assert trainer.epoch == 0


def test_checkpoints_without_a_manifest_still_load(run):
    _drop_manifests(run)
    trainer = _trainer(run)
    assert trainer.resume() and trainer.epoch == 2
    saved = load_checkpoint(run / "checkpoints" / "epoch-000002")
    assert all(torch.equal(p, saved["policy"][k]) for k, p in trainer.trainable.items())


def _save(directory, epoch, **kwargs):
    return save_checkpoint(
        directory,
        epoch,
        {"w": torch.arange(4.0)},
        {"epoch": epoch, "rng": torch.zeros(3)},
        "train: {epochs: 1}\n",
        ema={"w": torch.ones(4)},
        **kwargs,
    )


def test_the_manifest_tells_truncation_from_altered_content(tmp_path):
    folder = _save(tmp_path, 1)
    files = json.loads((folder / MANIFEST).read_text())["files"]
    assert sorted(files) == sorted(CORRUPTIONS)
    policy = folder / "policy.safetensors"
    original = policy.read_bytes()
    policy.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))  # same size, other content
    with pytest.raises(CorruptCheckpoint, match=r"policy\.safetensors: content differs from the manifest"):
        load_checkpoint(folder)
    policy.write_bytes(original[:-8])
    with pytest.raises(CorruptCheckpoint, match=rf"policy.safetensors: has {len(original) - 8} bytes but"):
        load_checkpoint(folder)
    (folder / MANIFEST).write_text("{not json")
    with pytest.raises(CorruptCheckpoint, match=r"manifest\.json: unreadable manifest"):
        load_checkpoint(folder)


def test_the_manifest_covers_deepspeed_partitions_in_the_staging_folder(tmp_path):
    # DeepSpeed's ranks write their optimiser partitions into the staging folder before rank 0 completes it
    partition = (
        ckpt_module.staging_dir(tmp_path, 1) / "deepspeed" / "state" / "zero_pp_rank_1_optim_states.pt"
    )
    partition.parent.mkdir(parents=True)
    partition.write_bytes(b"partition of rank 1")
    folder = _save(tmp_path, 1, staged=True)
    files = json.loads((folder / MANIFEST).read_text())["files"]
    assert "deepspeed/state/zero_pp_rank_1_optim_states.pt" in files
    assert torch.equal(load_checkpoint(folder)["policy"]["w"], torch.arange(4.0))
    (folder / "deepspeed" / "state" / partition.name).write_bytes(b"partition of rank 9")
    with pytest.raises(CorruptCheckpoint, match=re.escape(f"{partition.name}: content differs")):
        load_checkpoint(folder)


def test_a_full_disk_is_said_in_words_and_earlier_checkpoints_stay(tmp_path, monkeypatch):
    _save(tmp_path, 1)

    def full_disk(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at inline_container.cc:603] . unexpected pos; basic_ios::clear: iostream error"
        )

    monkeypatch.setattr(ckpt_module.torch, "save", full_disk)
    monkeypatch.setattr(ckpt_module.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 100, 0))
    with pytest.raises(CheckpointWriteError) as caught:
        _save(tmp_path, 2)
    message = str(caught.value)
    assert isinstance(caught.value, OSError) and caught.value.errno == errno.ENOSPC
    assert str(tmp_path / "epoch-000002.tmp" / "trainer_state.pt") in message
    assert "No space left on device" in message and "epoch-000001) are intact" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-000001"]  # no .tmp left behind
    assert load_latest_checkpoint(tmp_path)[0].name == "epoch-000001"


def test_a_permission_error_names_the_file_and_its_cause(tmp_path, monkeypatch):
    _save(tmp_path, 1)

    def refused(tensors, filename, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", filename)

    monkeypatch.setattr(ckpt_module, "save_file", refused)
    with pytest.raises(CheckpointWriteError, match=r"policy\.safetensors: Permission denied; the earlier"):
        _save(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-000001"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_checkpoint_folder_is_refused_in_words(tmp_path):
    _save(tmp_path, 1)
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(CheckpointWriteError, match="Permission denied; the earlier checkpoints"):
            _save(tmp_path, 2)
    finally:
        tmp_path.chmod(0o755)
    assert load_latest_checkpoint(tmp_path)[0].name == "epoch-000001"


def test_a_run_whose_checkpoint_cannot_be_written_stops_with_the_reason(run, monkeypatch):
    trainer = _trainer(run)
    assert trainer.resume() and trainer.epoch == 2

    def full_disk(*args, **kwargs):
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(ckpt_module.torch, "save", full_disk)
    monkeypatch.setattr(ckpt_module.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 100, 0))
    with pytest.raises(
        OSError, match=r"trainer_state\.pt: No space left on device \(RuntimeError: basic_ios"
    ):
        trainer.train(epochs=3)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-000001", "epoch-000002"]


def test_the_launcher_reports_the_epoch_the_trainer_will_resume_from(run):
    # a launcher only verifies (it may be a small pod that cannot hold the weights): the corrupt epoch 2 is
    # skipped without loading anything, as the trainer will skip it
    from flowgrpo_core.checkpoint import latest_intact_checkpoint

    CORRUPTIONS["policy.safetensors"](run / "checkpoints" / "epoch-000002" / "policy.safetensors")
    warnings = []
    assert latest_intact_checkpoint(run / "checkpoints", warn=warnings.append).name == "epoch-000001"
    assert "epoch-000002" in warnings[0] and "policy.safetensors" in warnings[0]
