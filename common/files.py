"""Atomic file and directory writes (a reader sees the old content or the new one, never half of it), and the one
check that refuses to mix outputs made with different settings in one folder."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from common.config import ConfigError


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file next to `path`; on success it replaces `path`, on error it is removed.

    Args:
        path: the final file path.
        mode: "w" (text) or "wb" (binary).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write text or bytes to `path` atomically."""
    with atomic_write(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory next to `path`; on success it becomes `path` (replacing an old one).

    Atomic for readers; two writers of one path at once must be serialised by the caller.

    Args:
        path: the final directory path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ensure_settings(path: str | Path, settings: Mapping[str, Any], *, ignore: Collection[str] = (),
                    write: bool = True) -> None:
    """Record how a folder's contents are made, or refuse to add to a folder made differently.

    When `path` (a JSON file) exists, every key of either record except `ignore` must have the same value, else a
    ConfigError names the keys that differ; when it does not exist it is written (atomically) if `write`.

    Args:
        path: the settings file, e.g. OUT/manifest.json.
        settings: JSON-able description of what is written there.
        ignore: keys that may differ (e.g. where a model was loaded from).
        write: False on ranks that must not write.
    """
    path = Path(path)
    settings = json.loads(json.dumps(settings))  # the form it has on disk (tuples -> lists)
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in old.keys() | settings.keys() if k not in ignore and old.get(k) != settings.get(k))
        if diff:
            shown = "; ".join(f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now" for k in diff[:3])
            raise ConfigError(f"{path.parent} holds outputs made with other settings ({shown}); use another "
                              f"folder, or the settings in {path.name}")
    elif write:
        with atomic_write(path) as f:
            json.dump(settings, f, indent=2)
            f.write("\n")


def json_digest(value: Any) -> str:
    """A short fingerprint of a JSON-able value (sha1 of its canonical text): what a resumable output records of the
    inputs it was made from, so that other inputs are refused rather than mixed in."""
    return hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """A short fingerprint of a file's bytes (sha1)."""
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()[:16]


def resume_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The complete rows of a jsonl file that a run appends to, the file rewritten (atomically) to hold just them: a
    line cut by an interruption, and anything after it, is dropped, so appending can go on. [] when it is missing."""
    path = Path(path)
    rows: list[dict[str, Any]] = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
        with atomic_write(path) as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows
