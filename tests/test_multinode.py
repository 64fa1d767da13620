"""Two "nodes" of one process each, started by torchrun's multi-node rendezvous on the loopback address, train the
tokenizer from shards served over HTTP: each node reads exactly its rank's share of the data order (whole shards,
disjoint across nodes), checkpoints and the export are written once and complete, and a run killed on both nodes
after a checkpoint resumes where it stopped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data.serve import ShardServer
from data.shards import ShardDataset, write_index
from tests.helpers import free_port, trainer_env
from tests.test_train_tokenizer import REPO, SCRIPT
from tokenizer import VQRAE
from train.data_order import ShardLocalBatchSampler
from world.export import export_world

pytestmark = pytest.mark.slow
STEPS, MICRO_BATCH, SEED, WINDOW = 6, 4, 0, 2


def _launch(node: int, port: int, out: Path, url: str, cache: Path, log: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
           "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), str(SCRIPT),
           f"data.train={url}", f"data.eval={url}", f"run.output_dir={out}", f"run.steps={STEPS}", "run.ckpt_every=3",
           f"deepspeed.micro_batch_size={MICRO_BATCH}", "deepspeed.zero_stage=2", "run.log_every=1",
           "run.sample_every=0", "run.tensorboard=false", "loss.gan_weight=0", "model.encoder_path=",
           f"data.shards.window={WINDOW}", f"run.seed={SEED}", "debug.sample_log=true", "run.num_workers=1", *extra]
    environment = {**trainer_env(), "VQRAE_SHARD_CACHE": str(cache)}  # each node its own disk
    return subprocess.Popen(cmd, cwd=REPO, env=environment, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def test_two_nodes_read_disjoint_shards_write_once_and_resume(tmp_path):
    export_world(tmp_path / "world", 96, image_size=32, fmt="shards", shard_size=8, progress=False)
    folder = tmp_path / "world" / "shards"
    write_index(sorted(str(p) for p in folder.glob("*.tar")), folder / "shardindex.json", threads=2)
    out = tmp_path / "run"
    with ShardServer(folder, latency_s=0.005) as server:
        url = f"{server.url}/shardindex.json"
        # first attempt: every rank SIGKILLs itself after step 4, past the step-3 checkpoint
        port = free_port()
        nodes = [_launch(n, port, out, url, tmp_path / f"cache{n}", tmp_path / f"first{n}.log", "debug.kill_at_step=4")
                 for n in (0, 1)]
        for n, p in enumerate(nodes):
            assert p.wait(timeout=600) != 0, (tmp_path / f"first{n}.log").read_text()[-3000:]
        assert _steps(out) == [1, 2, 3, 4] and not (out / "checkpoints" / "step_00000006").exists()
        # second attempt: resumes from step 3 on both nodes
        port = free_port()
        nodes = [_launch(n, port, out, url, tmp_path / f"cache{n}", tmp_path / f"second{n}.log") for n in (0, 1)]
        for n, p in enumerate(nodes):
            assert p.wait(timeout=900) == 0, (tmp_path / f"second{n}.log").read_text()[-3000:]
    log = (tmp_path / "second0.log").read_text()
    assert "resumed from" in log and "(step 3)" in log

    # each rank read exactly its share of the data order, resumed without repeats or gaps
    lengths = ShardDataset(folder).shard_lengths
    seen = {}
    for rank in (0, 1):
        lines = (out / "samples" / f"rank_{rank:05d}.txt").read_text().splitlines()
        seen[rank] = [int(i) for line in lines for i in line.split()]
        order = ShardLocalBatchSampler(lengths, WINDOW, MICRO_BATCH, rank, 2, SEED).batches()
        assert [[int(i) for i in line.split()] for line in lines] == [b for _, (_, b) in zip(range(STEPS), order)]
        assert len(set(seen[rank])) == len(seen[rank]) == STEPS * MICRO_BATCH
    shard_of = {i: s for s in range(len(lengths)) for i in range(sum(lengths[:s]), sum(lengths[:s + 1]))}
    assert not {shard_of[i] for i in seen[0]} & {shard_of[i] for i in seen[1]}  # whole shards, disjoint nodes

    # written once and complete: every step logged once, both checkpoints with both ranks' states, one export
    assert _steps(out) == list(range(1, STEPS + 1))
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("."))
    assert [c for c in checkpoints if c.startswith("step_")] == ["step_00000003", "step_00000006"]
    for step in checkpoints:
        if step.startswith("step_"):
            assert (out / "checkpoints" / step / "trainer_state.json").is_file()
            ranks = {p.name for p in (out / "checkpoints" / step).rglob("*optim_states.pt")}
            assert len(ranks) == 2, ranks  # ZeRO-2: one optimizer partition per rank
    model = VQRAE.from_pretrained(out / "export")
    assert model.config.num_tokens > 0
