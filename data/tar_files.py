"""Webdataset tar files, read and written without `tarfile`'s per-member cost: the member table from the headers
alone (`scan_tar`), a member's bytes by offset (`read_exactly`), a sample's key and its json metadata, and writing
a shard (`write_tar_shard`). Both shard readers (data/images.py's scanning one, data/shards.py's indexed one) and the
shard writers use these.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

from common.files import write_atomic


def _tar_number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _pax_records(data: bytes) -> dict[str, str]:
    records, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def scan_tar(path: str) -> list[tuple[str, int, int]]:
    """(member path, data offset, size) of every regular file in an uncompressed tar, reading headers only.

    Handles ustar prefixes, GNU long names and pax path/size records; much faster than `tarfile` per member.

    Args:
        path: the .tar file.
    """
    members, offset, long_name, pax = [], 0, None, {}
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        while True:
            f.seek(offset)
            header = f.read(512)
            if not header or header.count(0) == len(header) == 512:
                break
            if len(header) < 512:
                raise ValueError(f"not an uncompressed tar file, or truncated (at byte {offset}): {path}")
            try:
                valid = _tar_number(header[148:156]) == sum(header) - sum(header[148:156]) + 8 * 32
            except ValueError:
                valid = False
            if not valid:
                raise ValueError(f"not an uncompressed tar file, or corrupt (bad header at byte {offset}): {path}")
            kind = header[156:157]
            size = int(pax.get("size", _tar_number(header[124:136])))
            data = offset + 512
            offset = data + (size + 511) // 512 * 512
            if data + size > file_size:
                raise ValueError(f"truncated tar file (a member ends past the end of the file): {path}")
            if kind in (b"L", b"x"):
                f.seek(data)
                payload = f.read(size)
                if kind == b"L":
                    long_name = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                else:
                    pax = _pax_records(payload)
                continue
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if header[257:263] == b"ustar\0" and header[345]:
                name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
            name = pax.get("path", long_name or name)
            long_name, pax = None, {}
            if kind in (b"0", b"\0", b"7"):
                members.append((name, data, size))
    return members


def split_key(member: str) -> tuple[str, str]:
    """Webdataset key and extension: "a/b/0001.seg.png" -> ("a/b/0001", "seg.png")."""
    folder, _, base = member.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def read_exactly(fd: int, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` of an open file, by pread (no shared file offset, so descriptors inherited by forked
    workers or shared by threads stay correct); a short read is an OSError."""
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise OSError(f"short read ({len(data)} of {size} bytes)")
    return data


def member_meta(data: bytes | None) -> dict[str, Any]:
    """A sample's metadata from its "json" member (None: no member): the object, or {"json": value} for another
    JSON value; invalid JSON is a ValueError (the sample is skipped)."""
    if data is None:
        return {}
    try:
        meta = json.loads(data)
    except json.JSONDecodeError as err:
        raise ValueError(f"bad json member ({err.msg})") from None
    return meta if isinstance(meta, dict) else {"json": meta}


def write_tar_shard(path: str | Path, members: list[tuple[str, bytes]]) -> None:
    """Write one webdataset tar shard atomically: `members` (name, bytes) in order, ustar headers with mtime 0 (the
    same members give the same bytes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    write_atomic(path, buf.getvalue())
