"""The views follow the published augmentation distributions, tested statistically against the
papers' parameters (written out below from the papers, not taken from our code).

* SimCLR (arXiv:2002.05709, appendix A): random resized crop of area U(0.08, 1) and aspect
  log-uniform in (3/4, 4/3) (torchvision's 10 attempts, then the whole image), flip p=0.5, colour
  jitter p=0.8 with brightness/contrast/saturation factors U(1 - 0.8s, 1 + 0.8s) and hue shift
  U(-0.2s, 0.2s) in a uniformly random order, grayscale p=0.2, blur p=0.5 with sigma U(0.1, 2.0).
* MoCo v2 (arXiv:2003.04297) and SimSiam (arXiv:2011.10566): crop (0.2, 1), jitter (0.4, 0.4,
  0.4, 0.1), the rest as SimCLR.
* BYOL (arXiv:2006.07733, appendix B table 6): jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale 0.2,
  blur p = 1.0 / 0.1 and solarisation p = 0 / 0.2 on the first / second view.
* SwAV (arXiv:2006.09882): 2 x 224 px crops of (0.14, 1) and 6 x 96 px of (0.05, 0.14), SimCLR's
  colour distortion at s = 1, blur p=0.5.

Parameters are read from what the methods' ``train_transform`` builds from the shipped ImageNet
configs, so the configs are checked too. Tests: Kolmogorov-Smirnov against the paper's CDF
(critical value at alpha = 0.001: 1.95 / sqrt(n)), binomial rates within 4.5 standard deviations,
chi-square over the 24 jitter orders (23 degrees of freedom, alpha = 0.001: 49.7). The seeds are
fixed, so the tests are deterministic; the thresholds make a wrong parameter fail at these sample
sizes (e.g. crop scale (0.2, 1) instead of (0.08, 1) gives a KS distance of ~0.13 against 0.014,
a blur rate of 0.4 instead of 0.5 a 28-sigma deviation).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from scale_ssl.config import load_config
from scale_ssl.data import MultiCropViews, SimCLRViews
from scale_ssl.data.cpu_augment import augment_view
from scale_ssl.data.view_recipe import (
    BLUR,
    BRIGHTNESS,
    CONTRAST,
    FLIP,
    GRAYSCALE,
    HEIGHT,
    HUE,
    JITTER,
    LEFT,
    ORDER,
    SATURATION,
    SIGMA,
    SOLARIZE,
    TOP,
    WIDTH,
    sample_view_params,
)
from scale_ssl.methods import METHODS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
KS_ALPHA_001 = 1.95  # Kolmogorov distribution: P(sqrt(n) D > 1.95) = 0.001
CHI2_23_ALPHA_001 = 49.73
IMAGE_H, IMAGE_W = 800, 1000  # large, so that rounding crop sides to pixels does not show


def paper(jitter, crop, *, blur=0.5, solarize=0.0):
    b, c, s, h = jitter
    return {"crop_scale": crop, "brightness": (1 - b, 1 + b), "contrast": (1 - c, 1 + c),
            "saturation": (1 - s, 1 + s), "hue": (-h, h), "jitter_p": 0.8, "grayscale_p": 0.2, "flip_p": 0.5,
            "blur_p": blur, "sigma": (0.1, 2.0), "solarize_p": solarize}


SIMCLR = paper((0.8, 0.8, 0.8, 0.2), (0.08, 1.0))
MOCO_SIMSIAM = paper((0.4, 0.4, 0.4, 0.1), (0.2, 1.0))
BYOL_1 = paper((0.4, 0.4, 0.2, 0.1), (0.08, 1.0), blur=1.0, solarize=0.0)
BYOL_2 = paper((0.4, 0.4, 0.2, 0.1), (0.08, 1.0), blur=0.1, solarize=0.2)
SWAV_224 = paper((0.8, 0.8, 0.8, 0.2), (0.14, 1.0))
SWAV_96 = paper((0.8, 0.8, 0.8, 0.2), (0.05, 0.14))
PUBLISHED = {
    "simclr": [(224, SIMCLR)] * 2,
    "moco": [(224, MOCO_SIMSIAM)] * 2,
    "simsiam": [(224, MOCO_SIMSIAM)] * 2,
    "byol": [(224, BYOL_1), (224, BYOL_2)],
    "swav": [(224, SWAV_224)] * 2 + [(96, SWAV_96)] * 6,
}


# -- the paper's distributions, computed from their definitions ------------------------------------
def accepted_crop_region(height, width, scale, ratio=(3 / 4, 4 / 3), grid=20001):
    """The published crop proposal is (s, t) uniform on [scale] x [log ratio]; an attempt is kept
    when the box fits, i.e. s <= min(W / (H e^t), H e^t / W). Returns t's grid, the accepted s
    range per t, and the acceptance probability of one attempt."""
    t = np.linspace(math.log(ratio[0]), math.log(ratio[1]), grid)
    fits = np.minimum(width / (height * np.exp(t)), height * np.exp(t) / width)
    upper = np.minimum(scale[1], fits)
    length = np.clip(upper - scale[0], 0, None)
    return t, upper, length.mean() / (scale[1] - scale[0])


def crop_area_cdf(height, width, scale):
    """P(area <= x) = integral over t of (min(x, upper(t)) - s_low)+, normalised."""
    _, upper, _ = accepted_crop_region(height, width, scale)
    upper = np.sort(upper)
    mass = np.clip(upper - scale[0], 0, None)
    below = np.concatenate([[0.0], np.cumsum(mass)])  # sum of the masses of the t with upper(t) < x

    def cdf(x):
        x = np.asarray(x, dtype=float)
        k = np.searchsorted(upper, x)
        return (below[k] + (len(upper) - k) * np.clip(x - scale[0], 0, None)) / below[-1]
    return cdf


def crop_log_ratio_cdf(height, width, scale):
    t, upper, _ = accepted_crop_region(height, width, scale)
    mass = np.clip(upper - scale[0], 0, None)
    cumulative = np.cumsum(mass) / mass.sum()
    return lambda x: np.interp(x, t, cumulative)


def uniform_cdf(low, high):
    return lambda x: np.clip((np.asarray(x, dtype=float) - low) / (high - low), 0, 1)


def ks_distance(samples, cdf) -> float:
    x = np.sort(np.asarray(samples, dtype=float))
    n = len(x)
    f = cdf(x)
    return float(max((np.arange(1, n + 1) / n - f).max(), (f - np.arange(n) / n).max()))


def assert_ks(samples, cdf, what):
    distance, n = ks_distance(samples, cdf), len(samples)
    assert distance < KS_ALPHA_001 / math.sqrt(n), f"{what}: KS distance {distance:.4f} over {n} samples"


def assert_rate(hits, n, p, what):
    sd = math.sqrt(n * p * (1 - p))
    if p in (0.0, 1.0):
        assert hits == n * p, f"{what}: {hits} of {n}, expected exactly {n * p:.0f}"
        return
    assert abs(hits - n * p) < 4.5 * sd, f"{what}: {hits} of {n}, expected {n * p:.0f} +- {4.5 * sd:.0f}"


def draws(recipe, n, seed, height=IMAGE_H, width=IMAGE_W) -> np.ndarray:
    torch.manual_seed(seed)
    return torch.stack([sample_view_params(recipe, height, width) for _ in range(n)]).double().numpy()


def check_view(params: np.ndarray, expected: dict, what: str, height=IMAGE_H, width=IMAGE_W) -> None:
    n = len(params)
    area = params[:, HEIGHT] * params[:, WIDTH] / (height * width)
    log_ratio = np.log(params[:, WIDTH] / params[:, HEIGHT])
    assert_ks(area, crop_area_cdf(height, width, expected["crop_scale"]), f"{what} crop area")
    assert_ks(log_ratio, crop_log_ratio_cdf(height, width, expected["crop_scale"]), f"{what} crop log aspect")
    # Position: uniform over the places the box fits (a discrete uniform, spread by U(0, 1)).
    spread = np.random.default_rng(0).random((n, 2))
    for column, side, extent in ((TOP, HEIGHT, height), (LEFT, WIDTH, width)):
        position = (params[:, column] + spread[:, column - TOP]) / (extent - params[:, side] + 1)
        assert_ks(position, uniform_cdf(0, 1), f"{what} crop position {column}")
    for column, key in ((FLIP, "flip_p"), (JITTER, "jitter_p"), (GRAYSCALE, "grayscale_p"), (BLUR, "blur_p"),
                        (SOLARIZE, "solarize_p")):
        assert_rate(int(params[:, column].sum()), n, expected[key], f"{what} {key}")
    jittered = params[params[:, JITTER] == 1]
    for column, key in ((BRIGHTNESS, "brightness"), (CONTRAST, "contrast"), (SATURATION, "saturation"),
                        (HUE, "hue")):
        low, high = expected[key]
        assert_ks(jittered[:, column], uniform_cdf(low, high), f"{what} {key}")
    orders = Counter(tuple(int(v) for v in row[ORDER]) for row in jittered)
    assert set(orders) <= set(itertools.permutations(range(4)))
    expected_count = len(jittered) / 24
    chi2 = sum((orders.get(p, 0) - expected_count) ** 2 / expected_count for p in itertools.permutations(range(4)))
    assert chi2 < CHI2_23_ALPHA_001, f"{what}: jitter orders not uniform (chi-square {chi2:.1f})"
    blurred = params[params[:, BLUR] == 1]
    if len(blurred):
        assert_ks(blurred[:, SIGMA], uniform_cdf(*expected["sigma"]), f"{what} blur sigma")


def imagenet_transform(method: str, augment_on="cpu"):
    config = load_config(str(CONFIGS / method / "imagenet_64gpu.yaml"), [f"data.augment_on={augment_on}"])
    return METHODS[method].train_transform(config.data)


# -- tests ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(PUBLISHED))
def test_each_methods_imagenet_views_follow_its_paper(method):
    transform = imagenet_transform(method)
    published = PUBLISHED[method]
    assert [recipe.size for recipe in transform.recipes] == [size for size, _ in published]
    checked = {}
    for index, (recipe, (size, expected)) in enumerate(zip(transform.recipes, published)):
        if recipe in checked:  # identical recipes are one distribution: test it once
            continue
        checked[recipe] = True
        n = 5000 if method == "swav" else 8000
        check_view(draws(recipe, n, seed=100 + index), expected, f"{method} view {index}")
        # The paper's kernel: 10 % of the view's side, odd (23 px at 224, 9 at 96).
        assert recipe.blur_kernel == {224: 23, 96: 9}[size]


def test_a_wrong_parameter_is_caught():
    """The checks have teeth: MoCo's views are not SimCLR's, BYOL's second view is not its first."""
    moco = imagenet_transform("moco").recipes[0]
    with pytest.raises(AssertionError, match="crop area"):
        check_view(draws(moco, 12000, seed=1), SIMCLR, "moco as simclr")
    first, second = imagenet_transform("byol").recipes
    with pytest.raises(AssertionError, match="blur_p"):
        check_view(draws(second, 12000, seed=2), BYOL_1, "byol view 2 as view 1")


def test_crops_of_an_image_too_wide_for_every_attempt_fall_back_to_the_clamped_centre():
    # 300 x 1000: no proposal of area >= 0.3 fits, so the 10-attempt fallback is common; it must
    # happen at the paper's rate (1 - p_accept)^10 and be the centred box of aspect 4/3, full height.
    height, width, scale = 300, 1000, (0.3, 1.0)
    recipe = SimCLRViews(224, 3, (0.5,) * 3, (0.5,) * 3, crop_scale=scale).recipes[0]
    params = draws(recipe, 20000, seed=7, height=height, width=width)
    _, _, accept = accepted_crop_region(height, width, scale)
    # (An accepted 300 x 400 box is placed at a random left; the fallback always at the centre.)
    fallback = (params[:, HEIGHT] == height) & (params[:, WIDTH] == 400) & (params[:, LEFT] == 300)
    assert_rate(int(fallback.sum()), len(params), (1 - accept) ** 10, "fallback rate")
    assert set(params[fallback, TOP]) == {0.0}
    kept = params[~fallback]
    assert_ks(kept[:, HEIGHT] * kept[:, WIDTH] / (height * width), crop_area_cdf(height, width, scale),
              "accepted crop area")


@pytest.mark.parametrize("augment_on", ["cpu", "device"])
def test_the_pipeline_uses_the_tested_draws(augment_on):
    """What a call of the views does is the sampler's draw for each view, in order: on the device path
    the shipped parameters are those draws; on the CPU path the pixels are those draws applied."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    views = MultiCropViews(3, (0.5,) * 3, (0.25,) * 3, num_crops=(2, 3), size_crops=(64, 32),
                           min_scale_crops=(0.14, 0.05), max_scale_crops=(1.0, 0.14), blur=True,
                           augment_on=augment_on)
    torch.manual_seed(5)
    output = views(image)
    torch.manual_seed(5)
    for recipe, view in zip(views.recipes, output):
        params = sample_view_params(recipe, 90, 120)
        if augment_on == "device":
            assert torch.equal(view[1], params)
        else:
            pixels = augment_view(image, params.tolist(), recipe.size, recipe.blur_kernel)
            expected = (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - 0.5) / 0.25
            torch.testing.assert_close(view, expected, rtol=0, atol=1e-5)


def coordinate_image(height=200, width=256) -> np.ndarray:
    """Red = column, green = row: every output pixel says where in the source it was sampled."""
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([cols, rows, np.zeros_like(rows)], axis=-1).astype(np.uint8)


def test_output_pixels_show_the_published_crop_and_flip_distributions():
    """End to end on pixels: with colour ops off, each output's corner values give back the source
    box the view was resized from (bilinear, half-pixel centres), and its direction the flip."""
    height, width, size, n = 200, 256, 64, 3000
    views = SimCLRViews(size, 3, (0.0,) * 3, (1.0,) * 3, jitter_p=0.0, grayscale_p=0.0, blur=False)
    torch.manual_seed(11)
    image = coordinate_image(height, width)
    areas, flips = [], 0
    for _ in range(n // 2):
        for view in views(image):
            red, green = view[0] * 255, view[1] * 255
            first, last = float(red[size // 2, 0]), float(red[size // 2, -1])
            flipped = first > last
            flips += flipped
            # Output pixel i samples source x = left + (i + 0.5) w / size - 0.5.
            box_w = abs(last - first) * size / (size - 1)
            box_h = float(green[-1, size // 2] - green[0, size // 2]) * size / (size - 1)
            areas.append(box_w * box_h / (height * width))
    assert_rate(flips, n, 0.5, "flipped outputs")
    # Sides are read to about a pixel (uint8 rounding), so compare on a grid that a pixel does not move.
    cdf = crop_area_cdf(height, width, (0.08, 1.0))
    assert_ks(areas, cdf, "crop area read from output pixels")


def test_grayscale_and_jitter_rates_show_in_the_output_pixels():
    """Grayscale outputs (R = G = B) appear at the paper's rate 0.2 on a colour photograph: no other
    op makes a colour image exactly gray (saturation's factor is at least 0.2)."""
    from tests._data_images import photo

    image = np.asarray(photo().resize((120, 140)))
    views = SimCLRViews(48, 3, (0.0,) * 3, (1.0,) * 3, blur=True)
    torch.manual_seed(3)
    n, gray = 2000, 0
    for _ in range(n // 2):
        for view in views(image):
            gray += bool(torch.equal(view[0], view[1]) and torch.equal(view[1], view[2]))
    assert_rate(gray, n, 0.2, "gray outputs")
