"""Shards in object stores through their client libraries, against real servers on 127.0.0.1
(moto's S3 server for boto3, gcp-storage-emulator for google-cloud-storage; both started by the
test and stopped by PID), an HTTP server that honours range requests, and ``pipe:`` commands run
without a shell."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scale_ssl.data import ShardedImageStream, ShardSourceError, ShardTruncatedError, resolve_location
from scale_ssl.data.shard_source import _open, iter_shard_samples, load_index
from tests._dist_workers_data import pixels_as_tensor
from tests._object_stores import gcs_server, gcs_upload, s3_server, s3_upload
from tests._own_shards import USER_SHARD_SIZES, write_user_shards

REPO = Path(__file__).resolve().parents[1]
BATCH = 4


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    from scale_ssl.cli.main import main

    directory = tmp_path_factory.mktemp("stores") / "shards"
    keys = write_user_shards(directory, labels="cls")
    reference = tmp_path_factory.mktemp("stores") / "indexed"
    reference.mkdir(exist_ok=True)
    for path in directory.iterdir():
        (reference / path.name).write_bytes(path.read_bytes())
    assert main(["index-shards", str(reference)]) == 0  # the pipe: test needs an index it can cat
    return directory, keys, reference


@pytest.fixture
def environ(monkeypatch):
    """Set a server's variables in this process (the stream's DataLoader workers inherit them)."""
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "STORAGE_EMULATOR_HOST"):
        monkeypatch.delenv(name, raising=False)

    def apply(env: dict):
        for name, value in env.items():
            monkeypatch.setenv(name, value)

    return apply


def batches(source, rank=0, world=1, workers=1, **options):
    stream = ShardedImageStream(source, BATCH, pixels_as_tensor, rank=rank, world_size=world, num_workers=workers,
                                seed=4, shuffle_buffer=16, return_keys=True, **options)
    stream.set_epoch(1)
    return [(images, labels, keys) for images, labels, keys in stream], stream


def assert_same(got, reference):
    assert len(got) == len(reference) > 0
    for (images, labels, keys), (ref_images, ref_labels, ref_keys) in zip(got, reference):
        assert keys == ref_keys and torch.equal(labels, ref_labels) and torch.equal(images, ref_images)


@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_s3_shards_index_and_stream_like_local_ones_through_boto3(own, tmp_path, environ):
    from scale_ssl.cli.main import main

    directory, keys, _ = own
    local_index = tmp_path / "local"
    (local_index).mkdir()
    with s3_server() as env:
        environ(env)
        s3_upload(env, directory, "s3://shards-test/in/train")
        # One command indexes the set in place: shards.json is written beside the shards, in S3.
        assert main(["index-shards", "s3://shards-test/in/train", "--workers", "4"]) == 0
        index, urls = load_index("s3://shards-test/in/train", retries=0)
        assert [s.num_samples for s in index.shards] == USER_SHARD_SIZES
        assert urls[0] == "s3://shards-test/in/train/data-00.tar" and index.shards[0].offsets

        # Ranks read their parts of shards with ranged GETs: the same bytes as the local file.
        offset = index.shards[1].offsets[7]
        opened = _open(urls[1], timeout=10, offset=offset)
        assert opened.total_size == index.shards[1].bytes
        assert opened.stream.read(4096) == (directory / "data-01.tar").read_bytes()[offset:offset + 4096]
        opened.finish(abandon=True)

        # 2 ranks x 2 workers: bitwise the batches of the same shards on local disk.
        for rank in range(2):
            reference, _ = batches(directory, rank=rank, world=2, workers=2)
            got, stream = batches("s3://shards-test/in/train", rank=rank, world=2, workers=2)
            assert_same(got, reference)
            assert stream.epoch_stats()["samples_lost"] == 0
        # A glob over the bucket, and an index kept locally that points at the bucket.
        assert_same(batches("s3://shards-test/in/train/data-0*.tar")[0], batches(directory)[0])
        assert main(["index-shards", "s3://shards-test/in/train", "--out", str(local_index)]) == 0
        assert_same(batches(local_index)[0], batches(directory)[0])

        # A missing object is named at once (not retried); a missing bucket too.
        s3_upload(env, directory, "s3://shards-test/gone")
        assert main(["index-shards", "s3://shards-test/gone"]) == 0
        import boto3

        boto3.client("s3").delete_object(Bucket="shards-test", Key="gone/data-03.tar")
        stream = ShardedImageStream("s3://shards-test/gone", BATCH, pixels_as_tensor, rank=0, world_size=1,
                                    shuffle_shards=False, retry_delay=0.01)
        with pytest.raises(ShardSourceError, match=r"cannot read s3://shards-test/gone/data-03\.tar \(not retried\).*NoSuchKey"):
            list(stream)
        with pytest.raises(ShardSourceError, match=r"s3://no-such-bucket/x.*NoSuchBucket"):
            ShardedImageStream("s3://no-such-bucket/x", BATCH, pixels_as_tensor, retries=0)


@pytest.mark.timeout(300)
def test_s3_without_credentials_is_one_clear_error_line(own, tmp_path):
    directory, _, _ = own
    with s3_server() as env:
        s3_upload(env, directory, "s3://shards-test/creds")
        base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        base.update(PYTHONPATH=str(REPO), HOME=str(tmp_path))  # no ~/.aws to fall back on
        command = [sys.executable, "-m", "scale_ssl.cli.main", "index-shards", "s3://shards-test/creds", "--workers", "2"]
        # (With the credentials in the environment the same command works: the test above.)
        no_credentials = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        refused = subprocess.run(command, capture_output=True, text=True,
                                 env={**base, **no_credentials, "AWS_EC2_METADATA_DISABLED": "true"}, timeout=180)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1, refused.stderr
        assert lines[0].startswith("scale-ssl: error: ") and "credentials" in lines[0] and "AWS_ACCESS_KEY_ID" in lines[0]


@pytest.mark.timeout(300)
def test_gcs_shards_index_and_stream_like_local_ones_through_google_cloud_storage(own, environ):
    from scale_ssl.cli.main import main

    directory, _, _ = own
    with gcs_server() as env:
        environ(env)
        gcs_upload(env, directory, "gs://shards-test/in1k/train")
        assert main(["index-shards", "gs://shards-test/in1k/train", "--workers", "2"]) == 0
        for rank in range(2):
            assert_same(batches("gs://shards-test/in1k/train", rank=rank, world=2, workers=0)[0],
                        batches(directory, rank=rank, world=2, workers=0)[0])
        with pytest.raises(ShardSourceError, match=r"gs://shards-test/in1k/train/nope\.tar \(not retried\).*no such object"):
            list(iter_shard_samples("gs://shards-test/in1k/train/nope.tar", retry_delay=0.01))


@pytest.mark.timeout(300)
def test_http_range_requests_read_only_each_readers_part(own, tmp_path):
    from scale_ssl.cli.main import main
    from tests.test_data_remote import http_server

    def run_index_shards(location):
        import argparse

        from scale_ssl.cli.index_shards import run_index_shards as run

        run(argparse.Namespace(location=location, out=None, workers=2, overwrite=False, label_key="auto",
                               image_keys=None, no_check_images=False))

    directory, _, _ = own
    served = tmp_path / "served"
    (served / "train").mkdir(parents=True)
    for path in directory.iterdir():
        (served / "train" / path.name).write_bytes(path.read_bytes())
    with http_server(served, module="tests._range_http_server") as base:
        for rank in range(2):
            got, _ = batches(f"{base}/train/data-{{00..06}}.tar", rank=rank, world=2, workers=0)
            assert_same(got, batches(directory, rank=rank, world=2, workers=0)[0])
        # index-shards over HTTP: the server cannot be written to, so the index goes to --out.
        with pytest.raises(ValueError, match=r"cannot write an index to .* \(an HTTP server\): pass --out"):
            run_index_shards(f"{base}/train/data-{{00..06}}.tar")
        assert main(["index-shards", f"{base}/train/data-{{00..06}}.tar", "--out", str(tmp_path / "http.json")]) == 0
        assert_same(batches(tmp_path / "http.json", rank=1, world=2, workers=0)[0],
                    batches(directory, rank=1, world=2, workers=0)[0])
        # A reader whose part starts past the end of a shard cut short (HTTP 416) finds a
        # truncated shard, whose samples count as missing, not an unreachable one.
        cut = served / "train" / "data-01.tar"
        cut.write_bytes(cut.read_bytes()[:4096])
        with pytest.raises(ShardTruncatedError, match="truncated after 0 complete samples"):
            list(iter_shard_samples(f"{base}/train/data-01.tar", start_offset=8192, expected_bytes=40960))
    requests = (served / "requests.log").read_text().splitlines()
    ranged = [line for line in requests if re.search(r"\.tar bytes=\d+-$", line)]
    # Without an index on the server the set was indexed on the fly (whole reads); the readers
    # that start inside a shard asked for their part only.
    assert ranged, requests


def test_pipe_commands_run_without_a_shell(own, tmp_path):
    _, _, directory = own
    marker = tmp_path / "marker"
    reference, _ = batches(directory, workers=0)
    assert_same(batches(f"pipe:cat {directory}/{{name}}", workers=0)[0], reference)
    # A shell would run the second command; as an argument list, ';' is a file name for cat.
    with pytest.raises(ShardSourceError, match=r"command .*cat .*';' touch .* exited with status 1"):
        ShardedImageStream(f"pipe:cat {directory}/{{name}} ; touch {marker}", BATCH, pixels_as_tensor, retries=0)
    assert not marker.exists()
    # A name with a space stays one argument.
    spaced = tmp_path / "with space"
    spaced.mkdir()
    for path in directory.iterdir():
        (spaced / path.name).write_bytes(path.read_bytes())
    assert_same(batches(f"pipe:cat '{spaced}/{{name}}'", workers=0)[0], reference)
    assert resolve_location(f"pipe:cat '{spaced}/{{name}}'").url("a.tar") == f"pipe:cat '{spaced}/a.tar'"
