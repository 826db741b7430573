"""Both augmentation paths apply the published ops: each op, and each whole view, against
torchvision's definitions (``torchvision.transforms.v2.functional``, what the PyTorch versions of
SimCLR, MoCo, BYOL and SwAV use), on a real photograph.

Tolerances: the CPU path works in uint8 and rounds after every op, as PIL and torchvision's uint8
ops do, so a single op may differ from the float reference by one grey level of rounding, and a
whole view (up to eight rounded ops) by a few levels on a few pixels; the mean difference is kept
far below a level. The device path works in float32: single ops agree to 1e-4 (the luma weights
0.299/0.587/0.114 against torchvision's 0.2989/0.587/0.114).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F

from scale_ssl.data import SimCLRViews
from scale_ssl.data import cpu_augment as cpu
from scale_ssl.data.device_augment import DeviceViewAugment, _gaussian_blur
from scale_ssl.data.view_recipe import (
    BLUR,
    BRIGHTNESS,
    CONTRAST,
    FLIP,
    GRAYSCALE,
    HUE,
    JITTER,
    ORDER,
    SATURATION,
    SIGMA,
    SOLARIZE,
    TOP,
    WIDTH,
    ViewRecipe,
    sample_view_params,
)
from tests._data_images import photo

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.array(photo().resize((112, 96)))


def as_chw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1).int()


def levels(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round().int()


REFERENCE_JITTER = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
FACTOR = (BRIGHTNESS, CONTRAST, SATURATION, HUE)


@pytest.mark.parametrize("op, values", [
    ("brightness", [0.2, 0.7, 1.3, 1.8]), ("contrast", [0.2, 0.9, 1.8]), ("saturation", [0.0, 0.6, 1.8]),
    ("hue", [-0.5, -0.2, 0.01, 0.13, 0.5]),
])
def test_cpu_jitter_ops_are_torchvisions_to_one_grey_level(pixels, op, values):
    mine = getattr(cpu, f"adjust_{op}")
    reference = getattr(F, f"adjust_{op}")
    image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    for value in values:
        difference = (as_chw(mine(pixels, value)) - levels(reference(image, value))).abs()
        assert difference.max() <= 1, (op, value, int(difference.max()))


@pytest.mark.parametrize("kernel", [23, 9])  # the paper's kernel at 224 and at 96 px
def test_cpu_blur_is_the_papers_gaussian_to_one_grey_level(pixels, kernel):
    image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    for sigma in (0.1, 0.5, 1.0, 1.7, 2.0):
        reference = levels(F.gaussian_blur(image, [kernel, kernel], [sigma, sigma]))
        assert (as_chw(cpu.gaussian_blur(pixels, sigma, kernel)) - reference).abs().max() <= 1, sigma


def test_cpu_grayscale_and_solarize_are_torchvisions(pixels):
    image = torch.from_numpy(pixels[:, :96]).permute(2, 0, 1)
    params = [0.0] * 18
    params[TOP:WIDTH + 1] = [0, 0, 96, 96]
    params[GRAYSCALE] = 1.0
    gray = as_chw(cpu.augment_view(pixels, params, 96, 9))
    reference = levels(F.rgb_to_grayscale(image.float() / 255, num_output_channels=3))
    # (uint8 crop-resize at the same size and box is the identity, so only grayscale acts)
    assert (gray - reference).abs().max() <= 1
    params[GRAYSCALE], params[SOLARIZE] = 0.0, 1.0
    solarized = as_chw(cpu.augment_view(pixels, params, 96, 9))
    assert torch.equal(solarized, F.solarize(image, threshold=128).int())


def finish_reference(x: torch.Tensor, params: torch.Tensor, kernel: int) -> torch.Tensor:
    if params[FLIP]:
        x = F.horizontal_flip(x)
    if params[JITTER]:
        for op in params[ORDER].int().tolist():
            x = REFERENCE_JITTER[op](x, float(params[FACTOR[op]]))
    if params[GRAYSCALE]:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    if params[BLUR]:
        sigma = float(params[SIGMA])
        x = F.gaussian_blur(x, [kernel, kernel], [sigma, sigma])
    if params[SOLARIZE]:
        x = F.solarize(x, threshold=0.5)
    return x


def many_params(n: int, image_hw=(96, 112), size=48, seed=0) -> torch.Tensor:
    # Every op often: jitter, grayscale, blur and solarize each at least half the time.
    recipe = ViewRecipe(size, crop_scale=(0.3, 1.0), jitter_p=0.9, grayscale_p=0.5, blur_p=0.6, solarize_p=0.5)
    torch.manual_seed(seed)
    return torch.stack([sample_view_params(recipe, *image_hw) for _ in range(n)])


def test_cpu_crop_resize_is_bilinear_up_to_2x_and_antialiased_beyond(pixels):
    """Up to a 2x downscale: bilinear with half-pixel centres, torchvision's ``resized_crop``
    without antialiasing (as the paper's TF code resizes), to one level. Beyond: area averaging,
    an antialiasing box filter, within a few levels on average of torchvision's antialiased
    (triangle-filter) resize; without it a 4x downscale would alias."""
    large = np.array(photo().resize((400, 360)))
    image = torch.from_numpy(large).permute(2, 0, 1).float()
    for top, left, h, w, size in [(10, 20, 100, 120, 96), (0, 0, 180, 190, 96), (3, 3, 60, 70, 96)]:
        params = [float(top), float(left), float(h), float(w)] + [0.0] * 14
        mine = as_chw(cpu.crop_resize(large, params, size))
        reference = F.resized_crop(image, top, left, h, w, [size, size], antialias=False).round().int()
        assert (mine - reference).abs().max() <= 1, (h, w, size)
    for top, left, h, w, size in [(0, 0, 360, 400, 96), (5, 7, 300, 280, 64)]:
        params = [float(top), float(left), float(h), float(w)] + [0.0] * 14
        mine = as_chw(cpu.crop_resize(large, params, size))
        reference = F.resized_crop(image, top, left, h, w, [size, size], antialias=True).round().int()
        aliased = F.resized_crop(image, top, left, h, w, [size, size], antialias=False).round().int()
        assert (mine - reference).abs().float().mean() < 4 < (mine - aliased).abs().float().mean()


def test_cpu_views_are_the_reference_composition_to_a_few_levels(pixels):
    """From the same crop, the whole op chain (flip, jitter in each draw's order, grayscale, blur,
    solarize) against torchvision's float ops."""
    worst, total, count = 0, 0.0, 0
    for params in many_params(48):
        crop = cpu.crop_resize(pixels, params.tolist(), 48)
        mine = as_chw(cpu.augment_view(crop, [0.0, 0.0, 48.0, 48.0] + params.tolist()[4:], 48, 5))
        reference = finish_reference(torch.from_numpy(crop).permute(2, 0, 1).float() / 255, params, 5)
        difference = (mine - levels(reference)).abs()
        worst, total, count = max(worst, int(difference.max())), total + float(difference.float().sum()), count + difference.numel()
    # Rounded ops accumulate: a few levels on the odd pixel, well under one level on average.
    assert worst <= 6 and total / count < 0.35, (worst, total / count)


def test_device_views_are_the_reference_composition_per_sample(pixels):
    """Batched, each sample with its own factors, order, coins and sigma: equal to running the
    torchvision ops sample by sample."""
    params = many_params(48)
    crops = torch.stack([torch.from_numpy(cpu.crop_resize(pixels, p.tolist(), 48)).permute(2, 0, 1)
                         for p in params])
    out = DeviceViewAugment(MEAN, STD)((crops, params))
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    for i in range(len(params)):
        expected = (finish_reference(crops[i].float() / 255, params[i], 5) - mean) / std
        torch.testing.assert_close(out[i], expected, rtol=0, atol=2e-3)  # 2e-3 in normalised units = 1e-4 x 1/std x 255/255


def test_device_blur_takes_one_sigma_per_sample():
    x = torch.rand(3, 3, 40, 40)
    sigmas = torch.tensor([0.1, 1.0, 2.0])
    out = _gaussian_blur(x, sigmas, 9)
    for i, sigma in enumerate(sigmas.tolist()):
        torch.testing.assert_close(out[i], F.gaussian_blur(x[i], [9, 9], [sigma, sigma]), rtol=0, atol=1e-5)


def test_both_paths_make_the_same_views_from_the_same_draws(pixels):
    """``augment_on`` moves work, not the distribution: the same seeds give the same views to
    within the CPU path's uint8 rounding."""
    cpu_views = SimCLRViews(64, 3, MEAN, STD, blur=True)
    device_views = SimCLRViews(64, 3, MEAN, STD, blur=True, augment_on="device")
    finish = device_views.device_augmentation()
    difference = []
    for seed in range(24):
        torch.manual_seed(seed)
        on_cpu = cpu_views(pixels)
        torch.manual_seed(seed)
        shipped = device_views(pixels)
        assert all(crop.dtype == torch.uint8 and crop.shape == (3, 64, 64) for crop, _ in shipped)
        batch = tuple((crop[None], params[None]) for crop, params in shipped)
        on_device = finish(batch)
        std = torch.tensor(STD).view(3, 1, 1)
        for a, b in zip(on_cpu, on_device):
            difference.append(((a - b[0]) * std * 255).abs())
    difference = torch.stack(difference)
    # The CPU path blurs with the kernel cut at 4 sigma and rounds per op; levels, not more.
    assert difference.max() <= 8 and difference.mean() < 0.5, (float(difference.max()), float(difference.mean()))


def test_device_augment_passes_other_batch_parts_through_and_checks_shapes():
    augment = DeviceViewAugment(MEAN, STD)
    labels = torch.arange(4)
    params = many_params(4, size=16)
    crops = torch.zeros(4, 3, 16, 16, dtype=torch.uint8)
    (views, out_labels) = augment((((crops, params), (crops, params)), labels))
    assert [v.shape for v in views] == [(4, 3, 16, 16)] * 2 and views[0].dtype == torch.float32
    assert out_labels is labels
    with pytest.raises(ValueError, match="channels"):
        augment((torch.zeros(4, 1, 16, 16, dtype=torch.uint8), params))
