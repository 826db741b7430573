"""``make_imagefolder_shards`` and ``scale-ssl make-shards imagefolder`` on a real image folder:
Fashion-MNIST JPEGs and crops of a real photograph, one PNG named .JPEG, one unreadable file."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torchvision

from scale_ssl.data import ShardedImageStream, ShardIndex, make_imagefolder_shards
from tests._data_images import make_image_folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder") / "src"
    return root, make_image_folder(root)


def read_members(shard_dir: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in ShardIndex.load(shard_dir).shards:
        with tarfile.open(shard_dir / shard.name) as tar:
            for member in tar.getmembers():
                key, extension = member.name.rsplit(".", 1)
                samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return samples


def test_original_bytes_labels_and_stable_keys_and_unreadable_files_skipped(image_folder, tmp_path):
    root, made = image_folder
    result = make_imagefolder_shards(root, tmp_path / "shards", shard_size=9)
    index = result.index
    reference = torchvision.datasets.ImageFolder(str(root))  # the labels an ImageFolder gives

    assert index.classes == reference.classes
    assert [path for path, _ in result.skipped] == [str(p) for p in made["unreadable"]]
    assert "broken.jpg" in result.skipped[0][0] and "OSError" in result.skipped[0][1]
    assert index.num_samples == len(made["images"]) == len(reference.samples) - 1
    assert [s.num_samples for s in index.shards] == [9] * (index.num_samples // 9) + (
        [index.num_samples % 9] if index.num_samples % 9 else []
    )
    assert index.image_key == "jpg" and result.formats == {"jpg": len(made["images"]) - 1, "png": 1}
    assert "1 unreadable, skipped" in index.source

    members = read_members(tmp_path / "shards")
    labels = {path: label for path, label in reference.samples}
    for path, data in made["images"].items():
        relative = os.path.relpath(path, root)
        key = os.path.splitext(relative)[0].replace(".", "_")  # dots are not allowed in keys
        extension = "png" if path == made["png_named_jpeg"] else "jpg"
        assert members[key] == {extension: data, "cls": str(labels[str(path)]).encode()}, relative

    # The same tree packs to the same keys and bytes in the same shards, with or without workers.
    again = make_imagefolder_shards(root, tmp_path / "again", shard_size=9, workers=2)
    assert [s.num_samples for s in again.index.shards] == [s.num_samples for s in index.shards]
    assert read_members(tmp_path / "again") == members
    for shard, other in zip(index.shards, again.index.shards):
        with tarfile.open(tmp_path / "shards" / shard.name) as mine, tarfile.open(tmp_path / "again" / other.name) as theirs:
            assert mine.getnames() == theirs.getnames()

    # The stream reads them (the PNG too, though the index's image_key is jpg).
    stream = ShardedImageStream(tmp_path / "shards", 4, _size_of, rank=0, world_size=1, shuffle_shards=False,
                                return_keys=True)
    sizes = {key: size for sizes_, _, keys in stream for size, key in zip(sizes_.tolist(), keys)}
    assert stream.epoch_stats()["corrupt_skipped"] == 0
    assert sizes.get("photo/really_a_png", [60, 70]) == [60, 70]


def _size_of(image):
    import torch

    return torch.tensor(image.size)


def test_max_shard_bytes_and_refusal_to_overwrite(image_folder, tmp_path):
    root, made = image_folder
    limit = 40_000
    index = make_imagefolder_shards(root, tmp_path / "s", shard_size=1000, max_shard_bytes=limit).index
    assert len(index.shards) > 1
    largest_photo = max(len(data) for data in made["images"].values())
    for shard in index.shards:
        # members within the limit, plus the tar's end blocks and record padding
        assert shard.bytes <= max(limit, largest_photo + 2048) + 10240
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_imagefolder_shards(root, tmp_path / "s", shard_size=10)
    assert make_imagefolder_shards(root, tmp_path / "s", shard_size=10, overwrite=True).index.num_shards > 1


@pytest.mark.timeout(120)
def test_cli_make_shards_imagefolder_reports_skipped_files(image_folder, tmp_path, capsys):
    root, made = image_folder
    out = tmp_path / "cli"
    command = [sys.executable, "-m", "scale_ssl", "make-shards", "imagefolder", str(root), "--out", str(out),
               "--shard-size", "16", "--workers", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr
    assert f"skipped unreadable image {made['unreadable'][0]}" in done.stdout
    assert f"{len(made['images'])} images in" in done.stdout and "1 unreadable image(s) skipped" in done.stdout
    assert ShardIndex.load(out).num_samples == len(made["images"])
    # The refusals, in this process (a console-script start costs a torch import).
    from scale_ssl.cli.main import main

    assert main(command[3:]) == 2 and "overwrite" in capsys.readouterr().err
    assert main(command[3:5] + ["--out", str(tmp_path / "x")]) == 2
    assert "needs SRC_DIR" in capsys.readouterr().err
