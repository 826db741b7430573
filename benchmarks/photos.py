"""Real photographs for the data benchmarks, found on this machine and re-encoded ImageNet-like.

Sources, in order (every one a real camera photograph, none synthetic):

* ``/usr/share/backgrounds/mate/nature/*.jpg``: the nature photographs of Debian's
  ``mate-backgrounds`` package (12 photos, 1280x1024 to 2560x1920; ``make bench`` installs it
  with apt, as ``make data`` installs Fashion-MNIST);
* ``grace_hopper.jpg`` from matplotlib's sample data (a pinned dependency);
* ``china.jpg`` and ``flower.jpg`` from scikit-learn's sample images, when scikit-learn is installed.

``benchmark_jpegs(count)`` cuts ``count`` windows from them (each source scaled 1-2x its fitting
size, then a random window of 400-500 x 330-430 px: ImageNet's typical ~450 x 380) and encodes
each as a JPEG of quality 90 with 4:2:0 chroma (PIL's default, as most ImageNet files are).
The set is the same on every run (fixed seed), so contenders decode the same bytes.
"""

from __future__ import annotations

import glob
import io
import os

import numpy as np
import PIL.Image

MATE_NATURE = "/usr/share/backgrounds/mate/nature"


def photo_sources() -> list[tuple[str, PIL.Image.Image]]:
    """(name, RGB image) of every real photograph found; at least matplotlib's."""
    found = []
    for path in sorted(glob.glob(os.path.join(MATE_NATURE, "*.jpg"))):
        found.append((f"mate-backgrounds/{os.path.basename(path)}", PIL.Image.open(path).convert("RGB")))
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as file:
        found.append(("matplotlib/grace_hopper.jpg", PIL.Image.open(io.BytesIO(file.read())).convert("RGB")))
    try:
        from sklearn.datasets import load_sample_images

        images = load_sample_images()
        for name, pixels in zip(images.filenames, images.images):
            found.append((f"scikit-learn/{os.path.basename(name)}", PIL.Image.fromarray(pixels)))
    except ImportError:
        pass
    return found


def benchmark_jpegs(count: int, seed: int = 0) -> tuple[list[bytes], str]:
    """``count`` JPEG byte strings of ~450 x 380 px cut from the real photos, and a one-line
    description of where they come from (for the benchmark's table)."""
    sources = photo_sources()
    rng = np.random.default_rng(seed)
    out, sizes = [], []
    for i in range(count):
        _, photo = sources[i % len(sources)]
        width, height = int(rng.integers(400, 501)), int(rng.integers(330, 431))
        scale = max(width / photo.width, height / photo.height) * float(rng.uniform(1.0, 2.0))
        resized = photo.resize((int(photo.width * scale) + 1, int(photo.height * scale) + 1), PIL.Image.LANCZOS)
        left = int(rng.integers(0, resized.width - width + 1))
        top = int(rng.integers(0, resized.height - height + 1))
        buffer = io.BytesIO()
        resized.crop((left, top, left + width, top + height)).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
        sizes.append(width * height)
    mate = sum(name.startswith("mate-backgrounds") for name, _ in sources)
    origin = (f"{count} JPEGs (quality 90, mean {np.mean([len(b) for b in out]) / 1024:.0f} KB, mean "
              f"{np.sqrt(np.mean(sizes)):.0f} px geometric side) cut from {len(sources)} real photographs: "
              f"{mate} from Debian's mate-backgrounds, matplotlib's grace_hopper"
              + (", scikit-learn's china and flower" if any(n.startswith("scikit") for n, _ in sources) else ""))
    if not mate:
        origin += f" (mate-backgrounds not installed: `apt-get install mate-backgrounds` adds {MATE_NATURE})"
    return out, origin
