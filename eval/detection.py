"""The detector interface shared by GenEval scoring and every detector (Mask2Former + CLIP, the shapes world's), and
the choice of a detector by name (`build_detector`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image

from common.plugins import load_plugin, plugin_names

DETECTOR_PLUGINS = "vqrae.geneval_detectors"  # entry-point group: name -> a Detector class built without arguments
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


def build_detector(name: str, classes: set[str], mask2former: str = "", clip: str = "", device: str = "cpu"):
    """Detector `name`: "mask2former" (Mask2Former + CLIP from the local checkpoint directories `mask2former` and
    `clip`, on `device`), a detector a package declares (DETECTOR_PLUGINS), or "auto": the first declared detector
    whose `classes` attribute holds every class the prompts name (`classes`), else Mask2Former."""
    if name == "auto":
        known = {n: set(getattr(load_plugin(DETECTOR_PLUGINS, n), "classes", ())) for n in plugin_names(DETECTOR_PLUGINS)}
        name = next((n for n, c in known.items() if classes and classes <= c), "mask2former")
    if name != "mask2former":
        return load_plugin(DETECTOR_PLUGINS, name)()
    from eval.mask2former_clip import Mask2FormerClipDetector

    if not mask2former or not clip:
        raise FileNotFoundError("--detector mask2former needs --mask2former DIR and --clip DIR (local checkpoints)")
    return Mask2FormerClipDetector.from_pretrained(mask2former, clip, device=device)
