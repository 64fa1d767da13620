"""Mask2Former + CLIP detector on tiny random models of the real transformers classes, saved and loaded locally."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTokenizer,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    Mask2FormerImageProcessor,
    SwinConfig,
)

from eval.detection import GENEVAL_COLORS, Detection
from eval.geneval_scoring import ScoringConfig, evaluate_folder
from eval.mask2former_clip import (
    COCO_CLASSES,
    COLOR_TEMPLATES,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Mask2FormerClipDetector,
    clip_transform,
    coco_label_names,
    composite_crop,
    instance_predictions,
    masks_to_boxes,
)

REPO = Path(__file__).resolve().parents[1]
# Detectron2's spelling of three COCO classes, which GenEval renames: the loader must map them.
HF_STYLE_NAMES = [{"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard"}.get(n, n)
                  for n in COCO_CLASSES]


def save_mask2former(path: Path, names: list[str], num_queries: int = 12) -> Path:
    torch.manual_seed(0)
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(
        backbone_config=backbone, num_labels=len(names), id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)}, hidden_dim=32, mask_feature_size=32, feature_size=32,
        num_queries=num_queries, encoder_layers=1, decoder_layers=2, encoder_feedforward_dim=64, dim_feedforward=64,
        num_attention_heads=2,
    )
    model = Mask2FormerForUniversalSegmentation(config)
    for name, param in model.named_parameters():  # larger mask embeddings: masks that vary across the image
        if "mask_embedder" in name:
            torch.nn.init.normal_(param, std=1.0)
    model.save_pretrained(path)
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(path)
    return path


def save_clip(path: Path) -> Path:
    torch.manual_seed(0)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}  # character-level BPE vocabulary, no merges
    for ch in "abcdefghijklmnopqrstuvwxyz-":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77).save_pretrained(path)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return save_mask2former(root / "m2f-tiny", HF_STYLE_NAMES), save_clip(root / "clip-tiny")


@pytest.fixture(scope="module")
def detector(checkpoints: tuple[Path, Path]) -> Mask2FormerClipDetector:
    return Mask2FormerClipDetector.from_pretrained(*checkpoints, device="cpu", resize=(64, 96))


def random_image(h: int = 40, w: int = 56, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------------------------
# Loading


def test_class_names_match_geneval_object_names():
    names = (REPO / "eval" / "geneval_official" / "object_names.txt").read_text().split("\n")[:80]
    assert tuple(names) == COCO_CLASSES


def test_label_mapping_and_its_errors():
    assert coco_label_names(dict(enumerate(HF_STYLE_NAMES))) == list(COCO_CLASSES)
    shuffled = HF_STYLE_NAMES[::-1]
    assert coco_label_names(dict(enumerate(shuffled))) == list(COCO_CLASSES[::-1])  # by name, not by position
    with pytest.raises(ValueError, match="80-class COCO instance"):
        coco_label_names({i: f"c{i}" for i in range(133)})
    with pytest.raises(ValueError, match="do not match"):
        coco_label_names(dict(enumerate(["zebrafish"] + HF_STYLE_NAMES[1:])))


def test_from_pretrained_loads_and_names(detector: Mask2FormerClipDetector):
    assert detector.name == "mask2former:m2f-tiny+clip:clip-tiny"
    assert detector.class_names == list(COCO_CLASSES)
    assert detector.image_processor.size.shortest_edge == 64 and detector.image_processor.size.longest_edge == 96


def test_from_pretrained_errors(checkpoints: tuple[Path, Path], tmp_path: Path):
    m2f, clip = checkpoints
    with pytest.raises(FileNotFoundError, match="Mask2Former checkpoint directory not found"):
        Mask2FormerClipDetector.from_pretrained(tmp_path / "nope", clip)
    with pytest.raises(FileNotFoundError, match="CLIP checkpoint directory not found"):
        Mask2FormerClipDetector.from_pretrained(m2f, tmp_path / "nope")
    with pytest.raises(ValueError, match="holds a 'clip' model"):
        Mask2FormerClipDetector.from_pretrained(clip, clip)
    with pytest.raises(ValueError, match="holds a 'mask2former' model"):
        Mask2FormerClipDetector.from_pretrained(m2f, m2f)
    panoptic = tmp_path / "panoptic"
    Mask2FormerConfig(num_labels=133, id2label={i: f"c{i}" for i in range(133)}).save_pretrained(panoptic)
    with pytest.raises(ValueError, match="80-class COCO instance"):
        Mask2FormerClipDetector.from_pretrained(panoptic, clip)


# ---------------------------------------------------------------------------------------------------------------
# Detection


def test_detect_output_structure(detector: Mask2FormerClipDetector):
    image = random_image(40, 56)
    dets = detector.detect(image)
    assert set(dets) == set(COCO_CLASSES)
    flat = [d for ds in dets.values() for d in ds]
    assert len(flat) == min(100, 12 * 80)  # max_per_image (query, class) pairs
    for d in flat:
        assert 0.0 <= d.score <= 1.0
        assert d.mask.shape == (40, 56) and d.mask.dtype == bool
        x1, y1, x2, y2 = d.box
        assert 0 <= x1 <= x2 <= 56 and 0 <= y1 <= y2 <= 40
        if d.mask.any():  # the box is the mask's tight box (exclusive right/bottom edge)
            ys, xs = np.nonzero(d.mask)
            assert d.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        else:
            assert d.box == (0, 0, 0, 0) and d.score == 0.0
    assert any(d.mask.any() and not d.mask.all() for d in flat)  # the box checks above saw real shapes


def test_instance_predictions_match_a_direct_computation():
    torch.manual_seed(1)
    q, c, h, w = 5, 4, 6, 8
    class_logits, mask_logits = torch.randn(q, c + 1), torch.randn(q, h, w) * 3
    scores, labels, masks = instance_predictions(class_logits, mask_logits, (24, 32), (20, 30), (10, 15), 7)
    probs = class_logits.softmax(-1)
    expected = []
    for query in range(q):  # every (query, class) pair, computed one at a time
        full = F.interpolate(mask_logits[query][None, None], size=(24, 32), mode="bilinear", align_corners=False)
        full = F.interpolate(full[:, :, :20, :30], size=(10, 15), mode="bilinear", align_corners=False)[0, 0]
        binary = full > 0
        mask_score = (full.sigmoid() * binary).sum() / (binary.sum() + 1e-6)
        for label in range(c):
            expected.append((float(probs[query, label]), float(probs[query, label] * mask_score), label, binary))
    expected.sort(key=lambda e: e[0], reverse=True)  # the top 7 by class probability
    assert masks.shape == (7, 10, 15) and masks.dtype == torch.bool
    for k, (_, score, label, binary) in enumerate(expected[:7]):
        assert scores[k].item() == pytest.approx(score, rel=1e-5)
        assert labels[k].item() == label and torch.equal(masks[k], binary)


def test_masks_to_boxes():
    masks = torch.zeros(3, 5, 7, dtype=torch.bool)
    masks[0, 1:3, 2:6] = True
    masks[1, 4, 0] = True
    boxes = masks_to_boxes(masks)
    assert boxes.tolist() == [[2, 1, 6, 3], [0, 4, 1, 5], [0, 0, 0, 0]]


# ---------------------------------------------------------------------------------------------------------------
# Colour


def test_composite_crop_paints_outside_the_mask_grey():
    pixels = np.arange(8 * 10 * 3, dtype=np.uint8).reshape(8, 10, 3)
    mask = np.zeros((8, 10), dtype=bool)
    mask[2:5, 3:7] = True
    mask[4, 3] = False
    crop = np.asarray(composite_crop(Image.fromarray(pixels), Detection(box=(2.4, 1.6, 8, 6), score=0.9, mask=mask)))
    assert crop.shape == (4, 6, 3)  # rows 2..5, columns 2..7 (PIL rounds the box)
    inside = mask[2:6, 2:8]
    assert np.array_equal(crop[inside], pixels[2:6, 2:8][inside])
    assert (crop[~inside] == 153).all()  # "#999"
    no_mask = composite_crop(Image.fromarray(pixels), Detection(box=(0, 0, 10, 8), score=0.9))
    assert np.array_equal(np.asarray(no_mask), pixels)
    with pytest.raises(ValueError, match="mask shape"):
        composite_crop(Image.fromarray(pixels), Detection(box=(0, 0, 1, 1), score=0.9, mask=mask.T))


def test_clip_transform_constant_image():
    tensor = clip_transform(32)(Image.new("RGB", (50, 20), (200, 100, 50)))
    assert tensor.shape == (3, 32, 32)
    expected = [(v / 255 - m) / s for v, m, s in zip((200, 100, 50), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)]
    for channel, value in zip(tensor, expected):
        assert torch.allclose(channel, torch.full_like(channel, value), atol=1e-5)


def test_text_embeddings_average_templates(detector: Mask2FormerClipDetector):
    weights = detector.color_text_embeddings("hot dog")
    assert weights.shape == (16, len(GENEVAL_COLORS))
    assert detector.color_text_embeddings("hot dog") is weights  # cached per class
    for j, color in enumerate(GENEVAL_COLORS):
        per_template = []
        for template in ("a photo of a {} hot dog", "a photo of a {}-colored hot dog", "a photo of a {} object"):
            tokens = detector.tokenizer([template.format(color)], return_tensors="pt")  # one at a time, unpadded
            emb = detector.clip.get_text_features(**tokens).pooler_output[0]
            per_template.append(emb / emb.norm())
        mean = torch.stack(per_template).mean(0)
        assert torch.allclose(weights[:, j], mean / mean.norm(), atol=1e-5)
    assert COLOR_TEMPLATES[1].format(c="red", cls="cat") == "a photo of a red-colored cat"


def test_classify_colors_matches_manual_pipeline(detector: Mask2FormerClipDetector):
    image = random_image(40, 56, seed=3)
    mask = np.zeros((40, 56), dtype=bool)
    mask[5:30, 10:40] = True
    dets = [Detection(box=(10, 5, 40, 30), score=0.9, mask=mask), Detection(box=(0, 0, 56, 40), score=0.8),
            Detection(box=(20, 20, 20.2, 20.1), score=0.7)]  # sub-pixel box: still a one-pixel crop
    detector.batch_size = 2  # exercise batching
    colors = detector.classify_colors(image, "car", dets)
    assert len(colors) == 3 and all(c in GENEVAL_COLORS for c in colors)
    weights = detector.color_text_embeddings("car")
    for d, color in zip(dets, colors):
        pixels = detector.clip_preprocess(composite_crop(image, d))[None]
        feat = detector.clip.get_image_features(pixel_values=pixels).pooler_output[0]
        assert GENEVAL_COLORS[int((100 * feat / feat.norm() @ weights).argmax())] == color
    assert detector.classify_colors(image, "car", []) == []


def test_clip_mean_std_read_from_preprocessor_config(checkpoints: tuple[Path, Path], tmp_path: Path):
    m2f, clip = checkpoints
    (clip / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    try:
        det = Mask2FormerClipDetector.from_pretrained(m2f, clip, resize=None)
    finally:
        (clip / "preprocessor_config.json").unlink()
    value = det.clip_preprocess(Image.new("RGB", (8, 8), (255, 255, 255)))
    assert torch.allclose(value, torch.full_like(value, (1 - 0.5) / 0.25))
    assert det.image_processor.size.shortest_edge == 64  # resize=None keeps the checkpoint's processor


def test_scores_a_geneval_folder_end_to_end(detector: Mask2FormerClipDetector, tmp_path: Path):
    image = random_image(48, 48, seed=5)
    found = [name for name, dets in detector.detect(image).items() if dets][:2]  # classes the random model sees
    meta = {"tag": "color_attr", "include": [{"class": found[0], "count": 1, "color": "red"},
                                             {"class": found[1], "count": 1, "color": "blue"}], "prompt": "p"}
    samples = tmp_path / "00000" / "samples"
    samples.mkdir(parents=True)
    (samples.parent / "metadata.jsonl").write_text(json.dumps(meta))
    for k in range(2):
        image.save(samples / f"{k:04d}.png")
    calls = []
    classify = detector.classify_colors
    detector.classify_colors = lambda *args: calls.append(args[1]) or classify(*args)  # count colour calls
    try:  # threshold 0 so that the random model's detections reach the colour clauses
        results = evaluate_folder(tmp_path, detector, ScoringConfig(threshold=0.0), progress=False)
    finally:
        del detector.classify_colors
    assert len(results) == 2 and {r["detector"] for r in results} == {detector.name}
    assert calls.count(found[0]) == 2  # the first clause's colour was judged on each image
    assert all(isinstance(r["correct"], bool) for r in results)
