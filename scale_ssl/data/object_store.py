"""Shards in object stores, read through their maintained client libraries: ``s3://`` with boto3
(AWS S3 and S3-compatible servers: MinIO, Ceph, R2, ...), ``gs://`` with google-cloud-storage.

**Credentials and endpoints** come from each library's usual chain, never from scale_ssl's config:

- S3: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (/ ``AWS_SESSION_TOKEN``), ``AWS_PROFILE``
  and ``~/.aws/{credentials,config}``, or an instance / pod role; the region from
  ``AWS_DEFAULT_REGION`` or the profile; an S3-compatible server with ``AWS_ENDPOINT_URL_S3``
  (or ``AWS_ENDPOINT_URL``), which boto3 reads itself.
- GCS: application default credentials (``GOOGLE_APPLICATION_CREDENTIALS``, ``gcloud auth
  application-default login``, or the VM's service account); ``STORAGE_EMULATOR_HOST`` points
  the client at an emulator (anonymous credentials, as the library does).

**Reads stream**: S3 objects are read from one ``GetObject`` response body (a ``Range`` request
when a reader starts inside a shard); GCS objects through the library's ``BlobReader`` in ranged
chunks of ``GCS_CHUNK_BYTES``. The libraries retry the requests themselves (botocore's
``standard`` retry mode: connection errors, 5xx, throttling, with jittered back-off;
google-cloud-storage's default retry); a response that breaks while its body is read is reported
as a transport failure, which ``shard_source`` retries by reopening at the sample it had reached.
A missing object or bucket, or refused credentials, is permanent and named at once.
"""

from __future__ import annotations

import io
import os
import threading
from typing import Any

# GCS: bytes fetched per ranged request of a BlobReader (the library's default is 40 MiB).
GCS_CHUNK_BYTES = 8 << 20
_BOTO3_HINT = "s3:// shards need boto3 (pip install boto3; the version tested is pinned in requirements.txt)"
_GCS_HINT = "gs:// shards need google-cloud-storage (pip install google-cloud-storage; pinned in requirements.txt)"


class ObjectStoreError(Exception):
    """A request to an object store failed; ``permanent`` when asking again cannot help."""

    def __init__(self, message: str, permanent: bool):
        super().__init__(message)
        self.permanent = permanent


def split_url(url: str) -> tuple[str, str, str]:
    """``s3://bucket/key/path`` -> ``("s3", "bucket", "key/path")``."""
    scheme, _, rest = url.partition("://")
    bucket, _, key = rest.partition("/")
    if scheme not in ("s3", "gs") or not bucket:
        raise ValueError(f"not an object-store URL (s3://BUCKET/KEY or gs://BUCKET/KEY): {url!r}")
    return scheme, bucket, key


def open_object(url: str, offset: int, timeout: float) -> tuple[io.RawIOBase | io.BufferedIOBase, int | None]:
    """A readable stream of the object ``url`` from byte ``offset`` on, and the object's size."""
    scheme, bucket, key = split_url(url)
    return _open_s3(bucket, key, offset, timeout) if scheme == "s3" else _open_gcs(bucket, key, offset, timeout)


def read_object(url: str, timeout: float) -> bytes:
    stream, _ = open_object(url, 0, timeout)
    try:
        return stream.read()
    finally:
        stream.close()


def list_objects(url_prefix: str, timeout: float = 60.0) -> list[tuple[str, int]]:
    """``(url, size)`` of every object whose key starts with the prefix of ``url_prefix``."""
    scheme, bucket, prefix = split_url(url_prefix)
    if scheme == "s3":
        client = _s3_client(timeout)
        try:
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            return [(f"s3://{bucket}/{item['Key']}", int(item["Size"])) for page in pages for item in page.get("Contents", [])]
        except Exception as error:
            raise _s3_error(error, f"s3://{bucket}/{prefix}") from None
    client = _gcs_client()
    try:
        return [(f"gs://{bucket}/{blob.name}", int(blob.size or 0))
                for blob in client.list_blobs(bucket, prefix=prefix, timeout=timeout)]
    except Exception as error:
        raise _gcs_error(error, f"gs://{bucket}/{prefix}") from None


def write_object(url: str, data: bytes, timeout: float = 60.0) -> None:
    scheme, bucket, key = split_url(url)
    try:
        if scheme == "s3":
            _s3_client(timeout).put_object(Bucket=bucket, Key=key, Body=data, ContentType="application/json")
        else:
            _gcs_client().bucket(bucket).blob(key).upload_from_string(data, content_type="application/json", timeout=timeout)
    except ObjectStoreError:
        raise
    except Exception as error:
        raise (_s3_error if scheme == "s3" else _gcs_error)(error, url) from None


# -- S3 ------------------------------------------------------------------------------------------
_clients: dict[Any, Any] = {}
_clients_lock = threading.Lock()
_s3_session = None


def _s3_client(timeout: float):
    global _s3_session
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ObjectStoreError(_BOTO3_HINT, permanent=True) from None
    # One client per process (boto3 clients are thread-safe but must not cross a fork) and
    # timeout. The session is kept across a fork: a DataLoader worker forked from a process that
    # already read the index makes its client from the loaded service model in ~0.1 s, not ~1-2 s.
    cache_key = ("s3", os.getpid(), timeout)
    with _clients_lock:
        if cache_key not in _clients:
            if _s3_session is None:
                _s3_session = boto3.session.Session()
            config = Config(
                retries={"mode": "standard", "max_attempts": 4},
                connect_timeout=timeout,
                read_timeout=timeout,
                max_pool_connections=32,
            )
            _clients[cache_key] = _s3_session.client("s3", config=config)
        return _clients[cache_key]


def _open_s3(bucket: str, key: str, offset: int, timeout: float):
    client = _s3_client(timeout)
    request: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if offset:
        request["Range"] = f"bytes={offset}-"
    try:
        response = client.get_object(**request)
    except Exception as error:
        code = getattr(error, "response", {}).get("Error", {}).get("Code") if hasattr(error, "response") else None
        if offset and code == "InvalidRange":  # the object ends before the offset: a truncated shard
            return io.BytesIO(b""), None
        raise _s3_error(error, f"s3://{bucket}/{key}") from None
    total = None
    content_range = response.get("ContentRange")
    if content_range and "/" in content_range:
        total = _int_or_none(content_range.rsplit("/", 1)[1])
    elif not offset:
        total = _int_or_none(response.get("ContentLength"))
    return _S3Body(response["Body"], f"s3://{bucket}/{key}"), total


class _S3Body(io.RawIOBase):
    """A GetObject body as a raw stream whose failures mid-body are ``OSError`` (transport)."""

    def __init__(self, body, url: str):
        self.body, self.url = body, url

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            data = self.body.read(len(buffer))
        except Exception as error:  # botocore IncompleteReadError / ReadTimeoutError / urllib3 errors
            raise ConnectionError(f"reading {self.url} broke: {type(error).__name__}: {error}") from None
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        try:
            self.body.close()
        finally:
            super().close()


def _s3_error(error: Exception, url: str) -> ObjectStoreError:
    name = type(error).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError", "NoRegionError"):
        return ObjectStoreError(
            f"{url}: {error} (boto3 reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
            f"~/.aws/credentials or an instance role; the region from AWS_DEFAULT_REGION)", permanent=True)
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        message = response.get("Error", {}).get("Message", "")
        # botocore has already retried 5xx and throttling: what reaches here persisted.
        permanent = 400 <= status < 500 and status not in (408, 429) or code in ("NoSuchKey", "NoSuchBucket", "AccessDenied")
        return ObjectStoreError(f"{url}: S3 {status or ''} {code}{': ' + message if message else ''}".replace("  ", " "), permanent)
    # EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError...: the network, worth retrying
    return ObjectStoreError(f"{url}: {name}: {error}", permanent=False)


# -- GCS -----------------------------------------------------------------------------------------
def _gcs_client():
    try:
        from google.cloud import storage
    except ImportError:
        raise ObjectStoreError(_GCS_HINT, permanent=True) from None
    cache_key = ("gs", os.getpid())
    with _clients_lock:
        if cache_key not in _clients:
            try:
                _clients[cache_key] = storage.Client()
            except Exception as error:  # google.auth's DefaultCredentialsError, mostly
                raise ObjectStoreError(
                    f"cannot create a Google Cloud Storage client: {error} (set GOOGLE_APPLICATION_CREDENTIALS "
                    f"or run `gcloud auth application-default login`)", permanent=True) from None
        return _clients[cache_key]


def _open_gcs(bucket: str, key: str, offset: int, timeout: float):
    client = _gcs_client()
    try:
        blob = client.bucket(bucket).get_blob(key, timeout=timeout)
    except Exception as error:
        raise _gcs_error(error, f"gs://{bucket}/{key}") from None
    if blob is None:
        raise ObjectStoreError(f"gs://{bucket}/{key}: no such object (404)", permanent=True)
    reader = blob.open("rb", chunk_size=GCS_CHUNK_BYTES, timeout=timeout)
    if offset:
        reader.seek(offset)
    return _GCSReader(reader, f"gs://{bucket}/{key}"), blob.size


class _GCSReader(io.RawIOBase):
    def __init__(self, reader, url: str):
        self.reader, self.url = reader, url

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            data = self.reader.read(len(buffer))
        except Exception as error:  # google.api_core / google.resumable_media / requests errors
            raise ConnectionError(f"reading {self.url} broke: {type(error).__name__}: {error}") from None
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        try:
            self.reader.close()
        finally:
            super().close()


def _gcs_error(error: Exception, url: str) -> ObjectStoreError:
    code = getattr(error, "code", None)
    if isinstance(code, int):
        permanent = 400 <= code < 500 and code not in (408, 429)
        return ObjectStoreError(f"{url}: GCS {code} {getattr(error, 'message', error)}", permanent)
    if type(error).__name__ in ("DefaultCredentialsError", "RefreshError"):
        return ObjectStoreError(f"{url}: {error}", permanent=True)
    return ObjectStoreError(f"{url}: {type(error).__name__}: {error}", permanent=False)


def _int_or_none(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
