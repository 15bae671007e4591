"""The shapes world: flat coloured shapes on a grey canvas, drawn from GenEval metadata and detected back
by classical image analysis, so the GenEval rules can serve as a reward and an evaluator without any
learned model.

- :func:`render_scene` draws an image that satisfies a prompt's metadata (counts, colours, positions),
  with the ground-truth objects as :class:`Detection`s.
- :class:`ShapesDetector` finds the shapes again: each pixel is read as a blend of a palette colour and
  the background (estimated from the image border) and belongs to a shape when the colour dominates;
  each colour's connected components are objects; a component's shape comes from four scale-free
  measurements (fill ratio of its box, height of its centroid in the box, solidity, aspect ratio) and
  its colour from the palette. Detections carry their colour, so the GenEval colour rule needs no CLIP.

Shapes are axis-aligned with a square box (triangles and stars point up); the detector relies on that.
On clean renders of 64-128 px it is exact (tests/test_shapes.py); Gaussian noise (sigma 10) does not
change that; blur and JPEG artefacts hurt small pointed shapes first (diamonds and stars under 16 px).

An image wider or taller than ``working_size`` (512 px) is first reduced by an integer factor (the mean
of each f x f block) and its detections mapped back to the image's pixels: segmentation holds ~400 bytes
of float32 per pixel, which made a 2048 px image cost 1.6 GB and 6-9 s; reduced, it costs what a 512 px
image does (~0.4 s). The smallest shape the world draws (16 % of the side) is still 82 px at 512.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from flowgrpo_core.evaluation.geneval import Detection, Detector, relative_position
from flowgrpo_core.prompts.vocabulary import COLORS

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
# Far enough apart in RGB (closest pair: orange/yellow, 83) and from the background (closest: purple, 88).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "purple": (130, 50, 170),
    "pink": (245, 130, 190),
    "brown": (120, 75, 35),
    "black": (20, 20, 20),
    "white": (240, 240, 240),
}
BACKGROUND = (128, 128, 128)
MIN_SIDE = 12
assert tuple(PALETTE) == COLORS

_STAR_INNER = 0.45  # inner / outer radius of the five-pointed star


def shape_polygon(shape: str, x0: float, y0: float, side: float) -> list[tuple[float, float]] | None:
    """The outline of ``shape`` in the square box at (x0, y0); ``None`` for the circle (an ellipse)."""
    x1, y1, cx, cy = x0 + side, y0 + side, x0 + side / 2, y0 + side / 2
    if shape == "circle":
        return None
    if shape == "square":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "cross":
        a, b = x0 + side / 3, x0 + 2 * side / 3
        c, d = y0 + side / 3, y0 + 2 * side / 3
        return [
            (a, y0),
            (b, y0),
            (b, c),
            (x1, c),
            (x1, d),
            (b, d),
            (b, y1),
            (a, y1),
            (a, d),
            (x0, d),
            (x0, c),
            (a, c),
        ]
    if shape == "star":
        # outer radius so that the star's width (2 R sin 72) fills the box; its height is 1.81 R
        radius = side / (2 * math.sin(math.radians(72)))
        top = y0 + (side - radius * (1 + math.cos(math.radians(36)))) / 2
        points = []
        for k in range(10):
            r = radius if k % 2 == 0 else radius * _STAR_INNER
            angle = math.radians(-90 + 36 * k)
            points.append((cx + r * math.cos(angle), top + radius + r * math.sin(angle)))
        return points
    raise ValueError(f"unknown shape {shape!r}; shapes: {', '.join(SHAPES)}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Sequence[float], color: str | int) -> None:
    """Fill ``shape`` inside the square ``box`` (x0, y0, x1, y1), end exclusive; ``color``: a palette
    name, or a fill value for single-channel images."""
    x0, y0, x1, _ = box
    fill = PALETTE[color] if isinstance(color, str) else color
    # PIL fills outlines inclusively: the last pixel column of a box ending at x1 is x1 - 1
    polygon = shape_polygon(shape, x0, y0, x1 - x0 - 1)
    if polygon is None:
        draw.ellipse([x0, y0, x1 - 1, y0 + (x1 - x0) - 1], fill=fill)
    else:
        draw.polygon(polygon, fill=fill)


def pixel_box(shape: str, box: Sequence[float], size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The extent of the pixels :func:`draw_shape` fills (a star is less tall than its box)."""
    mask = Image.new("L", size, 0)
    draw_shape(ImageDraw.Draw(mask), shape, box, 255)
    return tuple(float(v) for v in mask.getbbox())


@dataclass
class Scene:
    image: Image.Image
    objects: list[Detection]  # the ground truth, score 1.0


def render_scene(
    metadata: Mapping[str, Any],
    size: int = 128,
    seed: int | np.random.Generator = 0,
    colors: Sequence[str] = COLORS,
    max_tries: int = 2000,
) -> Scene:
    """An image satisfying ``metadata`` (GenEval format, classes from :data:`SHAPES`).

    Each include clause gives ``count`` shapes of its class, in its colour or a random one from
    ``colors``; nothing else is drawn, so exclude clauses hold. Shapes never touch (a gap of 4 % of the
    image), and a position clause is drawn unambiguously: its relation holds with a margin of 0.25 (the
    rule's is 0.1) and no other relation holds even without margin."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    specs: list[tuple[int, str, str]] = []  # (include index, shape, colour)
    for index, req in enumerate(metadata["include"]):
        if req["class"] not in SHAPES:
            raise ValueError(f"shapes world: unknown class {req['class']!r}; shapes: {', '.join(SHAPES)}")
        for _ in range(req["count"]):
            specs.append((index, req["class"], req.get("color") or str(rng.choice(list(colors)))))
    if len(specs) > 6:
        raise ValueError(f"shapes world: {len(specs)} shapes do not fit; at most 6")
    low, high = (0.22, 0.34) if len(specs) <= 2 else (0.16, 0.24)
    gap = max(2.0, 0.04 * size)
    for _ in range(max_tries):
        boxes = _place(rng, len(specs), size, low, high, gap)
        if boxes is not None and _positions_hold(boxes, specs, metadata):
            break
    else:
        raise RuntimeError(f"could not place {metadata.get('prompt', metadata)!r} in {max_tries} tries")
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    objects = []
    for box, (_, shape, color) in zip(boxes, specs):
        draw_shape(draw, shape, box, color)
        objects.append(Detection(shape, 1.0, pixel_box(shape, box, image.size), color=color))
    return Scene(image, objects)


def _place(
    rng: np.random.Generator, n: int, size: int, low: float, high: float, gap: float
) -> list[tuple] | None:
    boxes: list[tuple[float, float, float, float]] = []
    for _ in range(n):
        # at least 12 px: below that a star's points merge into a blob
        side = float(np.floor(max(rng.uniform(low, high) * size, MIN_SIDE)))
        x0, y0 = np.floor(rng.uniform(2, size - side - 2, size=2))
        box = (float(x0), float(y0), float(x0 + side), float(y0 + side))
        if any(_near(box, other, gap) for other in boxes):
            return None
        boxes.append(box)
    return boxes


def _near(a: Sequence[float], b: Sequence[float], gap: float) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _positions_hold(
    boxes: list[tuple], specs: list[tuple[int, str, str]], metadata: Mapping[str, Any]
) -> bool:
    for index, req in enumerate(metadata["include"]):
        if "position" not in req:
            continue
        relation, target = req["position"]
        mine = [Detection("", 1.0, b) for b, s in zip(boxes, specs) if s[0] == index]
        theirs = [Detection("", 1.0, b) for b, s in zip(boxes, specs) if s[0] == target]
        for a in mine:
            for b in theirs:
                if relation not in relative_position(a, b, 0.25) or relative_position(a, b, 0.0) != {
                    relation
                }:
                    return False
    return True


# Mean features of renders (sizes 64-256, sides 10-87 px): fill ratio of the box, centroid height in the
# box, solidity, log aspect (width / height).
_PROTOTYPES: dict[str, tuple[float, float, float, float]] = {
    "circle": (0.78, 0.50, 1.0, 0.0),
    "square": (1.00, 0.50, 1.0, 0.0),
    "triangle": (0.515, 0.662, 1.0, 0.0),
    "diamond": (0.50, 0.497, 1.0, 0.0),
    "star": (0.40, 0.548, 0.62, 0.06),
    "cross": (0.60, 0.494, 0.79, 0.0),
}
_SPREAD = np.array([0.05, 0.035, 0.06, 0.08])  # tolerated deviation per feature (one "sigma")


class ShapesDetector(Detector):
    """Shapes and their colours by colour segmentation and connected components (no learned weights).

    Args:
        shapes: the classes it may report (a component is given the nearest of them).
        max_residual: largest RGB distance between a pixel and its blend of palette colour and
            background (off-palette pixels belong to no shape).
        min_area: smallest component kept, as a fraction of the image area.
        working_size: larger images are reduced to at most this many pixels a side before segmentation
            (module docstring); boxes and masks are given in the image's own pixels.

    Scores mimic a detector's: the share of the best class in a softmax over the feature distances
    (ambiguous blobs score low), times a penalty when even the best class fits badly (more than 2.5
    spreads away). Clean renders score above 0.9, GenEval's counting threshold."""

    def __init__(
        self,
        shapes: Sequence[str] = SHAPES,
        max_residual: float = 60.0,
        min_area: float = 0.0015,
        working_size: int = 512,
    ) -> None:
        unknown = set(shapes) - set(SHAPES)
        if unknown:
            raise ValueError(f"unknown shapes {sorted(unknown)}; shapes: {', '.join(SHAPES)}")
        self.shapes = tuple(shapes)
        self.max_residual = max_residual
        self.min_area = min_area
        self.working_size = working_size
        self._palette = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)
        self._prototypes = np.array([_PROTOTYPES[s] for s in self.shapes])

    def detect(self, images: Sequence[Image.Image], classes: Sequence[str] = ()) -> list[list[Detection]]:
        """Detections per image; ``classes`` is accepted for the Detector interface (all shapes are
        always reported, as GenEval's closed-set detector reports all COCO classes)."""
        return [self.detect_one(image) for image in images]

    def detect_one(self, image: Image.Image) -> list[Detection]:
        image = image.convert("RGB")
        factor = -(-max(image.size) // self.working_size)  # ceil: the reduced image fits working_size
        if factor <= 1:
            return self._detect(image)
        # block means map back exactly: reduced pixel i covers pixels [i * factor, (i + 1) * factor)
        full_width, full_height = image.size
        found = []
        for detection in self._detect(image.reduce(factor)):
            x0, y0, x1, y1 = (factor * v for v in detection.box)
            box = (x0, y0, float(min(x1, full_width)), float(min(y1, full_height)))
            mask = np.repeat(np.repeat(detection.mask, factor, 0), factor, 1)[:full_height, :full_width]
            found.append(Detection(detection.label, detection.score, box, mask=mask, color=detection.color))
        return found

    def _detect(self, image: Image.Image) -> list[Detection]:
        from scipy import ndimage

        pixels = np.asarray(image, dtype=np.float32)
        height, width, _ = pixels.shape
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        background = np.median(border, axis=0)
        nearest, foreground = self._segment(pixels - background, self._palette - background)
        min_pixels = max(6, int(self.min_area * height * width))
        square = np.ones((3, 3), dtype=bool)
        detections = []
        for k, color in enumerate(COLORS):
            mask = foreground & (nearest == k)
            if mask.sum() < min_pixels:
                continue
            # opening by reconstruction: drops speckle and thin fringes (where edges blend into the
            # background, or two colours meet) but gives the surviving components back their exact shape
            mask = ndimage.binary_propagation(ndimage.binary_opening(mask, structure=square), mask=mask)
            labels, _ = ndimage.label(mask, structure=square)
            for index, region in enumerate(ndimage.find_objects(labels), start=1):
                component = labels[region] == index
                area = int(component.sum())
                if area < min_pixels:
                    continue
                label, score = self._classify(component)
                rows, cols = region
                full = np.zeros((height, width), dtype=bool)
                full[region] = component
                box = (float(cols.start), float(rows.start), float(cols.stop), float(rows.stop))
                detections.append(Detection(label, score, box, mask=full, color=color))
        return sorted(detections, key=lambda d: -d.score)

    def _segment(self, offsets: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Colour index and foreground mask per pixel, from offsets to the background (H, W, 3) and the
        palette's offsets to it (K, 3).

        A pixel is read as a blend ``alpha * colour + (1 - alpha) * background`` for the palette colour
        whose blend line passes closest; it is foreground when alpha >= 0.5. On a blurred or
        anti-aliased edge that is where the shape's true edge lies, so shapes keep their geometry."""
        alpha = np.clip(offsets @ directions.T / (directions**2).sum(-1), 0.0, 1.0)  # (H, W, K)
        residual = np.linalg.norm(offsets[:, :, None, :] - alpha[..., None] * directions, axis=-1)
        residual = np.where(alpha >= 0.5, residual, np.inf)
        nearest = residual.argmin(-1)
        return nearest, residual.min(-1) < self.max_residual

    def _classify(self, component: np.ndarray) -> tuple[str, float]:
        features = shape_features(component)
        distances = np.linalg.norm((self._prototypes - features) / _SPREAD, axis=-1)
        best = int(distances.argmin())
        logits = -0.5 * distances**2
        share = float(np.exp(logits[best] - np.logaddexp.reduce(logits)))
        fit = math.exp(-0.5 * max(0.0, distances[best] - 2.5) ** 2)
        return self.shapes[best], share * fit


def shape_features(component: np.ndarray) -> np.ndarray:
    """(fill ratio of the bounding box, centroid height within it, solidity, log(width / height)) of a
    bool mask cropped to its bounding box."""
    from scipy.spatial import ConvexHull, QhullError

    height, width = component.shape
    area = component.sum()
    rows = np.nonzero(component)[0]
    centroid = (rows.mean() + 0.5) / height
    # Pick's theorem: a convex lattice polygon of area A with B lattice points on its boundary holds
    # A + B/2 + 1 lattice points, so a digitally convex pixel set has solidity 1 whatever its size
    ys, xs = np.nonzero(component ^ _eroded(component))
    points = np.stack([xs, ys], axis=1)
    try:
        hull = ConvexHull(points)
    except QhullError:  # collinear pixels: no 2-D hull
        return np.array([area / (height * width), centroid, 1.0, math.log(width / height)])
    corners = points[hull.vertices]
    steps = np.abs(np.diff(np.concatenate([corners, corners[:1]]), axis=0))
    lattice = hull.volume + np.gcd(steps[:, 0], steps[:, 1]).sum() / 2 + 1
    return np.array([area / (height * width), centroid, min(1.0, area / lattice), math.log(width / height)])


def _eroded(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    core = padded[1:-1, 1:-1].copy()
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        core &= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return core
