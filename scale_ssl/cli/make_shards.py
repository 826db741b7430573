"""``scale-ssl make-shards``: pack a data set into webdataset shards with a ``shards.json`` index."""

from __future__ import annotations

import os
import time

from scale_ssl.data import FASHION_MNIST_ROOT, ShardIndex, make_fashion_mnist_shards, make_imagefolder_shards


def _complete(out_dir: str) -> bool:
    try:
        return all(ShardIndex.load(os.path.join(out_dir, split)).num_shards > 0 for split in ("train", "test"))
    except (FileNotFoundError, ValueError):
        return False


def run_make_shards(args) -> None:
    if args.shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {args.shard_size}")
    if args.source == "imagefolder":
        _make_imagefolder_shards(args)
        return
    if args.src_dir is not None:
        raise ValueError(f"fashion-mnist takes no SRC_DIR (got {args.src_dir!r}); use --root for its idx files")
    if args.skip_existing and _complete(args.out):
        print(f"shards already complete in {args.out} (shards.json present); nothing to do")
        return
    start = time.perf_counter()
    indexes = make_fashion_mnist_shards(
        args.out, shard_size=args.shard_size, root=args.root or FASHION_MNIST_ROOT, overwrite=args.overwrite
    )
    elapsed = time.perf_counter() - start
    for split, index in indexes.items():
        size = sum(s.bytes for s in index.shards)
        print(f"{split}: {index.num_samples} images in {index.num_shards} shards ({size / 1e6:.1f} MB) -> {os.path.join(args.out, split)}")
    print(f"packed in {elapsed:.1f} s")


def _make_imagefolder_shards(args) -> None:
    if args.src_dir is None:
        raise ValueError("make-shards imagefolder needs SRC_DIR: scale-ssl make-shards imagefolder SRC_DIR --out DIR")
    if args.max_shard_bytes is not None and args.max_shard_bytes < 1:
        raise ValueError(f"--max-shard-bytes must be >= 1, got {args.max_shard_bytes}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if args.skip_existing:
        try:
            if ShardIndex.load(args.out).num_shards > 0:
                print(f"shards already complete in {args.out} (shards.json present); nothing to do")
                return
        except (FileNotFoundError, ValueError):
            pass
    start = time.perf_counter()
    result = make_imagefolder_shards(
        args.src_dir,
        args.out,
        shard_size=args.shard_size,
        max_shard_bytes=args.max_shard_bytes,
        workers=args.workers,
        overwrite=args.overwrite,
    )
    elapsed = time.perf_counter() - start
    index = result.index
    for path, problem in result.skipped:
        print(f"skipped unreadable image {path}: {problem}")
    size = sum(s.bytes for s in index.shards)
    print(
        f"{index.num_samples} images in {len(index.classes)} classes, {index.num_shards} shards "
        f"({size / 1e6:.1f} MB, formats {result.formats}) -> {args.out}; "
        f"{len(result.skipped)} unreadable image(s) skipped; packed in {elapsed:.1f} s"
    )
