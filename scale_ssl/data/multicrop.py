"""Multi-crop views: a few large "global" crops and several small "local" crops of one image.

Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments"
(SwAV), NeurIPS 2020 (arXiv:2006.09882), sec. 3.2: 2 x 224 px crops of 14-100% of the image plus
6 x 96 px crops of 5-14%, so the model learns to predict a global view's code from local views
at little extra cost.

Each crop gets SimCLR's augmentation at colour strength s (SwAV's ``get_color_distortion``:
jitter (0.8s, 0.8s, 0.8s, 0.2s) with p=0.8, grayscale p=0.2), flip p=0.5 and gaussian blur
p=0.5, sigma in [0.1, 2] (``view_recipe.simclr_recipe``), at its own size and scale range. The
image is decoded once for all crops. The result is a tuple of ``sum(num_crops)`` views, all crops
of one resolution group next to each other (largest first by convention); the stream's collate
stacks each position separately, so different sizes batch fine.
"""

from __future__ import annotations

from collections.abc import Sequence

from scale_ssl.data.transforms import AugmentedViews, _check_image_args
from scale_ssl.data.view_recipe import simclr_recipe


class MultiCropViews(AugmentedViews):
    """``sum(num_crops)`` augmented crops of one image: ``num_crops[i]`` crops of ``size_crops[i]``
    pixels, each covering a random ``[min_scale_crops[i], max_scale_crops[i]]`` share of the area.

    Args:
        channels / normalize_mean / normalize_std: as for ``SimCLRViews``.
        num_crops: crops per resolution, e.g. (2, 6).
        size_crops: output side in pixels per resolution, e.g. (224, 96).
        min_scale_crops / max_scale_crops: crop area range per resolution, e.g. (0.14, 0.05) and
            (1.0, 0.14).
        jitter_strength / blur: colour-jitter strength and gaussian blur (None: only >= 64 px).
        augment_on: ``"cpu"`` or ``"device"``, as for ``AugmentedViews``.

    Plain attributes only, so it pickles into DataLoader workers under any start method.
    """

    def __init__(
        self,
        channels: int,
        normalize_mean: Sequence[float],
        normalize_std: Sequence[float],
        *,
        num_crops: Sequence[int] = (2, 6),
        size_crops: Sequence[int] = (224, 96),
        min_scale_crops: Sequence[float] = (0.14, 0.05),
        max_scale_crops: Sequence[float] = (1.0, 0.14),
        jitter_strength: float = 1.0,
        blur: bool | None = None,
        augment_on: str = "cpu",
    ):
        lists = {"num_crops": num_crops, "size_crops": size_crops,
                 "min_scale_crops": min_scale_crops, "max_scale_crops": max_scale_crops}
        lengths = {name: len(value) for name, value in lists.items()}
        if len(set(lengths.values())) != 1 or not lengths["num_crops"]:
            raise ValueError(
                f"MultiCropViews: num_crops, size_crops, min_scale_crops and max_scale_crops need one entry per "
                f"resolution and the same length, got lengths {lengths}"
            )
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in num_crops) or sum(num_crops) < 2:
            raise ValueError(f"MultiCropViews: num_crops must be counts >= 0 adding up to >= 2, got {list(num_crops)}")
        for low, high in zip(min_scale_crops, max_scale_crops):
            if not 0 < low <= high <= 1:
                raise ValueError(
                    f"MultiCropViews: each crop scale range needs 0 < min <= max <= 1, got min_scale_crops="
                    f"{list(min_scale_crops)} max_scale_crops={list(max_scale_crops)}"
                )
        for size in size_crops:
            _check_image_args(size, channels, normalize_mean, normalize_std)
        self.num_crops = tuple(int(n) for n in num_crops)
        self.size_crops = tuple(int(s) for s in size_crops)
        recipes = []
        for count, size, low, high in zip(self.num_crops, self.size_crops, min_scale_crops, max_scale_crops):
            use_blur = size >= 64 if blur is None else blur
            recipe = simclr_recipe(size, jitter_strength, crop_scale=(float(low), float(high)), blur=use_blur)
            recipes += [recipe] * count
        super().__init__(recipes, channels, normalize_mean, normalize_std, augment_on=augment_on)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_crops={self.num_crops}, size_crops={self.size_crops}, "
                f"augment_on={self.augment_on!r}, views=[{', '.join(r.short_repr() for r in self.recipes)}])")
