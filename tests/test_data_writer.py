"""Shard writer, shard index and Fashion-MNIST reader, on real files.

The tars are read back with the standard library's ``tarfile`` (not webdataset), so the tests
check what any reader of the files would see.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from scale_ssl.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    ShardIndex,
    load_fashion_mnist,
    make_fashion_mnist_shards,
    read_idx,
    write_image_shards,
)

CLASSES = ["zero", "one", "two"]


def make_samples(count, start=0):
    rng = np.random.default_rng(start)
    for i in range(start, start + count):
        pixels = rng.integers(0, 256, (5, 7), dtype=np.uint8)
        yield f"img-{i:05d}", PIL.Image.fromarray(pixels), i % len(CLASSES)


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} of a tar, read with the standard library."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, extension = member.name.split(".", 1)
            samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return samples


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_uneven_shards_match_their_index_and_the_staging_dir_is_gone(tmp_path):
    out = tmp_path / "shards"
    index = write_image_shards(make_samples(23), out, shard_size=5, classes=CLASSES, source="unit test")

    assert [s.name for s in index.shards] == [f"shard-{i:06d}.tar" for i in range(5)]
    assert [s.num_samples for s in index.shards] == [5, 5, 5, 5, 3]
    assert index.num_samples == 23 and index.image_key == "png" and index.classes == CLASSES
    assert sorted(p.name for p in out.iterdir()) == sorted([s.name for s in index.shards] + ["shards.json"])
    assert leftovers(tmp_path) == []

    expected = {key: (image, label) for key, image, label in make_samples(23)}
    read_back = {}
    for shard, url in zip(index.shards, index.urls()):
        assert Path(url).stat().st_size == shard.bytes
        samples = read_tar(Path(url))
        assert len(samples) == shard.num_samples
        read_back.update(samples)
    assert sorted(read_back) == sorted(expected)
    for key, members in read_back.items():
        assert set(members) == {"png", "cls"}
        image, label = expected[key]
        assert int(members["cls"]) == label
        assert np.array_equal(np.array(PIL.Image.open(io.BytesIO(members["png"]))), np.array(image))

    loaded = ShardIndex.load(out)
    assert loaded == index and loaded.source == "unit test"
    assert ShardIndex.load(out / "shards.json").urls() == index.urls()


def test_encoded_bytes_are_stored_unchanged(tmp_path):
    buffer = io.BytesIO()
    PIL.Image.new("L", (3, 3), 200).save(buffer, format="PNG")
    write_image_shards([("only", buffer.getvalue(), 2)], tmp_path / "s", shard_size=10, classes=CLASSES)
    assert read_tar(tmp_path / "s" / "shard-000000.tar")["only"] == {"png": buffer.getvalue(), "cls": b"2"}


def test_refuses_to_overwrite_unless_asked(tmp_path):
    out = tmp_path / "shards"
    write_image_shards(make_samples(4), out, shard_size=3, classes=CLASSES)
    with pytest.raises(FileExistsError, match="overwrite=True") as error:
        write_image_shards(make_samples(6), out, shard_size=3, classes=CLASSES)
    assert str(out) in str(error.value)
    assert ShardIndex.load(out).num_samples == 4  # untouched

    write_image_shards(make_samples(6, start=100), out, shard_size=3, classes=CLASSES, overwrite=True)
    assert ShardIndex.load(out).num_samples == 6
    assert set(read_tar(out / "shard-000000.tar")) == {"img-00100", "img-00101", "img-00102"}
    assert leftovers(tmp_path) == []

    precious = tmp_path / "not-shards"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a shard directory"):
        write_image_shards(make_samples(2), precious, shard_size=3, classes=CLASSES, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_a_failure_midway_leaves_neither_out_dir_nor_staging(tmp_path):
    def samples_with_a_bad_label():
        yield from make_samples(7)
        yield "bad", PIL.Image.new("L", (5, 7)), 3  # only 3 classes: labels 0..2

    with pytest.raises(ValueError, match="label 3 is outside 0..2"):
        write_image_shards(samples_with_a_bad_label(), tmp_path / "shards", shard_size=3, classes=CLASSES)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "samples, error",
    [
        ([("a.b", PIL.Image.new("L", (2, 2)), 0)], "without '.'"),
        ([("a", PIL.Image.new("L", (2, 2)), 0), ("a", PIL.Image.new("L", (2, 2)), 1)], "already used"),
        ([], "samples is empty"),
    ],
)
def test_bad_samples_are_named(tmp_path, samples, error):
    with pytest.raises(ValueError, match=error):
        write_image_shards(samples, tmp_path / "s", shard_size=2, classes=CLASSES)
    assert list(tmp_path.iterdir()) == []


def test_index_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no shards.json"):
        ShardIndex.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ShardIndex.load(tmp_path / "nowhere")

    out = tmp_path / "shards"
    write_image_shards(make_samples(6), out, shard_size=2, classes=CLASSES)
    index_file = out / "shards.json"
    good = json.loads(index_file.read_text())

    index_file.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ShardIndex.load(out)
    index_file.write_text(json.dumps({**good, "num_samples": 7}))
    with pytest.raises(ValueError, match="malformed: num_samples is 7 but the shards hold 6"):
        ShardIndex.load(out)
    index_file.write_text(json.dumps({**good, "shards": [{"name": "x.tar"}]}))
    with pytest.raises(ValueError, match=r"malformed: shards\[0\]"):
        ShardIndex.load(out)

    index_file.write_text(json.dumps(good))
    (out / "shard-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match="shard-000001.tar"):
        ShardIndex.load(out)


def test_read_idx_rejects_a_wrong_magic_number_and_a_truncated_file(tmp_path):
    bad_magic = tmp_path / "bad-idx1-ubyte.gz"
    bad_magic.write_bytes(gzip.compress(b"\x01\x02\x08\x01" + b"\x00" * 8))
    with pytest.raises(ValueError, match="is not an IDX file"):
        read_idx(bad_magic)
    truncated = tmp_path / "short-idx1-ubyte.gz"
    truncated.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x05" + b"\x01\x02"))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(truncated)
    fine = tmp_path / "fine-idx2-ubyte.gz"
    fine.write_bytes(gzip.compress(b"\x00\x00\x08\x02\x00\x00\x00\x02\x00\x00\x00\x03" + bytes(range(6))))
    assert read_idx(fine).tolist() == [[0, 1, 2], [3, 4, 5]]


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path / "absent")
    with pytest.raises(ValueError, match="split must be one of"):
        load_fashion_mnist("validation")


needs_fashion_mnist = pytest.mark.skipif(
    not Path(FASHION_MNIST_ROOT).is_dir(),
    reason="Fashion-MNIST is not installed: apt-get install -y dataset-fashion-mnist",
)


@needs_fashion_mnist
def test_fashion_mnist_shards_round_trip_pixel_exact(tmp_path):
    indexes = make_fashion_mnist_shards(tmp_path / "fmnist", shard_size=7, limit=30)
    assert set(indexes) == {"train", "test"}
    for split, index in indexes.items():
        images, labels = load_fashion_mnist(split)
        assert images.shape[1:] == (28, 28) and images.dtype == np.uint8 and labels.dtype == np.int64
        assert index.num_samples == 30 and [s.num_samples for s in index.shards] == [7, 7, 7, 7, 2]
        assert index.classes == list(FASHION_MNIST_CLASSES)
        assert index.directory == tmp_path / "fmnist" / split
        read_back = {}
        for url in ShardIndex.load(index.directory).urls():
            read_back.update(read_tar(Path(url)))
        assert sorted(read_back) == [f"fmnist-{split}-{i:06d}" for i in range(30)]
        for i in range(30):
            members = read_back[f"fmnist-{split}-{i:06d}"]
            decoded = PIL.Image.open(io.BytesIO(members["png"]))
            assert decoded.mode == "L"
            assert np.array_equal(np.array(decoded), images[i])
            assert int(members["cls"]) == labels[i]
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_fashion_mnist_shards(tmp_path / "fmnist", limit=3)


@needs_fashion_mnist
def test_fashion_mnist_has_the_documented_size():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert sorted(set(labels.tolist())) == list(range(10))
