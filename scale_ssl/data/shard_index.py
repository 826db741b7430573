"""``shards.json``: the index that sits beside a directory of webdataset tar shards.

The index is what lets every rank plan an epoch without reading a tar or talking to another
rank: it lists each shard with its exact sample count, so the stream can compute, from the file
alone, how many full batches each rank and worker will produce (contract 5: equal steps per
rank). Shard names are stored relative to the index, so a shard directory can be moved or copied
as a whole.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

INDEX_FILENAME = "shards.json"
INDEX_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard: its file name relative to the index, its sample count and its size."""

    name: str
    num_samples: int
    bytes: int


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

    def urls(self) -> list[str]:
        """Full path of every shard, in index order (needs an index loaded from or saved to disk)."""
        if self.directory is None:
            raise ValueError(
                "this ShardIndex has no directory yet: load it with ShardIndex.load(...) or write "
                "it with index.save(directory) before asking for shard urls"
            )
        return [str(self.directory / shard.name) for shard in self.shards]

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "num_samples": self.num_samples,
            "classes": list(self.classes),
            "image_key": self.image_key,
            "source": self.source,
            "shards": [asdict(shard) for shard in self.shards],
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/shards.json`` and remember ``directory``; returns the file's path."""
        directory = Path(directory)
        path = directory / INDEX_FILENAME
        # Written through a temporary name so a reader never sees half an index.
        partial = path.with_suffix(".json.partial")
        partial.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        os.replace(partial, path)
        self.directory = directory
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
                f"copy remote shards to local disk first"
            )
        path = given / INDEX_FILENAME if given.is_dir() else given
        if not path.is_file():
            hint = (
                f"{given} has no {INDEX_FILENAME}: is it a shard directory written by "
                f"write_image_shards or make_fashion_mnist_shards?"
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
        missing = [url for url in index.urls() if not os.path.isfile(url)]
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
                f"shard index {path} is malformed: {problem}; re-write it with write_image_shards"
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
            shards.append(ShardInfo(entry["name"], entry["num_samples"], entry["bytes"]))
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
            )
        except ValueError as error:
            raise malformed(str(error)) from None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
