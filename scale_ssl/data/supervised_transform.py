"""The standard augmentation for training a classifier on top of a pretrained encoder.

Linear evaluation and fine-tuning in SimCLR (arXiv:2002.05709, appendix B.6), MoCo and BYOL train
with only a random resized crop and a horizontal flip (no colour distortion), and test on the
deterministic ``EvalTransform`` view. ``crop_scale`` is the crop's area range (ImageNet protocol:
(0.08, 1)); small, centred images such as Fashion-MNIST often do better with a milder range.
"""

from __future__ import annotations

from collections.abc import Sequence

import PIL.Image
import torch
import torchvision.transforms.v2 as v2

from scale_ssl.data.transforms import _check_image_args, _to_channels


class ClassifierTrainTransform:
    """Random resized crop (area ``crop_scale``) + horizontal flip (p=0.5), then float in [0, 1]
    and normalisation. Picklable, for DataLoader workers."""

    def __init__(
        self,
        image_size: int,
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        crop_scale: tuple[float, float] = (0.08, 1.0),
        flip_p: float = 0.5,
    ):
        _check_image_args(image_size, channels, mean, std)
        if not (len(crop_scale) == 2 and 0 < crop_scale[0] <= crop_scale[1] <= 1):
            raise ValueError(f"crop_scale must be (low, high) with 0 < low <= high <= 1, got {crop_scale!r}")
        self.transform = v2.Compose(
            [
                _to_channels(channels),
                v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), antialias=True),
                v2.RandomHorizontalFlip(p=flip_p),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=list(mean), std=list(std)),
            ]
        )

    def __call__(self, image: PIL.Image.Image) -> torch.Tensor:
        return self.transform(image).as_subclass(torch.Tensor)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform})"
