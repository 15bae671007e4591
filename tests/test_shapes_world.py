"""The shapes world (issue 7): the packaged base model (``shapes:sd3``) loads, draws, follows prompts
sometimes, and trains under the ``shapes`` preset with the shapes GenEval reward."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flowgrpo_core.config import load_config
from flowgrpo_core.evaluation.compare import generate
from flowgrpo_core.models import adapter_for, load_model
from flowgrpo_core.models.loading import ModelSourceError, parse_source, resolution_factor, resolve_folder
from flowgrpo_core.pretrain.config import ShapesModelSpec
from flowgrpo_core.pretrain.run import shapes_accuracy
from flowgrpo_core.pretrain.shapes_model import build_shapes_sd3
from flowgrpo_core.prompts import load_prompts
from flowgrpo_core.trainer import FlowGRPOTrainer

# Where the packaged folder is missing (a source checkout without package data) these tests are reported as
# skipped, never as passed.
pytestmark = pytest.mark.skipif(
    not (
        Path(__file__).resolve().parents[1] / "flowgrpo_core" / "data" / "shapes-sd3" / "model_index.json"
    ).is_file(),
    reason="the packaged shapes:sd3 folder is missing (flowgrpo_core/data/shapes-sd3: package data not installed)",
)

# the shipped model scores 0.29 on this subset (0.31 on all of shapes_test, PROVENANCE.md); the margin absorbs
# other CPUs drawing slightly different images from the same seeds
LOW = 0.15
SHAPES_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


@pytest.fixture(scope="module")
def shapes_model():
    return load_model("shapes:sd3")


def _test_subset(per_tag: int = 4):
    """A fixed subset of shapes_test: the first ``per_tag`` prompts of every tag (at most)."""
    test = load_prompts("builtin:shapes_test")
    chosen: dict[str, list[int]] = {}
    for index, meta in enumerate(test.metadata):
        chosen.setdefault(meta["tag"], [])
        if len(chosen[meta["tag"]]) < per_tag:
            chosen[meta["tag"]].append(index)
    return test.take(sorted(i for indices in chosen.values() for i in indices))


def test_packaged_source_resolves_to_the_shipped_folder():
    parsed = parse_source("shapes:sd3")
    assert parsed.kind == "packaged"
    folder = resolve_folder("shapes:sd3")
    assert folder == Path(parsed.location)
    assert (folder / "model_index.json").is_file() and (folder / "PROVENANCE.md").is_file()
    weights = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors"))
    assert "transformer/diffusion_pytorch_model.safetensors" in weights
    assert sum(p.stat().st_size for p in folder.rglob("*")) < 20e6  # "a few MB"
    assert resolution_factor("shapes:sd3") == 8  # VAE x4, patch 2: read from the folder's configs
    with pytest.raises(ModelSourceError, match="unknown packaged model"):
        parse_source("shapes:flux")


def test_packaged_model_draws_64px_images(shapes_model):
    assert shapes_model.family == "sd3"
    images = generate(
        shapes_model,
        ["a red circle", "two squares"],
        [0, 1],
        resolution=64,
        num_steps=8,
        guidance_scale=4.5,
        batch_size=2,
        max_sequence_length=16,
    )
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    assert np.asarray(images[0]).std() > 5  # not a flat canvas


def test_packaged_model_follows_prompts_sometimes(shapes_model):
    """The documented range of the base: clearly above a random model (about 0), far from perfect."""
    subset = _test_subset()
    kwargs = dict(min_images_per_tag=8, num_steps=20, guidance_scale=4.5)
    trained = shapes_accuracy(shapes_model, subset, **kwargs)
    random = shapes_accuracy(adapter_for(build_shapes_sd3(ShapesModelSpec(), seed=0)), subset, **kwargs)
    assert set(trained) == {*SHAPES_TAGS, "overall", "overall_se"}
    assert 0 < trained["overall_se"] < 0.2, trained
    assert LOW <= trained["overall"] <= 0.8, trained
    assert random["overall"] <= 0.05, random


def test_shapes_preset_is_valid():
    cfg = load_config("shapes")
    assert cfg.model.source == "shapes:sd3"
    assert cfg.rewards == {"shapes_geneval": 1.0}
    assert cfg.eval.metrics == ["shapes_geneval"]
    assert (cfg.prompts.train, cfg.prompts.eval) == ("builtin:shapes_train", "builtin:shapes_test")
    assert cfg.sampling.resolution % resolution_factor("shapes:sd3") == 0
    assert cfg.sampling.max_sequence_length == 16  # the length the base model was trained with
    fast = load_config("shapes", overrides=["sampling.sde_window_size=2"])
    assert fast.trained_steps_per_sample == 2
    assert cfg.sampling.images_per_epoch % cfg.sampling.batch_size == 0


def test_shapes_preset_trains_an_epoch_with_signal(tmp_path):
    cfg = load_config("shapes", overrides=["sampling.groups_per_epoch=2", "train.checkpoint_every=0"])
    trainer = FlowGRPOTrainer(cfg, tmp_path, progress=False)
    metrics = trainer.train(epochs=1)[-1]
    assert 0.0 <= metrics["reward/total"] <= 1.0
    assert metrics["reward/shapes_geneval/zero_variance_share"] < 1.0  # the groups carry within-group signal
    assert metrics["train/ratio_mean"] == pytest.approx(1.0, abs=0.05)
