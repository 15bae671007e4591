"""OCR reward (docs/algorithm.md sect. 7): how closely the text read in the image matches the prompt's quoted text.

The engine is RapidOCR: PaddleOCR's detector, orientation classifier and recogniser as ONNX models,
run by onnxruntime; the wheel ships them, so this works offline. Both sides are compared without
spaces and in lower case (the detector may split or merge words).

Rules (``rule``):
- ``reference`` (default, what flow_grpo trains and reports with): ``1 - min(lev, len(target)) /
  len(target)``, and 1 whenever the target is a substring of everything read (so garbage around the
  right text is free).
- ``strict``: ``1 - lev(read, target) / max(len(read), len(target))``. Extra text costs as much as
  missing text, which closes the reference rule's reward-hacking hole (``--option rule=strict``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from flowgrpo_core.rewards.base import Reward, RewardOutput

log = logging.getLogger(__name__)

RULES = ("reference", "strict")
# straight quotes, and the typographic pair that prompt writers paste in
_QUOTED = re.compile(r'"([^"]+)"|“([^”]+)”')
_SPACE = re.compile(r"\s+")


def quoted_text(prompt: str) -> str | None:
    """The first text in double quotes: ``'a sign that says "Open 24h"'`` -> ``'Open 24h'``."""
    match = _QUOTED.search(prompt)
    return next(group for group in match.groups() if group) if match else None


def normalise(text: str) -> str:
    return _SPACE.sub("", text).lower()


def ocr_score(read: str, target: str, rule: str = "reference") -> float:
    """Similarity in [0, 1] of the text read and the target text (both normalised here)."""
    from rapidfuzz.distance import Levenshtein

    read, target = normalise(read), normalise(target)
    if rule == "reference":
        if not target:
            raise ValueError("the reference OCR rule needs a non-empty target text")
        if target in read:
            return 1.0
        return 1.0 - min(Levenshtein.distance(read, target), len(target)) / len(target)
    if rule != "strict":
        raise ValueError(f"unknown OCR rule {rule!r}; expected one of {RULES}")
    longest = max(len(read), len(target))
    return 1.0 if longest == 0 else 1.0 - Levenshtein.distance(read, target) / longest


class OcrReward(Reward):
    """Edit-distance reward between the prompt's quoted text and RapidOCR's reading of the image.

    Args:
        model: optional folder, ``s3://`` prefix or hub id with the ONNX models (file names containing
            ``det``, ``rec`` and optionally ``cls``; a ``*.txt`` character list if the recogniser has none
            embedded). Default: the PP-OCR models shipped in the ``rapidocr`` wheel.
        rule: ``reference`` or ``strict`` (module docstring).
        text_score: lines read with lower confidence are ignored (PaddleOCR's drop_score, 0.5).
        device: ``cpu``, or ``cuda`` (needs onnxruntime-gpu).
        threads: onnxruntime intra-op threads (default: all cores).
    """

    name = "ocr"

    def __init__(
        self,
        model: str | None = None,
        revision: str | None = None,
        rule: str = "reference",
        text_score: float = 0.5,
        device: str = "cpu",
        threads: int | None = None,
    ) -> None:
        from rapidocr import RapidOCR

        if rule not in RULES:
            raise ValueError(f"unknown OCR rule {rule!r}; expected one of {RULES}")
        self.rule = rule
        self.device = "cuda" if device.startswith("cuda") else "cpu"
        params: dict = {"Global.log_level": "warning", "Global.text_score": float(text_score)}
        if self.device == "cuda":
            params["EngineConfig.onnxruntime.use_cuda"] = True
        if threads:
            params["EngineConfig.onnxruntime.intra_op_num_threads"] = int(threads)
        if model is not None:
            params.update(_model_params(model, revision))
        self.engine = RapidOCR(params=params)
        self.info = {"engine": "rapidocr", "model": model or "rapidocr wheel (PP-OCR ONNX)", "rule": rule}

    def check_inputs(self, prompts: Sequence[str], metadata: Sequence[dict]) -> None:
        """Raise ValueError if a prompt has no quoted text to compare with."""
        for i, prompt in enumerate(prompts):
            if not quoted_text(prompt):
                raise ValueError(f"ocr reward: prompts[{i}] has no text in double quotes: {prompt[:120]!r}")

    def read(self, image: Image.Image) -> str:
        """All text lines the engine reads, in reading order, joined by spaces."""
        result = self.engine(image.convert("RGB"))
        return " ".join(result.txts) if getattr(result, "txts", None) else ""

    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], metadata: Sequence[dict]
    ) -> RewardOutput:
        self.check_inputs(prompts, metadata)
        # RapidOCR runs one image at a time: batching the detector is slower on CPU (measured 2x), so the
        # gain from server batching here is fewer HTTP round trips, not a faster model call
        texts, errors = [], []
        for image in images:
            try:
                texts.append(self.read(image))
                errors.append("")
            except Exception as error:
                # RapidOCR fails on some legal images (a 4096x1 strip cannot be resized for its detector).
                # The reference scores an image it cannot read as reading nothing; so do we, and say why.
                log.warning("OCR could not read a %dx%d image: %s", *image.size, error)
                texts.append("")
                errors.append(f"{type(error).__name__}: {error}")
        targets = [quoted_text(prompt) or "" for prompt in prompts]
        scores = np.array([ocr_score(text, target, self.rule) for text, target in zip(texts, targets)])
        return RewardOutput(
            scores=scores, details={"ocr_text": texts, "target": targets, "ocr_error": errors}
        )


def _model_params(model: str, revision: str | None) -> dict:
    from flowgrpo_core.sources import WeightsSourceError, resolve_folder

    folder = resolve_folder(model, revision)
    onnx = sorted(Path(folder).glob("*.onnx"))

    def pick(tag: str) -> Path | None:
        found = [p for p in onnx if tag in p.name.lower()]
        if len(found) > 1:
            raise WeightsSourceError(
                f"OCR model folder {model!r} has several '{tag}' models: {[p.name for p in found]}"
            )
        return found[0] if found else None

    det, rec, cls = pick("det"), pick("rec"), pick("cls")
    if det is None or rec is None:
        raise WeightsSourceError(
            f"OCR model folder {model!r} needs a *det*.onnx and a *rec*.onnx file, found {[p.name for p in onnx]}"
        )
    params = {"Det.model_path": str(det), "Rec.model_path": str(rec)}
    if cls is not None:
        params["Cls.model_path"] = str(cls)
    else:
        params["Global.use_cls"] = False
    keys = sorted(Path(folder).glob("*.txt"))
    if keys:
        params["Rec.rec_keys_path"] = str(keys[0])
    return params
