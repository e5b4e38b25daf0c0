"""Input-level corruptions: closed forms, statistics of the noise, determinism, lazy == eager, wiring."""

from __future__ import annotations

import typing

import numpy as np
import pytest

from nc_finetune.config import DataConfig
from nc_finetune.data import load_data
from nc_finetune.data.corrupt import (
    CORRUPTIONS,
    CorruptedImages,
    corrupt_image,
    corrupt_split_inputs,
    image_rng,
)
from nc_finetune.errors import ConfigError, DataError


def gray(value: int, size: int = 256) -> np.ndarray:
    return np.full((size, size), value, np.uint8)


def test_schema_lists_exactly_the_corruptions():
    allowed = typing.get_args(typing.get_args(typing.get_type_hints(DataConfig)["corruption"])[0])
    assert set(allowed) == set(CORRUPTIONS)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
@pytest.mark.parametrize("shape", [(28, 28), (32, 32, 3), (20, 24, 1)])
def test_every_corruption_keeps_shape_and_dtype_and_is_deterministic(name, shape):
    img = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    a = corrupt_image(img, name, 5, image_rng(3, 0, 7))
    b = corrupt_image(img, name, 5, image_rng(3, 0, 7))
    assert a.shape == img.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, img)


def test_invert_contrast_brightness_closed_forms():
    img = np.random.default_rng(1).integers(0, 256, size=(16, 16), dtype=np.uint8)
    np.testing.assert_array_equal(corrupt_image(img, "invert", 1, image_rng(0, 0, 0)), 255 - img)

    x = img / 255.0
    for sev, c in zip(range(1, 6), (0.75, 0.5, 0.4, 0.3, 0.15), strict=True):
        expect = np.round(255 * ((x - x.mean()) * c + x.mean()))
        got = corrupt_image(img, "contrast", sev, image_rng(0, 0, 0)).astype(float)
        assert np.abs(got - expect).max() <= 1.0  # rounding only

    got = corrupt_image(gray(100, 4), "brightness", 5, image_rng(0, 0, 0))
    assert (got == int(100 + 0.3 * 255 + 0.5)).all()  # 176.5 rounds half up
    assert (corrupt_image(gray(250, 4), "brightness", 5, image_rng(0, 0, 0)) == 255).all()  # clipped


def test_rgb_brightness_raises_the_hsv_value_like_cifar10c():
    """CIFAR-10-C: rgb2hsv, V += c (clipped), hsv2rgb; hue and saturation are kept, so colours do not wash out."""
    import colorsys

    img = np.random.default_rng(5).integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
    img[0, 0], img[0, 1], img[0, 2] = (0, 0, 0), (255, 255, 255), (250, 10, 10)
    for sev, c in zip(range(1, 6), (0.05, 0.1, 0.15, 0.2, 0.3), strict=True):
        expect = np.array([[colorsys.hsv_to_rgb(h, s, min(v + c, 1.0))
                            for h, s, v in (colorsys.rgb_to_hsv(*(p / 255.0)) for p in row)] for row in img]) * 255
        got = corrupt_image(img, "brightness", sev, image_rng(0, 0, 0)).astype(float)
        assert np.abs(got - expect).max() <= 0.5 + 1e-6, sev  # rounding only
    gray3 = np.repeat(np.random.default_rng(6).integers(0, 256, size=(8, 8, 1), dtype=np.uint8), 3, axis=2)
    np.testing.assert_array_equal(corrupt_image(gray3, "brightness", 4, image_rng(0, 0, 0))[:, :, 0],
                                  corrupt_image(gray3[:, :, 0], "brightness", 4, image_rng(0, 0, 0)))


def test_noise_statistics_match_their_parameters():
    base = gray(128)
    noisy = corrupt_image(base, "gaussian_noise", 5, image_rng(0, 0, 0)).astype(float)
    assert abs((noisy - 128).std() / 255 - 0.10) < 0.003
    assert abs((noisy - 128).mean()) < 0.5

    shot = corrupt_image(base, "shot_noise", 3, image_rng(0, 0, 0)).astype(float) / 255  # Poisson(x c) / c
    x, c = 128 / 255, 100
    assert abs(shot.var() - x / c) / (x / c) < 0.05

    imp = corrupt_image(base, "impulse_noise", 5, image_rng(0, 0, 0))
    hit = (imp == 0) | (imp == 255)
    assert abs(hit.mean() - 0.07) < 0.005
    assert abs((imp == 255).sum() / hit.sum() - 0.5) < 0.05
    assert (imp[~hit] == 128).all()


def test_gaussian_blur_against_a_brute_force_convolution():
    img = np.random.default_rng(2).integers(0, 256, size=(24, 24), dtype=np.uint8)
    sigma, radius = 1.0, 4  # severity 5; scipy truncates the kernel at 4 sigma
    k1 = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k = np.outer(k1, k1) / k1.sum() ** 2
    x = img / 255.0
    got = corrupt_image(img, "gaussian_blur", 5, image_rng(0, 0, 0)).astype(float)
    for i in range(radius, 24 - radius):  # interior pixels: no boundary rule involved
        for j in range(radius, 24 - radius):
            expect = 255 * (x[i - radius:i + radius + 1, j - radius:j + radius + 1] * k).sum()
            assert abs(got[i, j] - expect) <= 0.5 + 1e-6
    assert (corrupt_image(gray(77, 10), "gaussian_blur", 5, image_rng(0, 0, 0)) == 77).all()


def test_pixelate_is_blocky_and_leaves_flat_images_alone():
    assert (corrupt_image(gray(90, 28), "pixelate", 5, image_rng(0, 0, 0)) == 90).all()
    checker = (np.indices((28, 28)).sum(0) % 2 * 255).astype(np.uint8)
    out = corrupt_image(checker, "pixelate", 5, image_rng(0, 0, 0))
    assert out.std() < checker.std() / 2  # a 1-pixel checkerboard cannot survive 0.65x down-sampling


def test_streams_differ_between_images_and_splits():
    base = gray(128, 32)
    a = corrupt_image(base, "gaussian_noise", 3, image_rng(0, 0, 0))
    assert not np.array_equal(a, corrupt_image(base, "gaussian_noise", 3, image_rng(0, 0, 1)))
    assert not np.array_equal(a, corrupt_image(base, "gaussian_noise", 3, image_rng(0, 1, 0)))
    assert not np.array_equal(a, corrupt_image(base, "gaussian_noise", 3, image_rng(1, 0, 0)))


def test_lazy_view_equals_eager_and_subsets_keep_their_pixels():
    imgs = np.random.default_rng(4).integers(0, 256, size=(9, 12, 12), dtype=np.uint8)
    eager = corrupt_split_inputs(imgs, "impulse_noise", 4, seed=5, stream=1)
    lazy = corrupt_split_inputs(list(imgs), "impulse_noise", 4, seed=5, stream=1)
    assert isinstance(lazy, CorruptedImages) and len(lazy) == 9
    for i in range(9):
        np.testing.assert_array_equal(lazy[i], eager[i])
    np.testing.assert_array_equal(lazy[-1], eager[8])
    sub = lazy.select([7, 2])
    np.testing.assert_array_equal(np.stack(list(sub)), eager[[7, 2]])
    np.testing.assert_array_equal(np.stack(lazy[1:4]), eager[1:4])
    with pytest.raises(IndexError):
        lazy[9]


def test_bad_arguments_are_refused():
    img = gray(1, 4)
    with pytest.raises(ConfigError, match="data.corruption must be one of gaussian_noise"):
        corrupt_image(img, "fog", 1, image_rng(0, 0, 0))
    with pytest.raises(ConfigError, match="corruption_severity must be one of 1, 2, 3, 4, 5; got 6"):
        corrupt_image(img, "contrast", 6, image_rng(0, 0, 0))
    with pytest.raises(DataError, match="expects a uint8"):
        corrupt_image(img.astype(np.float32), "contrast", 1, image_rng(0, 0, 0))


def test_load_data_corrupts_both_splits_and_records_it():
    clean = load_data("digits", max_train_samples=50, max_eval_samples=20)
    shifted = load_data("digits", max_train_samples=50, max_eval_samples=20, corruption="invert")
    np.testing.assert_array_equal(shifted.train.inputs, 255 - clean.train.inputs)
    np.testing.assert_array_equal(shifted.test.inputs, 255 - clean.test.inputs)
    np.testing.assert_array_equal(shifted.train.labels, clean.train.labels)
    assert shifted.info["corruption"] == {"name": "invert", "severity": 3, "seed": 0}
    assert "corruption" not in clean.info
    with pytest.raises(ConfigError, match="corruption_severity"):
        load_data("digits", corruption="contrast", corruption_severity=0)


def test_load_data_refuses_corrupting_text(monkeypatch):
    from nc_finetune.data import ClassificationData, Split

    def fake(name):
        split = Split(inputs=["a b", "c d", "e f", "g h"], labels=np.array([0, 1, 0, 1]))
        return ClassificationData(name, "text", split, split.subset([0, 1]), 2, ["n", "p"], {})

    monkeypatch.setattr("nc_finetune.data._builtin_splits", lambda name, tr, te: fake(name))
    with pytest.raises(ConfigError, match="applies to image datasets; 'rotten-tomatoes' is text"):
        load_data("rotten-tomatoes", corruption="invert")
