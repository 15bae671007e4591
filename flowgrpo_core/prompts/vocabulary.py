"""The vocabulary of prompt metadata: GenEval's classes, colours, relations and tasks, the check that a
metadata object is valid GenEval metadata, and the small grammar the prompt generators share.

It sits below ``evaluation/`` (which scores images against this metadata) and ``pretrain/`` (which
captions scenes with it), so that neither reaches into the other.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

COCO_CLASSES: tuple[str, ...] = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "computer mouse",
    "tv remote",
    "computer keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)
COLORS: tuple[str, ...] = (
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def validate_metadata(metadata: Any) -> None:
    """Raise ``ValueError`` naming the first field that is not valid GenEval metadata."""
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata must be an object, got {type(metadata).__name__}")
    if metadata.get("tag") not in TAGS:
        raise ValueError(f"unknown tag {metadata.get('tag')!r}; GenEval tags: {', '.join(TAGS)}")
    unknown = set(metadata) - {"tag", "prompt", "include", "exclude"}
    if unknown:
        raise ValueError(f"unknown metadata keys {sorted(unknown)}")
    include = metadata.get("include")
    if not isinstance(include, list) or not include:
        raise ValueError("'include' must be a non-empty list of requirements")
    for index, req in enumerate(include):
        where = f"include[{index}]"
        _check_requirement(req, where, {"class", "count", "color", "position"})
        if "color" in req and req["color"] not in COLORS:
            raise ValueError(f"{where}: unknown color {req['color']!r}; GenEval colours: {', '.join(COLORS)}")
        if "position" in req:
            position = req["position"]
            if not isinstance(position, (list, tuple)) or len(position) != 2:
                raise ValueError(f"{where}: 'position' must be [relation, index of an earlier include]")
            relation, target = position
            if relation not in RELATIONS:
                raise ValueError(f"{where}: unknown relation {relation!r}; relations: {', '.join(RELATIONS)}")
            if not isinstance(target, int) or isinstance(target, bool) or not 0 <= target < index:
                raise ValueError(
                    f"{where}: position target {target!r} must index an earlier include (0..{index - 1})"
                )
    exclude = metadata.get("exclude", [])
    if not isinstance(exclude, list):
        raise ValueError("'exclude' must be a list of requirements")
    for index, req in enumerate(exclude):
        _check_requirement(req, f"exclude[{index}]", {"class", "count"})


def _check_requirement(req: Any, where: str, allowed: set[str]) -> None:
    if not isinstance(req, dict):
        raise ValueError(f"{where}: expected an object, got {type(req).__name__}")
    if set(req) - allowed:
        raise ValueError(f"{where}: unknown keys {sorted(set(req) - allowed)}")
    if not isinstance(req.get("class"), str) or not req["class"].strip():
        raise ValueError(f"{where}: 'class' must be a non-empty string")
    count = req.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"{where}: 'count' must be an integer >= 1, got {count!r}")


KNOWN_TAGS: tuple[str, ...] = (*TAGS, "ocr", "general")
SHAPES_WORLD: tuple[str, ...] = ("circle", "square", "triangle", "cross")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def with_article(name: str) -> str:
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def make_plural(name: str) -> str:
    """GenEval's rule, kept for fidelity to its prompts ("two skises", "three persons")."""
    return f"{name}es" if name.endswith("s") else f"{name}s"


def requirement_key(metadata: Mapping[str, Any]) -> str:
    """What an image must show, independent of wording and order: prompts with the same key are the
    same test ("a cat and a dog" = "a dog and a cat"; "A right of B" = "B left of A")."""
    include = [dict(req) for req in metadata["include"]]
    if metadata["tag"] == "position" and len(include) == 2 and "position" in include[1]:
        relation, _ = include[1]["position"]
        target, subject = include[0]["class"], include[1]["class"]
        if relation in ("right of", "below"):  # name the relation from the other object's side
            relation = {"right of": "left of", "below": "above"}[relation]
            subject, target = target, subject
        return json.dumps(["position", subject, relation, target])
    parts = sorted(json.dumps(req, sort_keys=True) for req in include)
    excluded = sorted(json.dumps(req, sort_keys=True) for req in metadata.get("exclude", []))
    return json.dumps([metadata["tag"], parts, excluded])
