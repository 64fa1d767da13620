"""An exact detector for the shapes world (world/shapes.py), implementing eval.detection.Detector as "shapes-exact".

1. Every pixel takes the nearest of the ten palette colours and the background; the non-background pixels form
   8-connected components, one per object since objects are rendered apart. Components smaller than
   MIN_AREA_FRACTION of the image are ignored.
2. A component's colour is the palette colour nearest to the median of its core (its mask eroded by a pixel). Its
   mask is redrawn as the pixels at least half covered by that colour, the coverage of a pixel p being its
   projection (p - bg).(c - bg) / |c - bg|^2 on the background -> colour line, which is how antialiased edges mix.
3. Its class is the shape whose template (`world.shapes.box_template`, the mask the renderer draws for that box)
   has the highest IoU with the mask, trying the mask's box and that box grown by a pixel on any sides (JPEG and
   blur eat thin tips and corners). The best template's box is the detection's box.
4. Its score is a product of ramps (SCORE_RAMPS), each 1 for a rendered object and falling to 0 for a weird blob:
   the template IoU, the IoU margin over the next shape, the share of core pixels nearest to the object's colour,
   the distance of the median colour from the palette colour, the area, the box aspect against the shape's, and
   the share of background in the ring two pixels outside the mask. Rendered objects score 1.0 (also after JPEG q90), blurred
   ones a moderate score, noise near 0, so GenEval's 0.3 and 0.9 thresholds accept the first and reject the last.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

from eval.detection import Detection
from world.shapes import BACKGROUND, COLOR_NAMES, PALETTE, SHAPES, SUPERSAMPLE, box_template

MIN_AREA_FRACTION = 0.003  # 12 pixels at 64 px; the smallest rendered object covers about 45
# feature -> (value scoring 0, value scoring 1), linear in between
SCORE_RAMPS: dict[str, tuple[float, float]] = {
    "iou": (0.6, 0.85),  # best template IoU
    "margin": (0.0, 0.04),  # best IoU minus the best IoU of another shape
    "purity": (0.5, 0.8),  # share of core pixels whose nearest reference colour is the object's
    "color_distance": (50.0, 25.0),  # RGB distance of the core's median from the palette colour
    "area": (0.004, 0.007),  # mask area / image area; the smallest rendered object covers about 0.01
    "aspect": (0.5, 0.25),  # |log(box aspect / shape aspect)|
    "isolation": (0.5, 0.9),  # share of background pixels two pixels outside the mask
}
_REFERENCE = np.asarray([PALETTE[c] for c in COLOR_NAMES] + [BACKGROUND], np.int32)  # (11, 3); background last
_BG = len(COLOR_NAMES)
_HALF = 0.5 - 0.5 / SUPERSAMPLE**2  # between the coverages just under and at one half, as the renderer rounds
_EIGHT = np.ones((3, 3), bool)
_GROW = sorted(((a, b, c, d) for a in (0, 1) for b in (0, 1) for c in (0, 1) for d in (0, 1)), key=sum)


def nearest_reference(pixels: np.ndarray) -> np.ndarray:
    """Index of the nearest reference colour (COLOR_NAMES order, then the background at index 10) per pixel.

    Args:
        pixels: (..., 3) RGB values in [0, 255].
    Returns:
        (...) int64 indices.
    """
    diff = pixels.astype(np.int32)[..., None, :] - _REFERENCE  # (..., 11, 3)
    return np.einsum("...kc,...kc->...k", diff, diff).argmin(-1)


def _to_array(image: Image.Image) -> np.ndarray:
    if not isinstance(image, Image.Image):
        raise TypeError(f"ShapesDetector expects a PIL image, got {type(image).__name__}")
    return np.asarray(image.convert("RGB"))  # (H, W, 3) uint8


def _core(mask: np.ndarray) -> np.ndarray:
    """The mask eroded by one pixel, or the mask itself when erosion leaves too little."""
    core = ndimage.binary_erosion(mask, _EIGHT)
    return core if core.sum() >= max(4, mask.sum() // 4) else mask


def _median_color(pixels: np.ndarray) -> tuple[int, float]:
    """(palette index, distance) of the palette colour (never the background) nearest to the median of (N, 3)."""
    median = np.median(pixels.reshape(-1, 3), axis=0)
    dist = np.sqrt(((_REFERENCE[:_BG] - median) ** 2).sum(1))
    k = int(dist.argmin())
    return k, float(dist[k])


def _fit_template(mask: np.ndarray, box: tuple[int, int, int, int]) -> tuple[str, float, float, tuple[int, ...]]:
    """(shape, IoU, margin over the next shape, template box) of the best template for `mask`, over `box` and
    `box` grown by a pixel on any sides.

    Args:
        mask: (h, w) bool object mask; box: its bounding box (x1, y1, x2, y2) in mask coordinates.
    """
    padded = np.pad(mask, 1)  # mask pixel (r, c) at [r + 1, c + 1]
    area = int(mask.sum())
    best = {name: (-1.0, box) for name in SHAPES}
    x1, y1, x2, y2 = box
    for dl, dt, dr, db in _GROW:
        grown = (x1 - dl, y1 - dt, x2 + dr, y2 + db)
        region = padded[grown[1] + 1 : grown[3] + 1, grown[0] + 1 : grown[2] + 1]  # (bh, bw)
        if region.shape != (grown[3] - grown[1], grown[2] - grown[0]):
            continue  # grown past the padding
        for name in SHAPES:
            template = box_template(name, region.shape[1], region.shape[0])
            inter = int((template & region).sum())
            iou = inter / (int(template.sum()) + area - inter)
            if iou > best[name][0]:
                best[name] = (iou, grown)
    ranked = sorted(best, key=lambda n: best[n][0], reverse=True)
    top, second = best[ranked[0]][0], (best[ranked[1]][0] if len(ranked) > 1 else 0.0)
    return ranked[0], top, top - second, best[ranked[0]][1]


class ShapesDetector:
    """Colour segmentation + template matching detector for shapes-world images of any size.

    Args:
        min_area_fraction: components with fewer pixels than this share of the image are ignored.
    """

    name = "shapes-exact"
    classes = tuple(SHAPES)  # what it detects (eval/geneval.py --detector auto)

    def __init__(self, min_area_fraction: float = MIN_AREA_FRACTION):
        self.min_area_fraction = min_area_fraction

    def detect(self, image: Image.Image) -> dict[str, list[Detection]]:
        """Detect every object; returns shape name -> detections (an empty list for each absent shape)."""
        arr = _to_array(image)
        height, width = arr.shape[:2]
        labels = nearest_reference(arr)  # (H, W)
        components, _ = ndimage.label(labels != _BG, _EIGHT)
        out: dict[str, list[Detection]] = {name: [] for name in SHAPES}
        min_area = max(4.0, self.min_area_fraction * height * width)
        for k, sl in enumerate(ndimage.find_objects(components), start=1):
            if (components[sl] == k).sum() >= min_area:
                shape, _, det = self._measure(arr, labels, components, k, sl)
                out[shape].append(det)
        return out

    @staticmethod
    def _measure(arr: np.ndarray, labels: np.ndarray, components: np.ndarray, k: int, sl: tuple[slice, slice]
                 ) -> tuple[str, dict[str, float], Detection]:
        """(shape, score features, detection) of component k, whose bounding slices are `sl`."""
        height, width = components.shape
        y0, x0 = max(0, sl[0].start - 3), max(0, sl[1].start - 3)
        window = np.s_[y0 : min(height, sl[0].stop + 3), x0 : min(width, sl[1].stop + 3)]
        comp, pixels = components[window], arr[window]  # (h, w), (h, w, 3) around the component
        own = comp == k
        color, _ = _median_color(pixels[_core(own)])
        line = (_REFERENCE[color] - _REFERENCE[_BG]).astype(np.float32)  # (3,)
        alpha = (pixels.astype(np.float32) - _REFERENCE[_BG]) @ line / float(line @ line)  # (h, w) coverage
        mask = ndimage.binary_dilation(own, _EIGHT) & ((comp == 0) | own) & (alpha >= _HALF)  # never into another
        if not mask.any():
            mask = own
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        shape, iou, margin, (x1, y1, x2, y2) = _fit_template(
            mask, (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1))
        core = _core(mask)
        _, color_distance = _median_color(pixels[core])
        near = ndimage.binary_dilation(mask, _EIGHT)
        ring = ndimage.binary_dilation(near, _EIGHT) & ~near
        features = {
            "area": float(mask.sum()) / (height * width),
            "iou": iou,
            "margin": margin,
            "purity": float((labels[window][core] == color).mean()),
            "color_distance": color_distance,
            "aspect": abs(float(np.log((y2 - y1) / (x2 - x1) / SHAPES[shape].aspect))),
            "isolation": float((labels[window][ring] == _BG).mean()) if ring.any() else 1.0,
        }
        score = 1.0
        for key, (zero, one) in SCORE_RAMPS.items():
            score *= float(np.clip((features[key] - zero) / (one - zero), 0.0, 1.0))
        full = np.zeros((height, width), bool)
        full[window] = mask
        box = (float(max(0, x0 + x1)), float(max(0, y0 + y1)), float(min(width, x0 + x2)), float(min(height, y0 + y2)))
        return shape, features, Detection(box=box, score=score, mask=full)

    def classify_colors(self, image: Image.Image, class_name: str, detections: list[Detection]) -> list[str]:
        """Colour name of each detection: the palette colour nearest to the median of its mask's core (or of the
        non-background pixels in its box when it has no mask). `class_name` is not needed."""
        arr = _to_array(image)
        height, width = arr.shape[:2]
        names = []
        for det in detections:
            if det.mask is not None and det.mask.shape != (height, width):
                raise ValueError(f"detection mask {det.mask.shape} does not match the image {(height, width)}")
            if det.mask is not None and det.mask.any():
                mask = _core(det.mask)
            else:
                x1, y1, x2, y2 = (round(v) for v in det.box)
                x1, y1 = min(max(0, x1), width - 1), min(max(0, y1), height - 1)
                mask = np.zeros((height, width), bool)
                mask[y1 : max(y2, y1 + 1), x1 : max(x2, x1 + 1)] = True
                foreground = mask & (nearest_reference(arr) != _BG)
                mask = foreground if foreground.any() else mask
            names.append(COLOR_NAMES[_median_color(arr[mask])[0]])
        return names
