"""GenEval's real detector: Mask2Former COCO instance segmentation for objects, CLIP zero-shot for colours.

Both models load from local directories (transformers `save_pretrained` layout); nothing is downloaded.
Upstream GenEval used mmdet's Mask2Former Swin-S and open_clip's ViT-L/14 (OpenAI weights); this detector
reproduces its post-processing (mmdet's instance head: top-100 (query, class) pairs, score = class probability
times mean mask probability, boxes from masks) and its colour classifier (mask composite over "#999", crop,
CLIP zero-shot over 10 colours with 3 templates). The checkpoints' folder names are recorded in `name`, since
numbers can differ slightly with other weights.

Usage:

    detector = Mask2FormerClipDetector.from_pretrained(
        "ckpt/mask2former-swin-small-coco-instance", "ckpt/clip-vit-large-patch14", device="cuda")
    results = evaluate_folder(outdir, detector)   # eval/geneval_scoring.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    CLIPModel,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    PreTrainedTokenizerBase,
)
from transformers.image_processing_base import ImageProcessingMixin

from eval.detection import GENEVAL_COLORS, Detection
from tokenizer.encoder import saved_mean_std

# GenEval's object_names.txt: the 80 COCO thing classes in the detector's class order.
COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
# Other spellings of the same COCO classes found in checkpoint configs (Detectron2, Pascal-style names).
COCO_NAME_ALIASES: dict[str, str] = {
    "mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard", "motorbike": "motorcycle",
    "aeroplane": "airplane", "sofa": "couch", "tvmonitor": "tv", "tv monitor": "tv", "diningtable": "dining table",
    "pottedplant": "potted plant", "hair dryer": "hair drier", "doughnut": "donut", "cellphone": "cell phone",
}
COLOR_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object",
)
BACKGROUND = "#999"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def coco_label_names(id2label: dict[int, str]) -> list[str]:
    """GenEval class name for each label id of an 80-class COCO instance model.

    Args:
        id2label: the model config's label names (ids 0..79).

    Returns:
        names[label_id] in GenEval's spelling (object_names.txt).
    """
    labels = {int(k): v for k, v in id2label.items()}
    if sorted(labels) != list(range(len(COCO_CLASSES))):
        raise ValueError(
            f"not an 80-class COCO instance model: its config has {len(labels)} labels "
            f"(a COCO panoptic model has 133, ADE20k 150); use a Mask2Former COCO instance checkpoint"
        )
    names = []
    for i in range(len(labels)):
        name = labels[i].lower().replace("_", " ").replace("-", " ").strip()
        names.append(COCO_NAME_ALIASES.get(name, name))
    unknown = sorted(set(names) - set(COCO_CLASSES))
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"not a COCO instance model: label names {unknown or names} do not match COCO's 80 classes")
    return names


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes of binary masks, mmdet's convention: (x_min, y_min, x_max + 1, y_max + 1); zeros when empty.

    Args:
        masks: (N, H, W) bool.

    Returns:
        (N, 4) float boxes.
    """
    n, h, w = masks.shape
    cols, rows = masks.any(dim=1), masks.any(dim=2)  # (N, W), (N, H)
    xs = torch.arange(w, device=masks.device).expand(n, w)
    ys = torch.arange(h, device=masks.device).expand(n, h)
    x1 = torch.where(cols, xs, w).amin(dim=1)
    x2 = torch.where(cols, xs, -1).amax(dim=1) + 1
    y1 = torch.where(rows, ys, h).amin(dim=1)
    y2 = torch.where(rows, ys, -1).amax(dim=1) + 1
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()
    return torch.where(cols.any(dim=1, keepdim=True), boxes, torch.zeros_like(boxes))


def instance_predictions(
    class_logits: torch.Tensor, mask_logits: torch.Tensor, padded_hw: tuple[int, int], resized_hw: tuple[int, int],
    original_hw: tuple[int, int], max_per_image: int = 100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mmdet's Mask2Former instance post-processing for one image.

    The best `max_per_image` (query, class) pairs by class probability are kept (a query may give several
    classes); each mask is upsampled to the padded input, cropped to the resized image, resized to the original
    image and binarised at logit 0; score = class probability * mean sigmoid inside the binary mask.

    Args:
        class_logits: (Q, C + 1) with the "no object" class last.
        mask_logits: (Q, h, w) at a quarter of the padded input resolution.
        padded_hw: the model input's (height, width).
        resized_hw: the image's (height, width) inside that input, before padding.
        original_hw: the original image's (height, width).
        max_per_image: number of (query, class) pairs kept.

    Returns:
        scores (K,), labels (K,) and masks (K, H, W) bool at the original size, best first.
    """
    num_queries, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
    probs = class_logits.float().softmax(dim=-1)[:, :-1]  # (Q, C)
    class_scores, flat = probs.flatten().topk(min(max_per_image, num_queries * num_classes))  # (K,)
    labels, queries = flat % num_classes, flat // num_classes
    used, inverse = queries.unique(return_inverse=True)
    logits = F.interpolate(mask_logits[used].float()[None], size=padded_hw, mode="bilinear", align_corners=False)
    logits = logits[:, :, : resized_hw[0], : resized_hw[1]]
    logits = F.interpolate(logits, size=original_hw, mode="bilinear", align_corners=False)[0][inverse]  # (K, H, W)
    masks = logits > 0
    mask_scores = (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
    return class_scores * mask_scores, labels, masks


def composite_crop(image: Image.Image, detection: Detection, background: str = BACKGROUND) -> Image.Image:
    """The object as CLIP sees it: pixels outside its mask painted `background`, then cropped to its box.

    Args:
        image: the RGB image.
        detection: its box (rounded to whole pixels, as PIL's crop does) and optional (H, W) bool mask.
        background: colour of the masked-out area (GenEval: "#999").
    """
    image = image.convert("RGB")
    if detection.mask is not None:
        mask = np.asarray(detection.mask, dtype=bool)
        if mask.shape != (image.height, image.width):
            raise ValueError(f"mask shape {mask.shape} does not match the image's (H, W) {(image.height, image.width)}")
        canvas = Image.new("RGB", image.size, background)
        image = Image.composite(image, canvas, Image.fromarray(mask.astype(np.uint8) * 255))
    x1, y1, x2, y2 = (round(float(v)) for v in detection.box)
    return image.crop((x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)))  # at least one pixel


def clip_transform(size: int, mean: tuple[float, ...] = OPENAI_CLIP_MEAN,
                   std: tuple[float, ...] = OPENAI_CLIP_STD) -> transforms.Compose:
    """CLIP's evaluation preprocessing: bicubic resize of the short side, centre crop, normalise."""
    return transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def _checkpoint_config(path: str | Path, model_type: str, what: str) -> Path:
    """Check a local checkpoint directory and its config's model_type; return the resolved path."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"{what} checkpoint directory not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{what} checkpoint directory has no config.json: {path}")
    found = json.loads(config_file.read_text()).get("model_type")
    if found != model_type:
        raise ValueError(f"{path} holds a {found!r} model, expected a {what} checkpoint (model_type {model_type!r})")
    return path


class Mask2FormerClipDetector:
    """Detector protocol (eval/detection.py) with Mask2Former for objects and CLIP for colours.

    Build it from loaded modules (tests use tiny random ones) or with `from_pretrained` from local folders.

    Args:
        mask2former: a `Mask2FormerForUniversalSegmentation` trained on COCO instances (80 classes).
        image_processor: its `Mask2FormerImageProcessor`.
        clip: a `CLIPModel`.
        tokenizer: the CLIP tokenizer.
        name: recorded with every result.
        clip_mean: CLIP's per-channel normalisation mean.
        clip_std: CLIP's per-channel normalisation std.
        max_per_image: (query, class) pairs kept per image (mmdet's max_per_image).
        batch_size: crops per CLIP forward pass.
    """

    def __init__(
        self, mask2former: Mask2FormerForUniversalSegmentation, image_processor: ImageProcessingMixin,
        clip: CLIPModel, tokenizer: PreTrainedTokenizerBase, name: str,
        clip_mean: tuple[float, ...] = OPENAI_CLIP_MEAN, clip_std: tuple[float, ...] = OPENAI_CLIP_STD,
        max_per_image: int = 100, batch_size: int = 16,
    ) -> None:
        self.mask2former = mask2former.eval()
        self.image_processor = image_processor
        self.clip = clip.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.class_names = coco_label_names(mask2former.config.id2label)
        self.clip_preprocess = clip_transform(clip.config.vision_config.image_size, clip_mean, clip_std)
        self.max_per_image = max_per_image
        self.batch_size = batch_size
        self._text_embeddings: dict[str, torch.Tensor] = {}

    @classmethod
    def from_pretrained(
        cls, mask2former_dir: str | Path, clip_dir: str | Path, device: str | torch.device = "cpu",
        resize: tuple[int, int] | None = (800, 1333), max_per_image: int = 100, batch_size: int = 16,
    ) -> Mask2FormerClipDetector:
        """Load both models from local directories (never downloads).

        Args:
            mask2former_dir: a Mask2Former COCO instance checkpoint (config.json, weights, preprocessor_config.json).
            clip_dir: a CLIP checkpoint (config.json, weights, tokenizer files; preprocessor_config.json optional,
                read for the normalisation mean/std).
            device: where both models run.
            resize: (shortest, longest) edge for the detector input, as upstream's mmdet test pipeline
                (1333 x 800); None keeps the checkpoint's image processor setting.
            max_per_image: (query, class) pairs kept per image.
            batch_size: crops per CLIP forward pass.
        """
        m2f_path = _checkpoint_config(mask2former_dir, "mask2former", "Mask2Former")
        clip_path = _checkpoint_config(clip_dir, "clip", "CLIP")
        coco_label_names(Mask2FormerConfig.from_pretrained(m2f_path, local_files_only=True).id2label)
        if not (m2f_path / "preprocessor_config.json").is_file():
            raise FileNotFoundError(f"Mask2Former checkpoint directory has no preprocessor_config.json: {m2f_path}")
        size = {} if resize is None else {"size": {"shortest_edge": resize[0], "longest_edge": resize[1]}}
        processor = AutoImageProcessor.from_pretrained(m2f_path, local_files_only=True, **size)
        try:
            tokenizer = AutoTokenizer.from_pretrained(clip_path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(f"no usable CLIP tokenizer files in {clip_path}: {err}") from err
        mean, std = saved_mean_std(clip_path) or (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        # float32 as upstream, whatever dtype the weights were saved in
        mask2former = Mask2FormerForUniversalSegmentation.from_pretrained(
            m2f_path, local_files_only=True, dtype=torch.float32)
        clip = CLIPModel.from_pretrained(clip_path, local_files_only=True, dtype=torch.float32)
        return cls(
            mask2former.to(device), processor, clip.to(device), tokenizer,
            name=f"mask2former:{m2f_path.name}+clip:{clip_path.name}", clip_mean=mean, clip_std=std,
            max_per_image=max_per_image, batch_size=batch_size,
        )

    @property
    def device(self) -> torch.device:
        """Where Mask2Former runs."""
        return next(self.mask2former.parameters()).device

    @property
    def clip_device(self) -> torch.device:
        """Where CLIP runs."""
        return next(self.clip.parameters()).device

    @torch.no_grad()
    def detect(self, image: Image.Image) -> dict[str, list[Detection]]:
        """Instances of every COCO class in one image (scores unthresholded; the scorer filters).

        Args:
            image: an RGB image.

        Returns:
            every GenEval class name -> its detections (box from the mask, score, (H, W) bool mask).
        """
        image = image.convert("RGB")
        inputs = self.image_processor(images=image, return_tensors="pt")
        dtype = next(self.mask2former.parameters()).dtype
        pixel_values = inputs["pixel_values"].to(self.device, dtype)  # (1, 3, Hp, Wp)
        pixel_mask = inputs["pixel_mask"].to(self.device)  # (1, Hp, Wp), 1 inside the resized image
        out = self.mask2former(pixel_values=pixel_values, pixel_mask=pixel_mask)
        resized_hw = (int(pixel_mask[0].any(dim=1).sum()), int(pixel_mask[0].any(dim=0).sum()))
        scores, labels, masks = instance_predictions(
            out.class_queries_logits[0], out.masks_queries_logits[0], tuple(pixel_values.shape[-2:]), resized_hw,
            (image.height, image.width), self.max_per_image,
        )
        boxes = masks_to_boxes(masks).cpu().tolist()
        detections: dict[str, list[Detection]] = {name: [] for name in self.class_names}
        for box, score, label, mask in zip(boxes, scores.cpu().tolist(), labels.cpu().tolist(), masks.cpu().numpy()):
            detections[self.class_names[label]].append(Detection(box=tuple(box), score=score, mask=mask))
        return detections

    @torch.no_grad()
    def color_text_embeddings(self, class_name: str) -> torch.Tensor:
        """Zero-shot colour classifier for one class (cached): template-averaged, normalised text embeddings.

        Returns:
            (D, 10) weights, column j for GENEVAL_COLORS[j].
        """
        if class_name not in self._text_embeddings:
            texts = [t.format(c=color, cls=class_name) for color in GENEVAL_COLORS for t in COLOR_TEMPLATES]
            tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.clip_device)
            emb = F.normalize(self.clip.get_text_features(**tokens).pooler_output.float(), dim=-1)  # (10 * 3, D)
            emb = emb.view(len(GENEVAL_COLORS), len(COLOR_TEMPLATES), -1).mean(dim=1)  # (10, D)
            self._text_embeddings[class_name] = F.normalize(emb, dim=-1).T.contiguous()  # (D, 10)
        return self._text_embeddings[class_name]

    @torch.no_grad()
    def classify_colors(self, image: Image.Image, class_name: str, detections: list[Detection]) -> list[str]:
        """Name each detection's colour by CLIP zero-shot classification of its masked crop.

        Args:
            image: the RGB image the detections come from.
            class_name: their class (used in the text prompts).
            detections: boxes with optional (H, W) masks.

        Returns:
            one of GENEVAL_COLORS per detection.
        """
        if not detections:
            return []
        weights = self.color_text_embeddings(class_name)  # (D, 10)
        crops = torch.stack([self.clip_preprocess(composite_crop(image, d)) for d in detections])  # (N, 3, S, S)
        logits = []
        for start in range(0, len(crops), self.batch_size):
            pixels = crops[start : start + self.batch_size].to(self.clip_device, next(self.clip.parameters()).dtype)
            feats = F.normalize(self.clip.get_image_features(pixel_values=pixels).pooler_output.float(), dim=-1)
            logits.append(100.0 * feats @ weights)  # (n, 10)
        return [GENEVAL_COLORS[i] for i in torch.cat(logits).argmax(dim=1).tolist()]
