"""End-to-end runs of train/understanding.py on a tiny shapes world: stage 1 -> stage 2 (full and LoRA), the
stage-1 projector loaded into a 2-process ZeRO-3 stage 2, a killed LoRA run resumed, one-line config errors, LLaVA
shards (over HTTP as locally; text-only conversations among them)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration

from tests.helpers import assert_resume_is_uninterrupted, failure_report, free_port, logged_losses, trainer_env
from tokenizer import VQRAE, get_preset
from world.export import LLAVA_CAPTIONS, LLAVA_CONVERSATIONS, export_llava

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train" / "understanding.py"
STAGE2 = REPO / "train" / "configs" / "understanding" / "tiny-stage2.yaml"


@pytest.fixture(scope="module")
def world(tmp_path_factory, lm_dir) -> Path:
    root = tmp_path_factory.mktemp("und")
    torch.manual_seed(0)
    VQRAE(get_preset("tiny-p4-32")).save_pretrained(root / "tok")
    export_llava(root / "world", 64, image_size=32, seed=0, progress=False)
    (root / "lm").symlink_to(lm_dir)
    return root


def args(world: Path, out: Path, stage: int, *extra: str) -> list[str]:
    data = LLAVA_CAPTIONS if stage == 1 else LLAVA_CONVERSATIONS
    head = [] if stage == 1 else ["--config", str(STAGE2)]
    return [*head, f"model.vqrae={world / 'tok'}", f"model.lm_pretrained={world / 'lm'}", f"run.output_dir={out}",
            f"data.image_root={world / 'world'}", f"data.conversations={world / 'world' / data}",
            "deepspeed.micro_batch_size=8",
            "run.log_every=1", "run.tensorboard=false", "optim.warmup_steps=1", *extra]


def train(*argv: str, launcher: list[str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*(launcher or [sys.executable]), str(SCRIPT), *argv], cwd=REPO, env=trainer_env(),
                          capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed: {failure_report(proc)}")
    return proc


def weights(export: Path) -> dict[str, torch.Tensor]:
    """The export's tensors as transformers' LLaVA names them in memory (its files use the original layout)."""
    return {k: v for k, v in LlavaForConditionalGeneration.from_pretrained(export).state_dict().items()
            if k != "lm_head.weight"}


@pytest.fixture(scope="module")
def stage1(world) -> Path:
    out = world / "s1"
    train(*args(world, out, 1, "run.steps=4", "run.ckpt_every=2"))
    return out


def test_stage1_trains_the_projector_alone_and_saves_it(world, stage1):
    exported = weights(stage1 / "export")
    projector = load_file(str(stage1 / "checkpoints" / "step_00000004" / "projector.safetensors"))
    assert set(projector) == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    for k, v in projector.items():
        assert torch.equal(exported[f"model.multi_modal_projector.{k}"], v), k
    early = weights_of_checkpoint(stage1 / "checkpoints" / "step_00000002")
    for k, v in exported.items():  # between steps 2 and 4 only the projector moved
        moved = not torch.equal(v, early[k])
        assert moved == k.startswith("model.multi_modal_projector."), k
    model = LlavaForConditionalGeneration.from_pretrained(stage1 / "export")
    assert model.config.vision_feature_layer == -1 and model.config.image_seq_length == 64


def weights_of_checkpoint(checkpoint: Path) -> dict[str, torch.Tensor]:
    from train.checkpoint import consolidated_state_dict

    state = consolidated_state_dict(checkpoint, "model")
    return {k: v for k, v in state.items() if k != "lm_head.weight"}


def test_stage2_full_and_lora_exports(world, stage1, tmp_path):
    base = weights(stage1 / "export")
    full = tmp_path / "full"
    train(*args(world, full, 2, f"model.init_from={stage1}", "run.steps=3"))
    after = weights(full / "export")
    lm = "model.language_model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(after[lm], base[lm])  # stage 2 trains the LLM
    tower = "model.vision_tower.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(after[tower], base[tower])  # and keeps the tower frozen
    kept = tmp_path / "lora"
    train(*args(world, kept, 2, f"model.init_from={stage1}", "run.steps=3", "lora.enabled=true", "lora.r=4",
                "lora.alpha=8", "lora.merge_on_export=false"))
    unmerged = weights(kept / "export")
    assert torch.equal(unmerged[lm], base[lm])  # the base LLM as it was; the adapter beside it
    assert (kept / "export" / "adapter" / "adapter_config.json").is_file()
    assert not torch.equal(unmerged["model.multi_modal_projector.linear_1.weight"],
                           base["model.multi_modal_projector.linear_1.weight"])
    from peft import PeftModel

    from train.exports import export_understanding

    checkpoint = kept / "checkpoints" / "step_00000003"
    lora = json.loads((checkpoint / "lora.json").read_text())
    (checkpoint / "lora.json").write_text(json.dumps({**lora, "merge": True}))
    export_understanding(checkpoint, tmp_path / "merged")
    merged = LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    adapted = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(kept / "export"),
                                        kept / "export" / "adapter").eval()
    ids = torch.tensor([[5, 17, 40, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_stage1_projector_into_two_process_zero3_stage2(world, stage1, tmp_path):
    projector = stage1 / "checkpoints" / "step_00000004" / "projector.safetensors"
    out = tmp_path / "z3"
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                str(free_port())]
    train(*args(world, out, 2, "model.init_from=", f"model.projector={projector}", "run.steps=2", "deepspeed.zero_stage=3",
                "deepspeed.micro_batch_size=4", "optim.lr=0.0", "optim.min_lr=0.0"), launcher=launcher)
    exported = weights(out / "export")
    for k, v in load_file(str(projector)).items():  # lr 0: the stage-1 projector, exactly, after ZeRO-3
        assert torch.equal(exported[f"model.multi_modal_projector.{k}"], v), k


def test_stage1_resume_after_sigkill_is_the_uninterrupted_run(world, tmp_path):
    """Stage 1 (the projector alone) killed after step 4 and run again: every step's loss and the exported weights
    of the uninterrupted run."""
    assert_resume_is_uninterrupted(SCRIPT, lambda out: args(world, out, 1), tmp_path)


def test_killed_lora_run_resumes_with_adapter_and_projector(world, stage1, tmp_path):
    common = [f"model.init_from={stage1}", "run.steps=8", "run.ckpt_every=4", "lora.enabled=true", "lora.r=4",
              "lora.alpha=8"]
    train(*args(world, tmp_path / "a", 2, *common))
    reference = logged_losses(tmp_path / "a")
    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args(world, out, 2, *common)], cwd=REPO, env=trainer_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        done = (out / "metrics.jsonl").is_file() and max(logged_losses(out), default=0) >= 5
        if done and (out / "checkpoints" / "step_00000004" / "trainer_state.json").is_file():
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    train(*args(world, out, 2, *common))
    resumed = logged_losses(out)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-5), step
    a, b = weights(tmp_path / "a" / "export"), weights(out / "export")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # adapter and projector restored


def test_config_errors_are_one_line(world, tmp_path):
    for extra, message in [(("model.init_from=",), "set exactly one"), (("model.init_from=/nonexistent",), "no understanding export"),
                           (("model.init_from=", "model.projector=/nonexistent.safetensors"), "not found")]:
        proc = train(*args(world, tmp_path / "x", 2, *extra), check=False)
        assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], proc.stderr[-500:]
    proc = train(*args(world, tmp_path / "y", 1, "lora.enabled=true"), check=False)
    assert proc.returncode == 2 and "stage 1 trains the projector alone" in proc.stderr


def test_stage1_from_llava_shards_over_http_equals_local_shards(world, tmp_path):
    from data.llava import read_conversations, write_llava_shards
    from data.serve import ShardServer

    shards = tmp_path / "shards"
    write_llava_shards(read_conversations(world / "world" / LLAVA_CAPTIONS), world / "world", shards, shard_size=16,
                       progress=False)
    common = ("run.steps=3", "data.conversations=/nonexistent.json", "data.shards.window=2")
    train(*args(world, tmp_path / "local", 1, f"data.train={shards}", *common))
    with ShardServer(shards) as server:
        proc = train(*args(world, tmp_path / "http", 1, f"data.train={server.url}/shardindex.json",
                           f"data.shards.cache_dir={tmp_path / 'cache'}", *common))
        assert server.requests["GET /000000.tar"] == 1  # each shard fetched once, into the cache
    assert "64 conversations in 4 shards" in proc.stderr + proc.stdout
    local, remote = logged_losses(tmp_path / "local"), logged_losses(tmp_path / "http")
    assert sorted(local) == [1, 2, 3] and local == remote


def test_stage2_trains_text_only_conversations_from_shards(world, stage1, tmp_path):
    from data.llava import read_conversations, write_llava_shards

    samples = read_conversations(world / "world" / LLAVA_CONVERSATIONS)[:12]
    chats = [{"id": f"t{i}", "conversations": [{"from": "human", "value": "Say a colour."},
                                                {"from": "gpt", "value": "red"}]} for i in range(4)]
    mixed = [*samples[:6], *chats, *samples[6:]]  # 16 samples: shards of 8, one with four text-only chats
    counts = write_llava_shards(mixed, world / "world", tmp_path / "shards", shard_size=8, progress=False)
    assert counts["samples"] == 16 and counts["text_only"] == 4
    out = tmp_path / "run"
    train(*args(world, out, 2, f"model.init_from={stage1}", f"data.train={tmp_path / 'shards'}",
                "data.conversations=/nonexistent.json",
                "deepspeed.micro_batch_size=4", "run.steps=4", "data.shards.window=1"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert sum(r["examples"] for r in rows) == 16  # one epoch: every sample trained, the text-only ones included
    assert all(r["skipped_images"] == 0 for r in rows)


def test_two_ranks_stay_in_step_when_one_ranks_micro_batch_is_all_unreadable(world, tmp_path):
    """Every other image is unreadable and a micro-batch holds one sample: a rank whose micro-batch is empty runs a
    placeholder row (under ZeRO-3, whose forward is collective) while the other trains, and the skip counts logged
    are sums over both ranks."""
    samples = json.loads((world / "world" / LLAVA_CAPTIONS).read_text())[:16]
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    for s in samples[1::2]:
        s["image"] = str(tmp_path / "bad.png")
    (tmp_path / "captions.json").write_text(json.dumps(samples))
    out = tmp_path / "run"
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                str(free_port())]
    train(*args(world, out, 1, f"data.conversations={tmp_path / 'captions.json'}", "run.steps=6",
                "deepspeed.zero_stage=3", "deepspeed.micro_batch_size=1"), launcher=launcher)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and (out / "export" / "config.json").is_file()
    skipped = [0] + [r["skipped_images"] for r in rows]
    added = [b - a for a, b in zip(skipped, skipped[1:])]
    assert set(added) <= {0, 1, 2} and 1 in added and 2 in added  # one rank empty; both: counted over both ranks
    assert all(r["skipped_unreadable_image"] == r["skipped_images"] for r in rows)
    empty_on_rank0 = [r for r, n in zip(rows, added) if n == 2]
    assert all(r["examples"] == 0 and r["loss"] == 0.0 for r in empty_on_rank0)
