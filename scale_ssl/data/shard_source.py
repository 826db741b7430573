"""Where a shard set lives and how one shard is read: local files, ``http(s)://``, ``pipe:``
commands, and ``s3://`` / ``gs://`` through their command-line clients.

A shard set is addressed by its *location*: the place of its ``shards.json`` (the index) and,
beside it, its tar shards. Accepted forms:

- a local directory, or the path of its ``shards.json``;
- ``http://host/dir`` or ``https://...`` (also ``.../shards.json``): read with the standard
  library's HTTP client, with a socket timeout on every read;
- ``pipe:COMMAND`` where the command contains ``{name}``: the command with ``{name}`` replaced by
  a file name writes that file to stdout (``pipe:cat /data/in/{name}``,
  ``pipe:curl -sf https://host/dir/{name}``). The user owns the quoting of such a command;
- ``s3://bucket/prefix`` -> ``pipe:aws s3 cp s3://bucket/prefix/<name> -``;
  ``gs://bucket/prefix`` -> ``pipe:gsutil cat gs://bucket/prefix/<name>`` (quoted here).

Failures are split in two, because they call for opposite reactions:

- a *transport* failure (connection refused or reset, a read timeout, an HTTP 5xx, a command that
  exits non-zero) is retried ``retries`` times with exponential back-off; a retry reopens the
  shard and skips the samples it already delivered, so nothing is yielded twice. An HTTP 4xx
  (other than 408/429) and a missing local file are permanent and are not retried. When the
  retries are spent, ``ShardSourceError`` names the shard's URL and the last error.
- a *content* failure (the transport finished cleanly but the bytes are not a complete tar: a
  truncated or damaged shard) is not retried: ``ShardTruncatedError`` reports how many samples
  the shard delivered before the damage, and the stream's corrupt-data policy takes over.

Reads never block forever: HTTP reads have a socket timeout and a ``pipe:`` command's output is
read with ``select`` and the same timeout, after which the command is killed and the read counts
as a transport failure.
"""

from __future__ import annotations

import http.client
import io
import os
import re
import select
import shlex
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from webdataset.tariterators import base_plus_ext

from scale_ssl.data.shard_index import INDEX_FILENAME, ShardIndex
from scale_ssl.data.tar_members import iter_tar_members

# HTTP client errors that will not go away by asking again (408 timeout and 429 throttling will).
_RETRYABLE_CLIENT_ERRORS = {408, 429}


class ShardSourceError(RuntimeError):
    """A shard or an index could not be fetched, after the retries; the message names the URL."""


class ShardTruncatedError(RuntimeError):
    """A shard's bytes end (or break) before its last sample: delivered ``delivered`` samples."""

    def __init__(self, message: str, delivered: int = 0, reason: str = ""):
        super().__init__(message)
        self.delivered, self.reason = delivered, reason or message


@dataclass(frozen=True)
class ShardLocation:
    """A resolved shard-set location: ``kind`` is ``"local"``, ``"http"``, ``"s3"``, ``"gs"`` or
    ``"pipe"``; ``base`` is the directory, the base URL (no trailing slash) or the command
    template with ``{name}``."""

    kind: str
    base: str
    given: str

    def url(self, name: str) -> str:
        """The URL a reader opens for the file ``name`` (a shard or the index)."""
        if self.kind == "local":
            return str(Path(self.base) / name)
        if self.kind == "http":
            return f"{self.base}/{urllib.parse.quote(name)}"
        if self.kind == "s3":
            return f"pipe:aws s3 cp {shlex.quote(self.base + '/' + name)} -"
        if self.kind == "gs":
            return f"pipe:gsutil cat {shlex.quote(self.base + '/' + name)}"
        return "pipe:" + self.base.replace("{name}", name)

    def describe(self) -> str:
        return self.given


def resolve_location(source: str | os.PathLike) -> ShardLocation:
    """Parse a location string (see the module docstring); raises ``ValueError`` naming the form."""
    given = os.fspath(source)
    if given.startswith("pipe:"):
        command = given[len("pipe:"):]
        if "{name}" not in command:
            raise ValueError(
                f"a pipe: shard location must contain {{name}} where the file name goes, e.g. "
                f"'pipe:cat /data/shards/{{name}}'; got {given!r}"
            )
        return ShardLocation("pipe", command, given)
    scheme = urllib.parse.urlsplit(given).scheme.lower()
    if scheme in ("http", "https"):
        return ShardLocation("http", _strip_index_name(given), given)
    if scheme in ("s3", "gs"):
        return ShardLocation(scheme, _strip_index_name(given), given)
    if scheme and scheme != "file" and len(scheme) > 1:  # one letter: a Windows drive, a path
        raise ValueError(
            f"unsupported shard location scheme {scheme!r} in {given!r}: use a local path, "
            f"http(s)://, s3://, gs:// or pipe:COMMAND-with-{{name}}"
        )
    path = Path(given[len("file://"):] if given.startswith("file://") else given)
    return ShardLocation("local", str(path.parent if path.name == INDEX_FILENAME else path), given)


def _strip_index_name(url: str) -> str:
    url = url.rstrip("/")
    return url[: -len(INDEX_FILENAME) - 1] if url.endswith("/" + INDEX_FILENAME) else url


def load_index(
    location: ShardLocation | str | os.PathLike,
    *,
    retries: int = 3,
    retry_delay: float = 1.0,
    timeout: float = 60.0,
) -> tuple[ShardIndex, list[str]]:
    """Read the index of a shard set and return it with the URL of every shard, in index order.

    A local index is checked against the disk (a missing shard is named now, not mid-epoch); a
    remote one is fetched with the same retries as a shard.
    """
    location = location if isinstance(location, ShardLocation) else resolve_location(location)
    if location.kind == "local":
        index = ShardIndex.load(location.base)
        return index, index.urls()
    url = location.url(INDEX_FILENAME)
    raw = _with_retries(url, lambda: _read_all(url, timeout), retries, retry_delay)
    index = ShardIndex.from_bytes(raw, origin=url)
    return index, [location.url(shard.name) for shard in index.shards]


def pipe_command(url: str) -> str:
    """The shell command of a ``pipe:`` URL (what the reader runs)."""
    if not url.startswith("pipe:"):
        raise ValueError(f"not a pipe: URL: {url!r}")
    return url[len("pipe:"):]


class _TransportError(Exception):
    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


class _OpenedShard:
    """A readable byte stream of one URL plus a way to learn, at the end, whether the transport
    (not the content) failed."""

    def __init__(self, stream, process: subprocess.Popen | None = None, stderr=None, command: str = ""):
        self.stream, self.process, self.stderr, self.command = stream, process, stderr, command

    def finish(self, *, abandon: bool = False) -> str | None:
        """Close; return a description of a transport failure, or None when it ended cleanly."""
        if not abandon and isinstance(self.stream, http.client.HTTPResponse):
            # http.client treats a connection closed before Content-Length as a normal end of
            # the body; the tar reader may also stop before the tar's final padding. Read what
            # is left and compare with the promised length to tell the two apart.
            try:
                while self.stream.read(1 << 16):
                    pass
            except (OSError, http.client.HTTPException) as error:
                return f"{type(error).__name__}: {error}"
            missing = self.stream.length
            if missing:
                self.stream.close()
                return f"the connection closed {missing} bytes before the end of the body"
        try:
            self.stream.close()
        except Exception:  # closing a broken HTTP response may raise again; the read said enough
            pass
        if self.process is None:
            return None
        try:
            if abandon:
                self.process.kill()
            status = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            status = self.process.wait()
        message = None
        if not abandon and status != 0:
            self.stderr.seek(0)
            tail = self.stderr.read()[-400:].decode(errors="replace").strip()
            message = f"command {self.command!r} exited with status {status}" + (f": {tail}" if tail else "")
        self.stderr.close()
        return message


def _open(url: str, timeout: float) -> _OpenedShard:
    if url.startswith("pipe:"):
        command = pipe_command(url)
        stderr = tempfile.TemporaryFile()  # a file, not a pipe: a chatty command cannot block
        process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=stderr)
        stream = io.BufferedReader(_TimedPipeReader(process.stdout, timeout, command), 1 << 16)
        return _OpenedShard(stream, process, stderr, command)
    if re.match(r"(?i)^https?://", url):
        try:
            response = urllib.request.urlopen(url, timeout=timeout)
        except urllib.error.HTTPError as error:
            permanent = 400 <= error.code < 500 and error.code not in _RETRYABLE_CLIENT_ERRORS
            raise _TransportError(f"HTTP {error.code} {error.reason}", permanent) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            raise _TransportError(f"{type(error).__name__}: {getattr(error, 'reason', error)}") from None
        return _OpenedShard(response)
    try:
        return _OpenedShard(open(url, "rb"))
    except FileNotFoundError:
        raise _TransportError("no such file", permanent=True) from None
    except OSError as error:
        raise _TransportError(f"{type(error).__name__}: {error}") from None


class _TimedPipeReader(io.RawIOBase):
    """A command's stdout that raises ``TimeoutError`` when no byte arrives for ``timeout`` s."""

    def __init__(self, pipe, timeout: float, command: str):
        self.pipe, self.timeout, self.command = pipe, timeout, command

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        ready, _, _ = select.select([self.pipe], [], [], self.timeout)
        if not ready:
            raise TimeoutError(f"no output from {self.command!r} for {self.timeout:g} s")
        data = os.read(self.pipe.fileno(), len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.pipe.close()
        super().close()


def _read_all(url: str, timeout: float) -> bytes:
    opened = _open(url, timeout)
    try:
        data = opened.stream.read()
    except (OSError, http.client.HTTPException) as error:
        opened.finish(abandon=True)
        raise _TransportError(f"{type(error).__name__}: {error}") from None
    failure = opened.finish()
    if failure:
        raise _TransportError(failure)
    return data


def _with_retries(url: str, action, retries: int, retry_delay: float):
    attempt = 0
    while True:
        try:
            return action()
        except _TransportError as error:
            if error.permanent or attempt >= retries:
                tried = f"after {attempt + 1} attempt(s)" if not error.permanent else "(not retried)"
                raise ShardSourceError(f"cannot read {url} {tried}: {error}") from None
            time.sleep(retry_delay * 2**attempt)
            attempt += 1


def iter_shard_samples(
    url: str, *, retries: int = 3, retry_delay: float = 1.0, timeout: float = 60.0
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {extension: bytes})`` for every complete sample of one tar shard, in order.

    Members are grouped into samples by webdataset's naming rule (key = the name up to the first
    dot of its last path component). A sample is yielded only once the next one begins (or the tar
    ends cleanly), so a sample cut by truncation is never yielded. Transport failures are retried
    (see the module docstring); a damaged tar raises ``ShardTruncatedError`` after the samples
    before the damage.
    """
    delivered, attempt = 0, 0
    while True:
        opened = _with_retries(url, lambda: _open(url, timeout), retries - attempt, retry_delay)
        position, content_error, transport_error = 0, None, None
        # The last sample read is held back until the transport is known to have ended cleanly:
        # a transfer cut at a member boundary looks like the clean end of a shorter tar.
        held = None
        finished = False
        try:
            for sample in _tar_samples(opened.stream):
                if held is not None:
                    delivered += 1
                    yield held
                held = sample if position >= delivered else None
                position += 1
            finished = True
        except tarfile.TarError as error:
            content_error = error
        except (OSError, http.client.HTTPException) as error:
            transport_error = f"{type(error).__name__}: {error}"
        finally:
            if not finished and content_error is None and transport_error is None:
                opened.finish(abandon=True)  # the consumer stopped early (or raised)
        failure = opened.finish(abandon=transport_error is not None) or transport_error
        if failure is None and content_error is None:
            if held is not None:
                delivered += 1
                yield held
            return
        if failure is not None:
            if attempt >= retries:
                raise ShardSourceError(
                    f"cannot read {url} after {attempt + 1} attempt(s): {failure} "
                    f"({delivered} samples were read before the failure)"
                )
            time.sleep(retry_delay * 2**attempt)
            attempt += 1
            continue
        # A damaged tar: the sample being read when it broke may lack members; it is dropped.
        raise ShardTruncatedError(
            f"shard {url} is truncated or damaged after {delivered} complete samples: {content_error}",
            delivered,
            f"the tar is truncated or damaged after {delivered} complete samples ({content_error})",
        )


def _tar_samples(fileobj) -> Iterator[tuple[str, dict[str, bytes]]]:
    key, members = None, {}
    for name, data in iter_tar_members(fileobj):
        member_key, extension = base_plus_ext(name)
        if member_key is None or os.path.basename(member_key).startswith("__"):
            continue  # not a sample member, or webdataset metadata
        if member_key != key:
            # The previous sample is complete as soon as a member of the next one has been read.
            if members:
                yield key, members
            key, members = member_key, {}
        members[extension.lower()] = data
    if members:
        yield key, members
