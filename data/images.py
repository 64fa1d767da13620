"""Map-style image datasets over four on-disk formats, and their collate function.

- image folder: every .png/.jpg/.jpeg/.webp/.bmp file under a root (recursive, sorted), caption "".
- jsonl list: one JSON object a line, {"image": path relative to the jsonl folder (or absolute),
  "caption" or "text": str, ...other keys kept as metadata}.
- indexed shards (data/shards.py): webdataset tar shards, local or remote, named by an index written once.
- webdataset tar shards: members grouped by key (the member path up to the first dot of its file name): one image
  member (png/jpg/jpeg/webp), optional "txt" caption, optional "json" metadata. Shard headers are scanned once
  (no decoding) and samples are read by offset, so the dataset is map-style and works with DataLoader workers.

Every dataset returns `dict(pixel_values=(3, H, W) in [-1, 1], caption=str, index=int, meta=dict)`, or None for
an unreadable image (one warning names the file); `collate_images` drops the Nones and counts them. Random
transforms are seeded by (seed, epoch, index), so a resumed run sees the same pixels:

    dataset = build_image_dataset("/data/imagenet/train", ImageTransform(256, mode="random"), seed=0)
    dataset.set_epoch(epoch)  # before iterating the DataLoader of that epoch
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import struct
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from data.keys import epoch_and_index
from data.tar_files import member_meta, read_exactly, scan_tar, split_key
from data.transforms import pil_to_tensor, sample_seed, to_rgb

logger = logging.getLogger(__name__)

FOLDER_IMAGE_EXTS = frozenset({"png", "jpg", "jpeg", "webp", "bmp"})
TAR_IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")  # priority when a sample holds several
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)

Transform = Callable[..., torch.Tensor]


class StringArray:
    """An immutable list of strings in two numpy arrays (utf-8 bytes + offsets).

    Python lists of str in a Dataset are copied page by page into every forked DataLoader worker (reference counts
    write to them); numpy buffers are not.
    """

    def __init__(self, strings: Sequence[str]):
        encoded = [s.encode("utf-8", "surrogateescape") for s in strings]
        self._offsets = np.cumsum([0] + [len(b) for b in encoded], dtype=np.int64)
        self._data = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        start, end = self._offsets[i], self._offsets[i + 1]
        return self._data[start:end].tobytes().decode("utf-8", "surrogateescape")

    def containing(self, text: str) -> list[int]:
        """Indices of the strings that contain `text`, found by one scan of the whole buffer (fast when rare)."""
        needle, data = text.encode("utf-8"), self._data.tobytes()
        hits, at = set(), data.find(needle)
        while at >= 0:
            i = int(np.searchsorted(self._offsets, at, side="right")) - 1
            if at + len(needle) <= self._offsets[i + 1]:  # inside string i, not across a boundary
                hits.add(i)
            at = data.find(needle, at + 1)
        return sorted(hits)


class SkipSample(Exception):
    """Raised by `ImageDataset._read` for a sample that cannot be read and was already reported (e.g. every sample
    of an unreachable shard): `__getitem__` returns None for it without another warning."""


class ImageDataset(torch.utils.data.Dataset):
    """Common base: subclasses implement `__len__` and `_read(i) -> (image bytes or path, caption, meta, name)`; an
    image source None (a reader that allows samples without one) gives pixel_values None.

    Args:
        transform: called as `transform(pil_image, seed=...)` -> (3, H, W) in [-1, 1]; None converts the image
            to a tensor at its own size.
        seed: the data seed; sample i of epoch e uses `sample_seed(seed, e, i)`.
    """

    def __init__(self, transform: Transform | None = None, seed: int = 0):
        self.transform = transform
        self.seed = seed
        # Shared memory: forked, spawned and persistent DataLoader workers all see `set_epoch`.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random crops `__getitem__` reproduces; call before iterating that epoch.

        Args:
            epoch: the epoch number.
        """
        self._epoch.fill_(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def _read(self, i: int) -> tuple[bytes | str | None, str, dict[str, Any], str]:
        raise NotImplementedError

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | None:
        """Sample `key`: an index (crops of the epoch set by `set_epoch`) or an (epoch, index) pair, which a
        sampler that crosses epochs uses so that prefetching workers never see the wrong epoch."""
        epoch, i = epoch_and_index(key, self.epoch)
        if not 0 <= i < len(self):
            raise IndexError(f"{type(self).__name__}: index {i} out of range for {len(self)} samples")
        name = f"sample {i}"
        try:
            source, caption, meta, name = self._read(i)
            if source is None:  # a sample without an image, where the reader allows one
                return {"pixel_values": None, "caption": caption, "index": i, "meta": meta}
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                image.load()
                image = to_rgb(image)
        except SkipSample:
            return None
        except DECODE_ERRORS as err:
            reason = (str(err).splitlines() or [""])[0]
            logger.warning("skipping unreadable image %s: %s: %s", name, type(err).__name__, reason)
            return None
        if self.transform is None:
            pixels = pil_to_tensor(image)
        else:
            pixels = self.transform(image, seed=sample_seed(self.seed, epoch, i))
        return {"pixel_values": pixels, "caption": caption, "index": i, "meta": meta}


def _extension(path: str) -> str:
    return path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""


class ImageFolderDataset(ImageDataset):
    """Every image file under `root`, recursively, sorted by relative path; captions are "".

    Args:
        root: the folder.
        transform: see `ImageDataset`.
        seed: see `ImageDataset`.
    """

    def __init__(self, root: str | Path, transform: Transform | None = None, seed: int = 0):
        super().__init__(transform, seed)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        paths = []
        for folder, dirs, files in os.walk(self.root, followlinks=True):
            dirs.sort()
            rel = os.path.relpath(folder, self.root)
            paths += [os.path.normpath(os.path.join(rel, f)) for f in files if _extension(f) in FOLDER_IMAGE_EXTS]
        self.paths = StringArray(sorted(Path(p).as_posix() for p in paths))

    def __len__(self) -> int:
        return len(self.paths)

    def _read(self, i: int) -> tuple[str, str, dict[str, Any], str]:
        rel = self.paths[i]
        path = str(self.root / rel)
        return path, "", {"path": rel}, path


class JsonlImageDataset(ImageDataset):
    """Images listed in a jsonl file: {"image": path, "caption" | "text": str, ...metadata}.

    Args:
        path: the .jsonl file; relative image paths are relative to its folder.
        transform: see `ImageDataset`.
        seed: see `ImageDataset`.
    """

    def __init__(self, path: str | Path, transform: Transform | None = None, seed: int = 0):
        super().__init__(transform, seed)
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"jsonl file not found: {self.path}")
        lines = []
        with open(self.path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{self.path}:{number}: invalid JSON ({err.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get("image"), str):
                    raise ValueError(f"{self.path}:{number}: expected an object with a string 'image' key")
                lines.append(line.strip())
        self.records = StringArray(lines)

    def __len__(self) -> int:
        return len(self.records)

    def _read(self, i: int) -> tuple[str, str, dict[str, Any], str]:
        record = json.loads(self.records[i])
        image = str(self.path.parent / record.pop("image"))  # an absolute path replaces the folder
        caption = record.pop("caption", None)
        if caption is None:
            caption = record.pop("text", "")
        return image, caption, record, image


# ----------------------------------------------------------------------------------------------------------------
# Webdataset tar shards


class TarShardDataset(ImageDataset):
    """Samples of webdataset-style tar shards, random access by byte offset (local tars without an index; why they
    keep a reader of their own beside `data.shards.ShardDataset`, measured: docs/data.md).

    Args:
        shards: a folder of .tar files, a glob, one .tar file, or a list of .tar files.
        transform: see `ImageDataset`.
        seed: see `ImageDataset`.
        index_threads: threads scanning shard headers (helps on network file systems).
        max_open_files: open shard files kept per process.
    """

    def __init__(
        self,
        shards: str | Path | Sequence[str | Path],
        transform: Transform | None = None,
        seed: int = 0,
        index_threads: int = 8,
        max_open_files: int = 64,
    ):
        super().__init__(transform, seed)
        self.shards = resolve_shards(shards)
        self.max_open_files = max_open_files
        with ThreadPoolExecutor(max_workers=max(1, min(index_threads, len(self.shards)))) as pool:
            listings = list(pool.map(scan_tar, self.shards))
        keys, table = [], []  # table rows: shard, image offset, image size, txt offset, txt size, json ...
        missing_image = 0
        for shard_id, members in enumerate(listings):
            samples: dict[str, dict[str, tuple[int, int]]] = {}
            for name, offset, size in members:
                key, ext = split_key(name)
                samples.setdefault(key, {}).setdefault(ext, (offset, size))
            for key, parts in samples.items():
                image_ext = next((e for e in TAR_IMAGE_EXTS if e in parts), None)
                if image_ext is None:
                    missing_image += 1
                    continue
                txt, meta = parts.get("txt", (-1, 0)), parts.get("json", (-1, 0))
                keys.append(f"{key}.{image_ext}")
                table.append((shard_id, *parts[image_ext], *txt, *meta))
        if missing_image:
            logger.warning("%d tar samples without a png/jpg/jpeg/webp member were skipped", missing_image)
        self.keys = StringArray(keys)
        self.table = np.asarray(table, dtype=np.int64).reshape(-1, 7)
        self._files: OrderedDict[int, int] = OrderedDict()  # shard id -> descriptor, least recently used first

    def __len__(self) -> int:
        return len(self.table)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"] = OrderedDict()  # descriptors mean nothing in another process
        return state

    def _pread(self, shard_id: int, offset: int, size: int) -> bytes:
        fd = self._files.pop(shard_id, None)
        if fd is None:
            fd = os.open(self.shards[shard_id], os.O_RDONLY)
            while len(self._files) >= self.max_open_files:
                os.close(self._files.popitem(last=False)[1])
        self._files[shard_id] = fd
        return read_exactly(fd, offset, size)

    def _read(self, i: int) -> tuple[bytes, str, dict[str, Any], str]:
        shard_id, image_offset, image_size, txt_offset, txt_size, json_offset, json_size = map(int, self.table[i])
        shard = self.shards[shard_id]
        name = f"{shard}:{self.keys[i]}"
        meta = member_meta(self._pread(shard_id, json_offset, json_size) if json_offset >= 0 else None)
        meta.update(__key__=self.keys[i].rsplit(".", 1)[0], __shard__=shard)
        caption = self._pread(shard_id, txt_offset, txt_size).decode("utf-8").strip() if txt_offset >= 0 else ""
        return self._pread(shard_id, image_offset, image_size), caption, meta, name

    def __del__(self) -> None:
        for fd in getattr(self, "_files", {}).values():
            os.close(fd)


def resolve_shards(shards: str | Path | Sequence[str | Path]) -> list[str]:
    """The sorted list of .tar files named by a folder, a glob, a file or a list of files.

    Args:
        shards: the shard specification.
    """
    if isinstance(shards, (list, tuple)):
        paths = [str(p) for p in shards]
    elif os.path.isdir(shards):
        paths = sorted(glob.glob(os.path.join(glob.escape(str(shards)), "*.tar")))
    elif glob.has_magic(str(shards)):
        paths = sorted(glob.glob(str(shards)))
    else:
        paths = [str(shards)]
    if not paths:
        raise FileNotFoundError(f"no .tar shards found at {shards}")
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"tar shard not found: {p}")
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Collate and dispatch


def collate_images(samples: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Stack the readable samples; `skipped` counts the None ones (an all-None batch has zero rows).

    Args:
        samples: what `ImageDataset.__getitem__` returned.
    """
    kept = [s for s in samples if s is not None]
    if kept:
        pixel_values = torch.stack([s["pixel_values"] for s in kept])  # (B, 3, H, W)
    else:
        pixel_values = torch.zeros(0, 3, 0, 0)
    return {
        "pixel_values": pixel_values,
        "captions": [s["caption"] for s in kept],
        "indices": torch.tensor([s["index"] for s in kept], dtype=torch.int64),
        "meta": [s["meta"] for s in kept],
        "skipped": len(samples) - len(kept),
    }


DATASET_KINDS: dict[str, type[ImageDataset]] = {
    "folder": ImageFolderDataset,
    "jsonl": JsonlImageDataset,
    "tar": TarShardDataset,
}
SHARD_INDEX = "shardindex.json"  # the shard index (wids' format and default name), looked for next to the shards


def _infer_kind(path: str) -> str:
    if re.match(r"[a-z][a-z0-9+.-]*://", path) or re.search(r"\{[^}]*(\.\.|,)[^}]*\}", path) or \
            path.endswith(".json") or os.path.isfile(os.path.join(path, SHARD_INDEX)):
        return "shards"  # a URL, a brace pattern, an index file or a folder with one
    if glob.has_magic(path):
        return "tar"
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset path not found: {path}")
    if os.path.isdir(path):
        return "tar" if glob.glob(os.path.join(glob.escape(path), "*.tar")) else "folder"
    ext = _extension(path)
    if ext in ("jsonl", "tar"):
        return ext
    raise ValueError(f"cannot tell the dataset kind of {path} (expected a folder, a .jsonl or a .tar file)")


def build_image_dataset(
    path_or_spec: str | Path | Sequence[str] | dict[str, Any],
    transform: Transform | None = None,
    seed: int = 0,
    shards: Any = None,
) -> ImageDataset:
    """Open a dataset, inferring its kind from the path or taking it from "kind:path" / {"kind", "path"}.

    A URL (https://, s3://, ...), a brace pattern ("{000000..000999}"), a .json shard index or a folder holding
    shardindex.json are indexed shards (`data.shards.ShardDataset`: O(shards) start-up, remote stores); another
    folder holding *.tar files, a glob or a list are local tar shards scanned at start-up; a .jsonl file is a jsonl
    list; another folder is an image folder.

    Args:
        path_or_spec: the path, "kind:path", a list of shards, or {"kind": ..., "path": ...}.
        transform: see `ImageDataset`.
        seed: see `ImageDataset`.
        shards: `data.shard_cache.ShardOptions` for indexed shards (None: the defaults).
    """
    if isinstance(path_or_spec, dict):
        unknown = set(path_or_spec) - {"kind", "path"}
        if unknown or "path" not in path_or_spec:
            raise ValueError(f"dataset spec needs 'path' and optionally 'kind', got keys {sorted(path_or_spec)}")
        kind, path = path_or_spec.get("kind"), path_or_spec["path"]
    elif isinstance(path_or_spec, (list, tuple)):
        kind, path = "tar", list(path_or_spec)
    else:
        kind, path = None, str(path_or_spec)
        match = re.fullmatch(r"([A-Za-z]\w+):(?!//)(.+)", path)
        if match and not os.path.exists(path):
            kind, path = match.group(1), match.group(2)
    if kind is None:
        kind = _infer_kind(path)
    if kind == "shards":
        from data.shards import ShardDataset  # it builds on this module

        dataset: ImageDataset = ShardDataset(path, transform=transform, seed=seed, options=shards)
    elif kind in DATASET_KINDS:
        dataset = DATASET_KINDS[kind](path, transform=transform, seed=seed)
    else:
        raise ValueError(f"unknown dataset kind {kind!r} in {path_or_spec!r} (expected one of "
                         f"{sorted([*DATASET_KINDS, 'shards'])})")
    if len(dataset) == 0:
        raise ValueError(f"no images found in {kind} dataset {path}")
    return dataset
