"""Real images for the data tests: Fashion-MNIST digits of clothing and Grace Hopper's portrait
(matplotlib's sample photo), saved as JPEG files in a torchvision ImageFolder tree."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import PIL.Image

from scale_ssl.data import FASHION_MNIST_ROOT, load_fashion_mnist


def photo() -> PIL.Image.Image:
    """A real colour photograph (512 x 600) shipped with matplotlib, a pinned dependency."""
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as file:
        return PIL.Image.open(io.BytesIO(file.read())).convert("RGB")


def fmnist_jpegs(count: int, quality: int = 90) -> list[tuple[bytes, int]]:
    """The first ``count`` Fashion-MNIST test images as JPEG bytes, with their labels."""
    images, labels = load_fashion_mnist("test", FASHION_MNIST_ROOT)
    out = []
    for pixels, label in zip(images[:count], labels[:count]):
        buffer = io.BytesIO()
        PIL.Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
        out.append((buffer.getvalue(), int(label)))
    return out


def corrupt_jpeg(valid: bytes) -> bytes:
    """A JPEG cut in the middle of its entropy-coded data: PIL opens it but cannot decode it."""
    return valid[: len(valid) // 2]


def make_image_folder(root: Path, fmnist_count: int = 40, photo_crops: int = 6) -> dict:
    """``root/<class>/<file>``: Fashion-MNIST JPEGs in folders named by class, crops of the photo
    in ``photo/``, plus one PNG named ``.JPEG`` (as ImageNet has), one unreadable JPEG and one
    text file. Returns what was made, for the tests to check against."""
    made = {"images": {}, "unreadable": [], "png_named_jpeg": None}
    for i, (data, label) in enumerate(fmnist_jpegs(fmnist_count)):
        path = root / f"class_{label}" / f"fmnist.{i:04d}.jpg"  # a dot inside the stem on purpose
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        made["images"][path] = data
    portrait = photo()
    rng = np.random.default_rng(0)
    (root / "photo").mkdir(parents=True, exist_ok=True)
    for i in range(photo_crops):
        left, top = int(rng.integers(0, 200)), int(rng.integers(0, 250))
        crop = portrait.crop((left, top, left + 300, top + 340))
        buffer = io.BytesIO()
        crop.save(buffer, format="JPEG", quality=85)
        path = root / "photo" / f"hopper_{i}.JPEG"
        path.write_bytes(buffer.getvalue())
        made["images"][path] = buffer.getvalue()
    buffer = io.BytesIO()
    portrait.resize((60, 70)).save(buffer, format="PNG")
    path = root / "photo" / "really_a_png.JPEG"
    path.write_bytes(buffer.getvalue())
    made["images"][path] = buffer.getvalue()
    made["png_named_jpeg"] = path
    broken = root / "photo" / "broken.jpg"
    broken.write_bytes(corrupt_jpeg(made["images"][root / "photo" / "hopper_0.JPEG"]))
    made["unreadable"].append(broken)
    (root / "photo" / "notes.txt").write_text("not an image")
    return made
