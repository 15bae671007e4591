"""Checks every model family passes on its tiny model, shared by the family test files: an interrupted and
resumed run ends where a straight one does, and the whole DAG registers a pyfunc that generates images."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable

import torch
from PIL import Image

# two ways to batch one epoch of 8 images: one sampling batch; two batches (padded to one length where prompts
# differ) trained in sampling order, as upstream does
ON_POLICY_BATCHINGS = [
    ["sampling.batch_size=8"],
    ["sampling.batch_size=4", "train.shuffle_samples=false", "train.zero_advantage=keep"],
]
# the reference presets' training set-up: bf16 weights, float32 LoRA, bf16 autocast, activation checkpointing
BF16_SETUP = [
    "model.dtype=bfloat16",
    "train.mixed_precision=bf16",
    "train.gradient_checkpointing=true",
    "sampling.batch_size=8",
    "train.optimizer_steps_per_epoch=1",
]


def on_policy_epoch(trainer) -> dict:
    """One epoch whose single optimiser step comes after every ratio: all ratios exactly 1 and, with LoRA's
    B = 0 at the start, KL exactly 0. Returns the epoch's metrics."""
    (metrics,) = trainer.train(epochs=1)
    assert metrics["train/ratio_min"] == 1.0 and metrics["train/ratio_max"] == 1.0
    assert metrics["train/approx_kl"] == 0.0 and metrics["train/kl"] == 0.0
    return metrics


def bf16_epoch(trainer) -> dict:
    """One epoch under ``BF16_SETUP``: finite log-probs, ratios exactly 1, float32 finite trainable weights."""
    (metrics,) = trainer.train(epochs=1)
    assert torch.isfinite(trainer.last_samples.log_probs).all()
    assert metrics["train/ratio_min"] == 1.0 and metrics["train/ratio_max"] == 1.0
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in trainer.trainable.values())
    return metrics


def straight_and_resumed(make_trainer: Callable[..., object], *overrides: str, epochs: int, stop_at: int):
    """``make_trainer(*overrides, name=...)`` builds a trainer in a folder of that name. Trains ``epochs`` straight,
    and ``stop_at`` then the rest with a resume in between; asserts both end with the same weights, EMA and history
    (times aside) and returns (straight, resumed) for the caller's own checks."""
    straight = make_trainer(*overrides, name="straight")
    straight.train(epochs=epochs)
    first = make_trainer(*overrides, name="resumed")
    first.train(epochs=stop_at)
    torch.manual_seed(999)  # a fresh process would start with other global RNG state
    second = make_trainer(*overrides, name="resumed")
    assert second.resume() and second.epoch == stop_at
    second.train(epochs=epochs)
    a, b = straight.trainable, second.trainable
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(straight.ema.shadow[k], second.ema.shadow[k]) for k in a)
    assert without_times(straight.history) == without_times(second.history)
    return straight, second


def without_times(records: list[dict]) -> list[dict]:
    """Metric records without their ``time/`` entries, which no two runs share."""
    return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in records]


def assert_resume_is_exact(make_trainer: Callable[..., object]) -> None:
    """The tiny preset of a family: three epochs straight and 2 + 1 with a resume in between end alike, and it
    did train."""
    opts = ["train.checkpoint_every=1", "train.ema_update_interval=1", "sampling.batch_size=4"]
    straight, _ = straight_and_resumed(make_trainer, *opts, epochs=3, stop_at=2)
    assert any(p.abs().sum() > 0 for n, p in straight.trainable.items() if "lora_B" in n)  # it did train


def assert_dag_registers_a_pyfunc(tmp_path, source: str, family: str) -> None:
    """`flowgrpo run --preset tiny --model-source <source>` (the local runner): six finished stages, the model
    registered as ``flowgrpo-<family>``, and its pyfunc generating 64 px images."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from flowgrpo_core.stages import PipelineContext
    from pipelines.runner import run_local

    args = PipelineContext(
        preset="tiny",
        overrides=["train.epochs=1", "calibration.epochs=1", "eval.num_prompts=2", "eval.num_steps=3"],
        model_source=source,
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        workdir=str(tmp_path / "work"),
        experiment=f"{family}-dag",
    )
    result = run_local(args, pipeline_root=str(tmp_path / "kfp"))
    assert result.registered == f"flowgrpo-{family}/1"
    client = MlflowClient()
    runs = client.search_runs(
        [client.get_run(result.parent_run_id).info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'",
    )
    by_stage = {r.data.tags["stage"]: r for r in runs}
    assert all(r.info.status == "FINISHED" for r in runs) and len(by_stage) == 6
    assert by_stage["download_model"].data.params["model.family"] == family
    assert "eval/policy/reward_mean" in by_stage["evaluate"].data.metrics
    version = client.get_model_version_by_alias(f"flowgrpo-{family}", "candidate")
    assert version.tags["base.source"] == source
    model = mlflow.pyfunc.load_model(f"models:/flowgrpo-{family}@candidate")
    out = model.predict({"prompt": ["a photo of a cat", "a red fox in the snow"]}, params={"seed": 5})
    images = [Image.open(io.BytesIO(base64.b64decode(text))) for text in out["image"]]
    assert list(out["seed"]) == [5, 6]
    assert len(images) == 2 and all(im.size == (64, 64) and im.mode == "RGB" for im in images)


def train_from_the_command_line(out, source: str, epochs: int) -> tuple[str, list[str]]:
    """``flowgrpo train --preset tiny`` on ``source`` (4 steps) in a subprocess: its output and the exported LoRA's
    keys."""
    import subprocess
    import sys

    from safetensors import safe_open

    result = subprocess.run(
        [sys.executable, "-m", "flowgrpo_core.cli", "train", "--preset", "tiny", "--set",
         f"model.source={source}", "--set", "sampling.num_steps=4", "--epochs", str(epochs), "--out", str(out),
         "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with safe_open(str(out / "policy" / "pytorch_lora_weights.safetensors"), "pt") as f:
        return result.stdout + result.stderr, list(f.keys())
