"""Where a shard set lives and how one shard is read: local files, ``http(s)://``, ``s3://`` and
``gs://`` object stores (through boto3 and google-cloud-storage, see ``object_store``), and
``pipe:`` commands.

A shard set is addressed by its *location*. Accepted forms:

- a directory-like place: a local directory, ``http(s)://host/dir``, ``s3://bucket/prefix``,
  ``gs://bucket/prefix``: its index is ``<place>/shards.json`` and the shards are beside it;
- the index file itself, under any name ending in ``.json`` (``/data/in1k/train-index.json``);
  an index written away from its shards says where they are (its ``base``);
- the shards themselves: a brace list (``/data/shard-{000000..001281}.tar``,
  ``https://host/in1k/train-{0000..0146}.tar``), a glob (local, ``s3://``, ``gs://``:
  ``s3://bucket/laion/*.tar``) or one ``.tar`` file. The index is looked for in the directory the
  shards share; the shards named must all be in it;
- ``pipe:COMMAND`` where the command contains ``{name}``: the command with ``{name}`` replaced by
  a file name writes that file to stdout (``pipe:curl -sf https://host/dir/{name}``). The command
  is split like a shell would (``shlex``) and run **without a shell**, as an argument list: no
  expansion, redirection or second command happens, and a file name stays one argument. It still
  runs a program named by the config with the user's rights: accept ``pipe:`` locations only from
  configs you trust.

A set without an index can still be streamed when it is small (up to ``SCAN_MAX_SHARDS`` shards
and ``SCAN_MAX_BYTES``): ``load_index`` reads it once to build the index in memory and prints one
notice; larger sets must be indexed with ``scale-ssl index-shards LOCATION`` first.

A reader may open a shard at a byte offset (a seek; an HTTP ``Range`` request, falling back to
reading past the bytes when the server ignores it; a ranged ``GetObject``; a GCS seek; for a
``pipe:`` the bytes are read and dropped) and stop before another one, so that a reader that owns
samples ``[a, b)`` of a shard reads only those bytes when the index records sample offsets.

Failures are split in two, because they call for opposite reactions:

- a *transport* failure (connection refused or reset, a read timeout, an HTTP 5xx, an object
  store error the client library gave up on, a command that exits non-zero) is retried
  ``retries`` times with exponential back-off; a retry reopens the shard and skips the samples it
  already delivered, so nothing is yielded twice. An HTTP 4xx (other than 408/429), a missing
  object or local file and refused credentials are permanent and are not retried. When the
  retries are spent, ``ShardSourceError`` names the shard's URL and the last error.
- a *content* failure (the transport finished cleanly but the bytes are not a complete tar: a
  truncated shard) is not retried: ``ShardTruncatedError`` reports how many samples the shard
  delivered before it ended. Damaged stretches *inside* a tar are skipped by the tar reader,
  which resynchronises on the next valid header (``tar_members``); they are reported through
  ``on_damage`` and cost only the samples they overwrote.

Reads never block forever: HTTP and object-store reads have a socket timeout and a ``pipe:``
command's output is read with ``select`` and the same timeout, after which the command is killed
and the read counts as a transport failure.
"""

from __future__ import annotations

import fnmatch
import glob
import http.client
import io
import os
import re
import select
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from braceexpand import braceexpand
from webdataset.tariterators import base_plus_ext

from scale_ssl.data import object_store
from scale_ssl.data.shard_index import INDEX_FILENAME, ShardIndex, join_location
from scale_ssl.data.tar_members import TarDamage, iter_tar_entries

# HTTP client errors that will not go away by asking again (408 timeout and 429 throttling will).
_RETRYABLE_CLIENT_ERRORS = {408, 429}
# File names taken as tar shards when a directory or prefix is listed.
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
# The largest shard set a stream indexes by itself when it has no shards.json (reading it once).
SCAN_MAX_SHARDS = 64
SCAN_MAX_BYTES = 2 << 30
_GLOB_CHARS = re.compile(r"[*?\[]")


class ShardSourceError(RuntimeError):
    """A shard or an index could not be fetched, after the retries; the message names the URL."""


class ShardTruncatedError(RuntimeError):
    """A shard's bytes end (or break) before its last sample: delivered ``delivered`` samples."""

    def __init__(self, message: str, delivered: int = 0, reason: str = ""):
        super().__init__(message)
        self.delivered, self.reason = delivered, reason or message


class ShardIndexMismatchError(RuntimeError):
    """A shard does not hold what its index promises (more samples, another size): the index is
    stale, so the epoch plan is void."""


@dataclass(frozen=True)
class ShardLocation:
    """A resolved shard-set location.

    ``kind`` is ``"local"``, ``"http"``, ``"s3"``, ``"gs"`` or ``"pipe"``; ``base`` is the
    directory, the URL prefix (no trailing slash) or the command template with ``{name}``;
    ``index_name`` the index file inside ``base``; ``patterns`` the shard names (relative to
    ``base``, braces expanded, globs kept) when the location names shards rather than a place.
    """

    kind: str
    base: str
    given: str
    index_name: str = INDEX_FILENAME
    patterns: tuple[str, ...] | None = None

    def url(self, name: str) -> str:
        """The URL a reader opens for the file ``name`` (a shard or the index)."""
        if self.kind == "pipe":
            return "pipe:" + shlex.join(part.replace("{name}", name) for part in shlex.split(self.base))
        return join_location(self.base, name)

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
        try:
            if not shlex.split(command):
                raise ValueError("empty")
        except ValueError as error:
            raise ValueError(f"the command of {given!r} cannot be split into arguments: {error}") from None
        return ShardLocation("pipe", command, given)
    scheme = urllib.parse.urlsplit(given).scheme.lower()
    if scheme in ("http", "https", "s3", "gs"):
        kind = "http" if scheme.startswith("http") else scheme
        head, rest = given.split("://", 1)
        if kind != "http" and not rest.split("/", 1)[0]:
            raise ValueError(f"{given!r} names no bucket: use {scheme}://BUCKET/PREFIX")
        path = rest
        prefix = f"{head}://"
    elif scheme and scheme != "file" and len(scheme) > 1:  # one letter: a Windows drive, a path
        raise ValueError(
            f"unsupported shard location scheme {scheme!r} in {given!r}: use a local path, "
            f"http(s)://, s3://, gs:// or pipe:COMMAND-with-{{name}}"
        )
    else:
        kind, prefix = "local", ""
        path = given[len("file://"):] if given.startswith("file://") else given
    names_shards = "{" in path or _GLOB_CHARS.search(path) or path.endswith(TAR_SUFFIXES)
    if names_shards:
        if kind == "http" and _GLOB_CHARS.search(path):
            raise ValueError(
                f"{given!r}: an HTTP server cannot be listed, so globs do not work there; name the "
                f"shards with a brace list, e.g. https://host/dir/shard-{{000000..000099}}.tar"
            )
        expanded = list(braceexpand(path))
        directory = _common_directory(expanded)
        names = tuple(name[len(directory) + 1:] if directory else name for name in expanded)
        return ShardLocation(kind, prefix + (directory or "."), given, patterns=names)
    path = path.rstrip("/") or "/"
    if path.endswith(".json"):
        directory, _, index_name = path.rpartition("/")
        return ShardLocation(kind, prefix + (directory or "."), given, index_name=index_name)
    return ShardLocation(kind, prefix + path, given)


def _common_directory(paths: list[str]) -> str:
    """The longest directory (no trailing slash, "" for none) that holds every path, stopping
    before the first component with a glob character."""
    parts = [path.split("/")[:-1] for path in paths]
    common = []
    for components in zip(*parts):
        if len(set(components)) > 1 or _GLOB_CHARS.search(components[0]):
            break
        common.append(components[0])
    directory = "/".join(common)
    return directory or ("/" if paths and paths[0].startswith("/") and common == [""] else directory)


def list_shards(location: ShardLocation, timeout: float = 60.0) -> list[tuple[str, int | None]]:
    """``(name, size in bytes or None)`` of every shard a location names, names relative to its
    ``base``, in order: a pattern's shards (globs matched against a listing), or the tar files
    directly in a local directory or under an object-store prefix (not in its subdirectories)."""
    if location.patterns is not None:
        found: list[tuple[str, int | None]] = []
        listing = None
        for pattern in location.patterns:
            if not _GLOB_CHARS.search(pattern):
                found.append((pattern, _local_size(location, pattern)))
                continue
            if location.kind == "local":
                matches = sorted(glob.glob(os.path.join(location.base, pattern)))
                found += [(os.path.relpath(match, location.base), os.path.getsize(match)) for match in matches
                          if os.path.isfile(match)]
            else:
                listing = listing if listing is not None else _list_prefix(location, timeout)
                found += [(name, size) for name, size in listing if _glob_match(name, pattern)]
        if not found:
            raise FileNotFoundError(f"no shard matches {location.given!r}")
        return list(dict.fromkeys(found))
    # A place's own tar files only, not those of its subdirectories: /data/in1k holding train/ and
    # val/ must not become one set. Nested shards are named with a glob (/data/in1k/*/*.tar).
    if location.kind == "local":
        if not os.path.isdir(location.base):
            raise FileNotFoundError(f"shard location {location.given!r} does not exist")
        names = []
        for entry in os.scandir(location.base):
            if entry.is_file() and entry.name.endswith(TAR_SUFFIXES) and not entry.name.startswith("."):
                names.append((entry.name, entry.stat().st_size))
        return sorted(names)
    if location.kind in ("s3", "gs"):
        return [(name, size) for name, size in _list_prefix(location, timeout)
                if name.endswith(TAR_SUFFIXES) and "/" not in name]
    raise ShardSourceError(
        f"{location.given}: a {'pipe: command' if location.kind == 'pipe' else 'HTTP server'} cannot be "
        f"listed, so its shards need an index ({location.url(location.index_name)}) or a brace list "
        f"naming them (e.g. https://host/dir/shard-{{000000..000099}}.tar)"
    )


def _glob_match(name: str, pattern: str) -> bool:
    """Glob matching as a shell does it on paths: a wildcard does not cross a ``/``."""
    parts, wanted = name.split("/"), pattern.split("/")
    return len(parts) == len(wanted) and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, wanted))


def _local_size(location: ShardLocation, name: str) -> int | None:
    if location.kind != "local":
        return None
    path = os.path.join(location.base, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"shard {path} (named by {location.given!r}) does not exist")
    return os.path.getsize(path)


def _list_prefix(location: ShardLocation, timeout: float) -> list[tuple[str, int]]:
    prefix = location.base.rstrip("/") + "/"
    try:
        objects = object_store.list_objects(prefix, timeout)
    except object_store.ObjectStoreError as error:
        raise ShardSourceError(f"cannot list {prefix}: {error}") from None
    return sorted((url[len(prefix):], size) for url, size in objects)


def load_index(
    location: ShardLocation | str | os.PathLike,
    *,
    retries: int = 3,
    retry_delay: float = 1.0,
    timeout: float = 60.0,
    build_missing: bool = True,
    notice: Callable[[str], None] | None = None,
) -> tuple[ShardIndex, list[str]]:
    """Read the index of a shard set and return it with the URL of every shard, in index order.

    A local index is checked against the disk (a missing shard is named now, not mid-epoch); a
    remote one is fetched with the same retries as a shard. Without an index, a small set is
    indexed by reading it once (``build_missing``; ``notice`` gets the one-line message, by
    default printed to stderr); a larger one is an error that says how to index it.
    """
    location = location if isinstance(location, ShardLocation) else resolve_location(location)
    index = _read_index(location, retries, retry_delay, timeout)
    if index is not None and location.patterns is not None:
        index = _restrict(index, location, timeout)
    if index is None:
        if not build_missing:
            raise FileNotFoundError(
                f"{location.given} has no index ({location.url(location.index_name)}): write one with "
                f"`scale-ssl index-shards {location.given}`"
            )
        index = _index_on_the_fly(location, retries, retry_delay, timeout, notice)
    return index, shard_urls(index, location)


def shard_urls(index: ShardIndex, location: ShardLocation) -> list[str]:
    if index.base is not None or index.directory is not None:
        return index.urls()
    return [location.url(shard.name) for shard in index.shards]


def _read_index(location: ShardLocation, retries: int, retry_delay: float, timeout: float) -> ShardIndex | None:
    if location.kind == "local":
        path = Path(location.base) / location.index_name
        if not path.is_file():
            if location.patterns is None and location.index_name != INDEX_FILENAME:
                raise FileNotFoundError(f"shard index {path} does not exist")
            return None
        return ShardIndex.load(path)
    url = location.url(location.index_name)
    try:
        raw = _with_retries(url, lambda: _read_all(url, timeout), retries, retry_delay)
    except _MissingFile as missing:
        if location.kind in ("s3", "gs") or location.patterns is not None:
            return None
        raise ShardSourceError(
            f"cannot read {url} (not retried): {missing}; an {'HTTP server' if location.kind == 'http' else 'pipe: command'} "
            f"cannot be listed, so name the shards with a brace list or write an index with "
            f"`scale-ssl index-shards ... --out`"
        ) from None
    index = ShardIndex.from_bytes(raw, origin=url)
    return index


def _restrict(index: ShardIndex, location: ShardLocation, timeout: float) -> ShardIndex | None:
    """The index's entries for the shards a pattern names (in the pattern's order), or None when
    the index lacks some of them (then the named shards are indexed afresh)."""
    by_name = {shard.name: shard for shard in index.shards}
    wanted = [name for name, _ in list_shards(location, timeout)] if any(
        _GLOB_CHARS.search(p) for p in location.patterns) else list(location.patterns)
    if not all(name in by_name for name in wanted):
        return None
    return replace(index, shards=[by_name[name] for name in wanted], num_samples=-1)


def _index_on_the_fly(location, retries, retry_delay, timeout, notice) -> ShardIndex:
    from scale_ssl.data.shard_indexer import build_index  # the indexer reads shards through this module

    shards = list_shards(location, timeout)
    sizes = [size for _, size in shards if size is not None]
    if not shards:
        raise FileNotFoundError(f"{location.given} holds no tar shards ({', '.join(TAR_SUFFIXES)}) and no index")
    if len(shards) > SCAN_MAX_SHARDS or sum(sizes) > SCAN_MAX_BYTES:
        raise FileNotFoundError(
            f"{location.given} has no index ({location.url(location.index_name)}) and is too large to index "
            f"on the fly ({len(shards)} shards{f', {sum(sizes) / 1e9:.1f} GB' if sizes else ''}; at most "
            f"{SCAN_MAX_SHARDS} shards and {SCAN_MAX_BYTES / 2**30:.0f} GiB are): write it once with "
            f"`scale-ssl index-shards {location.given}`"
        )
    start = time.perf_counter()
    result = build_index(location, shards, retries=retries, retry_delay=retry_delay, timeout=timeout)
    index = result.index
    problems = f", {result.problem_count} bad member(s)/damaged stretch(es) found" if result.problem_count else ""
    message = (
        f"scale-ssl: note: {location.given} has no index; read its {index.num_shards} shard(s) once "
        f"({index.num_samples} samples, {'labels: ' + index.label_key if index.label_key else 'no labels'}"
        f"{problems}) in {time.perf_counter() - start:.1f} s. Write the index once with "
        f"`scale-ssl index-shards {location.given}`"
    )
    (notice or (lambda text: print(text, file=sys.stderr, flush=True)))(message)
    return index


# -- opening one URL -------------------------------------------------------------------------------
def pipe_command(url: str) -> list[str]:
    """The argument list of a ``pipe:`` URL (what the reader runs, without a shell)."""
    if not url.startswith("pipe:"):
        raise ValueError(f"not a pipe: URL: {url!r}")
    return shlex.split(url[len("pipe:"):])


class _TransportError(Exception):
    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


class _MissingFile(_TransportError):
    """The file or object does not exist (HTTP 404, no such key, no such file): permanent."""

    def __init__(self, message: str):
        super().__init__(message, permanent=True)


class _OpenedShard:
    """A readable byte stream of one URL, the size of the whole file when the transport says it,
    and a way to learn, at the end, whether the transport (not the content) failed."""

    def __init__(self, stream, process: subprocess.Popen | None = None, stderr=None, command: str = "",
                 total_size: int | None = None, drain: bool = False):
        self.stream, self.process, self.stderr, self.command = stream, process, stderr, command
        self.total_size, self.drain = total_size, drain

    def finish(self, *, abandon: bool = False) -> str | None:
        """Close; return a description of a transport failure, or None when it ended cleanly."""
        if not abandon and (self.drain or isinstance(self.stream, http.client.HTTPResponse)):
            # http.client treats a connection closed before Content-Length as a normal end of
            # the body (and the tar reader stops at the end-of-archive blocks, before the final
            # padding); object-store bodies check their length only once read to the end. Read
            # what is left to tell a complete transfer from a cut one.
            try:
                while self.stream.read(1 << 16):
                    pass
            except (OSError, http.client.HTTPException) as error:
                return f"{type(error).__name__}: {error}"
            missing = getattr(self.stream, "length", None)
            if isinstance(self.stream, http.client.HTTPResponse) and missing:
                self.stream.close()
                return f"the connection closed {missing} bytes before the end of the body"
        try:
            self.stream.close()
        except Exception:  # closing a broken response may raise again; the read said enough
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


def _open(url: str, timeout: float, offset: int = 0) -> _OpenedShard:
    """Open ``url`` positioned at byte ``offset``."""
    if url.startswith("pipe:"):
        argv = pipe_command(url)
        command = shlex.join(argv)
        stderr = tempfile.TemporaryFile()  # a file, not a pipe: a chatty command cannot block
        try:
            process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr)
        except OSError as error:  # no such program, not executable: asking again will not help
            stderr.close()
            raise _TransportError(f"cannot run {command!r}: {error}", permanent=True) from None
        stream = io.BufferedReader(_TimedPipeReader(process.stdout, timeout, command), 1 << 16)
        opened = _OpenedShard(stream, process, stderr, command)
        _discard(opened, offset)
        return opened
    if re.match(r"(?i)^https?://", url):
        request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as error:
            if error.code == 404:
                raise _MissingFile(f"HTTP 404 {error.reason}") from None
            if error.code == 416 and offset:  # the file ends before the offset: a truncated shard
                size = re.match(r"bytes \*/(\d+)", error.headers.get("Content-Range", "") or "")
                return _OpenedShard(io.BytesIO(b""), total_size=int(size.group(1)) if size else None)
            permanent = 400 <= error.code < 500 and error.code not in _RETRYABLE_CLIENT_ERRORS
            raise _TransportError(f"HTTP {error.code} {error.reason}", permanent) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            raise _TransportError(f"{type(error).__name__}: {getattr(error, 'reason', error)}") from None
        total = None
        if offset and response.status == 206:
            match = re.match(r"bytes (\d+)-\d+/(\d+)", response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                response.close()
                raise _TransportError(f"the server answered the range request for byte {offset} with "
                                      f"{response.headers.get('Content-Range')!r}", permanent=True)
            total = int(match.group(2))
            return _OpenedShard(response, total_size=total)
        if not response.headers.get("Content-Encoding") and response.headers.get("Content-Length", "").isdigit():
            total = int(response.headers["Content-Length"])
        opened = _OpenedShard(response, total_size=total)
        _discard(opened, offset)  # a server that ignores Range sends the file from its start
        return opened
    if url.startswith(("s3://", "gs://")):
        try:
            raw, total = object_store.open_object(url, offset, timeout)
        except object_store.ObjectStoreError as error:
            if error.permanent and re.search(r"NoSuchKey|no such object|\b404\b", str(error)):
                raise _MissingFile(str(error)) from None
            raise _TransportError(str(error), error.permanent) from None
        return _OpenedShard(io.BufferedReader(raw, 1 << 20), total_size=total, drain=True)
    try:
        file = open(url, "rb")
    except FileNotFoundError:
        raise _MissingFile("no such file") from None
    except OSError as error:
        raise _TransportError(f"{type(error).__name__}: {error}") from None
    if offset:
        file.seek(offset)
    return _OpenedShard(file, total_size=os.fstat(file.fileno()).st_size)


def _discard(opened: _OpenedShard, count: int) -> None:
    """Read ``count`` bytes into nothing (a stream that cannot start at an offset)."""
    try:
        while count:
            chunk = opened.stream.read(min(count, 1 << 20))
            if not chunk:
                break
            count -= len(chunk)
    except (OSError, http.client.HTTPException) as error:
        opened.finish(abandon=True)
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
        except _MissingFile:
            raise
        except _TransportError as error:
            if error.permanent or attempt >= retries:
                tried = f"after {attempt + 1} attempt(s)" if not error.permanent else "(not retried)"
                raise ShardSourceError(f"cannot read {url} {tried}: {error}") from None
            time.sleep(retry_delay * 2**attempt)
            attempt += 1


def read_file(url: str, *, retries: int = 3, retry_delay: float = 1.0, timeout: float = 60.0) -> bytes:
    """The whole file ``url`` (an index), with the shard reader's retries."""
    try:
        return _with_retries(url, lambda: _read_all(url, timeout), retries, retry_delay)
    except _MissingFile as missing:
        raise ShardSourceError(f"cannot read {url} (not retried): {missing}") from None


# -- samples of one shard ----------------------------------------------------------------------------
def iter_shard_samples(
    url: str,
    *,
    skip: int = 0,
    limit: int | None = None,
    start_offset: int = 0,
    stop_offset: int | None = None,
    expected_bytes: int | None = None,
    retries: int = 3,
    retry_delay: float = 1.0,
    timeout: float = 60.0,
    on_damage: Callable[[TarDamage], None] | None = None,
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {extension: bytes})`` for the samples of one tar shard, in order.

    Members are grouped into samples by webdataset's naming rule (key = the name up to the first
    dot of its last path component; ``__``-prefixed keys are metadata, not samples). The reader
    starts at byte ``start_offset`` (a sample's first record), passes over the first ``skip``
    samples without keeping their bytes, yields at most ``limit`` samples, and stops before the
    record at ``stop_offset``. ``expected_bytes`` (the index's size for the shard, given when its
    offsets are used) is checked against the size the transport reports: another size means the
    index is stale (``ShardIndexMismatchError``).

    A sample is yielded only once it is known to be complete (the next one began, or a bound or
    the clean end of the tar was reached), so a sample cut by truncation is never yielded.
    Transport failures are retried (see the module docstring); a truncated tar raises
    ``ShardTruncatedError`` after the samples before the cut; damaged stretches are passed over
    and reported to ``on_damage``.
    """
    delivered, attempt = 0, 0
    while True:
        opened = _with_retries_missing_named(url, lambda: _open(url, timeout, start_offset), retries - attempt, retry_delay)
        # Longer than indexed: the shard was rewritten, its offsets mean nothing. Shorter: it was
        # cut (a partial copy, a full disk): what is there is read and the rest counts as missing.
        if expected_bytes is not None and opened.total_size is not None and opened.total_size > expected_bytes:
            opened.finish(abandon=True)
            raise ShardIndexMismatchError(
                f"shard {url} is {opened.total_size} bytes but its index lists {expected_bytes}: the shard "
                f"changed after it was indexed; re-run `scale-ssl index-shards` on its location"
            )
        grouper = SampleGrouper(
            iter_tar_entries(opened.stream, offset=start_offset, stop_offset=stop_offset),
            skip=skip + delivered,
            limit=None if limit is None else limit - delivered,
            on_damage=on_damage,
        )
        content_error = transport_error = None
        held = None  # the last sample read, until it is known complete
        finished = False
        try:
            for key, members, _ in grouper:
                if held is not None:
                    delivered += 1
                    yield held
                held = key, members
            finished = True
        except tarfile.TarError as error:
            content_error = error
        except (OSError, http.client.HTTPException) as error:
            transport_error = f"{type(error).__name__}: {error}"
        finally:
            if not finished and content_error is None and transport_error is None:
                opened.finish(abandon=True)  # the consumer stopped early (or raised)
        # A bound (limit, stop_offset) ends the read before the end of the file: the rest is not
        # needed and the last sample is complete, so the transfer is abandoned, not checked.
        failure = opened.finish(abandon=transport_error is not None or grouper.bounded) or transport_error
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
        # A truncated tar whose transfer was complete: the held sample was followed by another
        # one, so it is whole; the sample being read when the bytes ran out is dropped.
        if held is not None:
            delivered += 1
            yield held
        raise ShardTruncatedError(
            f"shard {url} is truncated after {delivered} complete samples: {content_error}",
            delivered,
            f"the tar is truncated after {delivered} complete samples ({content_error})",
        )


def _with_retries_missing_named(url: str, action, retries: int, retry_delay: float):
    try:
        return _with_retries(url, action, retries, retry_delay)
    except _MissingFile as missing:
        raise ShardSourceError(f"cannot read {url} (not retried): {missing}") from None


class SampleGrouper:
    """Groups tar entries into samples ``(key, {extension: bytes}, offset of its first record)``.

    The one rule by which the stream and the indexer both count samples: a new key starts a
    sample (webdataset's grouping); samples a damaged stretch cut short still count. The first
    ``skip`` samples are passed over without reading their bytes; ``wanted(extension)`` (default:
    every member) chooses which members are read (the others are listed with ``None``). ``bounded`` is True when it stopped at ``limit``
    samples or at the entries' ``stop_offset`` rather than at the end of the tar.
    """

    def __init__(self, entries, skip: int = 0, limit: int | None = None, on_damage=None,
                 wanted: Callable[[str], bool] | None = None):
        self.entries, self.skip, self.limit, self.on_damage = entries, skip, limit, on_damage
        self.wanted = wanted
        self.bounded = False

    def __iter__(self) -> Iterator[tuple[str, dict[str, bytes], int | None]]:
        if self.limit is not None and self.limit <= 0:
            self.bounded = True
            return
        key, members, offset, seen, yielded = None, {}, None, 0, 0
        for item in self.entries:
            if isinstance(item, TarDamage):
                if self.on_damage is not None:
                    self.on_damage(item)
                continue
            member_key, extension = sample_key(item.name)
            if member_key is None:
                continue
            if member_key != key:
                # The previous sample is complete as soon as a member of the next one appears.
                if key is not None and seen > self.skip:
                    yield key, members, offset
                    yielded += 1
                    if self.limit is not None and yielded >= self.limit:
                        self.bounded = True
                        return
                key, members, offset = member_key, {}, item.offset
                seen += 1
            if seen > self.skip:
                # A member not wanted is listed (None) but its bytes are passed over.
                members[extension] = item.read() if self.wanted is None or self.wanted(extension) else None
        # The entries ended at stop_offset (a bound: the last sample is complete) or at the clean
        # end of the archive.
        self.bounded = bool(getattr(self.entries, "reached_stop", False))
        if key is not None and seen > self.skip:
            yield key, members, offset
            yielded += 1
        if self.limit is not None and yielded >= self.limit:
            self.bounded = True


def sample_key(name: str) -> tuple[str | None, str]:
    """``(key, extension)`` of a member name by webdataset's rule; key None for members that are
    not part of a sample (no extension, or webdataset's ``__``-prefixed metadata)."""
    member_key, extension = base_plus_ext(name)
    if member_key is None or os.path.basename(member_key).startswith("__"):
        return None, ""
    return member_key, extension.lower()
