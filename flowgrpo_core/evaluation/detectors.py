"""Object detectors and the colour classifier behind the GenEval rules (geneval.py), on transformers.

- :class:`TransformersDetector` wraps either
  - **Mask2Former** (default ``facebook/mask2former-swin-small-coco-instance``): GenEval's own detector,
    Mask2Former Swin-S trained on COCO instances, here without mmdet. Scores are computed as mmdet does
    (class probability x mean mask probability inside the mask, top 100 over queries x classes) and boxes
    are the masks' extents, so GenEval's thresholds (0.3, counting 0.9) keep their meaning; or
  - **OWLv2** (``google/owlv2-base-patch16-ensemble``): open-vocabulary, queried with "a photo of a
    {class}" for the 80 COCO classes plus any other class the metadata names. Its sigmoid scores are on
    another scale: the thresholds below (0.1, counting 0.3) are OWL's usual detection threshold and a
    guess for counting, not calibrated against GenEval's human study.
- :class:`ClipColorClassifier`: CLIP zero-shot over GenEval's ten colours on the object crop (masked
  objects pasted on grey #999 first), with GenEval's three prompt templates; CLIP ViT-L/14 by default
  (GenEval's open_clip ``ViT-L-14/openai`` is the same network).

Weights load from a hub id, a local folder or ``s3://`` through ``flowgrpo_core/sources.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from flowgrpo_core.clip import CLIP_L14, ClipEmbedder
from flowgrpo_core.devices import torch_device, torch_dtype
from flowgrpo_core.evaluation.geneval import Detection, Detector, Thresholds
from flowgrpo_core.prompts.vocabulary import COCO_CLASSES, COLORS
from flowgrpo_core.sources import resolve_folder

MASK2FORMER_COCO = "facebook/mask2former-swin-small-coco-instance"
# COCO label spellings of other checkpoints -> GenEval's class names
LABEL_ALIASES = {
    "mouse": "computer mouse",
    "remote": "tv remote",
    "keyboard": "computer keyboard",
    "sofa": "couch",
    "tvmonitor": "tv",
    "motorbike": "motorcycle",
    "aeroplane": "airplane",
    "diningtable": "dining table",
    "pottedplant": "potted plant",
    "hair dryer": "hair drier",
}
COLOR_TEMPLATES = (
    "a photo of a {c} {classname}",
    "a photo of a {c}-colored {classname}",
    "a photo of a {c} object",
)
__all__ = ["ClipColorClassifier", "Detector", "TransformersDetector"]


class TransformersDetector(Detector):
    """Mask2Former or OWLv2 from transformers (which one: the checkpoint's ``model_type``).

    Args:
        model: hub id, folder or ``s3://`` prefix of the checkpoint and its processor.
        revision: hub revision.
        device, dtype: as the rewards (``auto`` = CUDA when there is one).
        batch_size: images per forward pass.
        min_score: detections below this are dropped at once (no GenEval threshold is that low).
        nms_iou: OWLv2 only: per-class non-maximum suppression (OWL gives overlapping boxes per object,
            which would break counting); Mask2Former gets none, as in GenEval.
        query_template: OWLv2 only: the text query of a class.
        image_size: Mask2Former only: resize images to fit this square before detection (GenEval's mmdet
            pipeline uses 1024); default: the checkpoint's processor settings.
    """

    def __init__(
        self,
        model: str = MASK2FORMER_COCO,
        revision: str | None = None,
        device: str = "auto",
        dtype: str = "float32",
        batch_size: int = 8,
        min_score: float = 0.05,
        nms_iou: float = 0.5,
        query_template: str = "a photo of a {}",
        image_size: int | None = None,
    ) -> None:
        from transformers import AutoConfig

        folder = resolve_folder(model, revision)
        config = AutoConfig.from_pretrained(folder)
        self.family = config.model_type
        self.device, self.dtype = torch_device(device), torch_dtype(dtype)
        self.batch_size, self.min_score, self.nms_iou, self.query_template = (
            batch_size,
            min_score,
            nms_iou,
            query_template,
        )
        self.resize = (
            {"size": {"shortest_edge": image_size, "longest_edge": image_size}} if image_size else {}
        )
        self.info = {"model": model, "revision": revision, "family": self.family, "image_size": image_size}
        if self.family == "mask2former":
            from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

            self.processor = AutoImageProcessor.from_pretrained(folder)
            network = Mask2FormerForUniversalSegmentation.from_pretrained(folder)
            labels = [network.config.id2label[i] for i in range(len(network.config.id2label))]
            self.labels = [LABEL_ALIASES.get(label, label) for label in labels]
            self.vocabulary = tuple(self.labels)
        elif self.family == "owlv2":
            from transformers import Owlv2ForObjectDetection, Owlv2Processor

            self.processor = Owlv2Processor.from_pretrained(folder)
            network = Owlv2ForObjectDetection.from_pretrained(folder)
            self.vocabulary = COCO_CLASSES
            self.default_thresholds = Thresholds(presence=0.1, counting=0.3)
        else:
            raise ValueError(
                f"{model!r} is a {self.family!r} model; TransformersDetector takes mask2former or owlv2"
            )
        self.model = network.to(self.device, self.dtype).eval().requires_grad_(False)

    def detect(self, images: Sequence[Image.Image], classes: Sequence[str]) -> list[list[Detection]]:
        images = [image.convert("RGB") for image in images]
        if self.family == "mask2former":
            unknown = [c for c in classes if c not in self.labels]
            if unknown:
                raise ValueError(
                    f"the detector cannot find {unknown}: not among its {len(self.labels)} labels"
                )
        out: list[list[Detection]] = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            out += (
                self._mask2former(batch)
                if self.family == "mask2former"
                else self._owlv2(batch, list(classes))
            )
        return out

    @torch.inference_mode()
    def _mask2former(self, images: list[Image.Image]) -> list[list[Detection]]:
        inputs = self.processor(images=images, return_tensors="pt", **self.resize)
        pixels = inputs["pixel_values"].to(self.device, self.dtype)
        outputs = self.model(pixel_values=pixels, pixel_mask=inputs["pixel_mask"].to(self.device))
        padded = pixels.shape[-2:]
        results = []
        for i, image in enumerate(images):
            probs = outputs.class_queries_logits[i].float().softmax(-1)[:, :-1]  # last class: "no object"
            queries, classes = probs.shape
            # masks: 1/4 of the padded input -> the padded input -> its unpadded part -> the image
            masks = torch.nn.functional.interpolate(
                outputs.masks_queries_logits[i : i + 1].float(), size=padded, mode="bilinear"
            )
            valid = inputs["pixel_mask"][i]
            masks = masks[..., : int(valid.any(1).sum()), : int(valid.any(0).sum())]
            masks = torch.nn.functional.interpolate(masks, size=(image.height, image.width), mode="bilinear")[
                0
            ]
            binary = masks > 0
            mask_scores = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
            top, index = probs.flatten().topk(queries)  # mmdet: max_per_image = num_queries
            detections = []
            for score, flat in zip(top.tolist(), index.tolist()):
                query, label = divmod(flat, classes)
                score *= float(mask_scores[query])
                mask = binary[query].cpu().numpy()
                if score < self.min_score or not mask.any():
                    continue
                ys, xs = np.nonzero(mask)
                box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
                detections.append(Detection(self.labels[label], score, box, mask=mask))
            results.append(detections)
        return results

    @torch.inference_mode()
    def _owlv2(self, images: list[Image.Image], classes: list[str]) -> list[list[Detection]]:
        queries = [self.query_template.format(c) for c in classes]
        inputs = self.processor(
            text=[queries] * len(images), images=images, return_tensors="pt", padding=True, truncation=True
        )
        inputs = {
            k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
            for k, v in inputs.items()
        }
        outputs = self.model(**inputs)
        scores, labels = outputs.logits.float().sigmoid().max(-1)  # (B, boxes): best query per box
        results = []
        for i, image in enumerate(images):
            # OWLv2 pads images to a square (bottom and right): boxes are relative to that square
            side = max(image.width, image.height)
            cx, cy, w, h = (outputs.pred_boxes[i].float() * side).unbind(-1)
            boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
            boxes = boxes.clamp(min=0).minimum(
                torch.tensor([image.width, image.height] * 2, device=boxes.device)
            )
            keep = scores[i] >= self.min_score
            detections = []
            for label in labels[i][keep].unique().tolist():
                chosen = keep & (labels[i] == label)
                kept = _nms(boxes[chosen], scores[i][chosen], self.nms_iou)
                for box, score in zip(boxes[chosen][kept].tolist(), scores[i][chosen][kept].tolist()):
                    detections.append(Detection(classes[label], score, tuple(box)))
            results.append(detections)
        return results


def _nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> list[int]:
    """Greedy non-maximum suppression: indices kept, most confident first."""
    order = scores.argsort(descending=True).tolist()
    areas = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).tolist()
    kept: list[int] = []
    for i in order:
        overlaps = False
        for j in kept:
            x0, y0 = torch.maximum(boxes[i, :2], boxes[j, :2]).tolist()
            x1, y1 = torch.minimum(boxes[i, 2:], boxes[j, 2:]).tolist()
            inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
            if inter / max(areas[i] + areas[j] - inter, 1e-9) > iou:
                overlaps = True
                break
        if not overlaps:
            kept.append(i)
    return kept


class ClipColorClassifier:
    """GenEval's colour check: CLIP zero-shot over :data:`COLORS` on each object's crop.

    Args:
        model, revision, processor, device, dtype: the CLIP model (:class:`~flowgrpo_core.clip.ClipEmbedder`).
        background: what replaces the pixels outside an object's mask before cropping (GenEval: #999).
    """

    def __init__(
        self,
        model: str = CLIP_L14,
        revision: str | None = None,
        processor: str | None = None,
        device: str = "auto",
        dtype: str = "float32",
        background: str = "#999",
    ) -> None:
        self.clip = ClipEmbedder(
            model=model, revision=revision, processor=processor, device=device, dtype=dtype
        )
        self.background = background
        self._classifiers: dict[str, torch.Tensor] = {}

    def classifier(self, classname: str) -> torch.Tensor:
        """(colours, D) unit-norm text embeddings: the mean over the templates of each colour."""
        if classname not in self._classifiers:
            rows = []
            for color in COLORS:
                texts = [template.format(c=color, classname=classname) for template in COLOR_TEMPLATES]
                rows.append(torch.nn.functional.normalize(self.clip.embed_texts(texts).mean(0), dim=-1))
            self._classifiers[classname] = torch.stack(rows)
        return self._classifiers[classname]

    def crop(self, image: Image.Image, detection: Detection) -> Image.Image:
        if detection.mask is not None:
            blank = Image.new("RGB", image.size, self.background)
            image = Image.composite(image, blank, Image.fromarray(detection.mask.astype(np.uint8) * 255))
        x0, y0, x1, y1 = detection.box
        return image.crop((int(x0), int(y0), max(int(x1), int(x0) + 1), max(int(y1), int(y0) + 1)))

    def classify(self, image: Image.Image, detections: Sequence[Detection], classname: str) -> list[str]:
        if not detections:
            return []
        embeddings = self.clip.embed_images([self.crop(image.convert("RGB"), d) for d in detections])
        best = (embeddings @ self.classifier(classname).T.to(embeddings.device)).argmax(-1)
        return [COLORS[i] for i in best.tolist()]
