"""The trainers' shared pieces without DeepSpeed: schedule, resumable data order, EMA, DeepSpeed JSON, guard,
command line, metrics file."""

from __future__ import annotations

import itertools
import json
import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from common.config import ConfigError
from common.distributed import DistInfo, default_num_workers
from tests.helpers import run_fresh_process
from train.config import RunConfig, parse_config
from train.data_order import ResumableBatchSampler, resumable_loader
from train.ema import EMA
from train.engine import DeepSpeedConfig, OptimConfig, deepspeed_json, lr_lambda
from train.guard import NonFiniteGuard, NonFiniteLossError
from train.run_folder import truncate_metrics


def test_lr_schedule_warmup_then_cosine_to_min():
    optim = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    values = [lr_lambda(s, optim, 110) for s in range(120)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert values[110] == pytest.approx(0.1) and values[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


def stream(sampler: ResumableBatchSampler, n: int) -> list[list[tuple[int, int]]]:
    return list(itertools.islice(iter(sampler), n))


def test_resumable_sampler_resumes_exactly_and_shards_ranks():
    full = stream(ResumableBatchSampler(50, 4, 0, 1, seed=3), 30)  # 12 batches per epoch: crosses 2 epochs
    resumed = stream(ResumableBatchSampler(50, 4, 0, 1, seed=3, start=17), 13)
    assert resumed == full[17:]
    epoch0 = [i for batch in full[:12] for e, i in batch if e == 0]
    assert len(set(epoch0)) == 48  # a permutation, remainder dropped
    assert [batch[0][0] for batch in full] == [0] * 12 + [1] * 12 + [2] * 6  # 50 // 4 batches an epoch
    ranks = [stream(ResumableBatchSampler(50, 4, r, 2, seed=3), 6) for r in range(2)]
    for b in range(6):
        assert not set(ranks[0][b]) & set(ranks[1][b])
    with pytest.raises(ConfigError, match="smaller than one global batch"):
        ResumableBatchSampler(7, 4, 0, 2, seed=0)
    assert len(stream(ResumableBatchSampler(8, 4, 1, 2, seed=0), 3)) == 3  # exactly one global batch is enough


def test_resumable_sampler_epochs_follow_their_documented_seeds():
    """Epoch e is torch.randperm(n) seeded by seed + e, cut into global batches, each rank its slice of each."""
    n, micro, world, seed = 50, 4, 2, 3
    got = [stream(ResumableBatchSampler(n, micro, rank, world, seed=seed), 18) for rank in range(world)]
    for e in range(3):  # 6 micro-batches per rank an epoch
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + e)).tolist()
        for rank in range(world):
            expected = [[(e, i) for i in perm[(b * world + rank) * micro:(b * world + rank + 1) * micro]]
                        for b in range(6)]
            assert got[rank][6 * e:6 * (e + 1)] == expected, (e, rank)


def test_resumable_loader_is_endless_and_pins_memory_for_cuda_only():
    data = list(range(16))
    cpu, cuda = (DistInfo(0, 1, 0, torch.device(kind)) for kind in ("cpu", "cuda"))
    loader = resumable_loader(data, list, 4, cpu, seed=0, num_workers=0)
    assert len(loader) == len(loader.batch_sampler) == 1 << 62  # an endless stream: its length is never reached
    assert not loader.pin_memory and loader.num_workers == 0
    assert resumable_loader(data, list, 4, cpu, seed=0).num_workers == default_num_workers()  # -1: the default
    assert resumable_loader(data, list, 4, cuda, seed=0, num_workers=0).pin_memory
    assert not resumable_loader(data, list, 4, DistInfo(0, 1, 0, torch.device("mps")), seed=0).pin_memory
    assert resumable_loader(data, list, 4, cpu, seed=0, num_workers=1).num_workers == 1


def test_ema_matches_direct_computation_with_warmup():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA({"p": p}, decay=0.9)
    expected = torch.zeros(3)
    for step in range(1, 30):
        with torch.no_grad():
            p.add_(1.0)
        ema.update(step)
        d = min(0.9, (1 + step) / (10 + step))
        expected = d * expected + (1 - d) * p.detach()
        torch.testing.assert_close(ema.state_dict()["p"], expected)
    other = EMA({"p": p}, decay=0.9)
    other.load_state_dict(ema.state_dict())
    torch.testing.assert_close(other.shadow["p"], ema.shadow["p"])


def test_deepspeed_json_is_derived_from_the_dataclasses():
    ds = DeepSpeedConfig(zero_stage=3, bf16=True, micro_batch_size=8, grad_accum_steps=4,
                                extra={"zero_optimization": {"stage3_param_persistence_threshold": 0}})
    out = deepspeed_json(ds, OptimConfig(grad_clip=0.5), world_size=16)
    assert out["train_batch_size"] == 8 * 4 * 16 and out["gradient_clipping"] == 0.5
    assert out["bf16"] == {"enabled": True}
    assert out["zero_optimization"]["stage"] == 3
    assert out["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    with pytest.raises(ConfigError, match="zero_stage must be 0-3"):
        deepspeed_json(DeepSpeedConfig(zero_stage=4), OptimConfig(), 1)


def test_nonfinite_guard_counts_and_raises():
    guard = NonFiniteGuard(max_consecutive=2)
    assert guard.ok(torch.tensor(1.0))
    assert not guard.ok(torch.tensor(float("nan"))) and not guard.ok(torch.tensor(float("inf")))
    assert guard.ok(torch.tensor(0.5)) and guard.skipped == 2
    for _ in range(2):
        guard.ok(torch.tensor(float("nan")))
    with pytest.raises(NonFiniteLossError, match="3 consecutive"):
        guard.ok(torch.tensor(float("nan")))


@dataclass
class _Cfg:
    run: RunConfig = field(default_factory=RunConfig)
    name: str = "x"


def test_parse_config_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  steps: 7\nname: from-yaml\n")
    cfg = parse_config(_Cfg, ["--config", str(path), "run.seed=5", "--local_rank=0"], path, "")
    assert (cfg.run.steps, cfg.run.seed, cfg.name) == (7, 5, "from-yaml")
    path.write_text("run:\n  stepz: 7\n")
    with pytest.raises(ConfigError, match="unknown config key 'run.stepz'"):
        parse_config(_Cfg, ["--config", str(path)], path, "")


def test_truncate_metrics_drops_lines_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in range(1, 8)))
    truncate_metrics(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    import random

    import numpy as np

    from train.checkpoint import rng_state, set_rng_state

    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(7), np.random.rand(7), random.random()  # move every generator on
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(again[0], expected[0]) and np.array_equal(again[1], expected[1]) and again[2] == expected[2]


def _mismatched_checkpoint_check(root: str) -> None:
    """Run in a fresh process: a checkpoint of one model, loaded into an engine of another, is one ConfigError."""
    import deepspeed

    from common.distributed import init_distributed
    from train.checkpoint import Checkpointer
    from train.engine import build_engine

    info = init_distributed(always=True)
    optim = OptimConfig(lr=1e-3, warmup_steps=1)
    ds = deepspeed_json(DeepSpeedConfig(zero_stage=0, bf16=False, micro_batch_size=1), optim, info.world_size)
    ckpt = Checkpointer(Path(root), info, keep=1)

    def engine(*widths: int):
        model = torch.nn.Sequential(*(torch.nn.Linear(4, w) for w in widths))
        return build_engine(model, [{"params": list(model.parameters())}], optim, 10, ds)

    path = ckpt.save(1, {"model": engine(4)}, {})
    try:  # missing keys (1.*) and two size mismatches (0.*): the message ends with the last one
        ckpt.load(path, {"model": engine(3, 4)})
    except ConfigError as e:
        assert "does not fit this run's 'model'" in str(e) and "\n" not in str(e), e
        assert "size mismatch for 0.bias" in str(e), e
        print("refused:", e)
    deepspeed.comm.destroy_process_group()


def test_a_checkpoint_of_another_model_is_refused_in_one_line(tmp_path):
    code = f"from tests.test_train_parts import _mismatched_checkpoint_check; _mismatched_checkpoint_check({str(tmp_path)!r})"
    proc = run_fresh_process(code)
    assert proc.returncode == 0 and "refused: checkpoint" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


def _ema_master_check() -> None:
    """Run in a fresh process: under a bf16 ZeRO-2 engine the EMA reads DeepSpeed's fp32 master weights."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from common.distributed import init_distributed
    from train.engine import build_engine

    info = init_distributed(always=True)
    optim = OptimConfig(lr=1e-2, warmup_steps=1)
    ds = deepspeed_json(DeepSpeedConfig(zero_stage=2, bf16=True, micro_batch_size=2), optim, info.world_size)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    ema = EMA(dict(model.named_parameters()), decay=0.9)
    start = {k: v.clone() for k, v in ema.shadow.items()}
    engine = build_engine(model, [{"params": list(model.parameters())}], optim, 10, ds)
    engine.backward(engine(torch.randn(2, 8, dtype=torch.bfloat16)).float().square().mean())
    engine.step()
    ema.update(1)
    weight = 1 - min(0.9, 2 / 11)
    for name, p in engine.module.named_parameters():
        master = safe_get_full_fp32_param(p)
        assert master is not None and master.dtype == torch.float32
        assert not torch.equal(master, p.detach().float())  # the bf16 copy differs from the master
        torch.testing.assert_close(ema.shadow[name], start[name].lerp(master, weight), rtol=0, atol=0)
    print("ema reads the fp32 masters")
    deepspeed.comm.destroy_process_group()


def test_ema_reads_deepspeed_fp32_master_weights():
    code = "from tests.test_train_parts import _ema_master_check; _ema_master_check()"
    proc = run_fresh_process(code)
    assert proc.returncode == 0 and "ema reads the fp32 masters" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_ema_state_of_other_parameters_is_refused_naming_three():
    params = {f"p{i}": torch.nn.Parameter(torch.zeros(2)) for i in range(5)}
    ema = EMA(params, decay=0.9)
    partial = {k: v for k, v in ema.state_dict().items() if k == "p4"}  # p0..p3 missing
    with pytest.raises(KeyError, match=r"missing \['p0', 'p1', 'p2'\], unexpected \[\]"):
        ema.load_state_dict(partial)
    extra = {**ema.state_dict(), **{f"q{i}": torch.zeros(2) for i in range(4)}}
    with pytest.raises(KeyError, match=r"missing \[\], unexpected \['q0', 'q1', 'q2'\]\W*$"):
        ema.load_state_dict(extra)


def test_ema_follows_its_parameters_to_their_device():
    p = torch.nn.Parameter(torch.ones(3))
    ema = EMA({"p": p}, decay=0.9)  # built on the host
    ema.params["p"] = torch.nn.Parameter(torch.empty(3, device="meta"))  # trained elsewhere (meta: like a GPU here)
    ema.update(1)
    assert ema.shadow["p"].device.type == "meta"


def test_nonfinite_guard_from_its_first_micro_step_and_from_a_resumed_count():
    nan = torch.tensor(float("nan"))
    guard = NonFiniteGuard(max_consecutive=2)
    assert not guard.ok(nan) and not guard.ok(nan)  # two in a row are allowed from the very first micro-step
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive micro-steps \(3 in total\)"):
        guard.ok(nan)
    resumed = NonFiniteGuard(max_consecutive=0, skipped=5)
    with pytest.raises(NonFiniteLossError, match=r"1 consecutive micro-steps \(6 in total\)"):
        resumed.ok(nan)


class Unpicklable:
    """An arbitrary object in a checkpoint file: torch.load(weights_only=True) must refuse it."""


def _checkpointer_check(root: str) -> None:
    """Run in a fresh process: save / prune / resolve / load / consolidate with real ZeRO-0 and ZeRO-2 engines."""
    import logging
    import random

    import deepspeed
    import numpy as np

    from common.distributed import init_distributed
    from train.checkpoint import STATE_FILE, Checkpointer, consolidated_state_dict, find_checkpoint
    from train.engine import build_engine

    info = init_distributed(always=True)
    optim = OptimConfig(lr=1e-2, warmup_steps=1)
    out = Path(root) / "run"
    ckpt = Checkpointer(out, info, keep=3)

    def engine(stage: int, seed: int = 0):
        torch.manual_seed(seed)
        model = torch.nn.Linear(4, 3)
        if stage == 0:
            model.register_buffer("calls", torch.tensor([7]))  # an integer buffer stays an integer
        ds = deepspeed_json(DeepSpeedConfig(zero_stage=stage, bf16=stage > 0, micro_batch_size=1), optim, 1)
        return build_engine(model, [{"params": list(model.parameters())}], optim, 10, ds)

    engines = {"model": engine(0), "other": engine(2, seed=1)}
    for name, e in engines.items():
        x = torch.randn(1, 4, dtype=torch.bfloat16 if name == "other" else torch.float32)
        e.backward(e(x).float().sum())
        e.step()
    assert ckpt.latest() is None and ckpt.resolve("auto") is None and ckpt.resolve("none") is None
    stale = out / "checkpoints" / ".tmp_step_00000001"  # left by a save that was killed
    stale.mkdir(parents=True)
    (stale / "junk.txt").write_text("from the killed save")
    written, listings = {}, []
    for step in (1, 2, 3, 4):
        path = ckpt.save(step, engines, {"micro_batches": 10 * step}, {"extra.txt": lambda p: p.write_text("x")})
        written[step] = path
        listings.append(sorted(p.name for p in (out / "checkpoints").iterdir()))
        assert not (path / "junk.txt").exists()  # nothing of the killed save
    steps = [[int(name.removeprefix("step_")) for name in names] for names in listings]
    assert steps == [[1], [1, 2], [1, 2, 3], [2, 3, 4]], listings  # keep=3, no temporary folder left
    assert ckpt.latest() == written[4] == find_checkpoint(out) == find_checkpoint(written[4])
    assert ckpt.resolve("auto") == written[4] and ckpt.resolve(str(written[2])) == written[2]
    assert ckpt.resolve("".join(["au", "to"])) == written[4] and ckpt.resolve("".join(["no", "ne"])) is None
    cwd = os.getcwd()
    os.chdir(Path(root))
    try:  # a relative path that sorts after "auto" and "none" is still a path
        assert ckpt.resolve("run/checkpoints/step_00000003") == Path("run/checkpoints/step_00000003")
    finally:
        os.chdir(cwd)
    assert (written[3] / "extra.txt").read_text() == "x"
    state = json.loads((written[3] / STATE_FILE).read_text())
    assert state == {"micro_batches": 30, "step": 3}
    for bad in (str(out), str(Path(root) / "nothing")):
        try:
            ckpt.resolve(bad)
            raise AssertionError("resolve accepted " + bad)
        except FileNotFoundError as e:
            assert STATE_FILE in str(e)
    try:
        find_checkpoint(Path(root))
        raise AssertionError("find_checkpoint accepted a folder without checkpoints")
    except FileNotFoundError as e:
        assert "neither a checkpoint nor a run folder" in str(e)

    # the random generators saved at step 3 come back on load
    expected = (torch.rand(3), np.random.rand(3), random.random())
    fresh = {"model": engine(0, seed=5), "other": engine(2, seed=6)}
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    ckpt.save(5, fresh, {"micro_batches": 50})  # overwritten below: only its RNG files matter
    loaded = ckpt.load(written[3], fresh)
    assert loaded == {"micro_batches": 30, "step": 3}
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
    for name in engines:
        for a, b in zip(engines[name].module.parameters(), fresh[name].module.parameters()):
            assert torch.equal(a, b), name
    # a checkpoint without a rank's RNG file loads with a warning
    (written[3] / "rng" / "rank_00000.pt").unlink()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("vqrae").addHandler(handler)
    ckpt.load(written[3], fresh)
    assert any("no random-generator state for rank 0" in r.getMessage() for r in records)
    torch.save({"torch": torch.get_rng_state(), "payload": Unpicklable()}, written[3] / "rng" / "rank_00000.pt")
    try:  # checkpoint files load with weights_only: a pickled object is refused, never run
        ckpt.load(written[3], fresh)
        raise AssertionError("a random-generator file with a pickled object loaded")
    except pickle.UnpicklingError:
        pass
    try:
        ckpt.load(written[3], {"missing": engine(0)})
        raise AssertionError("a checkpoint without the engine's tag loaded")
    except FileNotFoundError as e:
        assert "no DeepSpeed state for 'missing'" in str(e)

    # consolidated weights: ZeRO-0's module state in fp32, ZeRO-2's fp32 masters
    plain = consolidated_state_dict(written[3], "model")
    module = engines["model"].module.state_dict()
    assert plain.keys() == module.keys() and plain["calls"].dtype == torch.int64
    assert all(torch.equal(plain[k], v) and plain[k].dtype == v.dtype for k, v in module.items())
    from deepspeed.utils import safe_get_full_fp32_param

    master = consolidated_state_dict(written[3], "other")
    for k, p in engines["other"].module.named_parameters():
        assert master[k].dtype == torch.float32 and torch.equal(master[k], safe_get_full_fp32_param(p)), k
    try:
        consolidated_state_dict(written[3], "nope")
        raise AssertionError("consolidated a missing tag")
    except FileNotFoundError as e:
        assert "no 'nope' folder" in str(e)
    states = written[3] / "model" / "mp_rank_00_model_states.pt"
    torch.save({"module": {"weight": torch.zeros(3, 4)}, "payload": Unpicklable()}, states)
    try:
        consolidated_state_dict(written[3], "model")
        raise AssertionError("a module-states file with a pickled object loaded")
    except pickle.UnpicklingError:
        pass
    print("checkpointer ok")
    deepspeed.comm.destroy_process_group()


def test_checkpointer_saves_prunes_resolves_loads_and_consolidates(tmp_path):
    code = f"from tests.test_train_parts import _checkpointer_check; _checkpointer_check({str(tmp_path)!r})"
    proc = run_fresh_process(code)
    assert proc.returncode == 0 and "checkpointer ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
