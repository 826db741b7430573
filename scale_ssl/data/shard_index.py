"""``shards.json``: the index of a set of webdataset tar shards.

The index is what lets every rank plan an epoch without reading a tar or talking to another
rank: it lists each shard with its exact sample count, so the stream can compute, from the file
alone, how many full batches each rank and worker will produce (contract 5: equal steps per
rank) and which samples of which shard each of them reads. Shard names are stored relative to the
index, so a shard directory can be moved or copied as a whole.

Format (``format_version`` 1; the fields marked optional were added later and are ignored by
readers that do not know them, so every index stays readable by every version):

- ``num_samples``, ``classes``, ``image_key`` (the most common image member extension),
  ``source`` (what wrote it);
- ``shards``: ``[{"name", "num_samples", "bytes", "offsets"?}]``. ``offsets`` (optional) is the
  byte offset of every sample's first tar record, in order: a reader that owns samples
  ``[a, b)`` of a shard opens it at ``offsets[a]`` and stops at ``offsets[b]``
  (``scale-ssl index-shards`` and the shard writer record them);
- ``label_key`` (optional): where a sample's label is: ``"cls"`` (a member holding the integer,
  or a class name listed in ``classes``), ``"json:<field>"`` (a field of the ``.json`` member),
  or ``null`` for unlabelled shards. Absent: ``"cls"`` (the only form older writers made);
- ``base`` (optional): where the shards are, when the index is not beside them: an absolute path
  or a URL (``http(s)://``, ``s3://``, ``gs://``) that shard names are relative to.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

INDEX_FILENAME = "shards.json"
INDEX_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard: its file name relative to the index (or to ``base``), its sample count, its
    size, and optionally the byte offset of every sample's first tar record."""

    name: str
    num_samples: int
    bytes: int
    offsets: tuple[int, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": self.name, "num_samples": self.num_samples, "bytes": self.bytes}
        if self.offsets is not None:
            entry["offsets"] = list(self.offsets)
        return entry


@dataclass
class ShardIndex:
    """The contents of ``shards.json``, plus the directory it was loaded from.

    ``directory`` is not written to the file: it is where the index lives, and shard names are
    resolved against it by ``urls()``.
    """

    shards: list[ShardInfo]
    classes: list[str]
    image_key: str
    source: str
    num_samples: int = -1
    format_version: int = INDEX_FORMAT_VERSION
    label_key: str | None = "cls"
    base: str | None = None
    directory: Path | None = field(default=None, compare=False)

    def __post_init__(self):
        counted = sum(shard.num_samples for shard in self.shards)
        if self.num_samples == -1:
            self.num_samples = counted
        elif self.num_samples != counted:
            raise ValueError(
                f"num_samples is {self.num_samples} but the shards hold {counted} samples; "
                f"leave num_samples out to have it summed from the shards"
            )

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def labelled(self) -> bool:
        return self.label_key is not None

    def urls(self) -> list[str]:
        """Where every shard is, in index order: ``base`` joined with its name, or the index's own
        directory when there is no ``base`` (then the index must have been loaded or saved)."""
        if self.base is not None:
            base = self.base
            if not _is_url(base) and not os.path.isabs(base) and self.directory is not None:
                base = str(self.directory / base)
            return [join_location(base, shard.name) for shard in self.shards]
        if self.directory is None:
            raise ValueError(
                "this ShardIndex has no directory yet: load it with ShardIndex.load(...) or write "
                "it with index.save(directory) before asking for shard urls"
            )
        return [join_location(str(self.directory), shard.name) for shard in self.shards]

    def to_json(self) -> dict[str, Any]:
        raw = {
            "format_version": self.format_version,
            "num_samples": self.num_samples,
            "classes": list(self.classes),
            "image_key": self.image_key,
            "label_key": self.label_key,
            "source": self.source,
        }
        if self.base is not None:
            raw["base"] = self.base
        raw["shards"] = [shard.to_json() for shard in self.shards]
        return raw

    def to_bytes(self) -> bytes:
        # One field, and one shard, per line: readable, and diffs of a re-index stay small.
        fields = [f" {json.dumps(key)}: {json.dumps(value)}," for key, value in self.to_json().items() if key != "shards"]
        shards = ",\n  ".join(json.dumps(shard.to_json(), separators=(",", ":")) for shard in self.shards)
        return ("{\n" + "\n".join(fields) + f'\n "shards": [\n  {shards}\n ]\n}}\n').encode()

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/shards.json`` and remember ``directory``; returns the file's path."""
        return self.write(Path(directory) / INDEX_FILENAME)

    def write(self, path: str | os.PathLike) -> Path:
        """Write the index to the file ``path`` (any name) and remember its directory."""
        path = Path(path)
        # Written through a temporary name so a reader never sees half an index.
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(self.to_bytes())
        os.replace(partial, path)
        self.directory = path.parent
        return path

    @classmethod
    def load(cls, path_or_dir: str | os.PathLike) -> ShardIndex:
        """Read the index of a local shard directory, or a path to its ``shards.json``.

        Every listed shard must exist on disk: a missing one is reported here, by name, rather
        than when a worker reaches it in the middle of an epoch.
        """
        given = Path(path_or_dir)
        if "://" in str(path_or_dir):
            raise ValueError(
                f"ShardIndex.load takes a local directory or shards.json path, got {path_or_dir!r}; "
                f"read remote indexes with scale_ssl.data.load_index"
            )
        path = given / INDEX_FILENAME if given.is_dir() else given
        if not path.is_file():
            hint = (
                f"{given} has no {INDEX_FILENAME}: index its shards with "
                f"`scale-ssl index-shards {given}`"
                if given.is_dir()
                else f"{given} does not exist"
            )
            raise FileNotFoundError(f"shard index not found: {hint}")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"shard index {path} is not valid JSON: {error}") from None
        index = cls._from_json(raw, path)
        index.directory = path.parent
        missing = [url for url in index.urls() if not _is_url(url) and not os.path.isfile(url)]
        if missing:
            raise FileNotFoundError(
                f"shard index {path} lists {len(missing)} shard(s) missing on disk, first: "
                f"{missing[0]}; re-write the shards (overwrite=True) or restore the files"
            )
        return index

    @classmethod
    def from_bytes(cls, raw: bytes, origin: str) -> ShardIndex:
        """Parse the bytes of a ``shards.json`` fetched from ``origin`` (a URL, named in errors).

        The result has no ``directory``: the caller knows where its shards are.
        """
        try:
            parsed = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"shard index {origin} is not valid JSON: {error}") from None
        return cls._from_json(parsed, origin)

    @classmethod
    def _from_json(cls, raw: Any, path: Path | str) -> ShardIndex:
        def malformed(problem: str) -> ValueError:
            return ValueError(
                f"shard index {path} is malformed: {problem}; re-write it with scale-ssl index-shards"
            )

        if not isinstance(raw, dict):
            raise malformed("the top level is not a JSON object")
        version = raw.get("format_version")
        if version != INDEX_FORMAT_VERSION:
            raise malformed(
                f"format_version is {version!r}, this scale_ssl reads version {INDEX_FORMAT_VERSION}"
            )
        expected_types = {
            "num_samples": int,
            "classes": list,
            "image_key": str,
            "source": str,
            "shards": list,
        }
        for key, kind in expected_types.items():
            if not isinstance(raw.get(key), kind) or isinstance(raw.get(key), bool):
                raise malformed(f"{key!r} is missing or not a {kind.__name__}")
        if not all(isinstance(name, str) for name in raw["classes"]):
            raise malformed("'classes' must be a list of strings")
        label_key = raw.get("label_key", "cls")
        if label_key is not None and not isinstance(label_key, str):
            raise malformed(f"'label_key' must be a string or null, got {label_key!r}")
        base = raw.get("base")
        if base is not None and (not isinstance(base, str) or not base):
            raise malformed(f"'base' must be a non-empty string (a path or URL), got {base!r}")
        shards = []
        for position, entry in enumerate(raw["shards"]):
            if (
                not isinstance(entry, dict)
                or not isinstance(entry.get("name"), str)
                or not _is_count(entry.get("num_samples"))
                or not _is_count(entry.get("bytes"))
            ):
                raise malformed(
                    f"shards[{position}] must be an object with a string 'name' and non-negative "
                    f"integer 'num_samples' and 'bytes', got {entry!r}"
                )
            name = PurePosixPath(entry["name"])
            if name.is_absolute() or ".." in name.parts:
                raise malformed(f"shards[{position}] name {entry['name']!r} leaves the directory")
            offsets = entry.get("offsets")
            if offsets is not None:
                problem = _offsets_problem(offsets, entry["num_samples"], entry["bytes"])
                if problem:
                    raise malformed(f"shards[{position}] ({entry['name']}) 'offsets' {problem}")
                offsets = tuple(offsets)
            shards.append(ShardInfo(entry["name"], entry["num_samples"], entry["bytes"], offsets))
        names = [shard.name for shard in shards]
        if len(set(names)) != len(names):
            raise malformed("a shard is listed twice")
        try:
            return cls(
                shards=shards,
                classes=list(raw["classes"]),
                image_key=raw["image_key"],
                source=raw["source"],
                num_samples=raw["num_samples"],
                format_version=version,
                label_key=label_key,
                base=base,
            )
        except ValueError as error:
            raise malformed(str(error)) from None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _offsets_problem(offsets: Any, num_samples: int, size: int) -> str | None:
    if not isinstance(offsets, list) or len(offsets) != num_samples:
        return f"must be a list of num_samples={num_samples} integers"
    previous = -1
    for offset in offsets:
        if not _is_count(offset) or offset % 512 or offset <= previous or offset >= max(size, 1):
            return (
                "must be increasing multiples of 512 below the shard's size in bytes; "
                "re-run scale-ssl index-shards"
            )
        previous = offset
    return None


def _is_url(location: str) -> bool:
    return location.split("://", 1)[0].lower() in ("http", "https", "s3", "gs") and "://" in location


def join_location(base: str, name: str) -> str:
    """``name`` (a relative POSIX path) inside ``base`` (a directory or a URL prefix)."""
    if _is_url(base):
        if base.lower().startswith(("http://", "https://")):
            return f"{base.rstrip('/')}/{urllib.parse.quote(name)}"
        return f"{base.rstrip('/')}/{name}"
    return os.path.join(base, name)
