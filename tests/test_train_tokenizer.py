"""End-to-end runs of `train/tokenizer.py` on a tiny shapes world: resume after SIGKILL, 2-process ZeRO-2/3,
corrupt-image and non-finite-loss skipping, config errors, export."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.helpers import (
    assert_resume_is_uninterrupted,
    failure_report,
    free_port,
    logged_losses,
    run_fresh_process,
    trainer_env,
)
from tokenizer import VQRAE
from world.export import export_world

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train" / "tokenizer.py"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    export_world(root / "train", 96, image_size=32, seed=0, fmt="shards", shard_size=32, progress=False)
    export_world(root / "eval", 16, image_size=32, seed=1, fmt="shards", progress=False)
    return root


def args(world: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.train={world}/train/shards", f"data.eval={world}/eval/shards", f"run.output_dir={out}",
            "deepspeed.micro_batch_size=8", "run.log_every=1", "run.sample_every=0", "run.tensorboard=false",
            "loss.gan_start=3", "loss.disc_start=3", "model.encoder_path=", *extra]


def train(*argv: str, launcher: list[str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + [str(SCRIPT), *argv]
    proc = subprocess.run(cmd, cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed: {failure_report(proc)}\n--- end of stdout:\n{proc.stdout[-2000:]}")
    return proc


def test_resume_after_sigkill_reproduces_loss_curve(world, tmp_path):
    common = ["run.steps=10", "run.ckpt_every=4"]
    train(*args(world, tmp_path / "a", *common))
    reference = logged_losses(tmp_path / "a")
    assert sorted(reference) == list(range(1, 11))

    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args(world, out, *common)], cwd=REPO, env=trainer_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        done = (out / "metrics.jsonl").is_file() and max(logged_losses(out), default=0) >= 6
        if done and (out / "checkpoints" / "step_00000004" / "trainer_state.json").is_file():
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoints" / "step_00000008").exists()
    train(*args(world, out, *common))  # run.resume=auto picks step 4
    resumed = logged_losses(out)
    assert sorted(resumed) == list(range(1, 11))
    for step in range(1, 11):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-5), step
    # the EMA continues from its checkpointed state: the exported (EMA) weights equal the uninterrupted run's
    exported = VQRAE.from_pretrained(out / "export").state_dict()
    uninterrupted = VQRAE.from_pretrained(tmp_path / "a" / "export").state_dict()
    assert exported.keys() == uninterrupted.keys()
    for key, value in exported.items():
        torch.testing.assert_close(value, uninterrupted[key], rtol=0, atol=1e-6, msg=key)
    raw = torch.load(out / "checkpoints" / "step_00000010" / "model" / "mp_rank_00_model_states.pt",
                     weights_only=True)["module"]
    assert (exported["decoder.head.weight"] - raw["decoder.head.weight"].float()).abs().max() > 1e-4  # an EMA


def test_export_matches_trained_weights(world, tmp_path):
    out = tmp_path / "run"
    train(*args(world, out, "run.steps=3", "loss.gan_weight=0"))
    raw = tmp_path / "raw"
    subprocess.run([sys.executable, str(REPO / "scripts" / "export_tokenizer.py"), str(out), "--out", str(raw),
                    "--weights", "raw"], cwd=REPO, env=trainer_env(), check=True, capture_output=True)
    state = torch.load(out / "checkpoints" / "step_00000003" / "model" / "mp_rank_00_model_states.pt",
                       weights_only=True)["module"]
    model = VQRAE.from_pretrained(raw)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k].float()), k
    ema = VQRAE.from_pretrained(out / "export").state_dict()
    assert torch.equal(ema["encoder.tower.embeddings.patch_embedding.weight"],
                       state["encoder.tower.embeddings.patch_embedding.weight"])  # frozen encoder: raw
    assert not torch.equal(ema["decoder.head.weight"], state["decoder.head.weight"])  # EMA differs from raw


def test_nonfinite_steps_are_skipped_then_fatal(world, tmp_path):
    out = tmp_path / "nan"
    train(*args(world, out, "run.steps=4", "debug.nan_steps=[2,3]", "loss.gan_weight=0"))
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["step"] == 4 and last["skipped_nonfinite"] == 2
    proc = train(*args(world, tmp_path / "nan2", "run.steps=4", "debug.nan_steps=[2,3,4]", "run.max_bad_steps=2",
                       "loss.gan_weight=0"), check=False)
    assert proc.returncode == 2
    assert "non-finite for 3 consecutive micro-steps" in proc.stderr.strip().splitlines()[-1]


def test_corrupt_images_are_skipped_and_counted(world, tmp_path):
    from world.shapes import render_sample

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(14):
        render_sample(0, i, 32)[0].save(folder / f"{i:03d}.png")
    (folder / "014.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(100))  # truncated PNG
    (folder / "015.jpg").write_bytes(os.urandom(500))  # not an image
    out = tmp_path / "run"
    # 16 files, 4 per micro-batch: 4 steps read every file exactly once
    train(*args(world, out, "run.steps=4", "loss.gan_weight=0", f"data.train={folder}", "deepspeed.micro_batch_size=4"))
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["step"] == 4 and last["skipped_images"] == 2


def test_config_errors_are_one_line(world, tmp_path):
    for bad, message in [("loss.lpips_wieght=1", "unknown config key 'loss.lpips_wieght'"),
                         ("run.steps=many", "expected int"),
                         ("model.preset=huge", "unknown preset 'huge'"),
                         ("stage=3", "stage must be 1 or 2"),
                         ("loss.lpips_weight=1.0", "LPIPS needs VGG16 weights")]:
        proc = train(*args(world, tmp_path / "x", bad), check=False)
        assert proc.returncode == 2, bad
        assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and message in proc.stderr, proc.stderr
    proc = train("--config", str(tmp_path / "missing.yaml"), check=False)
    assert proc.returncode == 2 and "not found" in proc.stderr
    proc = train(*args(world, tmp_path / "y", "stage=2", "model.init_from=/nonexistent"), check=False)
    assert proc.returncode == 2 and "no tokenizer export" in proc.stderr


def test_stage2_resume_after_sigkill_is_the_uninterrupted_run(world, tmp_path):
    """Stage 2 (the encoder trained toward its teacher, a frozen copy taken when stage 2 starts, the GAN on from step
    3) killed after step 4 and run again: every step's loss and the exported EMA weights of the uninterrupted run."""
    train(*args(world, tmp_path / "s1", "run.steps=2"))
    assert_resume_is_uninterrupted(SCRIPT, lambda out: args(world, out, "stage=2", f"model.init_from={tmp_path / 's1'}"),
                                   tmp_path)


@pytest.mark.parametrize("zero_stage, extra", [(2, "deepspeed.bf16=true"), (3, "model.gradient_checkpointing=true")])
def test_two_process_zero_smoke(world, tmp_path, zero_stage, extra):
    stage1 = tmp_path / "s1"
    port = free_port()
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port)]
    train(*args(world, stage1, "run.steps=4", f"deepspeed.zero_stage={zero_stage}", "deepspeed.micro_batch_size=4",
                "run.ckpt_every=2", "run.sample_every=2", extra), launcher=launcher)
    assert (stage1 / "samples" / "step_00000002.png").is_file()
    stage2 = tmp_path / "s2"
    train(*args(world, stage2, "stage=2", f"model.init_from={stage1}", "run.steps=5",
                f"deepspeed.zero_stage={zero_stage}", "deepspeed.micro_batch_size=4", extra), launcher=launcher)
    rows = [json.loads(line) for line in (stage2 / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 5 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert "distill" in rows[-1] and "gan_weight" in rows[-1]
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")  # DeepSpeed's CPU all-reduce buffers
    before = VQRAE.from_pretrained(stage1 / "export").state_dict()
    after = VQRAE.from_pretrained(stage2 / "export").state_dict()
    key = "encoder.tower.encoder.layers.0.mlp.fc1.weight"
    assert not torch.equal(before[key], after[key])  # stage 2 trains the encoder


def test_bench_script_counts_the_trainers_step(tmp_path):
    # the benchmark's step is the trainer's loss: the full loss (LPIPS + GAN + discriminator step) costs more FLOPs
    # than L2 + VQ alone, and stage 2 (teacher forward, encoder backward) more than stage 1
    flops = {}
    for loss in ("core", "full"):
        out = tmp_path / f"{loss}.json"
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_tokenizer.py"), "--batch", "2",
                               "--steps", "1", "--warmup", "0", "--ckpt", "off", "--loss", loss, "--json", str(out),
                               "--peak-n", "256"], capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, failure_report(proc)
        rows = json.loads(out.read_text())["results"]
        flops[loss] = {r["stage"]: r["flops"] for r in rows}
        assert all(r["img_s"] > 0 and r["mfu"] > 0 for r in rows)
    assert flops["full"][1] > flops["core"][1] and flops["full"][2] > flops["core"][2]
    assert flops["core"][2] > flops["core"][1]


@pytest.mark.slow
def test_compiled_training_follows_the_eager_loss_curve(world, tmp_path):
    # deepspeed.compile=true torch.compiles the model through its engine: same math, so the same curve up to the
    # rounding of fused kernels (stage 1 then stage 2 with the teacher compiled too, GAN from step 3)
    curves = {}
    for flag in ("false", "true"):
        s1, s2 = tmp_path / f"s1-{flag}", tmp_path / f"s2-{flag}"
        train(*args(world, s1, "run.steps=5", "deepspeed.zero_stage=0", f"deepspeed.compile={flag}"))
        train(*args(world, s2, "stage=2", f"model.init_from={s1}", "run.steps=4", "deepspeed.zero_stage=0",
                    f"deepspeed.compile={flag}"))
        curves[flag] = [*logged_losses(s1).values(), *logged_losses(s2).values()]
    assert len(curves["true"]) == 9
    np.testing.assert_allclose(curves["true"], curves["false"], rtol=2e-3)


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_stage2_resolves_config_logs_every_lr_and_exports_one_ema_set(world, tmp_path):
    from common.config import from_dict
    from train.engine import OptimConfig, lr_lambda

    stage1 = tmp_path / "s1"
    train(*args(world, stage1, "run.steps=3", "loss.gan_weight=0", "model.quantizer.codebook_size=256"))
    resolved = yaml.safe_load((stage1 / "config.yaml").read_text())
    assert resolved["model"]["quantizer"]["codebook_size"] == 256
    assert resolved["model"]["encoder"]["tower"]["image_size"] == 32  # the preset's, written out in full
    assert VQRAE.from_pretrained(stage1 / "export").config.quantizer.codebook_size == 256
    stage2 = tmp_path / "s2"
    optim = ["optim.lr=1e-3", "optim.min_lr=1e-4", "optim.warmup_steps=1"]
    stage2_config = ("--config", str(REPO / "train" / "configs" / "tokenizer" / "tiny-stage2.yaml"))
    train(*stage2_config, *args(world, stage2, f"model.init_from={stage1}", "run.steps=4", "loss.disc_start=1",
                                "loss.gan_start=2", "ema_decay=0.9", *optim))
    cfg = from_dict(OptimConfig, {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 1})
    for row in rows_of(stage2):
        assert row["lr"] == pytest.approx(cfg.lr * lr_lambda(row["step"], cfg, 4)), row  # the base group's
        assert row["lr_encoder"] == pytest.approx(0.5 * row["lr"]), row
    assert rows_of(stage2)[-1]["lr_disc"] == pytest.approx(cfg.min_lr)  # its schedule spans its own 3 steps
    # the export is the EMA of every trained tensor, the encoder's included
    checkpoint = stage2 / "checkpoints" / "step_00000004"
    ema = load_file(str(checkpoint / "ema.safetensors"))
    raw = torch.load(checkpoint / "model" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    exported = VQRAE.from_pretrained(stage2 / "export").state_dict()
    key = "encoder.tower.encoder.layers.0.mlp.fc1.weight"
    assert key in ema and torch.equal(exported[key], ema[key]) and not torch.equal(exported[key], raw[key].float())
    assert set(ema) == {k for k, v in exported.items() if k != "quantizer.codebook"}  # C is frozen: raw
    # stage 2 keeps the stage-1 model: a different codebook is refused in one line
    proc = train(*stage2_config, *args(world, tmp_path / "s2b", f"model.init_from={stage1}",
                                       "model.quantizer.codebook_size=1024"), check=False)
    assert proc.returncode == 2 and "model.quantizer.codebook_size is 256: it cannot become 1024" in proc.stderr


def test_ema_reads_the_fp32_master_weights_under_bf16_zero2(world, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out = tmp_path / "bf16"
    train(*args(world, out, "run.steps=3", "loss.gan_weight=0", "deepspeed.bf16=true", "deepspeed.zero_stage=2",
                "ema_decay=0.0"))  # decay 0: the EMA is the latest weights themselves
    checkpoint = out / "checkpoints" / "step_00000003"
    ema = load_file(str(checkpoint / "ema.safetensors"))
    masters = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="model")
    copies = torch.load(checkpoint / "model" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert ema and all(torch.equal(ema[k], masters[k]) for k in ema)
    assert any(not torch.equal(ema[k], copies[k].float()) for k in ema)  # the bf16 copies are not the masters


def _teacher_check(world: str, stage1: str, out: str) -> None:
    """Run in a fresh process: a short stage 2 in-process, then its teacher, student and distillation loss."""
    import deepspeed

    from common.distributed import init_distributed
    from train.config import read_config
    from train.tokenizer_config import CONFIG_DIR, TokenizerTrainConfig
    from train.tokenizer_trainer import TokenizerTrainer

    info = init_distributed(always=True)
    cfg = read_config(TokenizerTrainConfig, CONFIG_DIR / "tiny-stage1.yaml",
                      args(Path(world), Path(out), "stage=2", f"model.init_from={stage1}", "run.steps=4",
                           "loss.gan_weight=0", "optim.warmup_steps=1"))
    trainer = TokenizerTrainer(cfg, info)
    trainer.fit(cfg.run.steps, cfg)
    stage1_encoder = VQRAE.from_pretrained(Path(stage1) / "export").encoder.state_dict()
    teacher, student = trainer.teacher.state_dict(), trainer.engine.module.encoder.state_dict()
    assert teacher.keys() == stage1_encoder.keys() == student.keys()
    assert all(torch.equal(teacher[k], stage1_encoder[k]) for k in teacher), "the teacher moved"
    assert not all(torch.equal(student[k], stage1_encoder[k]) for k in student), "the student did not move"
    assert all(not p.requires_grad for p in trainer.teacher.parameters())
    distill = [r["distill"] for r in rows_of(Path(out))]
    assert distill[0] == pytest.approx(0.0, abs=1e-12) and all(d > 0 for d in distill[1:]), distill
    print("teacher ok")
    deepspeed.comm.destroy_process_group()


def test_stage2_teacher_is_the_frozen_stage1_encoder(world, tmp_path):
    stage1 = tmp_path / "s1"
    train(*args(world, stage1, "run.steps=2", "loss.gan_weight=0"))
    code = ("from tests.test_train_tokenizer import _teacher_check; "
            f"_teacher_check({str(world)!r}, {str(stage1)!r}, {str(tmp_path / 's2')!r})")
    proc = run_fresh_process(code, timeout=600)
    assert proc.returncode == 0 and "teacher ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
