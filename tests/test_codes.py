"""scripts/extract_codes.py and data/codes.py: codes equal the tokenizer's, resumable chunks, corrupt images
skipped and counted, the CLI's errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data.codes import CHUNK_SIZE, MANIFEST, CodeDataset, chunk_paths, ensure_manifest
from data.codes import extract_codes as extract
from data.images import build_image_dataset, collate_images
from data.transforms import ImageTransform
from tokenizer import VQRAE, get_preset
from world.export import export_world

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("codes")
    export_world(root / "world", 23, image_size=64, seed=3, fmt="folder", progress=False)
    (root / "world" / "images" / "00000005.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    torch.manual_seed(0)
    model = VQRAE(get_preset("tiny")).eval()
    model.save_pretrained(root / "tok")
    return root, model


def test_extracted_codes_equal_tokenizer_codes_and_resume(setup, tmp_path):
    root, model = setup
    dataset = build_image_dataset(root / "world" / "captions.jsonl", ImageTransform(64, "center"))
    counts = extract(model, dataset, tmp_path, chunk_size=10, batch_size=4, progress=False)
    assert counts == {"chunks": 3, "images": 22, "skipped": 1}
    (tmp_path / "manifest.json").write_text('{"num_tokens": 64, "codebook_size": 512}')
    codes = CodeDataset(tmp_path)
    assert len(codes) == 22 and 5 not in codes.indices.tolist()
    batch = collate_images([dataset[i] for i in codes.indices.tolist()])
    with torch.no_grad():
        expected = model.encode(batch["pixel_values"]).indices
    assert torch.equal(torch.stack([codes[i]["codes"] for i in range(len(codes))]), expected)
    assert [codes[i]["caption"] for i in range(len(codes))] == batch["captions"]
    # resume: only the missing chunk is encoded again, and it comes back identical
    before = np.load(chunk_paths(tmp_path, 1)[0]).copy()
    chunk_paths(tmp_path, 1)[1].unlink()
    again = extract(model, dataset, tmp_path, chunk_size=10, batch_size=4, progress=False)
    assert again["chunks"] == 1 and again["images"] == 10
    assert np.array_equal(np.load(chunk_paths(tmp_path, 1)[0]), before)
    # two ranks split the chunks between them
    split = tmp_path / "split"
    split.mkdir()
    a = extract(model, dataset, split, chunk_size=10, batch_size=4, rank=0, world=2, progress=False)
    b = extract(model, dataset, split, chunk_size=10, batch_size=4, rank=1, world=2, progress=False)
    assert (a["chunks"], b["chunks"]) == (2, 1) and a["images"] + b["images"] == 22


def test_cli_writes_manifest_and_refuses_mismatch(setup, tmp_path):
    root, _ = setup
    cmd = [sys.executable, str(REPO / "scripts" / "extract_codes.py"), "--tokenizer", str(root / "tok"), "--data",
           str(root / "world" / "captions.jsonl"), "--out", str(tmp_path / "c"), "--chunk-size", "8",
           "--num-workers", "0"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    assert "22 images, skipped 1 unreadable" in done.stdout
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())  # the finished pass, recorded last
    assert (summary["images_written"], summary["skipped_unreadable"], summary["complete_chunks"]) == (22, 1, 3)
    dataset = CodeDataset(tmp_path / "c")
    assert dataset.num_tokens == 64 and dataset.codebook_size == 512 and len(dataset) == 22
    bad = subprocess.run([*cmd[:-4], "--chunk-size", "5", "--num-workers", "0"], capture_output=True, text=True,
                         env=env)
    assert bad.returncode == 2 and "other settings (chunk_size: 8 there, 5 now)" in bad.stderr
    missing = subprocess.run([*cmd[:3], str(tmp_path / "nope"), *cmd[4:]], capture_output=True, text=True, env=env)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "not a VQRAE directory" in missing.stderr
    with pytest.raises(FileNotFoundError, match="not a code directory"):
        CodeDataset(tmp_path / "nope")


def test_the_script_and_the_trainer_share_the_chunk_size(setup, tmp_path):
    """Codes extracted by the script with its defaults are accepted by the generator trainer with its defaults."""
    root, _ = setup
    out, data = tmp_path / "c", str(root / "world" / "captions.jsonl")
    cmd = [sys.executable, str(REPO / "scripts" / "extract_codes.py"), "--tokenizer", str(root / "tok"), "--data",
           data, "--out", str(out), "--num-workers", "0"]
    subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    from train.ar_gen_trainer import GenDataConfig

    model = VQRAE.from_pretrained(root / "tok")
    ensure_manifest(out, root / "tok", model.config, data, 23, GenDataConfig().chunk_size)  # no refusal
    assert json.loads((out / MANIFEST).read_text())["chunk_size"] == CHUNK_SIZE
