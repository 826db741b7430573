"""``scale-ssl index-shards LOCATION``: index webdataset shards written by any tool.

Reads every shard once (streaming, ``--workers`` at a time) and writes ``shards.json`` beside
them (local directory, ``s3://``, ``gs://``) or to ``--out``; prints every damaged stretch and bad
member it met. See ``scale_ssl/data/shard_indexer.py`` for what is recorded and checked.
"""

from __future__ import annotations

import os
import sys

from scale_ssl.data.sample_fields import AUTO
from scale_ssl.data.shard_index import INDEX_FILENAME, join_location
from scale_ssl.data.shard_indexer import build_index, index_location_base
from scale_ssl.data.shard_source import ShardLocation, list_shards, read_file, resolve_location
from scale_ssl.data import object_store


def _out_target(location: ShardLocation, out: str | None) -> tuple[str, str]:
    """``(where the index is written, the directory-like place it sits in)``."""
    if out is None:
        if location.kind in ("http", "pipe"):
            raise ValueError(
                f"cannot write an index to {location.given} ({'an HTTP server' if location.kind == 'http' else 'a pipe: command'}): "
                f"pass --out PATH (a local file or directory, or an s3:// or gs:// URL)"
            )
        target = join_location(location.base, location.index_name)
        return target, location.base
    if out.startswith(("s3://", "gs://")):
        target = out if out.endswith(".json") else join_location(out.rstrip("/"), INDEX_FILENAME)
        return target, target.rsplit("/", 1)[0]
    if "://" in out:
        raise ValueError(f"--out {out!r}: write the index to a local path or an s3:// or gs:// URL")
    target = out if out.endswith(".json") else os.path.join(out, INDEX_FILENAME)
    return target, os.path.dirname(os.path.abspath(target))


def _exists(target: str) -> bool:
    if target.startswith(("s3://", "gs://")):
        try:
            read_file(target, retries=0)
            return True
        except Exception:
            return False
    return os.path.exists(target)


def run_index_shards(args) -> int:
    location = resolve_location(args.location)
    if location.kind == "pipe":
        raise ValueError("index-shards reads shards from a directory, a brace list or glob, http(s)://, s3:// or gs://; "
                         "a pipe: command cannot be listed")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    target, target_dir = _out_target(location, args.out)
    if _exists(target) and not args.overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    label_key = None if args.label_key in ("none", "null") else args.label_key
    image_keys = [k.strip() for k in args.image_keys.split(",") if k.strip()] if args.image_keys else None
    shards = list_shards(location)
    print(f"indexing {len(shards)} shard(s) of {location.given} with {min(args.workers, len(shards))} reader(s)...", flush=True)
    step = max(1, len(shards) // 10)

    def progress(done: int, total: int, scan) -> None:
        if total >= 20 and (done % step == 0 or done == total):
            print(f"  {done}/{total} shards read", flush=True)

    result = build_index(location, shards, label_key=label_key, image_keys=image_keys,
                         check_images=not args.no_check_images, workers=args.workers, progress=progress)
    index = result.index
    # An index written away from its shards records where they are.
    shard_dir = index_location_base(location)
    same_place = (os.path.abspath(target_dir) == shard_dir) if location.kind == "local" and "://" not in target \
        else target_dir.rstrip("/") == location.base.rstrip("/")
    index.base = None if same_place else shard_dir
    payload = index.to_bytes()
    if target.startswith(("s3://", "gs://")):
        object_store.write_object(target, payload)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        index.write(target)
    for line in result.problem_lines():
        print(f"  problem: {line}", file=sys.stderr)
    labels = f"labels: {index.label_key} ({len(index.classes)} classes)" if index.label_key else "no labels"
    offsets = sum(shard.offsets is not None for shard in index.shards)
    print(
        f"{index.num_samples} samples in {index.num_shards} shards ({sum(s.bytes for s in index.shards) / 1e6:.1f} MB), "
        f"image_key {index.image_key}, {labels}, sample offsets for {offsets} of {index.num_shards} shards; "
        f"{result.problem_count} problem(s); read in {result.seconds:.1f} s -> {target}",
        flush=True,
    )
    return 0


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "index-shards",
        help="index webdataset tar shards written by any tool (writes shards.json)",
        description="Read every shard once and write the index the stream plans epochs from: sample counts, "
                    "sizes, sample offsets, labels. Reports damaged tars and bad members.",
    )
    parser.add_argument("location", help="a directory, a brace list or glob of shards (/data/s-{000..099}.tar, "
                                         "s3://bucket/in1k/*.tar), an http(s):// brace list, or s3:// / gs:// prefix")
    parser.add_argument("--out", default=None, help="where to write the index (a .json file, a directory, or an "
                                                    "s3:// / gs:// URL); default: shards.json beside the shards")
    parser.add_argument("--workers", type=int, default=8, help="shards read at the same time (default 8)")
    parser.add_argument("--label-key", default=AUTO,
                        help="where labels are: auto (cls when present), cls, json:<field>, or none (default auto)")
    parser.add_argument("--image-keys", default=None,
                        help="comma-separated image member extensions, in order (default jpg,jpeg,png,webp,...)")
    parser.add_argument("--no-check-images", action="store_true",
                        help="do not parse each image's header (faster; bad images are then found while training)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing index")
