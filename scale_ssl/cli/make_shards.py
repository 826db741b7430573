"""``scale-ssl make-shards``: pack a data set into webdataset shards with a ``shards.json`` index."""

from __future__ import annotations

import os
import time

from scale_ssl.data import FASHION_MNIST_ROOT, ShardIndex, make_fashion_mnist_shards


def _complete(out_dir: str) -> bool:
    try:
        return all(ShardIndex.load(os.path.join(out_dir, split)).num_shards > 0 for split in ("train", "test"))
    except (FileNotFoundError, ValueError):
        return False


def run_make_shards(args) -> None:
    if args.shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {args.shard_size}")
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
