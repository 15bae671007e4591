"""The shapes world: scenes rendered from GenEval metadata with known counts, colours and positions are
found again by the colour-segmentation detector and judged correctly by the GenEval rules."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from PIL import Image, ImageDraw

from flowgrpo_core.evaluation.geneval import GenEvalScorer, check, keep_confident
from flowgrpo_core.evaluation.shapes import (
    BACKGROUND,
    PALETTE,
    SHAPES,
    ShapesDetector,
    draw_shape,
    pixel_box,
    render_scene,
    shape_features,
)
from flowgrpo_core.prompts.generators import generate_builtin
from flowgrpo_core.prompts.vocabulary import COLORS
from flowgrpo_core.rewards.geneval import ShapesGenEvalReward

SHAPES_METADATA = generate_builtin("shapes_train") + generate_builtin("shapes_test")


def random_scenes(count: int, size: int, seed: int) -> list[tuple[dict, Image.Image]]:
    """``count`` scenes of random shapes-world prompts, the six tags taking turns."""
    rng = np.random.default_rng(seed)
    by_tag: dict[str, list[dict]] = {}
    for meta in SHAPES_METADATA:
        by_tag.setdefault(meta["tag"], []).append(meta)
    groups = list(by_tag.values())
    chosen = [groups[i % len(groups)][rng.integers(len(groups[i % len(groups)]))] for i in range(count)]
    return [(meta, render_scene(meta, size=size, seed=rng).image) for meta in chosen]


def test_rendered_ground_truth_satisfies_its_metadata():
    for index, meta in enumerate(SHAPES_METADATA):
        scene = render_scene(meta, size=96, seed=index)
        result = check(keep_confident(scene.objects, meta["tag"]), meta)
        assert result.correct, (meta["prompt"], result.reason)
        assert len(scene.objects) == sum(req["count"] for req in meta["include"])


@pytest.mark.parametrize("size", [64, 128])
def test_detector_and_rules_accept_random_scenes(size):
    scorer = GenEvalScorer(ShapesDetector())
    scenes = random_scenes(200, size, seed=size)
    results = scorer([image for _, image in scenes], [meta for meta, _ in scenes])
    failures = [(r.tag, r.prompt, r.reason) for r in results if not r.correct]
    assert len(failures) <= 0.05 * len(scenes), failures[:5]
    assert {r.tag for r in results} == {
        "single_object",
        "two_object",
        "counting",
        "colors",
        "position",
        "color_attr",
    }


def wrong_version(meta: dict, rng: np.random.Generator) -> dict:
    """The same prompt with one requirement changed: another count, colour, relation or class."""
    wrong = copy.deepcopy(meta)
    first = wrong["include"][0]
    if meta["tag"] == "counting":
        first["count"] += 1
        wrong["exclude"][0]["count"] += 1
    elif meta["tag"] in ("colors", "color_attr"):
        first["color"] = str(rng.choice([c for c in COLORS if c != first["color"]]))
    elif meta["tag"] == "position":
        relation = wrong["include"][1]["position"][0]
        flipped = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[relation]
        wrong["include"][1]["position"][0] = flipped
    else:
        present = {req["class"] for req in meta["include"]}
        first["class"] = str(
            rng.choice([s for s in ("circle", "square", "triangle", "cross") if s not in present])
        )
    return wrong


def test_rules_reject_scenes_of_another_prompt():
    rng = np.random.default_rng(0)
    scenes = random_scenes(150, 96, seed=1)
    wrong = [wrong_version(meta, rng) for meta, _ in scenes]
    results = GenEvalScorer(ShapesDetector())([image for _, image in scenes], wrong)
    accepted = [(r.prompt, m["include"]) for r, m in zip(results, wrong) if r.correct]
    assert not accepted


def test_counts_colours_and_boxes_are_found_exactly():
    meta = {
        "tag": "counting",
        "include": [{"class": "triangle", "count": 3}],
        "exclude": [{"class": "triangle", "count": 4}],
        "prompt": "three triangles",
    }
    scene = render_scene(meta, size=128, seed=5)
    found = ShapesDetector().detect([scene.image])[0]
    assert sorted((d.label, d.color, d.box) for d in found) == sorted(
        (o.label, o.color, o.box) for o in scene.objects
    )
    assert all(d.score > 0.9 for d in found)  # clean renders pass GenEval's counting threshold


def test_every_shape_and_colour_is_recognised():
    detector = ShapesDetector()
    for shape in SHAPES:
        for color in COLORS:
            image = Image.new("RGB", (80, 80), BACKGROUND)
            draw_shape(ImageDraw.Draw(image), shape, (20, 24, 52, 56), color)
            (found,) = detector.detect([image])[0]
            assert (found.label, found.color, found.box) == (
                shape,
                color,
                pixel_box(shape, (20, 24, 52, 56), (80, 80)),
            )
            assert found.box[:3] == (20.0, 24.0, 52.0) and found.box[3] == (55.0 if shape == "star" else 56.0)


def test_detector_tolerates_noise():
    rng = np.random.default_rng(3)
    scenes = random_scenes(100, 128, seed=4)
    noisy = [
        Image.fromarray(
            (np.asarray(im, dtype=float) + rng.normal(0, 10, (128, 128, 3))).clip(0, 255).astype(np.uint8)
        )
        for _, im in scenes
    ]
    results = GenEvalScorer(ShapesDetector())(noisy, [meta for meta, _ in scenes])
    assert sum(r.correct for r in results) >= 95


def test_shape_features_closed_form():
    square = np.ones((10, 10), dtype=bool)
    assert shape_features(square).tolist() == [1.0, 0.5, 1.0, 0.0]
    triangle = np.tril(np.ones((10, 10), dtype=bool))  # right triangle: 55 of 100 pixels, digitally convex
    fill, centroid, solidity, aspect = shape_features(triangle)
    assert (fill, solidity, aspect) == (0.55, 1.0, 0.0) and centroid == pytest.approx(
        (np.arange(10) + 1) @ (np.arange(10) + 0.5) / 55 / 10
    )
    ring = square.copy()
    ring[3:7, 3:7] = False  # a hole: the convex hull still holds 100 pixels
    assert shape_features(ring)[2] == pytest.approx(0.84)


def test_background_and_stray_pixels_are_not_objects():
    image = Image.new("RGB", (64, 64), BACKGROUND)
    pixels = np.asarray(image).copy()
    pixels[10, 10] = PALETTE["red"]  # speckle
    pixels[30, 5:60] = PALETTE["blue"]  # a one-pixel line
    assert ShapesDetector().detect([Image.fromarray(pixels)]) == [[]]


def test_shapes_reward_scores_fraction_and_strict():
    meta = {
        "tag": "counting",
        "include": [{"class": "circle", "count": 2}],
        "exclude": [{"class": "circle", "count": 3}],
        "prompt": "two circles",
    }
    three = {
        "tag": "counting",
        "include": [{"class": "circle", "count": 3}],
        "exclude": [{"class": "circle", "count": 4}],
        "prompt": "three circles",
    }
    images = [render_scene(meta, size=96, seed=0).image, render_scene(three, size=96, seed=0).image]
    out = ShapesGenEvalReward()(images, [meta["prompt"]] * 2, [meta, meta])
    assert out.scores.tolist() == [1.0, 2 / 3]  # three circles: both instances found, the exclude fails
    assert out.details["correct"] == [1.0, 0.0] and out.details["reason"][1] == "expected circle<3, found 3"
    strict = ShapesGenEvalReward(score="strict")(images, [meta["prompt"]] * 2, [meta, meta])
    assert strict.scores.tolist() == [1.0, 0.0]


def test_renderer_is_deterministic_and_rejects_what_it_cannot_draw():
    meta = SHAPES_METADATA[0]
    assert render_scene(meta, seed=9).image.tobytes() == render_scene(meta, seed=9).image.tobytes()
    with pytest.raises(ValueError, match="unknown class 'dog'"):
        render_scene({"tag": "single_object", "include": [{"class": "dog", "count": 1}]})
    with pytest.raises(ValueError, match="at most 6"):
        render_scene({"tag": "counting", "include": [{"class": "circle", "count": 7}]})


def test_shapes_reward_behind_a_reward_server():
    from reward_fixtures import serving

    from flowgrpo_core.retrying_http import RewardServerError
    from flowgrpo_core.serving.client import RemoteReward

    scenes = random_scenes(6, 64, seed=11)
    images, metadata = [im for _, im in scenes], [meta for meta, _ in scenes]
    prompts = [meta["prompt"] for meta in metadata]
    reward = ShapesGenEvalReward()
    local = reward(images, prompts, metadata)
    with serving(reward, max_batch=4) as server:
        remote = RemoteReward("shapes_geneval", server.url)
        served = remote(images, prompts, metadata)
        assert remote.client.health()["model"]["detector"] == "shapes"
        with pytest.raises(
            RewardServerError, match=r"422.*unknown tag 'poses'"
        ):  # refused before scoring (422)
            remote(images[:1], ["a cat"], [{"tag": "poses", "include": [{"class": "cat", "count": 1}]}])
    assert served.scores.tolist() == local.scores.tolist()
    assert served.details == local.details
