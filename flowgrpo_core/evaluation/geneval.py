"""GenEval's rules (Ghosh et al. 2023; docs/algorithm.md sect. 8) as pure functions over detections.

A prompt's metadata states its requirements in GenEval's format::

    {"tag": "position", "prompt": "a photo of a dog right of a teddy bear",
     "include": [{"class": "teddy bear", "count": 1},
                 {"class": "dog", "count": 1, "position": ["right of", 0]}],
     "exclude": []}

An image is **correct** when every ``include`` holds and no ``exclude`` does:
- presence: at least ``count`` objects of the class score above the confidence threshold (0.3; 0.9 for
  the ``counting`` tag);
- colour: each of the ``count`` most confident of them has ``color``;
- position: each of them stands in ``relation`` to every object matched by include number ``index``,
  judged from box centres after shrinking the offset by ``margin * (size_a + size_b)`` per axis;
- exclude: fewer than ``count`` objects of the class (counting prompts exclude ``count + 1``).
A set's accuracy is the share of correct images per tag, and the overall score the mean over tags.

This follows ``evaluation/evaluate_images.py`` and ``summary_scores.py`` of djghosh13/geneval, rule by
rule and with its reason strings; the detector and the colour classifier are behind interfaces
(``detectors.py``, ``shapes.py``) instead of mmdet + open_clip.
"""

from __future__ import annotations

import dataclasses
import json
import math
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image

from flowgrpo_core.prompts.vocabulary import COLORS, TAGS, validate_metadata


# GenEval's object_names.txt: the 80 COCO classes in COCO order, with three renamed to read well in a
# prompt (COCO's "mouse", "remote", "keyboard").
@dataclass(frozen=True)
class Detection:
    """One detected object. ``box`` is ``(x0, y0, x1, y1)`` in pixels (y grows downwards); ``mask`` an
    optional (H, W) bool array; ``color`` a name from :data:`COLORS` when the detector knows it (shapes),
    else filled in by a colour classifier."""

    label: str
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)
    color: str | None = None


@dataclass(frozen=True)
class Thresholds:
    """GenEval's defaults, calibrated for its Mask2Former (Swin-S, COCO) detector."""

    presence: float = 0.3  # minimum detection score (strictly above)
    counting: float = 0.9  # minimum score for prompts tagged ``counting``
    position_margin: float = 0.1  # offsets shrink by this fraction of the summed box sizes
    max_objects: int = 16  # most confident detections kept per class


class Detector(ABC):
    """Finds objects of named classes (``detectors.TransformersDetector``, ``shapes.ShapesDetector``).

    ``vocabulary``: classes always worth asking for (a closed-set detector: its labels);
    ``default_thresholds``: the GenEval thresholds that suit its scores."""

    vocabulary: tuple[str, ...] = ()
    default_thresholds: Thresholds = Thresholds()

    @abstractmethod
    def detect(self, images: Sequence[Image.Image], classes: Sequence[str]) -> list[list[Detection]]:
        """Detections per image (boxes in pixels of that image), for at least ``classes``."""


class ColorClassifier(Protocol):
    def classify(self, image: Image.Image, detections: Sequence[Detection], classname: str) -> list[str]:
        """One colour name from :data:`COLORS` per detection."""
        ...


def required_classes(metadata: Mapping[str, Any]) -> list[str]:
    """Classes named by the metadata, in order of appearance."""
    names = [req["class"] for req in [*metadata.get("include", []), *metadata.get("exclude", [])]]
    return list(dict.fromkeys(names))


def keep_confident(
    detections: Sequence[Detection], tag: str, thresholds: Thresholds = Thresholds()
) -> dict[str, list[Detection]]:
    """Detections per class, most confident first, above the tag's threshold, at most ``max_objects``.

    GenEval applies no non-maximum suppression here (its ``max_overlap`` is 1.0)."""
    threshold = thresholds.counting if tag == "counting" else thresholds.presence
    by_class: dict[str, list[Detection]] = defaultdict(list)
    for detection in sorted(detections, key=lambda d: -d.score):
        if detection.score > threshold and len(by_class[detection.label]) < thresholds.max_objects:
            by_class[detection.label].append(detection)
    return dict(by_class)


def relative_position(a: Detection, b: Detection, margin: float = 0.1) -> set[str]:
    """Where ``a`` is relative to ``b``: a subset of :data:`RELATIONS` (empty when they overlap too much).

    Each axis's centre offset shrinks by ``margin`` times the summed box sizes along it; the remaining
    offset, divided by the full offset's length, must exceed 0.5 along an axis for that relation."""
    boxes = np.array([a.box, b.box], dtype=np.float64).reshape(2, 2, 2)  # (object, corner, xy)
    center_a, center_b = boxes.mean(axis=1)
    size_a, size_b = np.abs(boxes[:, 1] - boxes[:, 0])
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - margin * (size_a + size_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


@dataclass
class GenEvalResult:
    """The verdict on one image.

    ``correct`` is GenEval's strict verdict. ``fraction`` is the share of requirement units met, a denser
    reward with ``fraction == 1`` exactly when ``correct``: one unit per required instance (found among
    the confident detections), one per required instance of the right colour, one per position clause
    (met only when GenEval's position check passes) and one per exclude clause."""

    tag: str
    prompt: str
    correct: bool
    fraction: float
    reason: str
    detected: dict[str, list[dict]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check(
    objects: Mapping[str, Sequence[Detection]], metadata: Mapping[str, Any], margin: float = 0.1
) -> GenEvalResult:
    """GenEval's verdict on confident detections grouped by class (see :func:`keep_confident`).

    Detections whose colour is checked must carry one (``Detection.color``); :class:`GenEvalScorer`
    fills it in with a colour classifier."""
    correct = True
    reasons: list[str] = []
    units = met = 0
    matched_groups: list[Sequence[Detection] | None] = []
    for req in metadata["include"]:
        classname, count = req["class"], req["count"]
        found = list(objects.get(classname, []))[:count]
        matched = len(found) >= count
        units, met = units + count, met + len(found)
        if not matched:
            reasons.append(f"expected {classname}>={count}, found {len(found)}")
        if "color" in req:
            colors = [_color_of(d, classname) for d in found]
            hits = colors.count(req["color"])
            units, met = units + count, met + hits
            if matched and hits < count:
                matched = False
                reasons.append(
                    f"expected {req['color']} {classname}>={count}, found {hits} {req['color']}; and "
                    + ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
                )
        if "position" in req:
            units += 1
            if matched:
                relation, target = req["position"]
                targets = matched_groups[target]
                if targets is None:
                    matched = False
                    reasons.append(f"no target for {classname} to be {relation}")
                else:
                    failure = _first_wrong_relation(found, targets, relation, margin)
                    if failure is not None:
                        matched = False
                        found_relations = " and ".join(sorted(failure))
                        reasons.append(
                            f"expected {classname} {relation} target, found {found_relations} target"
                        )
                met += matched
        matched_groups.append(found if matched else None)
        correct = correct and matched
    for req in metadata.get("exclude", []):
        classname, count = req["class"], req["count"]
        present = len(objects.get(classname, []))
        units += 1
        if present >= count:
            correct = False
            reasons.append(f"expected {classname}<{count}, found {present}")
        else:
            met += 1
    detected = {
        name: [
            {"box": [round(float(v), 1) for v in d.box], "score": round(float(d.score), 4), "color": d.color}
            for d in dets
        ]
        for name, dets in objects.items()
    }
    return GenEvalResult(
        tag=str(metadata.get("tag", "")),
        prompt=str(metadata.get("prompt", "")),
        correct=correct,
        fraction=met / units if units else float(correct),
        reason="\n".join(reasons),
        detected=detected,
    )


def _color_of(detection: Detection, classname: str) -> str:
    if detection.color is None:
        raise ValueError(f"a {classname!r} detection has no colour; give GenEvalScorer a colour classifier")
    return detection.color


def _first_wrong_relation(
    found: Sequence[Detection], targets: Sequence[Detection], relation: str, margin: float
) -> set[str] | None:
    for obj in found:
        for target in targets:
            relations = relative_position(obj, target, margin)
            if relation not in relations:
                return relations
    return None


class GenEvalScorer:
    """Detector + colour classifier + rules: images and their metadata in, one verdict per image out.

    Args:
        detector: a :class:`Detector`.
        colors: a colour classifier for detections that come without a colour (``ClipColorClassifier``);
            not needed when the detector attaches colours itself.
        thresholds: default: the detector's ``default_thresholds``.
        vocabulary: classes always queried besides those of the metadata; GenEval runs its detector
            over all 80 COCO classes, which matters for open-vocabulary detectors (each box goes to the
            best-scoring query). Default: the detector's ``vocabulary``.
    """

    def __init__(
        self,
        detector: Detector,
        colors: ColorClassifier | None = None,
        thresholds: Thresholds | None = None,
        vocabulary: Sequence[str] | None = None,
    ) -> None:
        self.detector = detector
        self.colors = colors
        self.thresholds = thresholds or detector.default_thresholds
        self.vocabulary = tuple(vocabulary if vocabulary is not None else detector.vocabulary)

    def __call__(
        self, images: Sequence[Image.Image], metadata: Sequence[Mapping[str, Any]]
    ) -> list[GenEvalResult]:
        if len(images) != len(metadata):
            raise ValueError(f"{len(images)} images but {len(metadata)} metadata entries")
        for index, meta in enumerate(metadata):
            try:
                validate_metadata(dict(meta))
            except ValueError as error:
                raise ValueError(
                    f"metadata {index} ({meta.get('prompt', '')!r}) is not GenEval metadata: {error}"
                ) from None
        classes = list(dict.fromkeys([*self.vocabulary, *(c for m in metadata for c in required_classes(m))]))
        detections = self.detector.detect(list(images), classes)
        results = []
        for image, meta, found in zip(images, metadata, detections):
            objects = keep_confident(found, meta["tag"], self.thresholds)
            objects = self._attach_colors(image, objects, meta)
            results.append(check(objects, meta, self.thresholds.position_margin))
        return results

    def _attach_colors(
        self, image: Image.Image, objects: dict[str, list[Detection]], metadata: Mapping[str, Any]
    ) -> dict[str, list[Detection]]:
        """Colours for the objects whose colour the rules read (the ``count`` most confident per clause)."""
        for req in metadata["include"]:
            if "color" not in req:
                continue
            found = objects.get(req["class"], [])
            head = found[: req["count"]]
            missing = [i for i, d in enumerate(head) if d.color is None]
            if not missing:
                continue
            if self.colors is None:
                raise ValueError(
                    f"the detector gives no colours and no colour classifier was given ({req['class']!r})"
                )
            names = self.colors.classify(image.convert("RGB"), [head[i] for i in missing], req["class"])
            for i, name in zip(missing, names):
                found[i] = dataclasses.replace(head[i], color=name)
        return objects


@dataclass
class GenEvalReport:
    """Accuracy per tag and overall (mean over tags), as GenEval's ``summary_scores.py`` prints it."""

    per_tag: dict[str, float]
    counts: dict[str, tuple[int, int]]  # tag -> (correct, total)
    overall: float
    images: int
    prompts: int
    correct_prompts: float  # share of prompts with at least one correct image

    @property
    def standard_error(self) -> float:
        """Binomial standard error of ``overall``: ``sqrt(sum_t p_t (1 - p_t) / n_t) / K`` over the K tasks,
        treating images as independent. On the 273 images of the shapes evaluation it is about 2.3 points, so
        two evaluations differ significantly (two standard errors of the difference) only beyond about 6.5 points."""
        variance = sum(p * (1 - p) / n for p, (_, n) in zip(self.per_tag.values(), self.counts.values()))
        return math.sqrt(variance) / len(self.per_tag)

    def metrics(self, prefix: str = "geneval") -> dict[str, float]:
        return {f"{prefix}/overall": self.overall, f"{prefix}/overall_se": self.standard_error} | {
            f"{prefix}/{tag}": value for tag, value in self.per_tag.items()
        }

    def to_text(self) -> str:
        lines = [
            "Summary",
            "=======",
            f"Total images: {self.images}",
            f"Total prompts: {self.prompts}",
            f"% correct images: {sum(c for c, _ in self.counts.values()) / max(self.images, 1):.2%}",
            f"% correct prompts: {self.correct_prompts:.2%}",
            "",
            "Task breakdown",
            "==============",
        ]
        lines += [f"{tag:<16} = {self.per_tag[tag]:.2%} ({c} / {n})" for tag, (c, n) in self.counts.items()]
        overall = (
            f"Overall score (avg. over tasks): {self.overall:.5f} (standard error {self.standard_error:.5f})"
        )
        return "\n".join([*lines, "", overall, ""])


def summarize(
    results: Sequence[GenEvalResult], metadata: Sequence[Mapping[str, Any]] | None = None
) -> GenEvalReport:
    """Per-tag accuracy and their mean. Prompts are told apart by their metadata when it is given, else
    by their prompt text (several images per prompt count once in ``prompts``)."""
    keys = (
        [json.dumps(m, sort_keys=True) for m in metadata]
        if metadata is not None
        else [f"{r.tag}\n{r.prompt}" for r in results]
    )
    return summarize_verdicts([r.tag for r in results], [r.correct for r in results], keys)


def summarize_verdicts(
    tags: Sequence[str], correct: Sequence[bool | float], prompts: Sequence[str] | None = None
) -> GenEvalReport:
    """The report from per-image tags and 0/1 verdicts, e.g. a GenEval reward's ``details["tag"]`` and
    ``details["correct"]`` (also when it was computed by a reward server). ``prompts``: one key per image
    telling prompts apart (default: every image is its own prompt)."""
    if not len(tags):
        raise ValueError("no GenEval results to summarize")
    if len(tags) != len(correct) or (prompts is not None and len(prompts) != len(tags)):
        raise ValueError(f"{len(tags)} tags, {len(correct)} verdicts and {len(prompts or tags)} prompt keys")
    order = {tag: i for i, tag in enumerate(TAGS)}
    counts: dict[str, list[int]] = {}
    by_prompt: dict[str, bool] = {}
    for index in sorted(range(len(tags)), key=lambda i: order.get(tags[i], len(TAGS))):
        c = counts.setdefault(tags[index], [0, 0])
        c[0] += bool(correct[index])
        c[1] += 1
        key = prompts[index] if prompts is not None else str(index)
        by_prompt[key] = by_prompt.get(key, False) or bool(correct[index])
    per_tag = {tag: c / n for tag, (c, n) in counts.items()}
    return GenEvalReport(
        per_tag=per_tag,
        counts={tag: (c, n) for tag, (c, n) in counts.items()},
        overall=float(np.mean(list(per_tag.values()))),
        images=len(tags),
        prompts=len(by_prompt),
        correct_prompts=float(np.mean(list(by_prompt.values()))),
    )
