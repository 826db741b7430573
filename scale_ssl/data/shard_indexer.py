"""Index shards that some other tool wrote: ``scale-ssl index-shards`` and the stream's on-the-fly
index both call ``build_index``.

Each shard is read once, as a stream, from wherever it is (``shard_source``: local, HTTP, S3,
GCS, ``pipe:``), several shards at a time (threads: the work is waiting on I/O, and the tar
reader releases the GIL in its reads). Per shard it records what the stream needs to plan an
epoch without reading a tar: the sample count (by the same grouping rule the stream counts with,
``SampleGrouper``), the byte size, and the offset of every sample's first tar record (so that a
reader can open a shard at its first owned sample). On the way it finds what will cost samples
later, and reports it:

- damaged stretches inside a tar (the reader resynchronises after them; the samples they cut are
  not counted, so the stream will not wait for them);
- a tar that ends early (truncated: the samples before the cut are indexed);
- samples without an image member (``image_keys``), or without the requested label;
- images whose header cannot be parsed (``check_images``: ``PIL.Image.open``, which reads the
  header only, not the pixels).

Labels: with ``label_key="auto"`` a set is labelled by ``cls`` when any of its samples has a
``cls`` member, else unlabelled. ``classes`` lists ``"0".."max"`` for integer labels, or the
sorted class names when labels are names.
"""

from __future__ import annotations

import http.client
import io
import os
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image

from scale_ssl.data.sample_fields import AUTO, DEFAULT_IMAGE_KEYS, SampleFields, check_label_key
from scale_ssl.data.shard_index import ShardIndex, ShardInfo
from scale_ssl.data.shard_source import (
    SampleGrouper,
    ShardLocation,
    ShardSourceError,
    _open,
    _with_retries_missing_named,
)
from scale_ssl.data.tar_members import TarDamage, iter_tar_entries

# Problems listed by name per shard; beyond that they are counted.
_LISTED_PER_SHARD = 5


@dataclass
class ShardScan:
    """What reading one shard found."""

    name: str
    url: str
    num_samples: int = 0
    bytes: int = 0
    offsets: list[int] | None = field(default_factory=list)
    extensions: Counter = field(default_factory=Counter)
    labels: list = field(default_factory=list)  # raw label values (or None when missing)
    has_cls: bool = False
    problems: list[str] = field(default_factory=list)
    problem_count: int = 0

    def problem(self, text: str) -> None:
        self.problem_count += 1
        if len(self.problems) < _LISTED_PER_SHARD:
            self.problems.append(text)


@dataclass
class IndexResult:
    index: ShardIndex
    scans: list[ShardScan]
    seconds: float

    @property
    def problem_count(self) -> int:
        return sum(scan.problem_count for scan in self.scans)

    def problem_lines(self) -> list[str]:
        lines = []
        for scan in self.scans:
            lines += [f"{scan.name}: {text}" for text in scan.problems]
            if scan.problem_count > len(scan.problems):
                lines.append(f"{scan.name}: ... and {scan.problem_count - len(scan.problems)} more")
        return lines


def build_index(
    location: ShardLocation,
    shards: Sequence[tuple[str, int | None]],
    *,
    label_key: str | None = AUTO,
    image_keys: Sequence[str] | None = None,
    check_images: bool = True,
    workers: int = 8,
    retries: int = 3,
    retry_delay: float = 1.0,
    timeout: float = 60.0,
    progress: Callable[[int, int, ShardScan], None] | None = None,
) -> IndexResult:
    """Read every shard of ``shards`` (names relative to ``location.base``) once and return the
    index (``directory`` set for a local location, ``base`` for a remote one) with what was found."""
    label_key = check_label_key(label_key, "label_key")
    image_keys = tuple(k.lower() for k in image_keys) if image_keys else DEFAULT_IMAGE_KEYS
    if not shards:
        raise FileNotFoundError(f"{location.given}: no tar shards to index")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    start = time.perf_counter()
    done, lock = [0], threading.Lock()

    def scan(name: str) -> ShardScan:
        result = _scan_shard(location.url(name), name, label_key, image_keys, check_images, retries, retry_delay, timeout)
        if progress is not None:
            with lock:
                done[0] += 1
                progress(done[0], len(shards), result)
        return result

    with ThreadPoolExecutor(max_workers=min(workers, len(shards)), thread_name_prefix="index-shards") as pool:
        scans = list(pool.map(scan, [name for name, _ in shards]))

    resolved_label_key = label_key if label_key != AUTO else ("cls" if any(s.has_cls for s in scans) else None)
    classes = _classes(scans) if resolved_label_key is not None else []
    if resolved_label_key is not None:
        fields = SampleFields(["-"], resolved_label_key, classes)
        for scan_result in scans:
            missing = sum(value is None for value in scan_result.labels)
            if missing:
                scan_result.problem(f"{missing} sample(s) without a label ({resolved_label_key})")
            bad = []
            for value in scan_result.labels:
                if value is None:
                    continue
                try:
                    fields.class_index(value)
                except ValueError as error:
                    bad.append(str(error))
            if bad:
                scan_result.problem(f"{len(bad)} sample(s) with unusable labels, e.g. {bad[0]}")
    extensions = sum((s.extensions for s in scans), Counter())
    image_key = next(iter(k for k, _ in extensions.most_common() if k in image_keys), image_keys[0])
    index = ShardIndex(
        shards=[ShardInfo(s.name, s.num_samples, s.bytes, tuple(s.offsets) if s.offsets is not None else None) for s in scans],
        classes=classes,
        image_key=image_key,
        source=f"scale-ssl index-shards {location.given}",
        label_key=resolved_label_key,
    )
    if location.kind == "local":
        index.directory = _local_directory(location)
    else:
        index.base = location.base
    return IndexResult(index, scans, time.perf_counter() - start)


def _local_directory(location: ShardLocation) -> Path:
    return Path(location.base)


def _classes(scans: Sequence[ShardScan]) -> list[str]:
    values = [value for scan in scans for value in scan.labels if value is not None]
    numbers = [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)
               or isinstance(v, str) and v.lstrip("-").isdigit()]
    if len(numbers) == len(values):
        return [str(i) for i in range(max(numbers) + 1)] if numbers else []
    return sorted({str(v) for v in values if not (isinstance(v, str) and v.lstrip("-").isdigit())})


def _scan_shard(url, name, label_key, image_keys, check_images, retries, retry_delay, timeout) -> ShardScan:
    attempt = 0
    while True:
        try:
            return _scan_once(url, name, label_key, image_keys, check_images, retries - attempt, retry_delay, timeout)
        except (OSError, http.client.HTTPException) as error:  # the transfer broke: read it again
            if attempt >= retries:
                raise ShardSourceError(f"cannot read {url} after {attempt + 1} attempt(s): {type(error).__name__}: {error}") from None
            time.sleep(retry_delay * 2**attempt)
            attempt += 1


def _scan_once(url, name, label_key, image_keys, check_images, retries, retry_delay, timeout) -> ShardScan:
    result = ShardScan(name, url)
    opened = _with_retries_missing_named(url, lambda: _open(url, timeout), retries, retry_delay)
    label_member = None if label_key in (None, AUTO) else ("json" if label_key.startswith("json:") else label_key)
    fields = SampleFields(image_keys, label_key if label_key not in (None, AUTO) else None)

    def wanted(extension: str) -> bool:
        if extension == "cls" and label_key == AUTO:
            return True
        if extension == label_member:
            return True
        return check_images and extension in image_keys

    damages: dict[int, TarDamage] = {}
    entries = iter_tar_entries(opened.stream)
    grouper = SampleGrouper(entries, on_damage=lambda d: damages.setdefault(d.offset, d), wanted=wanted)
    ended = None
    try:
        for key, members, offset in grouper:
            result.num_samples += 1
            if offset is None:
                result.offsets = None  # a compressed tar: no byte offsets to seek to
            elif result.offsets is not None:
                result.offsets.append(offset)
            _check_sample(result, key, members, label_key, fields, image_keys, check_images)
    except tarfile.TarError as error:
        ended = error  # truncated; the transfer itself is checked below
    except BaseException:
        opened.finish(abandon=True)
        raise
    if opened.total_size is None:  # a pipe: count the bytes after the end-of-archive blocks too
        result.bytes = entries.position + sum(len(chunk) for chunk in iter(lambda: opened.stream.read(1 << 16), b""))
    else:
        result.bytes = opened.total_size
    transport = opened.finish()
    if transport:
        raise ConnectionError(transport)
    for damage in damages.values():
        result.problem(damage.describe())
    if ended is not None:
        result.problem(f"truncated: {ended}; the {result.num_samples} samples before it are indexed")
    return result


def _check_sample(result: ShardScan, key, members, label_key, fields: SampleFields, image_keys, check_images) -> None:
    present = [ext for ext in image_keys if ext in members]
    if not present:
        result.problem(f"sample {key!r} has no image member ({', '.join(image_keys)}); members: {sorted(members)}")
    else:
        result.extensions[present[0]] += 1
        if check_images:
            try:
                with PIL.Image.open(io.BytesIO(members[present[0]])):
                    pass
            except Exception as error:  # PIL raises UnidentifiedImageError, OSError, SyntaxError...
                result.problem(f"sample {key!r}: the {present[0]} member is not a readable image ({type(error).__name__}: {error})")
    if label_key == AUTO:
        if "cls" in members:
            result.has_cls = True
            result.labels.append(members["cls"].decode("utf-8", "replace").strip())
        else:
            result.labels.append(None)
    elif label_key is not None:
        try:
            result.labels.append(fields.raw_label(members))
        except ValueError:
            result.labels.append(None)


def index_location_base(location: ShardLocation) -> str:
    """The absolute place of a location's shards, for an index written elsewhere (``base``)."""
    if location.kind == "local":
        return os.path.abspath(location.base)
    return location.base
