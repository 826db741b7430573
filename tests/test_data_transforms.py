"""SimCLR views and the evaluation transform: shapes, channels, randomness, pickling."""

from __future__ import annotations

import pickle

import numpy as np
import PIL.Image
import pytest
import torch

from scale_ssl.data import FMNIST_MEAN, FMNIST_STD, EvalTransform, SimCLRViews


def grayscale_image(size=28, seed=0):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8))


def rgb_image(size=40, seed=0):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_two_grayscale_views_are_one_channel_float_and_differ():
    torch.manual_seed(0)
    views = SimCLRViews(28, 1, FMNIST_MEAN, FMNIST_STD)
    first, second = views(grayscale_image())
    assert first.shape == second.shape == (1, 28, 28)
    assert first.dtype == second.dtype == torch.float32
    assert type(first) is torch.Tensor  # plain tensors, not tv_tensors wrappers
    assert not torch.equal(first, second)


def test_channels_follow_the_argument_not_the_input():
    torch.manual_seed(0)
    # RGB input, channels=1: converted to one luminance channel, not kept as three.
    assert SimCLRViews(28, 1, FMNIST_MEAN, FMNIST_STD)(rgb_image())[0].shape == (1, 28, 28)
    # Grayscale input, channels=3: replicated, as a grayscale JPEG in an RGB data set needs.
    assert SimCLRViews(32, 3, (0.5,) * 3, (0.25,) * 3)(grayscale_image())[0].shape == (3, 32, 32)
    assert EvalTransform(28, 1, FMNIST_MEAN, FMNIST_STD)(rgb_image()).shape == (1, 28, 28)


def test_transforms_survive_pickling_with_their_settings():
    torch.manual_seed(0)
    views = SimCLRViews(28, 1, FMNIST_MEAN, FMNIST_STD, crop_scale=(0.5, 1.0), jitter_strength=0.5)
    copy = pickle.loads(pickle.dumps(views))
    assert repr(copy) == repr(views) and "crop_scale=(0.5, 1.0)" in repr(copy)
    first, second = copy(grayscale_image())
    assert first.shape == (1, 28, 28) and not torch.equal(first, second)
    evaluation = EvalTransform(28, 1, FMNIST_MEAN, FMNIST_STD)
    evaluation_copy = pickle.loads(pickle.dumps(evaluation))
    assert torch.equal(evaluation_copy(grayscale_image()), evaluation(grayscale_image()))


def test_eval_transform_is_deterministic_normalised_and_crops_to_size():
    evaluation = EvalTransform(28, 1, FMNIST_MEAN, FMNIST_STD)
    image = grayscale_image()
    assert torch.equal(evaluation(image), evaluation(image))
    constant = PIL.Image.new("L", (28, 28), 51)  # 51 / 255 = 0.2
    expected = (0.2 - FMNIST_MEAN[0]) / FMNIST_STD[0]
    assert torch.allclose(evaluation(constant), torch.full((1, 28, 28), expected), atol=1e-6)
    assert EvalTransform(28, 3, (0.5,) * 3, (0.5,) * 3)(rgb_image(size=40)).shape == (3, 28, 28)
    wide = PIL.Image.new("L", (56, 30))
    assert EvalTransform(28, 1, FMNIST_MEAN, FMNIST_STD)(wide).shape == (1, 28, 28)


def test_blur_is_off_for_small_images_and_on_for_large_ones():
    def blur_p(views):
        return {recipe.blur_p for recipe in views.recipes}

    assert blur_p(SimCLRViews(28, 1, FMNIST_MEAN, FMNIST_STD)) == {0.0}
    assert blur_p(SimCLRViews(96, 3, (0.5,) * 3, (0.5,) * 3)) == {0.5}
    assert blur_p(SimCLRViews(28, 1, FMNIST_MEAN, FMNIST_STD, blur=True)) == {0.5}
    # Saturation, hue and grayscale are meaningless for one channel and only used for three.
    gray = SimCLRViews(28, 1, FMNIST_MEAN, FMNIST_STD).recipes[0]
    assert (gray.saturation, gray.hue, gray.grayscale_p) == (0.0, 0.0, 0.0)
    colour = SimCLRViews(28, 3, (0.5,) * 3, (0.5,) * 3).recipes[0]
    assert (colour.saturation, colour.hue, colour.grayscale_p) == (0.8, 0.2, 0.2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_size=0), "image_size"),
        (dict(channels=2), "channels must be 1"),
        (dict(normalize_mean=(0.5, 0.5, 0.5)), "one value per channel"),
        (dict(normalize_std=(0.0,)), "std values must be positive"),
        (dict(crop_scale=(0.9, 0.1)), "crop_scale"),
        (dict(jitter_p=1.5), "jitter_p"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, message):
    arguments = dict(image_size=28, channels=1, normalize_mean=FMNIST_MEAN, normalize_std=FMNIST_STD) | kwargs
    with pytest.raises(ValueError, match=message):
        SimCLRViews(**arguments)
