"""Image transforms shared by every trainer and evaluator.

Pixel convention: a model input is a float tensor (3, H, W) in [-1, 1] made from uint8 pixels u as
u / 127.5 - 1; back to uint8 is `clamp(127.5 * x + 128, 0, 255)` truncated (as LlamaGen and TokenFlow do), which
returns u exactly for an unmodified input.

    transform = ImageTransform(256, mode="random", hflip=True)
    x = transform(Image.open(path), seed=sample_seed(0, epoch, index))  # (3, 256, 256)
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageCms

from common.files import atomic_write

TRANSFORM_MODES = ("center", "random", "resize")
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB; transparent pixels are composited on white.

    Palette images with a transparent colour, L/LA/PA/RGBA images and tRNS transparency all go through alpha
    compositing; CMYK uses the embedded ICC profile when there is one; 16-bit greyscale is scaled (not clipped)
    to 8 bits.

    Args:
        image: a decoded PIL image of any mode.
    """
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "F":
        return Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "CMYK" and image.info.get("icc_profile"):
        try:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
            return ImageCms.profileToProfile(image, profile, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            return image.convert("RGB")
    if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def open_rgb(path: str | Path) -> Image.Image:
    """An image file decoded whole and made 8-bit RGB by `to_rgb`: how every reader of images for a model (training
    data, evaluation, the chat) turns a file into pixels."""
    with Image.open(path) as raw:
        raw.load()
        return to_rgb(raw)


def adm_center_crop(image: Image.Image, size: int) -> Image.Image:
    """The ADM / LlamaGen / RAE evaluation crop: BOX-halve while the short side >= 2 * size, resize the short side
    to `size` (rounding) with BICUBIC, then centre-crop with floor offsets.

    Args:
        image: an RGB PIL image.
        size: output side length.
    """
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left = (image.width - size) // 2
    top = (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def random_crop(
    image: Image.Image,
    size: int,
    generator: torch.Generator | None = None,
    max_scale: float = 1.0,
    hflip: bool = False,
) -> Image.Image:
    """Training crop: resize the short side to size * s (s uniform in [1, max_scale]; BOX-halving first as in
    `adm_center_crop`), take a random size x size window and optionally flip it horizontally.

    Args:
        image: an RGB PIL image.
        size: output side length.
        generator: the source of randomness (the global torch RNG when None).
        max_scale: largest short-side scale relative to `size` (1.0 keeps the whole short side).
        hflip: flip horizontally with probability 1/2.
    """
    if max_scale < 1.0:
        raise ValueError(f"random_crop: max_scale must be >= 1, got {max_scale}")
    u = torch.rand((), generator=generator).item()
    short = max(size, round(size * (1.0 + (max_scale - 1.0) * u)))
    while min(image.size) >= 2 * short:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = short / min(image.size)
    image = image.resize(tuple(max(size, round(s * scale)) for s in image.size), resample=Image.BICUBIC)
    left = int(torch.randint(0, image.width - size + 1, (), generator=generator))
    top = int(torch.randint(0, image.height - size + 1, (), generator=generator))
    image = image.crop((left, top, left + size, top + size))
    if hflip and torch.rand((), generator=generator).item() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return image


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [-1, 1] (u / 127.5 - 1).

    Args:
        image: an RGB PIL image.
    """
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # (H, W, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 with `clamp(127.5 * x + 128, 0, 255)` truncated; any shape, e.g. (3, H, W) or
    (B, 3, H, W).

    Args:
        x: float tensor in [-1, 1].
    """
    return (127.5 * x.float() + 128.0).clamp(0, 255).to(torch.uint8)


def to_pil(x: torch.Tensor) -> Image.Image | list[Image.Image]:
    """(3, H, W) -> one PIL image; (B, 3, H, W) -> a list of them.

    Args:
        x: float tensor in [-1, 1].
    """
    if x.dim() not in (3, 4) or x.shape[-3] != 3:
        raise ValueError(f"to_pil: expected (3, H, W) or (B, 3, H, W), got {tuple(x.shape)}")
    pixels = to_uint8(x.detach()).cpu()
    if pixels.dim() == 3:
        return Image.fromarray(pixels.permute(1, 2, 0).numpy())
    return [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]


def make_grid_png(rows: Sequence[torch.Tensor], path: str | Path, padding: int = 2, min_cell: int = 0,
                  captions: Sequence[str] | None = None) -> Path:
    """Write a grid whose i-th row is `rows[i]` (e.g. originals over reconstructions) to a PNG, atomically.

    Args:
        rows: tensors (B, 3, H, W) in [-1, 1], all of the same shape.
        path: the output file.
        padding: white pixels between cells.
        min_cell: cells smaller than this are enlarged by an integer factor (nearest neighbour), so 32 px images
            stay visible; pixels are never interpolated.
        captions: one text per column, written (wrapped) in a band under the grid.
    """
    from torchvision.utils import make_grid

    if not rows or any(r.shape != rows[0].shape or r.dim() != 4 for r in rows):
        raise ValueError(f"make_grid_png: expected equal (B, 3, H, W) rows, got {[tuple(r.shape) for r in rows]}")
    cells = torch.cat([to_uint8(r.detach()).cpu() for r in rows])  # (R * B, 3, H, W)
    scale = max(1, -(-min_cell // max(cells.shape[-2:])))
    if scale > 1:
        cells = cells.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    grid = make_grid(cells, nrow=rows[0].shape[0], padding=padding, pad_value=255)  # (3, H', W')
    image = Image.fromarray(grid.permute(1, 2, 0).numpy())
    if captions is not None:
        if len(captions) != rows[0].shape[0]:
            raise ValueError(f"make_grid_png: {len(captions)} captions for {rows[0].shape[0]} columns")
        image = _caption_band(image, captions, cells.shape[-1] + padding, padding)
    path = Path(path)
    with atomic_write(path, "wb") as f:
        image.save(f, format="PNG")
    return path


def _caption_band(grid: Image.Image, captions: Sequence[str], column: int, padding: int) -> Image.Image:
    """`grid` with each column's caption wrapped in a white band below it."""
    import textwrap

    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=11)
    width = max(4, (column - padding) // 6)  # characters per line at the default font's ~6 px
    lines = [textwrap.wrap(c, width) or [""] for c in captions]
    band = 12 * max(len(ls) for ls in lines) + 2 * padding
    out = Image.new("RGB", (grid.width, grid.height + band), "white")
    out.paste(grid, (0, 0))
    draw = ImageDraw.Draw(out)
    for k, text in enumerate(lines):
        for j, line in enumerate(text):
            draw.text((padding + k * column, grid.height + j * 12), line, fill="black", font=font)
    return out


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample of one epoch, the same in every process and on every resume.

    Args:
        seed: the run's data seed.
        epoch: the epoch number.
        index: the sample index in the dataset.
    """
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


class ImageTransform:
    """PIL image (any mode) -> float32 tensor (3, resolution, resolution) in [-1, 1].

    Modes: "center" (`adm_center_crop`, the evaluation crop), "random" (`random_crop`), "resize" (squash the whole
    image to a square with BICUBIC). `hflip` flips with probability 1/2 in every mode; randomness comes from
    `seed` when given, so the same (image, seed) always gives the same tensor.

    Args:
        resolution: output side length.
        mode: one of TRANSFORM_MODES.
        hflip: random horizontal flips.
        max_scale: largest short-side scale of "random" crops (see `random_crop`).
    """

    def __init__(self, resolution: int, mode: str = "center", hflip: bool = False, max_scale: float = 1.0):
        if mode not in TRANSFORM_MODES:
            raise ValueError(f"ImageTransform: unknown mode {mode!r}, expected one of {TRANSFORM_MODES}")
        if resolution <= 0:
            raise ValueError(f"ImageTransform: resolution must be positive, got {resolution}")
        self.resolution = resolution
        self.mode = mode
        self.hflip = hflip
        self.max_scale = max_scale

    @property
    def is_random(self) -> bool:
        """Whether the output depends on the seed."""
        return self.mode == "random" or self.hflip

    def __call__(self, image: Image.Image, seed: int | None = None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        image = to_rgb(image)
        if self.mode == "random":
            image = random_crop(image, self.resolution, generator, self.max_scale, self.hflip)
        else:
            if self.mode == "center":
                image = adm_center_crop(image, self.resolution)
            else:
                image = image.resize((self.resolution, self.resolution), resample=Image.BICUBIC)
            if self.hflip and torch.rand((), generator=generator).item() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return pil_to_tensor(image)

    def __repr__(self) -> str:
        return (f"ImageTransform(resolution={self.resolution}, mode={self.mode!r}, hflip={self.hflip}, "
                f"max_scale={self.max_scale})")
