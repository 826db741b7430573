"""Images per second of the data pipeline: tar shards (``ShardedImageStream``) against a
torchvision ``ImageFolder`` of the same JPEG files, with the same transforms and 0 / 1 / 2
DataLoader workers; plus PIL against ``torchvision.io.decode_jpeg`` for the decode alone.

The images are ImageNet-like: JPEG crops (quality 90, sides of 300-500 px, ImageNet's typical
size) of the real photographs that ship with matplotlib (and scikit-learn when installed), in
four class folders. Each configuration reads the whole set once per repeat; the table shows the
median over repeats. Run:

    .venv/bin/python benchmarks/data_throughput.py [--images 384] [--repeats 3]

It rewrites only the ``## Data throughput`` section of ``docs/BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torchvision
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import doc_region  # noqa: E402

from scale_ssl.data import ShardedImageStream, SimCLRViews, make_imagefolder_shards  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BATCH = 32
SECTION = "## Data throughput"


def source_photos() -> list[PIL.Image.Image]:
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as file:
        photos = [PIL.Image.open(io.BytesIO(file.read())).convert("RGB")]
    try:
        from sklearn.datasets import load_sample_images

        photos += [PIL.Image.fromarray(image) for image in load_sample_images().images]
    except ImportError:
        pass
    return photos


def make_folder(root: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    photos = source_photos()
    for i in range(count):
        photo = photos[i % len(photos)]
        width, height = (int(v) for v in rng.integers(300, 501, size=2))
        scale = max(width / photo.width, height / photo.height) * float(rng.uniform(1.0, 1.6))
        resized = photo.resize((int(photo.width * scale) + 1, int(photo.height * scale) + 1))
        left = int(rng.integers(0, resized.width - width + 1))
        top = int(rng.integers(0, resized.height - height + 1))
        path = root / f"class_{i % 4}" / f"img_{i:05d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        resized.crop((left, top, left + width, top + height)).save(path, format="JPEG", quality=90)


class DecodeOnly:
    """Decoding is all the work: returns the image size, so batches collate whatever the size."""

    def __call__(self, image: PIL.Image.Image) -> torch.Tensor:
        return torch.tensor(image.size)


def transforms() -> dict:
    chosen = {
        "decode only": DecodeOnly(),
        "decode + SimCLR 2x224": SimCLRViews(224, 3, IMAGENET_MEAN, IMAGENET_STD),
    }
    try:
        from scale_ssl.data.multicrop import MultiCropViews

        chosen["decode + SwAV 2x224+6x96"] = MultiCropViews(3, IMAGENET_MEAN, IMAGENET_STD)
    except ImportError:
        print("scale_ssl.data.multicrop is not there yet: SwAV multi-crop not measured", file=sys.stderr)
    return chosen


def shard_images_per_second(shards: Path, transform, workers: int) -> float:
    stream = ShardedImageStream(shards, BATCH, transform, rank=0, world_size=1, num_workers=workers)
    start, images = time.perf_counter(), 0
    for batch in stream:
        images += len(batch[1])
    return images / (time.perf_counter() - start)


def folder_images_per_second(folder: Path, transform, workers: int) -> float:
    dataset = torchvision.datasets.ImageFolder(str(folder), transform=transform)
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers, drop_last=True)
    start, images = time.perf_counter(), 0
    for batch in loader:
        images += len(batch[1])
    return images / (time.perf_counter() - start)


def decoder_images_per_second(folder: Path, repeats: int) -> dict[str, float]:
    """One process, one thread: PIL ``open + load`` vs ``torchvision.io.decode_jpeg``."""
    files = [path.read_bytes() for path in sorted(folder.rglob("*.JPEG"))]
    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in files]

    def pil():
        for data in files:
            with PIL.Image.open(io.BytesIO(data)) as image:
                image.load()

    def torchvision_io():
        for data in tensors:
            torchvision.io.decode_jpeg(data)

    results = {}
    for name, run in (("PIL", pil), ("torchvision.io.decode_jpeg", torchvision_io)):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        results[name] = len(files) / statistics.median(times)
    return results


def median_rate(measure, repeats: int) -> float:
    return statistics.median(measure() for _ in range(repeats))


def write_section(markdown: str) -> str:
    return doc_region.write_doc_section(markdown, SECTION)


def goal_verdicts(rows: dict, bare_pil: float, repeats: int) -> list[str]:
    """The issue's two goals, judged from this run's rows (stated, never assumed)."""
    out = []
    if ("decode only", 0) in rows:
        share = rows["decode only", 0][0] / bare_pil
        out.append(f"- Goal: the shard pipeline (decode only, 0 workers) >= 0.8 x decoding alone: "
                   f"{share:.2f} -> **{'met' if share >= 0.8 else 'not met'}**.")
    ratios = {key: shard / folder for key, (shard, folder) in rows.items()}
    at_least = [key for key, ratio in ratios.items() if ratio >= 1.0]
    out.append(f"- Goal: shards >= the ImageFolder baseline: met in {len(at_least)} of {len(ratios)} rows "
               f"(shards / ImageFolder {min(ratios.values()):.2f}-{max(ratios.values()):.2f}, median "
               f"{statistics.median(ratios.values()):.2f}) -> **{'met' if len(at_least) == len(ratios) else 'not met'}**. "
               f"Medians of {repeats} passes on a 2-core machine move by ~10 % between runs, so a row "
               "within 0.9-1.1 is a tie, not a result.")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    torch.set_num_threads(1)  # DataLoader workers run one thread each; so does the main process

    with tempfile.TemporaryDirectory() as scratch:
        folder, shards = Path(scratch) / "folder", Path(scratch) / "shards"
        make_folder(folder, args.images)
        make_imagefolder_shards(folder, shards, shard_size=64)
        decoders = decoder_images_per_second(folder, args.repeats)
        rows = {}
        for name, transform in transforms().items():
            for workers in args.workers:
                shard_rate = median_rate(lambda: shard_images_per_second(shards, transform, workers), args.repeats)
                folder_rate = median_rate(lambda: folder_images_per_second(folder, transform, workers), args.repeats)
                rows[name, workers] = (shard_rate, folder_rate)
                print(f"{name:28s} workers={workers}: shards {shard_rate:7.1f} img/s, ImageFolder {folder_rate:7.1f} img/s",
                      flush=True)

    lines = [
        SECTION,
        "",
        f"`benchmarks/data_throughput.py --images {args.images} --repeats {args.repeats}` on "
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch "
        f"{torch.__version__}, torchvision {torchvision.__version__}, Pillow {PIL.__version__}; "
        f"{args.images} JPEGs of 300-500 px (quality 90) cut from real photographs, batch {BATCH}, "
        f"one thread per process, median images/s over {args.repeats} passes (worker start-up "
        f"included). Shards: `ShardedImageStream` (exact mode, shuffle buffer 1000) over shards of "
        f"64 written by `make-shards imagefolder`; ImageFolder: `torchvision.datasets.ImageFolder` + "
        f"`DataLoader(shuffle=True)` on the same files, same transform. The machine is shared, so "
        f"figures are noisy; compare within a row.",
        "",
        "| transform | workers | shards img/s | ImageFolder img/s | shards / ImageFolder |",
        "|---|---:|---:|---:|---:|",
    ]
    for (name, workers), (shard_rate, folder_rate) in rows.items():
        lines.append(f"| {name} | {workers} | {shard_rate:.1f} | {folder_rate:.1f} | {shard_rate / folder_rate:.2f} |")
    bare = decoders["PIL"]
    lines += [
        "",
        "Decoding alone (one process, one thread, the same JPEG bytes already in memory), and the",
        "shard pipeline's decode-only rate with 0 workers (one thread too) as a share of it: what",
        "reading tars, shuffling, seeding and collating cost on top of the decode.",
        "",
        "| decoder | images/s |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {rate:.1f} |" for name, rate in decoders.items()]
    if ("decode only", 0) in rows:
        lines.append(f"| shard pipeline, decode only, 0 workers | {rows['decode only', 0][0]:.1f} "
                     f"({rows['decode only', 0][0] / bare:.2f} x PIL alone) |")
    lines += ["", *goal_verdicts(rows, bare, args.repeats), ""]
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    if not args.no_write:
        print(f"written to {write_section(markdown)}")


if __name__ == "__main__":
    main()
