"""Image augmentations: the random views of pretraining, and a fixed one for evaluation.

``AugmentedViews`` decodes an image once and cuts one view per ``ViewRecipe`` from it
(``view_recipe.py`` states each view's distribution and cites the papers). Two paths, one
distribution:

* ``augment_on="cpu"`` (default): every op runs per sample in the loader on uint8 pixels with
  OpenCV (``cpu_augment.py``) and the views leave as normalised float tensors.
* ``augment_on="device"``: the loader only crops and resizes, and ships each view as
  ``(uint8 crops, parameter rows)``; the trainer's device runs the rest batched
  (``device_augment.DeviceViewAugment``, which ``device_augmentation()`` returns). On a GPU this
  moves the colour and blur work off the CPU entirely.

``decode(encoded)`` is the shard stream's hook: JPEG bytes become pixels through OpenCV, at a
reduced size when every view can afford it (``decode.py``). Called directly, the views also take a
PIL image or a uint8 array.

Channels are explicit: ``channels=1`` keeps grayscale data (Fashion-MNIST) as one channel rather
than replicating it into fake RGB, and only the colour augmentations that mean something for one
channel (brightness, contrast) are used. ``channels=3`` converts any input to RGB (a grayscale
JPEG inside ImageNet, say) and uses the full colour distortion.

All of them are plain picklable objects, so DataLoader workers receive them under any start method.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import PIL.Image
import torch
import torchvision.transforms.v2 as v2

from scale_ssl.data.cpu_augment import Normalizer, augment_view, crop_resize, use_one_thread
from scale_ssl.data.decode import as_pixels, decode_image
from scale_ssl.data.view_recipe import ViewRecipe, byol_recipes, sample_view_params, simclr_recipe

# Fashion-MNIST train-split pixel mean and standard deviation, on the [0, 1] scale.
FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)

# Below this size SimCLR's blur mostly erases the image (the paper drops it for CIFAR-10).
BLUR_MIN_IMAGE_SIZE = 64
AUGMENT_ON = ("cpu", "device")


class AugmentedViews:
    """One augmented view per recipe, all cut from one decode of the image.

    Args:
        recipes: the views' distributions, in output order.
        channels / normalize_mean / normalize_std: 1 or 3 channels and their normalisation.
        augment_on: ``"cpu"`` (normalised float views) or ``"device"`` (``(uint8 crops, params)``
            per view, finished by ``device_augmentation()`` on the training device).
    """

    def __init__(
        self,
        recipes: Sequence[ViewRecipe],
        channels: int,
        normalize_mean: Sequence[float],
        normalize_std: Sequence[float],
        *,
        augment_on: str = "cpu",
    ):
        if not recipes:
            raise ValueError("AugmentedViews needs at least one ViewRecipe")
        _check_image_args(recipes[0].size, channels, normalize_mean, normalize_std)
        if augment_on not in AUGMENT_ON:
            raise ValueError(f"augment_on must be one of {AUGMENT_ON}, got {augment_on!r}")
        self.recipes = tuple(recipe.for_channels(channels) for recipe in recipes)
        self.channels = channels
        self.mean, self.std = tuple(normalize_mean), tuple(normalize_std)
        self.augment_on = augment_on
        self._normalize = Normalizer(self.mean, self.std)

    # -- the stream's decode hook ----------------------------------------------------------
    def decode(self, encoded: bytes) -> np.ndarray:
        """Image bytes -> uint8 pixels, at a reduced JPEG size when every view can afford it."""
        return decode_image(encoded, self.channels, self._min_crop_side)

    def _min_crop_side(self, height: float, width: float) -> float:
        """The smallest crop side any view can cut from a ``height`` x ``width`` image, in units of
        that view's output side (the smallest area at the most extreme aspect ratio)."""
        area = height * width
        return min(
            math.sqrt(r.crop_scale[0] * area * min(r.crop_ratio[0], 1 / r.crop_ratio[1])) / r.size
            for r in self.recipes
        )

    # -- augmentation ----------------------------------------------------------------------
    def __call__(self, image) -> tuple:
        use_one_thread()
        pixels = as_pixels(image, self.channels)
        height, width = pixels.shape[:2]
        views = []
        for recipe in self.recipes:
            params = sample_view_params(recipe, height, width)
            values = params.tolist()
            if self.augment_on == "device":
                crop = crop_resize(pixels, values, recipe.size)
                crop = torch.from_numpy(crop[None] if crop.ndim == 2 else crop.transpose(2, 0, 1).copy())
                views.append((crop, params))
            else:
                views.append(self._normalize(augment_view(pixels, values, recipe.size, recipe.blur_kernel)))
        return tuple(views)

    def device_augmentation(self):
        """The batched second half for ``augment_on="device"`` (None on the CPU path)."""
        if self.augment_on != "device":
            return None
        from scale_ssl.data.device_augment import DeviceViewAugment

        return DeviceViewAugment(self.mean, self.std)

    def __repr__(self) -> str:
        views = ", ".join(recipe.short_repr() for recipe in self.recipes)
        return f"{type(self).__name__}(channels={self.channels}, augment_on={self.augment_on!r}, views=[{views}])"


class SimCLRViews(AugmentedViews):
    """Two independently augmented views of one image, as SimCLR (Chen et al. 2020, appendix A).

    Each view: random resized crop (area ``crop_scale``, aspect 3/4-4/3), horizontal flip
    (``flip_p`` 0.5), colour jitter with strength ``jitter_strength`` = s applied with ``jitter_p``
    0.8 (brightness, contrast and saturation 0.8s, hue 0.2s, in random order; one channel:
    brightness and contrast only), random grayscale (``grayscale_p`` 0.2, three channels only),
    optional gaussian blur (p=0.5, kernel 10% of the image, sigma in [0.1, 2]), normalisation.

    ``blur=None`` turns blur on only for images of at least 64 pixels.
    """

    def __init__(
        self,
        image_size: int,
        channels: int,
        normalize_mean: Sequence[float],
        normalize_std: Sequence[float],
        *,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        jitter_strength: float = 1.0,
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur: bool | None = None,
        flip_p: float = 0.5,
        augment_on: str = "cpu",
    ):
        _check_image_args(image_size, channels, normalize_mean, normalize_std)
        if blur is None:
            blur = image_size >= BLUR_MIN_IMAGE_SIZE
        recipe = simclr_recipe(image_size, jitter_strength, crop_scale=tuple(crop_scale), blur=blur)
        recipe = replace(recipe, jitter_p=jitter_p, grayscale_p=grayscale_p, flip_p=flip_p)
        super().__init__(self._recipes(recipe, image_size, jitter_strength, crop_scale, blur), channels,
                         normalize_mean, normalize_std, augment_on=augment_on)
        self.image_size = image_size

    @staticmethod
    def _recipes(recipe, image_size, jitter_strength, crop_scale, blur) -> tuple[ViewRecipe, ViewRecipe]:
        return recipe, recipe

    @classmethod
    def from_data_config(cls, data, owner: str) -> "SimCLRViews":
        """The two-view augmentation from a run config's ``data`` section (SimCLR, MoCo v2, BYOL,
        SimSiam, AMDIM, CPC v2); ``owner`` names the method in the error for unexpected ``data.views``."""
        if data.get("views"):
            raise ValueError(f"data.views={dict(data['views'])!r}: {owner} takes no extra view options; leave it empty")
        return cls(
            image_size=data["image_size"], channels=data["channels"], normalize_mean=tuple(data["mean"]),
            normalize_std=tuple(data["std"]), crop_scale=tuple(data["crop_scale"]),
            jitter_strength=data["jitter_strength"], blur=data["gaussian_blur"],
            augment_on=data.get("augment_on", "cpu"),
        )


class BYOLViews(SimCLRViews):
    """BYOL's two asymmetric views (Grill et al. 2020, arXiv:2006.07733, appendix B): SimCLR's
    crop and flip, colour jitter (0.8s, 0.8s, 0.4s, 0.2s) with p=0.8 (``jitter_strength`` s = 0.5
    gives the paper's (0.4, 0.4, 0.2, 0.1)), grayscale p=0.2; gaussian blur always on the first view and with p=0.1 on
    the second; solarisation p=0.2 on the second view only."""

    @staticmethod
    def _recipes(recipe, image_size, jitter_strength, crop_scale, blur) -> tuple[ViewRecipe, ViewRecipe]:
        first, second = byol_recipes(image_size, jitter_strength, crop_scale=tuple(crop_scale), blur=blur)
        keep = dict(jitter_p=recipe.jitter_p, grayscale_p=recipe.grayscale_p, flip_p=recipe.flip_p)
        return replace(first, **keep), replace(second, **keep)


class EvalTransform:
    """The deterministic view used for evaluation and linear probes: resize the short side to
    ``image_size``, centre-crop a square, convert to float in [0, 1], normalise."""

    def __init__(
        self,
        image_size: int,
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
    ):
        _check_image_args(image_size, channels, mean, std)
        self.transform = v2.Compose(
            [
                _to_channels(channels),
                v2.ToImage(),
                v2.Resize(image_size, antialias=True),
                v2.CenterCrop(image_size),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=list(mean), std=list(std)),
            ]
        )
        self.image_size = image_size
        self.channels = channels

    def __call__(self, image: PIL.Image.Image) -> torch.Tensor:
        return self.transform(image).as_subclass(torch.Tensor)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform})"


def _to_channels(channels: int) -> v2.Transform:
    # Grayscale(1) leaves a one-channel image as it is; RGB() replicates one channel into three.
    return v2.Grayscale(num_output_channels=1) if channels == 1 else v2.RGB()


def _check_image_args(image_size, channels, mean, std) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer (pixels), got {image_size!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"mean and std need one value per channel ({channels}), got mean={tuple(mean)} "
            f"std={tuple(std)}; for Fashion-MNIST use FMNIST_MEAN and FMNIST_STD"
        )
    if any(value <= 0 for value in std):
        raise ValueError(f"std values must be positive, got {tuple(std)}")
