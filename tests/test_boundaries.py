"""Boundaries between the project's models and the libraries around them, where a wrong value range, normalisation,
hidden layer or pixel layout passes every end-to-end run: each test holds one hand-over against the other side's own
code (transformers' processors and models, PIL) or an independent computation, with statistics other than SigLIP's
0.5 / 0.5 wherever that trivial normalisation would hide a mistake.

- a pretrained tower folder: VQRAE's features on the project's pixels = the tower on its own processor's pixels,
  whether the folder saved an image processor (preprocessor_config.json) or a whole processor (processor_config.json);
- the world's SigLIP: trained on exactly the pixels its saved processor makes;
- a unified model's images given as codes: the processor's normalisation undone before VQRAE encodes;
- a LLaVA checkpoint with its tower swapped for VQRAE's: transformers reads VQRAE's features from the saved config;
- generated images on disk (GenEval, DPG-Bench): the pipeline's images, rounded to uint8, in RGB and HWC order.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipImageProcessor,
    SiglipModel,
    SiglipProcessor,
)

from data.transforms import pil_to_tensor
from llm.sampler import SamplingConfig
from tests.test_ar_gen import tiny_text_to_image
from tests.test_encoder_loading import CLIP_MEAN, CLIP_STD, siglip
from tests.test_understanding import shapes_images, small_internvit, tiny_vqrae
from tokenizer import VQRAE, get_preset
from tokenizer.decoder import unpatchify
from world.shapes import shapes_world_tokenizer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models are all per-op overhead: one intra-op thread is far faster than several on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def noise_images(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def signed_pixels(images: list[Image.Image]) -> torch.Tensor:
    """u / 127.5 - 1 of each image, (B, 3, H, W), computed here from the uint8 arrays."""
    arrays = np.stack([np.asarray(im.convert("RGB"), dtype=np.float64) for im in images])  # (B, H, W, 3)
    return torch.from_numpy(arrays / 127.5 - 1).permute(0, 3, 1, 2).float()


# ----------------------------------------------------------------------------------------------- pretrained towers


@pytest.mark.parametrize("saved", ["image_processor", "processor"])
def test_a_tower_folder_is_normalised_as_its_own_processor_does(tmp_path, saved):
    """VQRAE's features of an image = the folder's SigLIP tower on the pixels of the folder's own processor."""
    from world.siglip import train_caption_tokenizer

    torch.manual_seed(0)
    model = siglip().eval()
    model.save_pretrained(tmp_path / "siglip")
    images = SiglipImageProcessor(size={"height": 16, "width": 16}, image_mean=list(CLIP_MEAN),
                                  image_std=list(CLIP_STD))
    if saved == "image_processor":  # preprocessor_config.json, as on the Hub
        images.save_pretrained(tmp_path / "siglip")
    else:  # the image processor and a tokenizer together, as a SigLIP checkpoint is saved with transformers 5
        texts = ["a photo of a red circle", "two blue squares below a green triangle", "three yellow circles"] * 4
        tokenizer = train_caption_tokenizer(texts, tmp_path / "spm", 40)
        SiglipProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(tmp_path / "siglip")
    processor = AutoImageProcessor.from_pretrained(tmp_path / "siglip")  # either file, as transformers reads it
    assert tuple(processor.image_mean) == CLIP_MEAN
    vqrae = VQRAE.from_pretrained_encoder(get_preset("tiny"), tmp_path / "siglip").eval()  # model.encoder_path
    pictures = noise_images(2, 16)
    with torch.no_grad():
        pixels = processor(images=pictures, return_tensors="pt")["pixel_values"]
        theirs = model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        ours = vqrae.encode_features(torch.stack([pil_to_tensor(im) for im in pictures]))
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_the_worlds_siglip_trains_on_the_pixels_its_saved_processor_makes(tmp_path):
    """The pixels the world's SigLIP pretraining feeds equal what its saved processor (AutoProcessor) makes."""
    from world.export import export_world
    from world.siglip import CaptionedImages, SiglipPretrainConfig, pretrain_siglip

    export_world(tmp_path / "train", 12, image_size=32, seed=0, progress=False)
    towers = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
    cfg = SiglipPretrainConfig(vision={**towers, "patch_size": 8}, text=towers, vocab_size=48)
    cfg.run.steps, cfg.run.batch_size, cfg.run.ckpt_every = 1, 4, 1
    out = pretrain_siglip(tmp_path / "train", tmp_path / "siglip", cfg, 32, tmp_path / "work", {}, progress=False)
    processor = AutoProcessor.from_pretrained(out)
    fed = CaptionedImages(tmp_path / "train", processor.tokenizer, cfg.max_length, 32, progress=False).pixels
    files = sorted((tmp_path / "train" / "images").glob("*.png"))
    assert len(files) == len(fed) == 12
    made = processor(images=[Image.open(f).convert("RGB") for f in files], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(fed, made, atol=1e-6, rtol=0)
    siglip_model = SiglipModel.from_pretrained(out).eval()  # and the tower takes them at its own resolution
    with torch.no_grad():
        assert siglip_model.vision_model(pixel_values=made).last_hidden_state.shape == (12, 16, 16)


# ----------------------------------------------------------------------------------------------- understanding


def test_images_as_codes_undo_a_processor_normalisation_that_is_not_siglips(tmp_path):
    """A unified model's codes of its processor's pixels (ImageNet mean / std) = VQRAE's codes of the image."""
    from llm.understanding import build_processor
    from llm.unified import image_codes

    vqrae = small_internvit()
    assert vqrae.config.encoder.image_mean != (0.5, 0.5, 0.5)
    build_processor(vqrae, shapes_world_tokenizer(tmp_path / "tok")).save_pretrained(tmp_path / "export")
    processor = AutoProcessor.from_pretrained(tmp_path / "export")  # what load_unified and the trainer hold
    size = vqrae.config.encoder.image_size
    pictures = noise_images(3, size, seed=5)
    pixels = processor.image_processor(images=pictures, return_tensors="pt")["pixel_values"]
    signed = signed_pixels(pictures)
    assert (pixels - signed).abs().max() > 0.5  # the normalisation is not the identity here
    with torch.no_grad():
        expected = vqrae.encode(signed).indices
        got = image_codes(vqrae, processor, pixels)
    assert len({tuple(row.tolist()) for row in expected}) == 3  # codes that tell the images apart
    assert torch.equal(got, expected), f"{int((got != expected).sum())} of {got.numel()} codes differ"


def test_a_swapped_llava_reads_the_vqrae_features_from_its_saved_config(tmp_path):
    """A LLaVA-1.5 checkpoint (layer -2) with VQRAE's tower swapped in feeds, by its saved config, VQRAE's features."""
    from llm.understanding import add_image_token, build_processor, replace_vision_tower, save_llava, user_turn
    from llm.vocab import build_tiny_qwen3

    tokenizer = shapes_world_tokenizer(tmp_path / "tok")
    image_token = add_image_token(tokenizer)
    lm = build_tiny_qwen3(tokenizer, seed=1)
    vqrae = tiny_vqrae(seed=11)
    vision = {k: v for k, v in vqrae.config.encoder.tower.items() if k != "model_type"}
    config = LlavaConfig(vision_config={"model_type": "siglip_vision_model", **vision},
                         text_config=lm.config.to_dict(), image_token_index=image_token,
                         vision_feature_select_strategy="full", vision_feature_layer=-2,
                         image_seq_length=vqrae.config.num_tokens)
    torch.manual_seed(7)
    save_llava(LlavaForConditionalGeneration(config).eval(), build_processor(vqrae, tokenizer), tmp_path / "llava")
    vqrae.save_pretrained(tmp_path / "vq")
    replace_vision_tower(tmp_path / "llava", tmp_path / "vq", tmp_path / "swapped")
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "swapped").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "swapped")
    pictures = shapes_images(vqrae.config.encoder.image_size)
    text = processor.apply_chat_template([user_turn("How many circles?", True)], add_generation_prompt=True,
                                         tokenize=False)
    inputs = processor(images=pictures, text=[text] * len(pictures), return_tensors="pt")
    with torch.no_grad():
        seen = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output  # the config's choice
        expected = model.model.multi_modal_projector(vqrae.encode_features(signed_pixels(pictures)))
    seen = torch.stack(list(seen))
    assert seen.shape == expected.shape
    torch.testing.assert_close(seen, expected, atol=1e-5, rtol=1e-5)
    tokens = (inputs["input_ids"] == model.config.image_token_index).sum(1)
    assert tokens.tolist() == [expected.shape[1]] * len(pictures)


# ----------------------------------------------------------------------------------------------- generated images


def assert_nearest_uint8(saved: Image.Image, image: torch.Tensor, what: str) -> None:
    """`saved` holds, pixel for pixel, the nearest uint8 value of (x + 1) / 2 * 255 of `image` (3, H, W) in [-1, 1],
    in RGB order and (H, W, 3) layout."""
    assert saved.mode == "RGB", what
    exact = (image.detach().double().clamp(-1, 1).permute(1, 2, 0).numpy() + 1) * 127.5  # (H, W, 3) in [0, 255]
    error = np.abs(np.asarray(saved, dtype=np.float64) - exact)
    assert error.shape == exact.shape and error.max() <= 0.5 + 1e-3, f"{what}: off by up to {error.max():.2f}"


def test_benchmark_images_on_disk_are_the_pipelines_images(tmp_path):
    """GenEval samples and DPG-Bench tiles hold the pipeline's images of their streams, as uint8 RGB pixels."""
    from eval import dpg_generation, geneval_generation

    t2i = tiny_text_to_image(tmp_path)
    sampling = SamplingConfig(cfg_scale=2.0, temperature=1.0, seed=3)
    prompts = [{"tag": "single_object", "prompt": "a photo of a red circle"},
               {"tag": "two_object", "prompt": "a photo of a square and a triangle"}]
    geneval_generation.generate(t2i, prompts, tmp_path / "geneval", 2, sampling, prompts_per_batch=2,
                                model_name="tiny")
    texts = [p["prompt"] for p in prompts for _ in range(2)]
    images, _ = t2i.generate(texts, sampling, image_ids=[0, 1, 2, 3])  # image k of prompt i: stream 2 i + k
    assert len({im.sum().item() for im in images}) == 4 and images.min() < -0.5 and images.max() > 0.5
    for i in range(2):
        for k in range(2):
            saved = Image.open(tmp_path / "geneval" / f"{i:05d}" / "samples" / f"{k:04d}.png")
            assert_nearest_uint8(saved, images[2 * i + k], f"GenEval prompt {i} image {k}")
    tiles = dpg_generation.TILES
    dpg_generation.generate(t2i, [("item", "a photo of a red circle")], tmp_path / "dpg", sampling,
                            prompts_per_batch=1, model_name="tiny")
    images, _ = t2i.generate(["a photo of a red circle"] * tiles, sampling, image_ids=list(range(tiles)))
    for k, crop in enumerate(dpg_generation.crops(Image.open(tmp_path / "dpg" / "item.png"))):
        assert_nearest_uint8(crop, images[k], f"DPG-Bench tile {k}")


# ----------------------------------------------------------------------------------------------- token grid


def test_decoder_token_k_paints_the_block_the_encoders_token_k_reads():
    """Encoder and decoder share one token grid: the encoder's token k embeds pixel block (k // g, k % g) and the
    decoder's head output of token k lands in that block, its p*p*3 values in (row, column, channel) order."""
    torch.manual_seed(0)
    model = VQRAE(get_preset("tiny")).eval()
    p, g = model.config.encoder.patch_size, model.config.grid_size
    embeddings = model.encoder.tower.embeddings
    x = torch.rand(1, 3, g * p, g * p) * 2 - 1
    with torch.no_grad():
        base = embeddings(x)
        for r, c in ((0, 1), (g - 1, 2), (3, g - 1)):
            y = x.clone()
            y[:, :, r * p : (r + 1) * p, c * p : (c + 1) * p] += 0.5
            changed = (embeddings(y) - base).abs().amax(-1)[0].nonzero().flatten().tolist()
            assert changed == [r * g + c]
    head = torch.randn(2, g * g, p * p * 3)
    out = unpatchify(head, g, p)
    for k in (0, 5, g * g - 1):
        block = out[:, :, (k // g) * p : (k // g + 1) * p, (k % g) * p : (k % g + 1) * p]  # (2, 3, p, p)
        expected = torch.stack([head[:, k, [(i * p + j) * 3 + ch for i in range(p) for j in range(p)]].view(2, p, p)
                                for ch in range(3)], dim=1)
        assert torch.equal(block, expected)
