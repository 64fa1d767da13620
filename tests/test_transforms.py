"""Transforms: the ADM crop against guided-diffusion's numpy formulation, mode conversions, determinism, the
uint8 round trip and the PNG grid."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from data.transforms import (
    ImageTransform,
    adm_center_crop,
    make_grid_png,
    open_rgb,
    pil_to_tensor,
    random_crop,
    sample_seed,
    to_pil,
    to_rgb,
    to_uint8,
)


def _noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _reference_center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """guided-diffusion's `center_crop_arr` (numpy slicing), the reference the evaluation crop must match."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (257, 300), (64, 64), (1030, 517), (33, 90), (129, 64)])
def test_adm_center_crop_matches_reference(size):
    image = _noise_image(*size)
    out = adm_center_crop(image, 64)
    assert out.size == (64, 64)
    np.testing.assert_array_equal(np.array(out), _reference_center_crop_arr(image, 64))


def test_adm_center_crop_is_identity_at_target_size():
    image = _noise_image(32, 32)
    np.testing.assert_array_equal(np.array(adm_center_crop(image, 32)), np.array(image))


def test_to_rgb_composites_alpha_on_white():
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 10, 50)
    rgba[0, :, 3] = 255  # opaque row keeps its colour
    rgba[1, :, 3] = 0  # transparent row becomes white
    out = np.array(to_rgb(Image.fromarray(rgba, mode="RGBA")))
    assert out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out[0], np.tile([200, 10, 50], (3, 1)))
    np.testing.assert_array_equal(out[1], np.full((3, 3), 255))
    half = np.array(to_rgb(Image.fromarray(np.array([[[0, 0, 0, 128]]], dtype=np.uint8), mode="RGBA")))
    assert abs(int(half[0, 0, 0]) - 127) <= 1


def test_an_rgb_file_with_a_transparent_colour_is_composited_too(tmp_path):
    """PNG's tRNS chunk on an RGB image: the pixels of that colour are transparent, so they become white, as on an
    RGBA image; what every model reader opens a file with (`open_rgb`) does the same."""
    pixels = np.zeros((2, 2, 3), dtype=np.uint8)
    pixels[0] = (10, 20, 30)  # the transparent colour
    pixels[1] = (200, 100, 0)
    image = Image.fromarray(pixels, mode="RGB")
    image.save(tmp_path / "t.png", transparency=(10, 20, 30))
    with Image.open(tmp_path / "t.png") as raw:
        assert raw.mode == "RGB" and "transparency" in raw.info
        converted = np.array(to_rgb(raw))
    expected = np.array([[[255, 255, 255]] * 2, [[200, 100, 0]] * 2], dtype=np.uint8)
    np.testing.assert_array_equal(converted, expected)
    np.testing.assert_array_equal(np.array(open_rgb(tmp_path / "t.png")), expected)


def test_to_rgb_palette_grey_cmyk_and_16_bit():
    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    np.testing.assert_array_equal(np.array(to_rgb(palette))[0, 0], [10, 20, 30])
    palette.info["transparency"] = 1
    np.testing.assert_array_equal(np.array(to_rgb(palette))[0, 0], [255, 255, 255])

    grey = Image.fromarray(np.array([[7, 250]], dtype=np.uint8), mode="L")
    np.testing.assert_array_equal(np.array(to_rgb(grey)), [[[7] * 3, [250] * 3]])
    grey_alpha = Image.fromarray(np.array([[[7, 255], [7, 0]]], dtype=np.uint8), mode="LA")
    np.testing.assert_array_equal(np.array(to_rgb(grey_alpha)), [[[7] * 3, [255] * 3]])

    cmyk = Image.new("CMYK", (1, 1), (255, 0, 0, 0))  # pure cyan
    np.testing.assert_array_equal(np.array(to_rgb(cmyk))[0, 0], [0, 255, 255])

    sixteen = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16))
    assert sixteen.mode.startswith("I;16")
    np.testing.assert_array_equal(np.array(to_rgb(sixteen))[0, :, 0], [0, 100, 255])


def test_uint8_round_trip_is_exact():
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = Image.fromarray(np.stack([values, values.T, 255 - values], axis=-1))
    x = pil_to_tensor(image)
    assert x.dtype == torch.float32 and x.shape == (3, 16, 16)
    assert x.min() == -1 and x.max() == 1
    np.testing.assert_array_equal(to_uint8(x).permute(1, 2, 0).numpy(), np.array(image))


def test_to_uint8_formula():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.3, 1.0, 3.0])
    expected = [int(min(max(127.5 * v + 128, 0), 255)) for v in x.tolist()]  # clamp, then truncate
    assert to_uint8(x).tolist() == expected
    assert to_uint8(x).dtype == torch.uint8


def test_to_pil_single_and_batch():
    x = torch.rand(2, 3, 5, 7) * 2 - 1
    images = to_pil(x)
    assert len(images) == 2 and images[1].size == (7, 5) and images[1].mode == "RGB"
    np.testing.assert_array_equal(np.array(to_pil(x[1])), to_uint8(x[1]).permute(1, 2, 0).numpy())
    with pytest.raises(ValueError, match="expected"):
        to_pil(torch.zeros(1, 5, 5))


def test_make_grid_png(tmp_path):
    top, bottom = torch.rand(3, 3, 8, 6) * 2 - 1, torch.rand(3, 3, 8, 6) * 2 - 1
    path = make_grid_png([top, bottom], tmp_path / "grid.png", padding=2)
    assert os.listdir(tmp_path) == ["grid.png"]  # no temporary file left behind
    grid = np.array(Image.open(path))
    assert grid.shape == (2 * (8 + 2) + 2, 3 * (6 + 2) + 2, 3)
    cell = grid[2 + 10:2 + 10 + 8, 2 + 8:2 + 8 + 6]  # row 1, column 1
    np.testing.assert_array_equal(cell, to_uint8(bottom[1]).permute(1, 2, 0).numpy())
    assert (grid[0] == 255).all()
    with pytest.raises(ValueError, match="equal"):
        make_grid_png([top, bottom[:2]], tmp_path / "bad.png")
    big = np.array(Image.open(make_grid_png([top], tmp_path / "big.png", padding=0, min_cell=16)))
    assert big.shape == (16, 3 * 12, 3)  # cells enlarged 2x by repetition: every pixel a 2 x 2 block
    np.testing.assert_array_equal(big[::2, ::2], np.array(Image.open(make_grid_png([top], tmp_path / "s.png", 0))))
    plain = np.array(Image.open(make_grid_png([top, bottom], tmp_path / "p.png", padding=2, min_cell=48)))
    captioned = np.array(Image.open(make_grid_png([top, bottom], tmp_path / "c.png", padding=2, min_cell=48,
                                                  captions=["a red circle", "two squares", "a long caption " * 4])))
    assert captioned.shape[1] == plain.shape[1] and captioned.shape[0] > plain.shape[0]
    np.testing.assert_array_equal(captioned[: plain.shape[0]], plain)  # the cells unchanged, the text below
    band = captioned[plain.shape[0] :]
    assert (band < 128).any() and (band[:, : plain.shape[1] // 3] < 128).any()  # text under the first column
    with pytest.raises(ValueError, match="2 captions for 3 columns"):
        make_grid_png([top], tmp_path / "x.png", captions=["a", "b"])


@pytest.mark.parametrize("mode", ["center", "random", "resize"])
def test_transform_modes(mode):
    transform = ImageTransform(32, mode=mode)
    x = transform(_noise_image(70, 45).convert("RGBA"), seed=3)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert -1 <= x.min() and x.max() <= 1


def test_center_transform_equals_adm_crop():
    image = _noise_image(90, 61)
    x = ImageTransform(32, mode="center")(image)
    np.testing.assert_array_equal(to_uint8(x).permute(1, 2, 0).numpy(), _reference_center_crop_arr(image, 32))


def test_random_transform_is_deterministic_given_seed():
    image = _noise_image(120, 50)
    transform = ImageTransform(32, mode="random", hflip=True, max_scale=1.5)
    assert transform.is_random
    torch.testing.assert_close(transform(image, seed=11), transform(image, seed=11), rtol=0, atol=0)
    crops = {transform(image, seed=s).sum().item() for s in range(8)}
    assert len(crops) > 4


def test_random_crop_is_a_window_of_the_resized_image():
    image = _noise_image(100, 32)  # short side already 32: only the horizontal offset is random
    for seed in range(5):
        out = np.array(random_crop(image, 32, torch.Generator().manual_seed(seed)))
        windows = [np.array(image)[:, left:left + 32] for left in range(100 - 32 + 1)]
        assert any((out == w).all() for w in windows)
    with pytest.raises(ValueError, match="max_scale"):
        random_crop(image, 32, max_scale=0.5)


def test_center_hflip_flips_for_some_seeds():
    image = _noise_image(40, 40)
    plain = ImageTransform(40, mode="center")(image)
    flipping = ImageTransform(40, mode="center", hflip=True)
    outs = [flipping(image, seed=s) for s in range(10)]
    assert any(torch.equal(o, plain) for o in outs)
    assert any(torch.equal(o, plain.flip(-1)) for o in outs)


def test_sample_seed_is_stable_and_mixed():
    assert sample_seed(0, 1, 2) == sample_seed(0, 1, 2)
    seeds = {sample_seed(s, e, i) for s in range(3) for e in range(3) for i in range(3)}
    assert len(seeds) == 27
    assert all(0 <= s < 2**63 for s in seeds)


def test_transform_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown mode"):
        ImageTransform(32, mode="crop")
    with pytest.raises(ValueError, match="positive"):
        ImageTransform(0)
