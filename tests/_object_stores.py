"""Real object-store servers on 127.0.0.1 for the data tests and benchmarks, each a subprocess
stopped by its PID: moto's S3 server (``moto_server``, the S3 REST API that boto3 speaks) and
gcp-storage-emulator (the GCS JSON API that google-cloud-storage speaks).

Their output goes to a file, not a pipe: a server logging every request into a pipe nobody
reads would block once the pipe's buffer is full.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _wait_for(predicate, process, log: Path, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not start within {timeout:g} s: {log.read_text()[-2000:]}")


@contextmanager
def s3_server(bucket: str = "shards-test"):
    """moto's S3 server on a free port with ``bucket`` created; yields the environment boto3
    needs (endpoint, fake credentials, region) as a dict, to pass to ``os.environ`` or a child."""
    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "moto.log"
        with open(log, "w") as out:
            process = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", "0"],
                                       stdout=out, stderr=subprocess.STDOUT)
        try:
            port = _wait_for(lambda: (re.search(r"Running on http://127\.0\.0\.1:(\d+)", log.read_text()) or [None, None])[1],
                             process, log, "moto_server")
            env = {
                "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1",
            }
            import boto3

            client = boto3.session.Session().client(
                "s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], aws_access_key_id="testing",
                aws_secret_access_key="testing", region_name="us-east-1")
            client.create_bucket(Bucket=bucket)
            yield env
        finally:
            _stop(process)


def s3_upload(env: dict, directory: Path, url_prefix: str) -> list[str]:
    """Put every file of ``directory`` under ``s3://bucket/prefix``; returns the keys."""
    import boto3

    bucket, _, prefix = url_prefix[len("s3://"):].partition("/")
    client = boto3.session.Session().client(
        "s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])
    keys = []
    for path in sorted(directory.iterdir()):
        key = f"{prefix.rstrip('/')}/{path.name}"
        client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
        keys.append(key)
    return keys


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def gcs_server(bucket: str = "shards-test"):
    """gcp-storage-emulator (in memory) with ``bucket``; yields ``{"STORAGE_EMULATOR_HOST": url}``."""
    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "gcs.log"
        port = _free_port()  # the emulator does not report a port it chose itself
        with open(log, "w") as out:
            process = subprocess.Popen(
                [str(BIN / "gcp-storage-emulator"), "start", "-H", "127.0.0.1", "--port", str(port), "--in-memory",
                 "--default-bucket", bucket, "-q"], stdout=out, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"

            def ready():
                try:
                    urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}", timeout=2)
                    return True
                except OSError:
                    return False

            _wait_for(ready, process, log, "gcp-storage-emulator")
            yield {"STORAGE_EMULATOR_HOST": url}
        finally:
            _stop(process)


def gcs_upload(env: dict, directory: Path, url_prefix: str) -> None:
    from google.cloud import storage

    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = env["STORAGE_EMULATOR_HOST"]
    try:
        bucket_name, _, prefix = url_prefix[len("gs://"):].partition("/")
        bucket = storage.Client().bucket(bucket_name)
        for path in sorted(directory.iterdir()):
            bucket.blob(f"{prefix.rstrip('/')}/{path.name}").upload_from_filename(str(path))
    finally:
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous
