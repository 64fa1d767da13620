"""The bottom package: strict configs, atomic files and settings records, weight loading, command-line errors,
and the import rules that keep it at the bottom."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from common.cli import reported_errors
from common.config import ConfigError, apply_overrides, load_config, set_override
from common.distributed import default_num_workers
from common.files import atomic_directory, atomic_write, ensure_settings
from common.weights import find_prefix, load_exactly

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "tokenizer", "llm", "data", "train", "eval", "world", "demo", "scripts")
ENTRY_FOLDERS = ("train", "eval", "scripts")  # where the design card puts the commands


def is_entry_point(path: Path) -> bool:
    return "\nif __name__ == \"__main__\":" in path.read_text()


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


ENTRY_SCRIPTS = {module_name(p) for package in PACKAGES for p in (REPO / package).rglob("*.py") if is_entry_point(p)}


# ----------------------------------------------------------------------------------------------- import rules


def project_imports(path: Path) -> set[str]:
    """The project modules a file imports (anywhere in it, lazily or not)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def test_layering_rules_hold_for_every_module():
    forbidden = {  # package -> packages it must not import
        "common": set(PACKAGES) - {"common"},
        "tokenizer": {"data", "llm", "train", "eval", "world", "demo", "scripts"},
        "llm": {"data", "train", "eval", "world", "demo", "scripts"},
        "data": {"train", "eval", "world", "demo", "scripts"},
        "eval": {"train", "world", "demo", "scripts"},
        "train": {"world", "demo", "scripts"},  # no trainer knows the CPU default's world exists
        "world": {"demo", "scripts"},
        "demo": {"train", "world", "scripts"},  # the chat and web demo load exports; they never train
    }
    problems = []
    for package in (*PACKAGES, "tests"):  # entry scripts are run, never imported: not by a package, not by a test
        for path in sorted((REPO / package).rglob("*.py")):
            imports = project_imports(path)
            bad = {m for m in imports if m.split(".")[0] in forbidden.get(package, set())}
            bad |= {m for m in imports if m in ENTRY_SCRIPTS or m.startswith(tuple(f"{e}." for e in ENTRY_SCRIPTS))}
            if bad:
                problems.append(f"{path.relative_to(REPO)} imports {sorted(bad)}")
    assert not problems, "\n".join(problems)
    misplaced = sorted(e for e in ENTRY_SCRIPTS if e.split(".")[0] not in ENTRY_FOLDERS)
    assert not misplaced, f"entry points outside {ENTRY_FOLDERS}: {misplaced}"
    assert project_imports(REPO / "data" / "codes.py").isdisjoint({"tokenizer", "tokenizer.config"})


# ----------------------------------------------------------------------------------------------- configs


@dataclass
class _Inner:
    size: int = 3
    table: dict = field(default_factory=dict)


@dataclass
class _Outer:
    inner: _Inner = field(default_factory=_Inner)
    name: str = "x"
    ratio: float = 1.0

    @classmethod
    def resolve_raw(cls, data: dict) -> dict:  # a dependent default: size follows name unless given
        data.setdefault("inner", {}).setdefault("size", len(data.get("name", "x")))
        return data


def test_load_config_layers_and_resolves_and_is_strict():
    cfg = load_config(_Outer, {"name": "abcd"}, ["ratio=2", "inner.table.free.form=7"])
    assert (cfg.inner.size, cfg.ratio, cfg.inner.table) == (4, 2.0, {"free": {"form": 7}})
    assert load_config(_Outer, {}, ["ratio=1e-4"]).ratio == 1e-4  # yaml 1.1 reads this as a string
    assert load_config(_Outer, {}, ["name=1e-4"]).name == "1e-4"
    with pytest.raises(ConfigError, match="expected float"):
        load_config(_Outer, {}, ["ratio=fast"])
    assert load_config(_Outer, {"name": "ab", "inner": {"size": 9}}).inner.size == 9
    with pytest.raises(ConfigError, match="unknown config key 'inner.sise'"):
        load_config(_Outer, {}, ["inner.sise=1"])
    with pytest.raises(ConfigError, match="'name' has no sub-keys"):
        load_config(_Outer, {}, ["name.x=1"])
    with pytest.raises(ConfigError, match="expected int"):
        load_config(_Outer, {"inner": {"size": "big"}})
    with pytest.raises(ConfigError, match="key=value"):
        set_override({}, _Outer, "ratio")
    assert apply_overrides(_Outer(), ["inner.size=5"]).inner.size == 5


def test_reported_errors_one_line_and_exit_status(capsys):
    with pytest.raises(SystemExit) as exit_info, reported_errors():
        raise ConfigError("unknown key 'x'\n  (a second line)")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: unknown key 'x' (a second line)\n"
    with pytest.raises(SystemExit), reported_errors():
        raise FileNotFoundError("no such file: a.png")
    with pytest.raises(TypeError), reported_errors():  # not an expected failure: the traceback stays
        raise TypeError("bug")
    with pytest.raises(ValueError), reported_errors(FileNotFoundError):  # only the kinds named
        raise ValueError("bug")


# ----------------------------------------------------------------------------------------------- files


def test_atomic_writes_leave_nothing_half_written(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write("new, half")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    folder = tmp_path / "dir"
    with atomic_directory(folder) as tmp:
        (tmp / "x").write_text("1")
    with pytest.raises(RuntimeError), atomic_directory(folder) as tmp:
        (tmp / "y").write_text("2")
        raise RuntimeError("killed")
    assert sorted(p.name for p in folder.iterdir()) == ["x"] and len(list(tmp_path.iterdir())) == 2


def test_ensure_settings_records_then_refuses_other_settings(tmp_path):
    path = tmp_path / "out" / "settings.json"
    path.parent.mkdir()
    ensure_settings(path, {"seed": 1, "size": (32, 32), "where": "a"}, ignore=("where",))
    assert json.loads(path.read_text()) == {"seed": 1, "size": [32, 32], "where": "a"}
    ensure_settings(path, {"seed": 1, "size": [32, 32], "where": "b"}, ignore=("where",))  # same, tuples = lists
    with pytest.raises(ConfigError, match=r"other settings \(seed: 1 there, 2 now\)"):
        ensure_settings(path, {"seed": 2, "size": [32, 32], "where": "a"}, ignore=("where",))
    with pytest.raises(ConfigError, match="extra"):
        ensure_settings(path, {"seed": 1, "size": [32, 32], "where": "a", "extra": 0}, ignore=("where",))
    ensure_settings(tmp_path / "none.json", {"a": 1}, write=False)
    assert not (tmp_path / "none.json").exists()


# ----------------------------------------------------------------------------------------------- weights


def test_find_prefix_and_load_exactly():
    module = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.LayerNorm(3))
    state = {f"model.vision_tower.{k}": torch.randn_like(v) for k, v in module.state_dict().items()}
    state["model.language_model.0.weight"] = torch.zeros(5, 5)  # outside the module: ignored
    assert find_prefix(module.state_dict(), state) == "model.vision_tower."
    assert load_exactly(module, state, "ckpt") == "model.vision_tower."
    for k, v in module.state_dict().items():
        assert torch.equal(v, state[f"model.vision_tower.{k}"])
    del state["model.vision_tower.1.bias"]
    with pytest.raises(ValueError, match=r"1 of the 4 tensors .* e\.g\. 1\.bias"):
        load_exactly(module, state, "ckpt")
    state["model.vision_tower.1.bias"] = torch.zeros(4)
    with pytest.raises(ValueError, match="other shapes"):
        load_exactly(module, state, "ckpt")


def test_default_num_workers_follows_the_cores_and_processes(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert default_num_workers() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_num_workers() == 8  # capped
    monkeypatch.setattr("os.sched_getaffinity", lambda _: {0, 1})
    assert default_num_workers() == 2


def test_cpu_threads_honour_an_explicit_omp_num_threads(monkeypatch):
    from common.distributed import cpu_threads

    monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(16)))
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMP_NUM_THREADS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert cpu_threads() == 4  # the cores split between the job's processes
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # a user sharing the machine
    assert cpu_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "two")
    with pytest.raises(ValueError, match="OMP_NUM_THREADS must be a positive integer, got 'two'"):
        cpu_threads()


# ----------------------------------------------------------------------------------------------- entry points

ENTRY_POINTS = sorted(p for folder in ENTRY_FOLDERS for p in (REPO / folder).glob("[a-z]*.py"))


@pytest.mark.parametrize("script", [p for p in ENTRY_POINTS if is_entry_point(p)], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_entry_point_runs_from_outside_the_repository(script, tmp_path):
    """`python path/to/script.py --help` from another folder, with nothing on PYTHONPATH: the installed packages are
    found, no script imports another script, and only the trainers edit sys.path (train/tokenizer.py would hide the
    tokenizer package)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
    edits = "sys.path.insert" in script.read_text()
    assert edits == (script.parent.name == "train"), "only the trainers edit sys.path"
