"""scripts/ablate_codebook.py: every point is a real stage-1 run whose numbers equal an independent evaluation of its
export; finished points are kept on a rerun; other settings are refused; the convergence rule as stated."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.images import build_image_dataset, collate_images
from data.transforms import ImageTransform, to_uint8
from eval.reconstruction_scoring import CONVERGED_MARGIN_DB, converged
from tests.helpers import trainer_env
from tokenizer import VQRAE
from world.export import export_world

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "ablate_codebook.py"


def sweep(world: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = trainer_env()
    trainer = [f"data.train={world}/train/shards", f"data.eval={world}/eval/shards", "model.encoder_path=",
               "deepspeed.micro_batch_size=8", "run.log_every=1", "run.sample_every=0",
               "run.tensorboard=false", "run.ckpt_every=0"]
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--device", "cpu", *extra, *trainer],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_sweep_points_resume_and_refusals(tmp_path):
    world = tmp_path / "world"
    export_world(world / "train", 48, image_size=32, seed=0, fmt="shards", progress=False)
    export_world(world / "eval", 12, image_size=32, seed=1, fmt="shards", progress=False)
    out = tmp_path / "sweep"
    proc = sweep(world, out, "--dim-ratios", "0.25,2", "--sizes", "32", "--steps", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "ablation.json").read_text())
    assert [(p["dim"], p["size"]) for p in result["points"]] == [(16, 32), (128, 32)]  # width 64 x 0.25, x 2
    assert result["settings"]["encoder_width"] == 64

    # each point's numbers, recomputed from its export on the held-out images
    dataset = build_image_dataset(f"{world}/eval/shards", ImageTransform(32, mode="center"))
    batch = collate_images([dataset[i] for i in range(len(dataset))])["pixel_values"]
    originals = to_uint8(batch).double() / 255
    for point in result["points"]:
        run_dir = out / "points" / f"d{point['dim']}-k{point['size']}"
        model = VQRAE.from_pretrained(run_dir / "export").eval()
        assert (model.config.quantizer.codebook_dim, model.config.quantizer.codebook_size) == (point["dim"], 32)
        with torch.no_grad():
            out_ = model(batch)
        assert point["utilisation"] == pytest.approx(out_.indices.unique().numel() / 32)
        counts = torch.bincount(out_.indices.flatten(), minlength=32).double()
        p = counts[counts > 0] / counts.sum()
        assert point["perplexity"] == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-6)
        mse = ((to_uint8(out_.reconstruction).double() / 255 - originals) ** 2).flatten(1).mean(1)
        assert point["psnr"] == pytest.approx((10 * torch.log10(1 / mse)).mean().item(), abs=1e-6)
        assert point["loss_curve"]["step"] == [1, 2, 3] and point["trainer_config"]["run"]["steps"] == 3
    mean = np.round(to_uint8(batch).numpy().astype(np.float64).mean(0)) / 255  # the mean image, in uint8 levels
    mse = ((originals.numpy() - mean) ** 2).reshape(len(batch), -1).mean(1)
    assert result["mean_image_psnr"] == pytest.approx(float((10 * np.log10(1 / mse)).mean()), abs=1e-6)
    assert "| 16 | 0.25 | 32 |" in (out / "ablation.md").read_text()
    assert Image.open(out / "ablation.png").size[0] > 0

    # a rerun keeps the finished points (no trainer runs), other settings are refused
    before = {p: p.stat().st_mtime_ns for p in (out / "points").glob("*.json")}
    again = sweep(world, out, "--dim-ratios", "0.25,2", "--sizes", "32", "--steps", "3")
    assert again.returncode == 0 and again.stdout.count("done before, kept") == 2, again.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in (out / "points").glob("*.json")} == before
    other = sweep(world, out, "--dim-ratios", "0.25,2", "--sizes", "32", "--steps", "4")
    assert other.returncode == 2 and "other settings" in other.stderr and "steps" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    swept = sweep(world, tmp_path / "x", "--steps", "3", "model.quantizer.codebook_dim=8")
    assert swept.returncode == 2 and "set by the sweep" in swept.stderr


def test_convergence_rule():
    curve = {"loss": [1.0, 0.5], "l2": [0.2, 0.1], "skipped_nonfinite": 0}
    assert converged(curve, 20.0 + CONVERGED_MARGIN_DB, 20.0)
    assert not converged(curve, 20.0 + CONVERGED_MARGIN_DB - 1e-3, 20.0)  # not far enough above the mean image
    assert not converged({**curve, "l2": [0.2, None]}, 40.0, 20.0)  # a non-finite loss was logged
    assert not converged({**curve, "skipped_nonfinite": 1}, 40.0, 20.0)
    assert CONVERGED_MARGIN_DB == pytest.approx(10 * math.log10(2))  # half the mean image's squared error
