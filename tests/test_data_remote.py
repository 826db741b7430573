"""Shards over the network and through commands: a real HTTP server on 127.0.0.1 (Python's
``http.server``, and a deliberately flaky one), ``pipe:cat`` as the local stand-in for any
``pipe:`` command, and how location strings resolve (object stores are tested against real
servers in ``test_data_object_stores.py``)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from scale_ssl.data import ShardedImageStream, ShardSourceError, resolve_location
from tests._dist_workers_data import pixels_as_tensor, write_uneven_shards

SHARD_SIZES = [9, 14, 6, 11]
BATCH = 4
REPO = Path(__file__).resolve().parents[1]


@contextmanager
def http_server(directory: Path, flaky: bool = False, module: str | None = None):
    """A real HTTP server process serving ``directory``; yields its base URL; stopped by PID.
    ``module``: a test server module run as ``python -m module DIRECTORY`` instead."""
    if flaky or module:
        command = [sys.executable, "-u", "-m", module or "tests._flaky_http_server", str(directory)]
    else:
        command = [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(directory)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = process.stdout.readline()  # both print their port once listening
        port = re.search(r"port (\d+)", line)
        assert port, f"the HTTP server did not start: {line!r}"
        yield f"http://127.0.0.1:{port.group(1)}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    write_uneven_shards(root / "shards", SHARD_SIZES, image_size=5)
    return root


def epoch_batches(source, **options):
    options = {"rank": 0, "world_size": 1, "seed": 2, "shuffle_buffer": 10, "return_keys": True, **options}
    stream = ShardedImageStream(source, BATCH, pixels_as_tensor, **options)
    stream.set_epoch(1)
    return [(images, labels, keys) for images, labels, keys in stream], stream


def assert_same(batches, reference):
    assert len(batches) == len(reference) > 0
    for (images, labels, keys), (ref_images, ref_labels, ref_keys) in zip(batches, reference):
        assert keys == ref_keys and torch.equal(labels, ref_labels) and torch.equal(images, ref_images)


@pytest.mark.timeout(120)
def test_http_shards_stream_exactly_like_local_ones_and_a_404_names_the_shard(served, tmp_path):
    local, _ = epoch_batches(served / "shards", num_workers=1)
    with http_server(served) as base:
        over_http, stream = epoch_batches(f"{base}/shards", num_workers=1)
        assert_same(over_http, local)
        assert stream.location == f"{base}/shards"
        assert_same(epoch_batches(f"{base}/shards/shards.json")[0], local)

    # A shard missing on the server: the index still lists it, the error names its URL.
    partial = tmp_path / "partial"
    shutil.copytree(served / "shards", partial / "shards")
    (partial / "shards" / "part-001.tar").unlink()
    with http_server(partial) as base:
        stream = ShardedImageStream(f"{base}/shards", BATCH, pixels_as_tensor, rank=0, world_size=1,
                                    shuffle_shards=False, retry_delay=0.01)
        with pytest.raises(ShardSourceError, match=rf"cannot read {base}/shards/part-001\.tar \(not retried\): HTTP 404"):
            list(stream)
        with pytest.raises(ShardSourceError, match=rf"{base}/nowhere/shards\.json .*HTTP 404"):
            ShardedImageStream(f"{base}/nowhere", BATCH, pixels_as_tensor, retry_delay=0.01)


@pytest.mark.timeout(120)
def test_transient_http_failures_are_retried_without_repeating_samples(served, tmp_path):
    local, _ = epoch_batches(served / "shards", shuffle_shards=False)
    flaky_root = tmp_path / "flaky"
    shutil.copytree(served / "shards", flaky_root / "shards")
    with http_server(flaky_root, flaky=True) as base:
        batches, _ = epoch_batches(f"{base}/shards", shuffle_shards=False, retry_delay=0.01)
    assert_same(batches, local)
    requests = (flaky_root / "requests.log").read_text().split("\n")
    # every shard: a 503, then a transfer cut in half (resumed after the samples already read), then OK
    assert "/shards/part-000.tar 3" in requests and "/shards/shards.json 2" in requests

    with http_server(flaky_root, flaky=True) as base:
        with pytest.raises(ShardSourceError, match=r"shards\.json after 1 attempt\(s\): HTTP 503"):
            ShardedImageStream(f"{base}/shards", BATCH, pixels_as_tensor, retries=0)


@pytest.mark.timeout(60)
def test_pipe_commands_stream_like_local_files_and_a_failing_command_is_named(served):
    local, _ = epoch_batches(served / "shards")
    assert_same(epoch_batches(f"pipe:cat {served}/shards/{{name}}")[0], local)
    with pytest.raises(ShardSourceError, match=r"command 'cat /nonexistent/shards\.json' exited with status 1"):
        ShardedImageStream("pipe:cat /nonexistent/{name}", BATCH, pixels_as_tensor, retries=1, retry_delay=0.01)
    with pytest.raises(ValueError, match=r"must contain \{name\}"):
        resolve_location("pipe:cat /data/shards.json")


def test_location_forms_resolve_to_places_shards_and_urls():
    s3 = resolve_location("s3://my-bucket/imagenet train/shards.json")
    assert (s3.kind, s3.base, s3.index_name) == ("s3", "s3://my-bucket/imagenet train", "shards.json")
    assert s3.url("shard-000001.tar") == "s3://my-bucket/imagenet train/shard-000001.tar"
    gs = resolve_location("gs://bucket/in1k/")
    assert gs.url("shard-000001.tar") == "gs://bucket/in1k/shard-000001.tar" and gs.patterns is None
    assert resolve_location("https://h/x/").url("a b.tar") == "https://h/x/a%20b.tar"
    braces = resolve_location("https://h/in1k/train-{000..002}.tar")
    assert (braces.base, braces.patterns) == ("https://h/in1k", ("train-000.tar", "train-001.tar", "train-002.tar"))
    nested = resolve_location("/data/{train,val}/s-{0..1}.tar")
    assert nested.base == "/data" and nested.patterns == ("train/s-0.tar", "train/s-1.tar", "val/s-0.tar", "val/s-1.tar")
    globbed = resolve_location("s3://b/laion/part-*/*.tar")
    assert (globbed.base, globbed.patterns) == ("s3://b/laion", ("part-*/*.tar",))
    index_file = resolve_location("/data/indexes/in1k-train.json")
    assert (index_file.base, index_file.index_name) == ("/data/indexes", "in1k-train.json")
    assert resolve_location("pipe:curl -sf 'https://h/a b/{name}'").url("s.tar") == "pipe:curl -sf 'https://h/a b/s.tar'"
    with pytest.raises(ValueError, match="unsupported shard location scheme 'ftp'"):
        resolve_location("ftp://h/x")
    with pytest.raises(ValueError, match="globs do not work there"):
        resolve_location("https://h/x/*.tar")
    with pytest.raises(ValueError, match="names no bucket"):
        resolve_location("s3:///x")
