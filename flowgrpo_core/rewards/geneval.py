"""GenEval as a reward (docs/algorithm.md sect. 7-8): GenEval's rules checked on the detections of each image.

The metadata of each prompt carries the requirements (GenEval format, e.g. ``builtin:geneval_train``).
Two scores, both always in ``details`` (with the tag and GenEval's reason string):
- ``fraction`` (default score): the share of requirement units met (``GenEvalResult``): one per required
  instance found, one per instance of the right colour, one per position and one per exclude clause. It
  is 1.0 exactly when the image is strictly correct, and below that it still ranks partial successes
  (two of three clocks beats none), which gives GRPO within-group variance where the 0/1 verdict has
  none. The reference also trains on a partial score (its own: exact counts with count closeness).
- ``correct``: GenEval's strict 0/1 verdict, the evaluation metric (``score="strict"`` trains on it).

``geneval``: Mask2Former (COCO) or OWLv2 + CLIP colours (evaluation/detectors.py).
``shapes_geneval``: the shapes world (evaluation/shapes.py), no learned model at all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from PIL import Image

from flowgrpo_core.evaluation.geneval import (
    ColorClassifier,
    Detector,
    GenEvalScorer,
    Thresholds,
)
from flowgrpo_core.prompts.vocabulary import validate_metadata
from flowgrpo_core.rewards.base import Reward, RewardOutput

SCORES = ("fraction", "strict")


class GenEvalReward(Reward):
    """GenEval rules on a transformers detector, colours by CLIP zero-shot.

    Args:
        detector: Mask2Former or OWLv2 checkpoint (hub id, folder or ``s3://``).
        clip: CLIP checkpoint for the colour checks.
        clip_processor: where CLIP's tokenizer and image processor live (default: ``clip`` itself).
        score: ``fraction`` or ``strict`` (module docstring).
        threshold, counting_threshold: detection score thresholds (default: the detector's; Mask2Former:
            GenEval's 0.3 and 0.9).
        position_margin: GenEval's position threshold (0.1 of the summed box sizes).
        detector_image_size: Mask2Former input size (GenEval's mmdet pipeline: 1024); default: the
            checkpoint's processor settings.
        device, dtype, batch_size: for both models.
    """

    name = "geneval"

    def __init__(
        self,
        detector: str = "facebook/mask2former-swin-small-coco-instance",
        detector_revision: str | None = None,
        clip: str = "openai/clip-vit-large-patch14",
        clip_revision: str | None = None,
        clip_processor: str | None = None,
        score: str = "fraction",
        threshold: float | None = None,
        counting_threshold: float | None = None,
        position_margin: float = 0.1,
        device: str = "auto",
        dtype: str = "float32",
        detector_image_size: int | None = None,
        batch_size: int = 8,
    ) -> None:
        from flowgrpo_core.evaluation.detectors import ClipColorClassifier, TransformersDetector

        found = TransformersDetector(
            detector,
            detector_revision,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            image_size=detector_image_size,
        )
        colors = ClipColorClassifier(clip, clip_revision, clip_processor, device=device, dtype=dtype)
        self._setup(found, colors, score, threshold, counting_threshold, position_margin)
        self.device = found.device
        self.info = {
            "detector": found.info,
            "clip": colors.clip.info,
            "score": score,
            "thresholds": dataclasses.asdict(self.scorer.thresholds),
        }

    def _setup(
        self,
        detector: Detector,
        colors: ColorClassifier | None,
        score: str,
        threshold: float | None,
        counting_threshold: float | None,
        margin: float,
    ) -> None:
        if score not in SCORES:
            raise ValueError(f"unknown GenEval score {score!r}; expected one of {SCORES}")
        defaults = detector.default_thresholds
        thresholds = Thresholds(
            presence=defaults.presence if threshold is None else threshold,
            counting=defaults.counting if counting_threshold is None else counting_threshold,
            position_margin=margin,
            max_objects=defaults.max_objects,
        )
        self.score_kind = score
        self.scorer = GenEvalScorer(detector, colors, thresholds)

    def check_inputs(self, prompts: Sequence[str], metadata: Sequence[dict]) -> None:
        """Refuse metadata that is not GenEval's (a reward server answers 422 with this message)."""
        for index, meta in enumerate(metadata):
            try:
                validate_metadata(meta)
            except ValueError as error:
                hint = "" if meta else "; use a GenEval prompt set such as builtin:geneval_train"
                raise ValueError(
                    f"reward {self.name!r}: metadata {index} of {prompts[index]!r}: {error}{hint}"
                ) from None

    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], metadata: Sequence[dict]
    ) -> RewardOutput:
        self.check_inputs(prompts, metadata)
        results = self.scorer(images, metadata)
        correct = [float(r.correct) for r in results]
        fraction = [r.fraction for r in results]
        return RewardOutput(
            scores=correct if self.score_kind == "strict" else fraction,
            details={
                "correct": correct,
                "fraction": fraction,
                "tag": [r.tag for r in results],
                "reason": [r.reason for r in results],
            },
        )


class ShapesGenEvalReward(GenEvalReward):
    """GenEval rules on the shapes world, detected by colour segmentation (no model weights).

    Args:
        score, threshold, counting_threshold, position_margin: as :class:`GenEvalReward`.
        shapes: the shape classes the detector may report.
    """

    name = "shapes_geneval"

    def __init__(
        self,
        score: str = "fraction",
        threshold: float | None = None,
        counting_threshold: float | None = None,
        position_margin: float = 0.1,
        shapes: Sequence[str] | None = None,
    ) -> None:
        from flowgrpo_core.evaluation.shapes import SHAPES, ShapesDetector

        detector = ShapesDetector(tuple(shapes) if shapes is not None else SHAPES)
        self._setup(detector, None, score, threshold, counting_threshold, position_margin)
        self.device = "cpu"
        self.info = {
            "detector": "shapes",
            "shapes": list(detector.shapes),
            "score": score,
            "thresholds": dataclasses.asdict(self.scorer.thresholds),
        }
