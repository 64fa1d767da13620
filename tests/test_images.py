"""Image datasets over the three on-disk formats: the same images give the same tensors in every format, corrupt
files give None and are counted, random crops are reproducible for (seed, epoch, index), and DataLoader workers
(forked, persistent) return what the main process returns."""

import io
import json
import logging
import pickle
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from data.images import (
    ImageFolderDataset,
    JsonlImageDataset,
    TarShardDataset,
    build_image_dataset,
    collate_images,
)
from data.tar_files import scan_tar, split_key
from data.transforms import ImageTransform


def _png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _images() -> dict[str, bytes]:
    """name -> encoded bytes: several modes and formats, one truncated PNG, one random-bytes JPEG."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (24, 24, 4), dtype=np.uint8), mode="RGBA")
    grey = Image.fromarray(rng.integers(0, 256, (40, 50), dtype=np.uint8), mode="L")
    palette = rgb.convert("P", palette=Image.ADAPTIVE, colors=16)
    good = _png_bytes(rgb)
    return {
        "a_rgb.png": good,
        "b_rgba.png": _png_bytes(rgba),
        "c_grey.jpg": _png_bytes(grey, "JPEG"),
        "d_palette.png": _png_bytes(palette),
        "e_cmyk.jpg": _png_bytes(rgb.convert("CMYK"), "JPEG"),
        "f_rgb.webp": _png_bytes(rgb, "WEBP"),
        "g_rgb.bmp": _png_bytes(rgb, "BMP"),
        "h_truncated.png": good[: len(good) // 2],
        "i_random.jpg": rng.integers(0, 256, 500, dtype=np.uint8).tobytes(),
    }


TAR_NAMES = [n for n in _images() if not n.endswith(".bmp")]  # webdataset images are png/jpg/jpeg/webp
CORRUPT = {"h_truncated.png", "i_random.jpg"}


def _caption(name: str) -> str:
    return f"a photo of {name.split('.')[0]}"


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    """The same images as a folder, a jsonl list and two tar shards."""
    root = tmp_path_factory.mktemp("formats")
    images = _images()
    folder = root / "folder"
    (folder / "sub").mkdir(parents=True)
    for name, data in images.items():
        (folder / ("sub" if name.startswith("d") else "") / name).write_bytes(data)
    (folder / "notes.txt").write_text("not an image")

    jsonl = root / "list" / "data.jsonl"
    jsonl.parent.mkdir()
    lines = []
    for i, name in enumerate(TAR_NAMES):
        path = folder / ("sub" if name.startswith("d") else "") / name
        image = str(path) if i % 2 else "../" + path.relative_to(root).as_posix()  # absolute or relative
        key = "caption" if i % 3 else "text"
        lines.append(json.dumps({"image": image, key: _caption(name), "source": "test", "id": i}))
    jsonl.write_text("\n".join(lines) + "\n\n")

    shards = root / "shards"
    shards.mkdir()
    for shard_id, names in enumerate([TAR_NAMES[:4], TAR_NAMES[4:]]):
        with tarfile.open(shards / f"shard-{shard_id:05d}.tar", "w", format=tarfile.GNU_FORMAT) as tar:
            for name in names:
                key, ext = name.split(".")
                members = {ext: images[name], "txt": _caption(name).encode(), "json": json.dumps({"name": name}).encode()}
                for suffix, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo("zz_no_image.txt")  # a sample without an image is skipped
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
    return {"root": root, "folder": folder, "jsonl": jsonl, "shards": shards}


def _by_name(dataset, key) -> dict[str, dict]:
    return {key(s): s for s in (dataset[i] for i in range(len(dataset))) if s is not None}


def test_folder_lists_images_recursively_sorted(formats):
    dataset = ImageFolderDataset(formats["folder"], ImageTransform(16))
    paths = [dataset.paths[i] for i in range(len(dataset))]
    assert paths == sorted(paths) and len(paths) == len(_images())
    assert "sub/d_palette.png" in paths and "notes.txt" not in paths
    sample = dataset[0]
    assert sample["caption"] == "" and sample["meta"] == {"path": "a_rgb.png"} and sample["index"] == 0


def test_folder_extension_is_case_insensitive(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "UPPER.PNG")
    Image.new("RGB", (8, 8)).save(tmp_path / "mixed.JpEg", format="JPEG")
    assert len(ImageFolderDataset(tmp_path)) == 2


def test_jsonl_captions_and_metadata(formats):
    dataset = JsonlImageDataset(formats["jsonl"], ImageTransform(16))
    assert len(dataset) == len(TAR_NAMES)
    for i in range(len(dataset)):
        sample = dataset[i]
        if TAR_NAMES[i] in CORRUPT:
            assert sample is None
            continue
        assert sample["caption"] == _caption(TAR_NAMES[i])
        assert sample["meta"] == {"source": "test", "id": i}


def test_jsonl_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png"}\n{"caption": "no image"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        JsonlImageDataset(bad)
    bad.write_text('{"image": "a.png"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        JsonlImageDataset(bad)


def test_tar_captions_metadata_and_skipped_samples(formats, caplog):
    dataset = TarShardDataset(formats["shards"], ImageTransform(16))
    assert len(dataset) == len(TAR_NAMES)  # the image-less sample in each shard is not counted
    samples = _by_name(dataset, lambda s: s["meta"]["name"])
    assert set(samples) == set(TAR_NAMES) - CORRUPT
    for name, sample in samples.items():
        assert sample["caption"] == _caption(name)
        assert sample["meta"]["__key__"] == name.split(".")[0]
        assert sample["meta"]["__shard__"].endswith(".tar")


def test_same_images_give_identical_tensors_in_every_format(formats):
    transform = ImageTransform(16, mode="center")
    folder = _by_name(ImageFolderDataset(formats["folder"], transform), lambda s: s["meta"]["path"].split("/")[-1])
    jsonl = _by_name(JsonlImageDataset(formats["jsonl"], transform), lambda s: TAR_NAMES[s["index"]])
    tar = _by_name(TarShardDataset(formats["shards"], transform), lambda s: s["meta"]["name"])
    assert set(jsonl) == set(tar) == set(TAR_NAMES) - CORRUPT
    for name in tar:
        x = tar[name]["pixel_values"]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
        assert torch.equal(x, folder[name]["pixel_values"]) and torch.equal(x, jsonl[name]["pixel_values"])


def test_non_rgb_images_are_converted(formats):
    dataset = ImageFolderDataset(formats["folder"])  # no transform: native size
    rgba = next(dataset[i] for i in range(len(dataset)) if dataset.paths[i] == "b_rgba.png")
    raw = np.array(Image.open(formats["folder"] / "b_rgba.png")).astype(np.float64)
    alpha = raw[..., 3:] / 255
    expected = raw[..., :3] * alpha + 255 * (1 - alpha)  # composited on white
    got = (rgba["pixel_values"].permute(1, 2, 0).numpy() + 1) * 127.5
    assert np.abs(got - expected).max() <= 1.01


def test_corrupt_images_return_none_and_are_counted(formats, caplog):
    dataset = ImageFolderDataset(formats["folder"], ImageTransform(16))
    with caplog.at_level(logging.WARNING, logger="data.images"):
        samples = [dataset[i] for i in range(len(dataset))]
    corrupt = [dataset.paths[i] for i, s in enumerate(samples) if s is None]
    assert sorted(corrupt) == sorted(CORRUPT)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and all("\n" not in w for w in warnings)
    assert any("h_truncated.png" in w for w in warnings) and any("i_random.jpg" in w for w in warnings)

    batch = collate_images(samples)
    assert batch["skipped"] == 2
    assert batch["pixel_values"].shape == (len(samples) - 2, 3, 16, 16)
    assert batch["indices"].tolist() == [i for i, s in enumerate(samples) if s is not None]
    assert batch["captions"] == [""] * (len(samples) - 2)
    empty = collate_images([None, None])
    assert empty["skipped"] == 2 and empty["pixel_values"].shape[0] == 0


def test_random_crops_depend_only_on_seed_epoch_index(formats):
    transform = ImageTransform(16, mode="random", hflip=True)
    first, second = TarShardDataset(formats["shards"], transform, seed=5), TarShardDataset(formats["shards"], transform, seed=5)
    other_seed = TarShardDataset(formats["shards"], transform, seed=6)
    valid = [i for i, name in enumerate(TAR_NAMES) if name not in CORRUPT]
    for i in valid:
        assert torch.equal(first[i]["pixel_values"], second[i]["pixel_values"])
    assert any(not torch.equal(first[i]["pixel_values"], other_seed[i]["pixel_values"]) for i in valid)
    index = TAR_NAMES.index("c_grey.jpg")
    epochs = []
    for epoch in range(4):
        first.set_epoch(epoch)
        epochs.append(first[index]["pixel_values"])
    first.set_epoch(2)
    assert torch.equal(first[index]["pixel_values"], epochs[2])
    assert len({e.sum().item() for e in epochs}) > 1


def _loader_batches(dataset, num_workers, epochs, persistent=False):
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=num_workers, collate_fn=collate_images,
                                         persistent_workers=persistent, multiprocessing_context="fork" if num_workers else None)
    out = []
    for epoch in epochs:
        dataset.set_epoch(epoch)
        out.append([(b["pixel_values"], b["indices"], b["skipped"]) for b in loader])
    return out


def test_dataloader_workers_match_main_process(formats):
    dataset = TarShardDataset(formats["shards"], ImageTransform(16, mode="random"), seed=1)
    main = _loader_batches(dataset, 0, epochs=[0, 1])
    workers = _loader_batches(dataset, 2, epochs=[0, 1], persistent=True)  # set_epoch must reach live workers
    assert main[0][0][0].shape[1:] == (3, 16, 16)
    for main_epoch, worker_epoch in zip(main, workers):
        assert len(main_epoch) == len(worker_epoch)
        for (x0, i0, s0), (x1, i1, s1) in zip(main_epoch, worker_epoch):
            assert torch.equal(x0, x1) and torch.equal(i0, i1) and s0 == s1
    assert sum(s for _, _, s in main[0]) == 2
    assert not torch.equal(main[0][0][0], main[1][0][0])


def test_tar_dataset_pickles_for_spawned_workers(formats):
    dataset = TarShardDataset(formats["shards"], ImageTransform(16))
    before = dataset[0]["pixel_values"]  # opens a file descriptor, which must not travel
    clone = pickle.loads(pickle.dumps(dataset))
    assert len(clone._files) == 0 and torch.equal(clone[0]["pixel_values"], before)


LONG_NAMES = ["short.png", "deep/" * 30 + "long.txt", "ünïcode/ß.json", "a" * 150 + ".png"]
USTAR_NAMES = ["short.png", "deep/" * 30 + "long.txt", "x/" * 60 + "y.png"]  # long paths use the prefix field


@pytest.mark.parametrize(("fmt", "names"), [(tarfile.GNU_FORMAT, LONG_NAMES), (tarfile.PAX_FORMAT, LONG_NAMES),
                                            (tarfile.USTAR_FORMAT, USTAR_NAMES)])
def test_scan_tar_agrees_with_tarfile(tmp_path, fmt, names):
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = 10 + 700 * i
            tar.addfile(info, io.BytesIO(bytes(info.size)))
    with tarfile.open(path) as tar:
        expected = [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
    assert scan_tar(str(path)) == expected


def test_scan_tar_rejects_compressed_tar(tmp_path):
    path = tmp_path / "c.tar"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("a.png")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(ValueError, match="not an uncompressed tar"):
        scan_tar(str(path))


def test_split_key_follows_webdataset():
    assert split_key("dir/sub/0001.seg.png") == ("dir/sub/0001", "seg.png")
    assert split_key("0001.JPG") == ("0001", "jpg")


def test_build_dispatches_on_the_path(formats):
    transform = ImageTransform(16)
    assert isinstance(build_image_dataset(formats["shards"], transform), TarShardDataset)
    assert isinstance(build_image_dataset(str(formats["jsonl"]), transform), JsonlImageDataset)
    assert isinstance(build_image_dataset(formats["folder"], transform), ImageFolderDataset)
    shard_paths = sorted(str(p) for p in formats["shards"].glob("*.tar"))
    assert len(build_image_dataset(str(formats["shards"] / "*.tar"), transform)) == len(TAR_NAMES)
    assert len(build_image_dataset(shard_paths[:1], transform)) == 4
    assert len(build_image_dataset(shard_paths[1], transform)) == len(TAR_NAMES) - 4
    spec = build_image_dataset({"kind": "jsonl", "path": str(formats["jsonl"])}, transform)
    assert isinstance(spec, JsonlImageDataset)


def test_build_forced_kind_and_errors(formats, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(formats["shards"], mixed)
    (mixed / "extra.png").write_bytes(_images()["a_rgb.png"])
    assert isinstance(build_image_dataset(mixed), TarShardDataset)
    forced = build_image_dataset(f"folder:{mixed}")
    assert isinstance(forced, ImageFolderDataset) and len(forced) == 1
    with pytest.raises(FileNotFoundError, match="not found"):
        build_image_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        build_image_dataset(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown dataset kind 'parquet'"):
        build_image_dataset(f"parquet:{mixed}")
    with pytest.raises(ValueError, match="'path'"):
        build_image_dataset({"kind": "tar"})
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        build_image_dataset(str(tmp_path / "nothing-*.tar"))
