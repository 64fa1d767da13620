"""Reconstruction evaluation against independent computations: scikit-image PSNR/SSIM on uint8 images decoded from
the PNG files, code counts from `model.encode`, the Frechet distance of features computed here, and the CLI run in
a subprocess."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from data.images import build_image_dataset
from data.transforms import ImageTransform, adm_center_crop
from eval.metrics import InceptionFeatureExtractor, build_fid_inception, frechet_distance
from eval.reconstruction_scoring import PSNR_CAP_DB, evaluate, image_metrics
from tests.helpers import run_script
from tokenizer import VQRAE, get_preset
from world.export import export_world

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "eval" / "reconstruction.py"
NUM_IMAGES, BATCH = 40, 16


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    export_world(out, NUM_IMAGES, image_size=64, seed=3, fmt="folder", progress=False)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tok"
    VQRAE(get_preset("tiny")).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(model_dir) -> VQRAE:
    return VQRAE.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def dataset(world, model):
    return build_image_dataset(world, ImageTransform(model.config.encoder.image_size, mode="center"))


@pytest.fixture(scope="module")
def result(model, dataset):
    return evaluate(model, dataset, batch_size=BATCH, device="cpu", progress=False)


def _independent_images(world: Path, model: VQRAE, count: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (count, H, W, 3) originals decoded here and reconstructions of the same batches, via numpy."""
    size = model.config.encoder.image_size
    files = sorted((world / "images").glob("*.png"))[:count]
    originals = np.stack([np.asarray(adm_center_crop(Image.open(f).convert("RGB"), size)) for f in files])
    x = torch.from_numpy(originals).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W)
    with torch.no_grad():
        rec = torch.cat([model(x[i:i + batch]).reconstruction for i in range(0, count, batch)])
    rec = rec.permute(0, 2, 3, 1).numpy().astype(np.float32)
    reconstructions = np.clip(np.float32(127.5) * rec + np.float32(128.0), 0, 255).astype(np.uint8)
    return originals, reconstructions


def test_per_image_metrics_match_skimage(result, world, model):
    summary, per_image = result
    originals, reconstructions = _independent_images(world, model, NUM_IMAGES, BATCH)
    assert [r["index"] for r in per_image] == list(range(NUM_IMAGES))
    assert [r["source"] for r in per_image] == [f"images/{i:08d}.png" for i in range(NUM_IMAGES)]
    a, b = originals / 255.0, reconstructions / 255.0
    expected = {
        "psnr": [peak_signal_noise_ratio(x, y, data_range=1.0) for x, y in zip(a, b)],
        "ssim": [structural_similarity(x, y, channel_axis=-1, data_range=1.0) for x, y in zip(a, b)],
        "ssim_llamagen": [structural_similarity(x, y, channel_axis=-1, data_range=2.0) for x, y in zip(a, b)],
    }
    for key, values in expected.items():
        np.testing.assert_allclose([r[key] for r in per_image], values, rtol=0, atol=1e-9, err_msg=key)
        assert summary[key] == pytest.approx(np.mean([r[key] for r in per_image]), rel=1e-12)
    assert summary["ssim_llamagen"] > summary["ssim"]  # data_range 2 inflates SSIM
    assert summary["num_images"] == NUM_IMAGES and summary["skipped_unreadable"] == 0
    assert summary["ssim_data_range"] == 1.0 and summary["psnr_capped_images"] == 0
    assert summary["resolution"] == 64 and summary["rfid"] is None and summary["rfid_features"] is None
    assert summary["images_per_s"] == pytest.approx(NUM_IMAGES / summary["wall_time_s"])


def test_code_usage_matches_direct_count(result, model, dataset):
    summary, per_image = result
    x = torch.stack([dataset[i]["pixel_values"] for i in range(NUM_IMAGES)])
    with torch.no_grad():
        indices = model.encode(x).indices.numpy()  # (B, N)
    k = model.quantizer.codebook_size
    counts = np.bincount(indices.ravel(), minlength=k)
    p = counts[counts > 0] / counts.sum()
    assert summary["codebook_size"] == k
    assert summary["utilisation"] == pytest.approx((counts > 0).sum() / k, abs=0)
    assert summary["perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)
    distinct = [len(np.unique(row)) for row in indices]
    assert [r["codes_used"] for r in per_image] == distinct
    assert summary["codes_per_image"] == pytest.approx(np.mean(distinct))
    assert summary["tokens_per_image"] == indices.shape[1]


def test_identity_gives_ssim_one_and_capped_psnr(dataset):
    u8 = torch.stack([(dataset[i]["pixel_values"] * 127.5 + 128).clamp(0, 255).to(torch.uint8) for i in range(4)])
    same = image_metrics(u8, u8)
    torch.testing.assert_close(same["ssim"], torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(same["ssim_llamagen"], torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(same["psnr"], torch.full((4,), PSNR_CAP_DB, dtype=torch.float64))  # inf (MSE 0) -> the cap
    # One level off in one pixel is the closest non-identical pair: finite, below the cap, and equal to skimage.
    near = u8.clone()
    near[:, 0, 0, 0] ^= 1
    value = image_metrics(u8, near)["psnr"]
    expected = peak_signal_noise_ratio(u8[0].permute(1, 2, 0).numpy() / 255, near[0].permute(1, 2, 0).numpy() / 255,
                                       data_range=1.0)
    assert value[0].item() == pytest.approx(expected) and expected < PSNR_CAP_DB
    with pytest.raises(ValueError, match="uint8"):
        image_metrics(u8.float(), u8.float())


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    """A random state dict of the real FID Inception-v3, scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, tensor in build_fid_inception().state_dict().items():
        if name.endswith("conv.weight") or name == "fc.weight":
            tensor = torch.randn(tensor.shape, generator=g) * math.sqrt(2.0 / tensor[0].numel())
        elif name.endswith(("bn.weight", "running_var")):
            tensor = torch.rand(tensor.shape, generator=g) + 0.5
        elif name.endswith(("bn.bias", "running_mean")) or name == "fc.bias":
            tensor = torch.randn(tensor.shape, generator=g) * 0.1
        state[name] = tensor
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(state, path)
    return path


@pytest.fixture
def one_thread():
    """The Inception net is many small ops; on a busy machine idle-spinning OpenMP threads multiply its time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_rfid_matches_independent_frechet_distance(model, dataset, world, inception_file, one_thread):
    count, batch = 6, 3
    inception = InceptionFeatureExtractor.from_file(inception_file, "cpu", "pytorch-fid")
    summary, _ = evaluate(model, dataset, batch_size=batch, inception=inception, num_images=count, progress=False)
    originals, reconstructions = _independent_images(world, model, count, batch)

    def stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        features = inception(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()).double().numpy()
        return features.mean(0), np.cov(features, rowvar=False)

    expected = frechet_distance(*stats(originals), *stats(reconstructions))
    assert expected > 0
    assert summary["rfid"] == pytest.approx(expected, rel=1e-6)
    assert summary["rfid_features"]["preprocessing"] == "pytorch-fid"
    assert "Inception" in summary["rfid_features"]["network"] and summary["num_images"] == count


def test_unreadable_images_are_skipped_and_counted(tmp_path, world, model):
    for i in range(3):
        shutil.copy(world / "images" / f"{i:08d}.png", tmp_path / f"{i}.png")
    (tmp_path / "3.png").write_bytes(b"not a png")
    data = build_image_dataset(tmp_path, ImageTransform(64))
    summary, per_image = evaluate(model, data, batch_size=2, progress=False)
    assert summary["num_images"] == 3 and summary["skipped_unreadable"] == 1
    assert [r["source"] for r in per_image] == ["0.png", "1.png", "2.png"]


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ""}  # the script must find the repository by itself
    return subprocess.run([sys.executable, str(SCRIPT), *args], check=False, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_end_to_end(tmp_path, model_dir, world, result):
    out = tmp_path / "out"
    proc = _run_cli("--model", str(model_dir), "--data", str(world), "--out", str(out), "--batch-size", str(BATCH),
                    "--num-workers", "0", "--save-recons", "4", "--no-progress", "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sum(line.startswith("rFID skipped") for line in proc.stdout.splitlines()) == 1
    summary = json.loads((out / "summary.json").read_text())
    per_image = [json.loads(line) for line in (out / "per_image.jsonl").read_text().splitlines()]
    assert summary["model"] == str(model_dir) and summary["data"] == str(world) and summary["rfid"] is None
    assert len(per_image) == summary["num_images"] == NUM_IMAGES
    for key in ("psnr", "ssim", "ssim_llamagen", "utilisation", "perplexity"):  # the same pass as in-process
        assert summary[key] == pytest.approx(result[0][key], rel=1e-12), key
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (4 * 64 + 5 * 2, 2 * 64 + 3 * 2)  # 4 originals over 4 reconstructions, 2 px padding
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_cli_missing_model_exits_2_with_one_line(tmp_path, world):
    proc = _run_cli("--model", str(tmp_path / "missing"), "--data", str(world), "--out", str(tmp_path / "out"),
                    cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model directory not found") and "missing" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["missing data", "empty folder", "not a model dir"])
def test_bad_input_exits_2_and_writes_nothing(case, tmp_path, model_dir, world, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    model, data, message = {
        "missing data": (model_dir, tmp_path / "nowhere", "data path not found"),
        "empty folder": (model_dir, empty, "no images found"),
        "not a model dir": (empty, world, "is not a VQRAE directory"),
    }[case]
    with pytest.raises(SystemExit) as exit_info:
        run_script("eval/reconstruction.py", ["--model", str(model), "--data", str(data), "--out",
                                              str(tmp_path / "out"), "--num-workers", "0", "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_torchrun_two_processes_match_single_process(tmp_path, model_dir, world, result):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           "--model", str(model_dir), "--data", str(world), "--out", str(out), "--batch-size", "8",
           "--num-workers", "0", "--no-progress", "--device", "cpu"]
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    per_image = [json.loads(line) for line in (out / "per_image.jsonl").read_text().splitlines()]
    assert summary["world_size"] == 2 and summary["num_images"] == NUM_IMAGES
    assert [r["index"] for r in per_image] == list(range(NUM_IMAGES))
    for key in ("psnr", "ssim", "utilisation", "perplexity", "codes_per_image"):
        assert summary[key] == pytest.approx(result[0][key], rel=1e-6), key
