"""Input pipeline: PNG (8/16-bit) and JPEG decode, folder errors, seeded batch augmentation, cache-then-shuffle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import AugmentSection
from pipeline.errors import InputError
from pipeline.training.inputs import InputSpec, directory_dataset, directory_files, load_images, make_dataset

NO_AUG = {"rotation_deg": 0, "translate": 0, "zoom": 0, "contrast": 0, "brightness": 0, "horizontal_flip": False,
          "shear_deg": 0, "fill_mode": "constant"}


def _gradient(side: int = 32) -> np.ndarray:
    return np.tile(np.linspace(0, 1, side, dtype=np.float64), (side, 1))


def test_decodes_8_and_16_bit_png_and_jpeg_to_unit_floats(tmp_path: Path) -> None:
    ramp = _gradient()
    Image.fromarray((ramp * 255).round().astype(np.uint8)).save(tmp_path / "g8.png")
    Image.fromarray((ramp * 65535).round().astype(np.uint16)).save(tmp_path / "g16.png")
    Image.fromarray((ramp * 255).round().astype(np.uint8)).convert("RGB").save(tmp_path / "c.jpg", quality=95)
    spec = InputSpec(32, 1, 2)
    g8, g16, jpg = load_images([str(tmp_path / n) for n in ("g8.png", "g16.png", "c.jpg")], spec)
    assert g8.shape == (32, 32, 1) and g8.dtype == np.float32
    np.testing.assert_allclose(g8[..., 0], ramp, atol=1 / 255)
    np.testing.assert_allclose(g16[..., 0], ramp, atol=1e-4)  # 16-bit precision kept, not cut to 8 bits
    assert np.abs(g16[..., 0] - ramp).max() < np.abs(g8[..., 0] - ramp).max()
    np.testing.assert_allclose(jpg[..., 0], ramp, atol=0.03)
    rgb = load_images([str(tmp_path / "g8.png")], InputSpec(16, 3, 2))  # gray → 3 channels, resized
    assert rgb.shape == (1, 16, 16, 3) and np.allclose(rgb[..., 0], rgb[..., 2])


def test_missing_or_empty_image_folder_says_path_and_layout(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"dataset/train .*does not exist.*ROOT/<class>/<image>"):
        directory_files("dataset/train")  # the seed's Q9 path
    (tmp_path / "NORMAL").mkdir()
    with pytest.raises(InputError, match="holds no images.*NORMAL"):
        directory_files(tmp_path)


def _folder(root: Path, n: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for label in ("NORMAL", "PNEUMONIA"):
        (root / label).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(root / label / f"{i}.png")
    return root


def test_directory_dataset_caches_then_shuffles_each_epoch(tmp_path: Path) -> None:
    ds, classes = directory_dataset(_folder(tmp_path), InputSpec(24, 1, 2), batch_size=4, training=True, seed=3)
    assert classes == ["NORMAL", "PNEUMONIA"]
    epochs = [np.concatenate([x.numpy().reshape(len(x), -1)[:, 0] for x, _ in ds]) for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) and not np.array_equal(epochs[0], epochs[1])


def test_augmentation_is_seeded_and_has_no_flip_by_default(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    paths = sorted(str(p) for p in root.rglob("*.png"))
    labels = np.array([0] * 8 + [1] * 8)
    spec = InputSpec(24, 1, 2)
    aug = AugmentSection(**{**NO_AUG, "rotation_deg": 10, "zoom": 0.1, "contrast": 0.2})

    def batches(seed: int, augment: AugmentSection | None) -> list[np.ndarray]:
        ds = make_dataset(paths, labels, spec, batch_size=16, training=True, seed=seed, augment=augment)
        return [x.numpy() for x, _ in ds]

    plain = batches(1, None)[0]
    a, b, c = batches(1, aug)[0], batches(1, aug)[0], batches(2, aug)[0]
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, plain)
    assert a.min() >= 0 and a.max() <= 1
    assert batches(1, AugmentSection(**NO_AUG))[0].tolist() == plain.tolist()  # all off: untouched


def test_horizontal_flip_only_when_enabled_and_exactly_mirrors() -> None:
    from pipeline.training.models.augment import RandomAffineAugment

    images = np.random.default_rng(0).random((32, 12, 12, 1)).astype(np.float32)
    seed = np.array([5, 6], np.int64)
    unflipped = np.asarray(RandomAffineAugment()(images, training=True, seed=seed))
    np.testing.assert_allclose(unflipped, images, atol=1e-6)
    out = np.asarray(RandomAffineAugment(horizontal_flip=True)(images, training=True, seed=seed))
    mirrored = [np.allclose(o, i[:, ::-1], atol=1e-6) for o, i in zip(out, images, strict=True)]
    same = [np.allclose(o, i, atol=1e-6) for o, i in zip(out, images, strict=True)]
    assert all(m or s for m, s in zip(mirrored, same, strict=True)) and 5 < sum(mirrored) < 27


def test_grayscale_stored_as_rgb_is_warped_once_with_the_same_result() -> None:
    from pipeline.training.models.augment import RandomAffineAugment

    gray = np.random.default_rng(1).random((8, 20, 20, 1)).astype(np.float32)
    layer = RandomAffineAugment(rotation_deg=20, zoom=0.1, translate=0.1)
    seed = np.array([1, 2], np.int64)
    one = np.asarray(layer(gray, training=True, seed=seed))
    three = np.asarray(layer(np.repeat(gray, 3, axis=-1), training=True, seed=seed))
    np.testing.assert_allclose(three, np.repeat(one, 3, axis=-1), atol=1e-6)
    colour = np.concatenate([gray, gray * 0.5, gray], axis=-1)  # not gray: each channel warped the same way
    out = np.asarray(layer(colour, training=True, seed=seed))
    np.testing.assert_allclose(out[..., 1], one[..., 0] * 0.5, atol=1e-5)
