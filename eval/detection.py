"""The detector interface shared by GenEval scoring and every detector (Mask2Former + CLIP, the shapes world's)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image

GENEVAL_COLORS: tuple[str, ...] = (
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white",
)


@dataclass
class Detection:
    """One detected object instance.

    Args:
        box: (x1, y1, x2, y2) in pixels; x grows right, y grows down.
        score: detector confidence in [0, 1].
        mask: (H, W) bool instance mask, or None when the detector has none.
    """

    box: tuple[float, float, float, float]
    score: float
    mask: np.ndarray | None = None


class Detector(Protocol):
    """What GenEval scoring needs from a detector."""

    name: str  # recorded with every result, e.g. "mask2former-swin-s-coco+clip-vit-l-14" or "shapes-exact"

    def detect(self, image: Image.Image) -> dict[str, list[Detection]]:
        """Detect objects in one RGB image.

        Returns:
            class name -> detections of that class, in any order (the scorer sorts and thresholds them).
        """
        ...

    def classify_colors(self, image: Image.Image, class_name: str, detections: list[Detection]) -> list[str]:
        """Name the colour of each detection (one entry of GENEVAL_COLORS per detection)."""
        ...
