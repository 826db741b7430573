"""What computing one-pixel convolutions as matrix products saves, side by side in one process.

    .venv/bin/python benchmarks/one_pixel_conv.py [--batch 256] [--steps 5] [--repeats 3]
                                                  [--threads 1] [--write-doc]

The workload is one rank's step of the demo (``configs/simclr/fmnist_cpu.yaml``): SimCLR's ResNet-10
with the ImageNet stem and max-pool on 1-channel 28 px images, so ``layer4`` enters at 2 x 2 and
runs at 1 x 1; head 512-512-128, NT-Xent at T 0.1, SGD. ``--batch`` is the rows the encoder sees
per step (the demo's 128 images per rank x 2 views = 256). Two variants of the same initial
weights, on the same random batch:

* ``conv2d``: every convolution a plain ``nn.Conv2d`` (oneDNN), as torchvision builds it;
* ``one_pixel``: the encoder as ``build_resnet_encoder`` returns it, whose convolutions compute a
  one-pixel output as the matrix product (``scale_ssl/models/one_pixel_conv.py``).

Each rotation times ``--steps`` steps of each variant (after one warm-up step), alternating which
goes first; the table gives the median step per variant and the ratio per rotation (median and
min-max). The layer table times ``layer4``'s two 3x3 convolutions alone, forward + backward, the
same way. ``--write-doc`` rewrites the table between the ``one_pixel_conv`` markers in
docs/BENCHMARKS.md (or ``--doc``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.doc_region import write_doc_region  # noqa: E402
from scale_ssl.losses import NTXentLoss  # noqa: E402
from scale_ssl.models import ProjectionHead, build_resnet_encoder  # noqa: E402
from scale_ssl.models.one_pixel_conv import use_plain_convs  # noqa: E402

REGION = "one_pixel_conv"
DOC = os.path.join(ROOT, "docs", "BENCHMARKS.md")


def _as_plain_conv2d(module: nn.Module) -> nn.Module:
    plain = copy.deepcopy(module)
    use_plain_convs(plain)
    return plain


def _step_timer(encoder: nn.Module, batch: torch.Tensor):
    torch.manual_seed(1)
    head = ProjectionHead(512, 512, 128)
    model = nn.ModuleDict({"encoder": encoder, "head": head})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    criterion = NTXentLoss(0.1)

    def step() -> float:
        start = time.perf_counter()
        z1, z2 = head(encoder(batch)).chunk(2)
        loss = criterion(z1, z2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


def _conv_timer(conv: nn.Module, x: torch.Tensor):
    x = x.clone().requires_grad_()
    grad = torch.randn_like(conv(x))

    def step() -> float:
        start = time.perf_counter()
        conv(x).backward(grad)
        return time.perf_counter() - start

    return step


def _rotations(timers: dict, steps: int, repeats: int) -> dict[str, list[float]]:
    """Median step time per variant per rotation; the first variant alternates."""
    for timer in timers.values():
        timer()  # warm-up: oneDNN picks and caches its kernels
    names = list(timers)
    per_rotation: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % 2 :] + names[: r % 2]:
            per_rotation[name].append(statistics.median(timers[name]() for _ in range(steps)))
    return per_rotation


def measure(batch: int, steps: int, repeats: int) -> dict:
    torch.manual_seed(0)
    encoder, _ = build_resnet_encoder("resnet10", in_channels=1, first_conv=True, maxpool1=True)
    images = torch.randn(batch, 1, 28, 28)
    step = _rotations({"conv2d": _step_timer(_as_plain_conv2d(encoder), images),
                       "one_pixel": _step_timer(encoder, images)}, steps, repeats)  # fmt: skip
    layers = {}
    with torch.no_grad():  # the inputs layer4's convolutions see in the demo's encoder
        h = encoder.layer3(encoder.layer2(encoder.layer1(encoder.maxpool(encoder.relu(encoder.bn1(encoder.conv1(images)))))))
        inner = F.relu(encoder.layer4[0].bn1(encoder.layer4[0].conv1(h)))
    for name, conv, x in (("layer4.0.conv1 (3x3 stride 2, 256 -> 512, 2x2 -> 1x1)", encoder.layer4[0].conv1, h),
                          ("layer4.0.conv2 (3x3, 512 -> 512, 1x1 -> 1x1)", encoder.layer4[0].conv2, inner)):  # fmt: skip
        layers[name] = _rotations({"conv2d": _conv_timer(_as_plain_conv2d(conv), x),
                                   "one_pixel": _conv_timer(conv, x)}, steps, repeats)  # fmt: skip
    return {"step": step, "layers": layers}


def _ratio_cell(times: dict[str, list[float]]) -> str:
    ratios = [a / b for a, b in zip(times["conv2d"], times["one_pixel"])]
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def markdown(result: dict, args, load_start, load_end) -> str:
    ms = lambda seconds: f"{1e3 * statistics.median(seconds):.0f}"  # noqa: E731
    lines = [
        f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} cores "
        f"({platform.processor() or platform.machine()}), torch {torch.__version__}, {args.threads} thread(s); load "
        f"average (1/5/15 min) {' / '.join(f'{x:.2f}' for x in load_start)} at the start, "
        f"{' / '.join(f'{x:.2f}' for x in load_end)} at the end. Median of {args.steps} steps per variant per "
        f"rotation, {args.repeats} rotations; speed-up = conv2d / one_pixel per rotation, median (min-max).",
        "",
        "```bash",
        f".venv/bin/python benchmarks/one_pixel_conv.py --batch {args.batch} --steps {args.steps} "
        f"--repeats {args.repeats} --threads {args.threads} --write-doc",
        "```",
        "",
        "| what (forward + backward) | nn.Conv2d (ms) | OnePixelConv2d (ms) | speed-up |",
        "|---|---|---|---|",
        f"| SimCLR step, ResNet-10 on 28 px, {args.batch} rows | {ms(result['step']['conv2d'])} | "
        f"{ms(result['step']['one_pixel'])} | {_ratio_cell(result['step'])} |",
    ]
    for name, times in result["layers"].items():
        lines.append(f"| {name} | {ms(times['conv2d'])} | {ms(times['one_pixel'])} | {_ratio_cell(times)} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256, help="rows per step (the demo: 128 per rank x 2 views)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant per rotation")
    p.add_argument("--repeats", type=int, default=3, help="rotations")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the demo: 1 per rank)")
    p.add_argument("--write-doc", action="store_true", help="rewrite the table in --doc")
    p.add_argument("--doc", default=DOC, help="the document whose one_pixel_conv region --write-doc rewrites")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    result = measure(args.batch, args.steps, args.repeats)
    text = markdown(result, args, load_start, os.getloadavg())
    print(text)
    if args.write_doc:
        write_doc_region(REGION, text, args.doc)
    return result


if __name__ == "__main__":
    main()
