"""Pre-tokenised image codes for generator training: what `scripts/extract_codes.py` writes and trainers read.

On disk (DIR):
    manifest.json                 tokenizer (path, codebook size, grid), source dataset, chunk size
    chunk_000000.codes.npy        (n, grid*grid) uint16 (int32 when K > 65535) code indices
    chunk_000000.jsonl            one line per row: {"index": dataset index, "caption": str}
A chunk covers dataset indices [c * chunk_size, (c + 1) * chunk_size) minus unreadable images; its .jsonl is
written last, so a chunk is complete exactly when its .jsonl exists. Codes are memory-mapped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from common.files import atomic_write, ensure_settings
from data.images import StringArray, collate_images
from data.keys import epoch_and_index

MANIFEST = "manifest.json"
CHUNK_SIZE = 5000  # dataset indices per chunk, the default of every tool that writes codes


def chunk_paths(directory: Path, chunk: int) -> tuple[Path, Path]:
    return directory / f"chunk_{chunk:06d}.codes.npy", directory / f"chunk_{chunk:06d}.jsonl"


def write_chunk(directory: Path, chunk: int, codes: np.ndarray, rows: list[dict[str, Any]]) -> None:
    """Write one chunk atomically (codes first, then the .jsonl that marks it complete).

    Args:
        codes: (n, N) integer code indices; rows: n dicts with "index" and "caption".
    """
    if len(codes) != len(rows):
        raise ValueError(f"chunk {chunk}: {len(codes)} code rows but {len(rows)} captions")
    npy, jsonl = chunk_paths(directory, chunk)
    with atomic_write(npy, "wb") as f:
        np.save(f, codes)
    with atomic_write(jsonl) as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def ensure_manifest(directory: Path, tokenizer_path: str | Path, model_config: Any, data: str, num_samples: int,
                    chunk_size: int = CHUNK_SIZE, write: bool = True) -> None:
    """Record how the codes in `directory` are made (written once, by rank 0: `write`); a directory holding codes
    made with other settings is refused with a ConfigError naming them (the tokenizer may have moved).

    Args:
        model_config: the VQRAEConfig of the tokenizer.
    """
    manifest = {"tokenizer": str(Path(tokenizer_path).resolve()), "data": str(data), "num_samples": num_samples,
                "chunk_size": chunk_size, "codebook_size": model_config.quantizer.codebook_size,
                "grid_size": model_config.grid_size, "num_tokens": model_config.num_tokens,
                "image_size": model_config.encoder.image_size}
    ensure_settings(directory / MANIFEST, manifest, ignore=("tokenizer",), write=write)


def complete_chunks(directory: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1].split(".")[0]) for p in directory.glob("chunk_*.jsonl"))


def code_dtype(codebook_size: int) -> np.dtype:
    return np.dtype(np.uint16) if codebook_size <= 65536 else np.dtype(np.int32)


class CodeDataset(torch.utils.data.Dataset):
    """Rows of a code directory: `__getitem__(i) -> {"codes": (N,) int64 tensor, "caption": str, "index": int}`.

    Args:
        directory: a folder written by scripts/extract_codes.py.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        manifest = self.directory / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(f"{self.directory} is not a code directory (no {MANIFEST}); "
                                    "run scripts/extract_codes.py first")
        self.manifest = json.loads(manifest.read_text())
        chunks = complete_chunks(self.directory)
        if not chunks:
            raise ValueError(f"code directory {self.directory} holds no complete chunk")
        self.codes = [np.load(chunk_paths(self.directory, c)[0], mmap_mode="r") for c in chunks]
        captions, indices = [], []
        for c in chunks:
            for line in chunk_paths(self.directory, c)[1].read_text().splitlines():
                row = json.loads(line)
                captions.append(row["caption"])
                indices.append(row["index"])
        self.captions = StringArray(captions)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.offsets = np.cumsum([0] + [len(c) for c in self.codes])
        if self.offsets[-1] != len(self.indices):
            raise ValueError(f"{self.directory}: code rows and caption lines disagree")

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["num_tokens"])

    @property
    def codebook_size(self) -> int:
        return int(self.manifest["codebook_size"])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        _, i = epoch_and_index(key)
        chunk = int(np.searchsorted(self.offsets, i, side="right")) - 1
        codes = torch.from_numpy(np.asarray(self.codes[chunk][i - self.offsets[chunk]], dtype=np.int64))
        return {"codes": codes, "caption": self.captions[i], "index": int(self.indices[i])}


@torch.no_grad()
def extract_codes(model: Any, dataset: torch.utils.data.Dataset, out: Path, chunk_size: int, batch_size: int, rank: int = 0, world: int = 1,
            num_workers: int = 0, dtype: torch.dtype = torch.float32, progress: bool = True) -> dict[str, int]:
    """Encode this rank's missing chunks of `dataset` (an ImageDataset) with `model` (a VQRAE in eval mode) into
    `out`; chunks are dealt round-robin to ranks. Returns counts {"chunks", "images", "skipped"}."""
    device = next(model.parameters()).device
    n_chunks = (len(dataset) + chunk_size - 1) // chunk_size
    todo = [c for c in range(rank, n_chunks, world) if not chunk_paths(out, c)[1].is_file()]
    total = sum(min(chunk_size, len(dataset) - c * chunk_size) for c in todo)
    counts = {"chunks": 0, "images": 0, "skipped": 0}
    bar = tqdm(total=total, desc=f"codes rank {rank}", unit="img", disable=not progress)
    np_dtype = code_dtype(model.config.quantizer.codebook_size)
    for chunk in todo:
        indices = list(range(chunk * chunk_size, min((chunk + 1) * chunk_size, len(dataset))))
        subset = torch.utils.data.Subset(dataset, indices)
        loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, collate_fn=collate_images,
                                             num_workers=num_workers)
        codes, rows = [], []
        for batch in loader:
            counts["skipped"] += batch["skipped"]
            bar.update(len(batch["captions"]) + batch["skipped"])
            if not batch["captions"]:
                continue
            x = batch["pixel_values"].to(device, dtype)
            codes.append(model.encode(x).indices.cpu().numpy().astype(np_dtype))
            rows += [{"index": int(i), "caption": c} for i, c in zip(batch["indices"], batch["captions"])]
        width = model.config.num_tokens
        write_chunk(out, chunk, np.concatenate(codes) if codes else np.zeros((0, width), np_dtype), rows)
        counts["chunks"] += 1
        counts["images"] += len(rows)
    bar.close()
    return counts
