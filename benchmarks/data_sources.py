"""Images per second of ``ShardedImageStream`` by where the shards are: local disk, an HTTP server
and an S3-compatible object store (moto's S3 server, through boto3), both on 127.0.0.1, and
optionally a GCS emulator (through google-cloud-storage); measured side by side in one run.

The shards are the same bytes everywhere: ImageNet-like JPEG crops (``data_throughput.py``'s
images) packed by ``make-shards imagefolder`` into shards of 64, indexed with sample offsets, so
that readers whose share starts inside a shard open it there (a seek, an HTTP ``Range`` request,
a ranged ``GetObject``). Each pass reads the whole set once (decode only, so the transport's cost
is not hidden behind augmentation), as 2 ranks played one after the other in this process; the
sources are measured in rotation (local, HTTP, S3, local, ...) and the table gives the median
over the rotations and the ratio to local disk in the same run. The servers run on this machine
and take CPU from the reader: the ratios are an upper bound on the cost of a loopback transport,
not a prediction for a real network.

It also tabulates, from the plans alone, the samples exact mode leaves out per epoch on the
issue's example (7 webdataset shards of 3-40 samples, 2 ranks x 2 workers) under the
whole-shard split that scale_ssl used before and the sample-granular split it uses now.

    .venv/bin/python benchmarks/data_sources.py [--images 384] [--repeats 5] [--workers 0 2] [--gcs]

It rewrites only the ``## Data throughput by source`` section of ``docs/BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import doc_region  # noqa: E402
from data_throughput import BATCH, DecodeOnly, make_folder  # noqa: E402

from scale_ssl.data import EpochShardPlan, ShardedImageStream, make_imagefolder_shards  # noqa: E402
from tests._object_stores import gcs_server, gcs_upload, s3_server, s3_upload  # noqa: E402

SECTION = "## Data throughput by source"
AFTER = "## Data throughput"
ISSUE_SHARDS = [3, 40, 17, 9, 28, 5, 26]


@contextmanager
def http_server(directory: Path):
    """The test suite's range-capable HTTP server (as nginx or a CDN answers ranges)."""
    process = subprocess.Popen([sys.executable, "-u", "-m", "tests._range_http_server", str(directory)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        port = re.search(r"port (\d+)", process.stdout.readline())
        if not port:
            raise RuntimeError("the HTTP server did not start")
        yield f"http://127.0.0.1:{port.group(1)}"
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextmanager
def environment(env: dict):
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def images_per_second(source: str, workers: int, world: int = 2) -> float:
    """One epoch of every rank of a ``world``-rank run, played one after the other."""
    start, images = time.perf_counter(), 0
    for rank in range(world):
        stream = ShardedImageStream(source, BATCH, DecodeOnly(), rank=rank, world_size=world, num_workers=workers,
                                    seed=1, io_timeout=60)
        for batch in stream:
            images += len(batch[1])
    return images / (time.perf_counter() - start)


def whole_shard_drops(sizes, world: int, workers: int, batch: int, epoch: int, seed: int = 0) -> int:
    """Samples left out by the split scale_ssl used before: whole shards dealt round-robin to
    ranks, then to workers; every rank cut to the poorest rank's full batches."""
    order = list(range(len(sizes)))
    random.Random(seed + epoch).shuffle(order)
    steps = min(
        sum(sum(sizes[s] for s in order[rank::world][w::workers]) // batch for w in range(workers))
        for rank in range(world)
    )
    return sum(sizes) - steps * batch * world


def drop_table(epochs: int = 4) -> list[str]:
    total = sum(ISSUE_SHARDS)
    lines = ["| batch / rank | epoch | whole-shard split: dropped | sample split: dropped |", "|---:|---:|---:|---:|"]
    for batch in (4, 8):
        for epoch in range(epochs):
            before = whole_shard_drops(ISSUE_SHARDS, 2, 2, batch, epoch)
            after = EpochShardPlan(ISSUE_SHARDS, epoch=epoch, seed=0, world_size=2, num_workers=2,
                                   batch_size=batch).samples_dropped
            lines.append(f"| {batch} | {epoch} | {before} of {total} ({100 * before / total:.0f} %) | "
                         f"{after} of {total} ({100 * after / total:.0f} %) |")
    return lines


def write_section(markdown: str) -> str:
    return doc_region.write_doc_section(markdown, SECTION, after=AFTER)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--gcs", action="store_true", help="also a GCS emulator (a Python server: slow, indicative)")
    parser.add_argument("--no-write", action="store_true", help="print the tables only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as scratch, ExitStack() as servers:
        scratch = Path(scratch)
        folder, served = scratch / "folder", scratch / "served"
        make_folder(folder, args.images)
        make_imagefolder_shards(folder, served / "train", shard_size=64)
        shards = served / "train"
        sources = {"local disk": str(shards)}
        base = servers.enter_context(http_server(served))
        sources["HTTP (127.0.0.1, range requests)"] = f"{base}/train"
        s3_env = servers.enter_context(s3_server())
        servers.enter_context(environment(s3_env))
        s3_upload(s3_env, shards, "s3://shards-test/train")
        sources["S3 (moto server on 127.0.0.1, boto3)"] = "s3://shards-test/train"
        if args.gcs:
            gcs_env = servers.enter_context(gcs_server())
            servers.enter_context(environment(gcs_env))
            gcs_upload(gcs_env, shards, "gs://shards-test/train")
            sources["GCS (emulator on 127.0.0.1, google-cloud-storage)"] = "gs://shards-test/train"
        size_mb = sum(p.stat().st_size for p in shards.glob("*.tar")) / 1e6
        rates: dict[tuple[str, int], list[float]] = {}
        for workers in args.workers:
            for source in sources.values():  # untimed: page cache, imports, clients, the servers' first request
                images_per_second(source, workers)
            for repeat in range(args.repeats):
                for name, source in sources.items():
                    rate = images_per_second(source, workers)
                    rates.setdefault((name, workers), []).append(rate)
                    print(f"workers={workers} repeat {repeat}: {name:52s} {rate:7.1f} img/s", flush=True)
        shutil.rmtree(folder, ignore_errors=True)

    load_after = os.getloadavg()
    lines = [
        SECTION,
        "",
        f"`benchmarks/data_sources.py --images {args.images} --repeats {args.repeats} --workers "
        f"{' '.join(map(str, args.workers))}{' --gcs' if args.gcs else ''}`, measured "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), torch {torch.__version__}; load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after. {args.images} JPEGs of 300-500 px in shards "
        f"of 64 ({size_mb:.1f} MB), indexed with sample offsets; decode only, batch {BATCH}, exact mode, one "
        f"epoch of each of 2 ranks per pass; median of {args.repeats} passes, sources in rotation. The servers "
        f"share the machine's cores with the reader, so a ratio below 1 is the loopback transport's cost "
        f"*plus* the server's CPU, an upper bound, not a network prediction.",
        "",
        "| source | workers | img/s (median) | vs local disk |",
        "|---|---:|---:|---:|",
    ]
    for workers in args.workers:
        local = statistics.median(rates["local disk", workers])
        for name in sources:
            rate = statistics.median(rates[name, workers])
            lines.append(f"| {name} | {workers} | {rate:.1f} | {rate / local:.2f} |")
    lines += [
        "",
        "Samples exact mode leaves out per epoch on the issue's example (7 webdataset shards of "
        f"{', '.join(map(str, ISSUE_SHARDS))} samples, 2 ranks x 2 workers, seed 0; computed from the plans): "
        "the whole-shard split cut every rank to the poorest rank's full batches; the sample split "
        "leaves out fewer than world x batch whatever the shard sizes.",
        "",
        *drop_table(),
        "",
    ]
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    if not args.no_write:
        print(f"written to {write_section(markdown)}")


if __name__ == "__main__":
    main()
