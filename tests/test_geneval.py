"""GenEval rules on hand-built detections (right and wrong answers per task type), the per-tag report,
and the transformers code path (tiny random OWLv2 / Mask2Former + CLIP) end to end on an image."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from reward_fixtures import tiny_clip_folder

from flowgrpo_core.evaluation.geneval import (
    Detection,
    GenEvalScorer,
    Thresholds,
    check,
    keep_confident,
    relative_position,
    summarize,
    summarize_verdicts,
)
from flowgrpo_core.prompts.vocabulary import COLORS, validate_metadata


def det(label: str, box: tuple, score: float = 0.95, color: str | None = None) -> Detection:
    return Detection(label, score, tuple(float(v) for v in box), color=color)


def verdict(detections: list[Detection], metadata: dict):
    validate_metadata(metadata)
    return check(keep_confident(detections, metadata["tag"]), metadata)


SINGLE = {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}
TWO = {
    "tag": "two_object",
    "include": [{"class": "cat", "count": 1}, {"class": "tv remote", "count": 1}],
    "prompt": "a photo of a cat and a tv remote",
}
COUNTING = {
    "tag": "counting",
    "include": [{"class": "clock", "count": 2}],
    "exclude": [{"class": "clock", "count": 3}],
    "prompt": "a photo of two clocks",
}
COLORS_META = {
    "tag": "colors",
    "include": [{"class": "car", "count": 1, "color": "red"}],
    "prompt": "a photo of a red car",
}
POSITION = {
    "tag": "position",
    "include": [
        {"class": "teddy bear", "count": 1},
        {"class": "dog", "count": 1, "position": ["right of", 0]},
    ],
    "prompt": "a photo of a dog right of a teddy bear",
}
COLOR_ATTR = {
    "tag": "color_attr",
    "include": [
        {"class": "car", "count": 1, "color": "red"},
        {"class": "bench", "count": 1, "color": "blue"},
    ],
    "prompt": "a photo of a red car and a blue bench",
}


def test_single_object_needs_a_confident_detection():
    assert verdict([det("bench", (0, 0, 10, 10), 0.31)], SINGLE).correct
    wrong = verdict(
        [det("bench", (0, 0, 10, 10), 0.3), det("cat", (0, 0, 5, 5))], SINGLE
    )  # 0.3 is not above 0.3
    assert not wrong.correct and wrong.reason == "expected bench>=1, found 0" and wrong.fraction == 0.0
    assert verdict(
        [det("bench", (0, 0, 10, 10)), det("bench", (20, 0, 30, 10))], SINGLE
    ).correct  # GenEval: at least


def test_two_object_needs_both():
    assert verdict([det("cat", (0, 0, 10, 10)), det("tv remote", (20, 0, 30, 10))], TWO).correct
    wrong = verdict([det("cat", (0, 0, 10, 10)), det("tv", (20, 0, 30, 10))], TWO)
    assert not wrong.correct and wrong.reason == "expected tv remote>=1, found 0" and wrong.fraction == 0.5


def test_counting_uses_the_counting_threshold_and_the_exclude_clause():
    two = [det("clock", (0, 0, 10, 10), 0.95), det("clock", (20, 0, 30, 10), 0.92)]
    assert verdict(two, COUNTING).correct
    unsure = verdict(
        [two[0], det("clock", (20, 0, 30, 10), 0.85)], COUNTING
    )  # 0.85 counts elsewhere, not here
    assert not unsure.correct and unsure.reason == "expected clock>=2, found 1"
    assert unsure.fraction == pytest.approx(2 / 3)  # 1 of 2 instances + the exclude clause
    three = verdict([*two, det("clock", (40, 0, 50, 10), 0.99)], COUNTING)
    assert (
        not three.correct
        and three.reason == "expected clock<3, found 3"
        and three.fraction == pytest.approx(2 / 3)
    )


def test_colors_reads_the_colour_of_the_most_confident_objects():
    assert verdict([det("car", (0, 0, 10, 10), color="red")], COLORS_META).correct
    wrong = verdict(
        [det("car", (0, 0, 10, 10), 0.9, color="blue"), det("car", (20, 0, 30, 10), 0.5, color="red")],
        COLORS_META,
    )
    assert not wrong.correct and wrong.reason == "expected red car>=1, found 0 red; and 1 blue"
    assert wrong.fraction == 0.5
    with pytest.raises(ValueError, match="no colour"):
        verdict([det("car", (0, 0, 10, 10))], COLORS_META)


def test_position_compares_box_centres_with_a_margin():
    bear = det("teddy bear", (0, 0, 10, 10))
    assert verdict([bear, det("dog", (30, 0, 40, 10))], POSITION).correct
    left = verdict([bear, det("dog", (-30, 0, -20, 10))], POSITION)
    assert not left.correct and left.reason == "expected dog right of target, found left of target"
    assert left.fraction == pytest.approx(2 / 3)  # both objects found, the relation fails
    # centres 2 px apart with sizes 10 + 10: the 0.1 margin eats the whole offset
    overlap = verdict([bear, det("dog", (2, 0, 12, 10))], POSITION)
    assert not overlap.correct and overlap.reason == "expected dog right of target, found  target"
    missing = verdict([det("dog", (30, 0, 40, 10))], POSITION)
    assert (
        not missing.correct
        and missing.reason == "expected teddy bear>=1, found 0\nno target for dog to be right of"
    )


def test_relative_position_closed_form():
    b = det("x", (0, 0, 10, 10))
    assert relative_position(det("x", (20, 0, 30, 10)), b) == {"right of"}
    assert relative_position(det("x", (0, -20, 10, -10)), b) == {"above"}
    assert relative_position(det("x", (20, 20, 30, 30)), b) == {
        "right of",
        "below",
    }  # diagonal: dx = dy = 0.64
    # offset 3 along x, margin 0.1 * 20 = 2: revised offset 1, normalised 1/3 < 0.5
    assert relative_position(det("x", (3, 0, 13, 10)), b) == set()
    assert relative_position(det("x", (3, 0, 13, 10)), b, margin=0.0) == {"right of"}


def test_color_attribution_binds_each_colour_to_its_object():
    right = [det("car", (0, 0, 10, 10), color="red"), det("bench", (20, 0, 30, 10), color="blue")]
    assert verdict(right, COLOR_ATTR).correct
    swapped = verdict(
        [det("car", (0, 0, 10, 10), color="blue"), det("bench", (20, 0, 30, 10), color="red")], COLOR_ATTR
    )
    assert not swapped.correct and swapped.fraction == 0.5
    assert swapped.reason.splitlines() == [
        "expected red car>=1, found 0 red; and 1 blue",
        "expected blue bench>=1, found 0 blue; and 1 red",
    ]


def test_fraction_is_one_exactly_when_correct():
    rng = np.random.default_rng(0)
    labels = ["car", "bench", "clock", "dog", "teddy bear"]
    for _ in range(300):
        detections = [
            det(
                str(rng.choice(labels)),
                tuple(rng.uniform(0, 50, 2)) + tuple(rng.uniform(55, 100, 2)),
                float(rng.uniform(0.2, 1)),
                str(rng.choice(COLORS[:3])),
            )
            for _ in range(int(rng.integers(0, 5)))
        ]
        for meta in (SINGLE, COUNTING, COLORS_META, POSITION, COLOR_ATTR):
            result = verdict(detections, meta)
            assert (result.fraction == 1.0) == result.correct and 0.0 <= result.fraction <= 1.0


def test_keep_confident_sorts_thresholds_and_caps():
    many = [det("cup", (i, 0, i + 1, 1), 0.31 + i / 100) for i in range(20)] + [det("cup", (0, 0, 1, 1), 0.2)]
    kept = keep_confident(many, "colors")["cup"]
    assert len(kept) == 16 and [d.score for d in kept] == sorted((d.score for d in kept), reverse=True)
    assert keep_confident(many, "counting") == {}  # none above 0.9
    assert len(keep_confident(many, "counting", Thresholds(counting=0.45))["cup"]) == 5


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"tag": "pose", "include": [{"class": "cat", "count": 1}]}, "unknown tag 'pose'"),
        (
            {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "teal"}]},
            r"include\[0\]: unknown color 'teal'",
        ),
        (
            {"tag": "position", "include": [{"class": "cat", "count": 1, "position": ["left of", 0]}]},
            "must index an earlier include",
        ),
        ({"tag": "counting", "include": [{"class": "cat", "count": 0}]}, "'count' must be an integer >= 1"),
        ({"tag": "single_object", "include": []}, "non-empty list"),
        (
            {"tag": "single_object", "include": [{"class": "cat", "count": 1, "size": 3}]},
            r"unknown keys \['size'\]",
        ),
    ],
)
def test_invalid_metadata_names_the_field(metadata, message):
    with pytest.raises(ValueError, match=message):
        validate_metadata(metadata)


def test_report_is_the_mean_over_tags_like_geneval_summary():
    tags = ["single_object"] * 4 + ["counting"]
    correct = [True, True, True, False, False]
    report = summarize_verdicts(tags, correct, prompts=["a", "a", "b", "c", "d"])
    assert report.per_tag == {"single_object": 0.75, "counting": 0.0}
    assert report.overall == 0.375  # not the image mean, 0.6
    assert report.counts == {"single_object": (3, 4), "counting": (0, 1)} and report.prompts == 4
    assert report.correct_prompts == 0.5
    assert report.metrics() == {
        "geneval/overall": 0.375,
        "geneval/overall_se": pytest.approx(math.sqrt(0.75 * 0.25 / 4) / 2),
        "geneval/single_object": 0.75,
        "geneval/counting": 0.0,
    }
    text = report.to_text()
    assert "single_object    = 75.00% (3 / 4)" in text and "Overall score (avg. over tasks): 0.37500" in text
    # sqrt(0.75 * 0.25 / 4 + 0 / 1) / 2 tasks
    assert report.standard_error == pytest.approx(math.sqrt(0.75 * 0.25 / 4) / 2)
    assert "(standard error 0.10825)" in text
    results = [verdict([det("bench", (0, 0, 9, 9), s)], SINGLE) for s in (0.9, 0.1)]
    assert summarize(results, [SINGLE, SINGLE]).per_tag == {"single_object": 0.5}
    assert summarize(results, [SINGLE, SINGLE]).prompts == 1


def test_standard_error_of_the_mean_over_tags():
    tags = ["single_object"] * 10 + ["counting"] * 20
    correct = [True] * 5 + [False] * 5 + [True] * 4 + [False] * 16
    report = summarize_verdicts(tags, correct)
    # each task a binomial proportion: var 0.5 * 0.5 / 10 and 0.2 * 0.8 / 20; the mean of two divides by 2
    assert report.standard_error == pytest.approx(math.sqrt(0.025 + 0.008) / 2)
    assert summarize_verdicts(["counting"] * 3, [True] * 3).standard_error == 0.0


# ---- the transformers code path on tiny random models --------------------------------------------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from tiny_detectors import save_tiny_mask2former, save_tiny_owlv2

    root = tmp_path_factory.mktemp("geneval-models")
    return {
        "owlv2": save_tiny_owlv2(root / "owlv2"),
        "mask2former": save_tiny_mask2former(root / "mask2former"),
        "clip": tiny_clip_folder(root / "clip"),
    }


def photo(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_owlv2_and_clip_score_an_image_end_to_end(tiny_models):
    from flowgrpo_core.evaluation.detectors import ClipColorClassifier, TransformersDetector

    detector = TransformersDetector(str(tiny_models["owlv2"]), min_score=0.0)
    assert detector.family == "owlv2" and "computer mouse" in detector.vocabulary
    found = detector.detect([photo(), photo(48, 80, 1)], ["car", "bench"])
    assert len(found) == 2 and all(found)
    for image, detections in zip([photo(), photo(48, 80, 1)], found):
        for d in detections:
            assert d.label in ("car", "bench") and 0.0 <= d.score <= 1.0
            assert 0 <= d.box[0] <= d.box[2] <= image.width and 0 <= d.box[1] <= d.box[3] <= image.height
    # every detection kept (threshold below any score), queries limited to the metadata's classes:
    # the colour classifier must colour the most confident car and bench
    scorer = GenEvalScorer(
        detector, ClipColorClassifier(str(tiny_models["clip"])), Thresholds(presence=-1.0), vocabulary=()
    )
    result = scorer([photo()], [COLOR_ATTR])[0]
    assert set(result.detected) <= {"car", "bench"}
    colored = [d["color"] for dets in result.detected.values() for d in dets[:1]]
    assert colored and all(c in COLORS for c in colored)
    assert 0.0 <= result.fraction <= 1.0 and result.tag == "color_attr"


def test_geneval_reward_on_tiny_models(tiny_models):
    from flowgrpo_core.rewards.geneval import GenEvalReward

    reward = GenEvalReward(
        detector=str(tiny_models["owlv2"]), clip=str(tiny_models["clip"]), threshold=-1.0, device="cpu"
    )
    out = reward([photo(), photo(seed=3)], [COLORS_META["prompt"], TWO["prompt"]], [COLORS_META, TWO])
    assert out.scores.shape == (2,) and set(out.details) == {"correct", "fraction", "tag", "reason"}
    assert out.details["tag"] == ["colors", "two_object"]
    assert np.array_equal(out.scores, out.details["fraction"])
    strict = GenEvalReward(
        detector=str(tiny_models["owlv2"]), clip=str(tiny_models["clip"]), threshold=2.0, score="strict"
    )
    out = strict([photo()], ["a photo of a bench"], [SINGLE])
    assert out.scores.tolist() == [0.0] and out.details["reason"] == ["expected bench>=1, found 0"]
    with pytest.raises(
        ValueError, match=r"metadata 0 of 'a cat': unknown tag None.*use a GenEval prompt set"
    ):
        strict([photo()], ["a cat"], [{}])
    with pytest.raises(ValueError, match=r"metadata 1 of 'x': include\[0\]: unknown color 'teal'"):
        strict.check_inputs(
            ["a photo of a bench", "x"],
            [SINGLE, {**COLORS_META, "include": [{"class": "car", "count": 1, "color": "teal"}]}],
        )
    with pytest.raises(ValueError, match="unknown GenEval score"):
        GenEvalReward(detector=str(tiny_models["owlv2"]), clip=str(tiny_models["clip"]), score="soft")


def test_mask2former_masks_boxes_and_geneval_names(tiny_models):
    from flowgrpo_core.evaluation.detectors import TransformersDetector

    detector = TransformersDetector(str(tiny_models["mask2former"]), min_score=0.0)
    # the checkpoint says "mouse" / "remote" / "keyboard" (COCO); GenEval's prompts say these
    assert {"computer mouse", "tv remote", "computer keyboard"} <= set(detector.vocabulary)
    assert "mouse" not in detector.vocabulary and detector.default_thresholds == Thresholds()
    image = photo(100, 60)
    detections = detector.detect([image], ["cat"])[0]
    assert detections
    for d in detections:
        assert d.mask.shape == (60, 100) and d.mask.any()
        ys, xs = np.nonzero(d.mask)
        assert d.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # mmdet's mask2bbox
    with pytest.raises(ValueError, match="cannot find"):
        detector.detect([image], ["circle"])
    resized = TransformersDetector(str(tiny_models["mask2former"]), min_score=0.0, image_size=96)
    assert all(d.mask.shape == (60, 100) for d in resized.detect([image], [])[0])


def test_colour_crop_pastes_the_mask_on_grey(tiny_models):
    from flowgrpo_core.evaluation.detectors import ClipColorClassifier

    classifier = ClipColorClassifier(str(tiny_models["clip"]))
    image = Image.new("RGB", (20, 10), (255, 0, 0))
    mask = np.zeros((10, 20), dtype=bool)
    mask[2:5, 3:8] = True
    crop = np.asarray(classifier.crop(image, Detection("car", 1.0, (2.0, 1.0, 9.0, 6.0), mask=mask)))
    assert crop.shape == (5, 7, 3)
    assert (crop[1:4, 1:6] == (255, 0, 0)).all() and (crop[0] == (0x99, 0x99, 0x99)).all()
    assert classifier.classifier("car").shape == (len(COLORS), 16)


def test_owlv2_nms_removes_duplicate_boxes():
    import torch

    from flowgrpo_core.evaluation.detectors import _nms

    boxes = torch.tensor(
        [[0, 0, 10, 10], [1, 0, 11, 10], [20, 0, 30, 10], [0, 0, 10, 10.5]], dtype=torch.float32
    )
    scores = torch.tensor([0.5, 0.9, 0.4, 0.3])
    assert _nms(boxes, scores, 0.5) == [1, 2]  # IoU(0, 1) = 0.82; box 3 overlaps box 1 too
    assert _nms(boxes, scores, 0.96) == [1, 0, 2, 3]  # IoU(0, 3) = 100 / 105 = 0.952
