"""Training-time augmentation as one Keras preprocessing layer.

``keras.layers.RandomRotation``, ``RandomTranslation``, ``RandomZoom`` (and a shear) each
resample the whole image; stacking them costs one interpolation pass per layer and blurs
the image a little more each time. :class:`RandomAffineAugment` draws all geometric
parameters per image, composes them into ONE affine matrix and resamples once, then
applies contrast and brightness as cheap per-pixel arithmetic — the same family of
transforms, several times faster (``benchmarks/bench_input.py``).

Randomness is stateless: pass ``seed`` (a ``[2]`` integer tensor, e.g. one per batch from
``tf.data.Dataset.random``) and the output depends only on that seed and the images, so
parallel ``tf.data`` maps stay reproducible. Without ``seed`` the layer draws one from its
own seed generator (inside a model).
"""

from __future__ import annotations

import math
from typing import Any

import keras


@keras.saving.register_keras_serializable(package="xrayops")
class RandomAffineAugment(keras.layers.Layer):
    """Random rotation/translation/zoom/shear/flip in one resampling, then contrast and brightness.

    Args:
        rotation_deg: max absolute rotation in degrees.
        translate: max shift as a fraction of the side (each axis).
        zoom: max zoom in/out as a fraction (same factor on both axes).
        shear_deg: max shear angle in degrees (``ImageDataGenerator`` semantics).
        horizontal_flip: flip left/right with probability 0.5 (off for chest X-rays).
        contrast: contrast factor drawn from ``[1 - contrast, 1 + contrast]`` (about the image mean).
        brightness: additive shift drawn from ``[-brightness, brightness]`` (images in [0, 1]).
        fill_mode: ``constant`` (zeros) or ``nearest``/``reflect``/``wrap`` outside the image.
        seed: seed of the fallback generator used when ``call`` gets no ``seed``.
    """

    def __init__(self, rotation_deg: float = 0.0, translate: float = 0.0, zoom: float = 0.0,
                 shear_deg: float = 0.0, horizontal_flip: bool = False, contrast: float = 0.0,
                 brightness: float = 0.0, fill_mode: str = "constant", seed: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rotation_deg, self.translate, self.zoom = float(rotation_deg), float(translate), float(zoom)
        self.shear_deg, self.horizontal_flip = float(shear_deg), bool(horizontal_flip)
        self.contrast, self.brightness = float(contrast), float(brightness)
        self.fill_mode, self.seed = fill_mode, seed
        self._seed_generator = keras.random.SeedGenerator(seed)

    @property
    def geometric(self) -> bool:
        return bool(self.rotation_deg or self.translate or self.zoom or self.shear_deg or self.horizontal_flip)

    def call(self, images: Any, training: bool = True, seed: Any = None) -> Any:
        import tensorflow as tf

        if not training:
            return images
        if seed is None:
            seed = keras.random.randint((2,), 0, 2**31 - 1, seed=self._seed_generator)
        seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=8)
        n = tf.shape(images)[0]
        out = images
        if self.geometric:
            out = self._resample(out, self._affine(n, tf.shape(images)[1], tf.shape(images)[2], seeds))
        if self.contrast:
            factor = self._uniform(seeds[6], (n, 1, 1, 1), 1.0 - self.contrast, 1.0 + self.contrast)
            mean = tf.reduce_mean(out, axis=(1, 2), keepdims=True)
            out = (out - mean) * factor + mean
        if self.brightness:
            out = out + self._uniform(seeds[7], (n, 1, 1, 1), -self.brightness, self.brightness)
        if self.contrast or self.brightness:
            out = tf.clip_by_value(out, 0.0, 1.0)
        return out

    @staticmethod
    def _uniform(seed: Any, shape: Any, low: float, high: float) -> Any:
        import tensorflow as tf

        return tf.random.stateless_uniform(shape, seed=seed, minval=low, maxval=high, dtype=tf.float32)

    def _affine(self, n: Any, height: Any, width: Any, seeds: Any) -> Any:
        """Output→input affine transforms ``(n, 8)`` composed about the image centre."""
        import tensorflow as tf

        rot = self._uniform(seeds[0], (n,), -1.0, 1.0) * math.radians(self.rotation_deg)
        shear = self._uniform(seeds[1], (n,), -1.0, 1.0) * math.radians(self.shear_deg)
        scale = 1.0 + self._uniform(seeds[2], (n,), -self.zoom, self.zoom)
        h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
        tx = self._uniform(seeds[3], (n,), -self.translate, self.translate) * w
        ty = self._uniform(seeds[4], (n,), -self.translate, self.translate) * h
        flip = tf.ones((n,), tf.float32)
        if self.horizontal_flip:
            flip = tf.where(self._uniform(seeds[5], (n,), 0.0, 1.0) < 0.5, -1.0, 1.0)
        cos, sin = tf.cos(rot), tf.sin(rot)
        # A = R(rot) · Shear(shear) · diag(scale·flip, scale); input = c + A (out − c) + t
        a00 = cos * scale * flip
        a01 = (-cos * tf.sin(shear) - sin * tf.cos(shear)) * scale
        a10 = sin * scale * flip
        a11 = (-sin * tf.sin(shear) + cos * tf.cos(shear)) * scale
        cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
        b0 = cx + tx - (a00 * cx + a01 * cy)
        b1 = cy + ty - (a10 * cx + a11 * cy)
        zeros = tf.zeros_like(a00)
        return tf.stack([a00, a01, b0, a10, a11, b1, zeros, zeros], axis=1)

    def _resample(self, images: Any, transforms: Any) -> Any:
        """One bilinear warp per batch; grayscale stored as RGB (equal channels) is warped once and repeated."""
        import tensorflow as tf

        def warp(x: Any) -> Any:
            return tf.raw_ops.ImageProjectiveTransformV3(
                images=x, transforms=transforms, output_shape=tf.shape(x)[1:3], fill_value=0.0,
                interpolation="BILINEAR", fill_mode=self.fill_mode.upper())

        if images.shape[-1] == 3:
            gray = tf.reduce_all(tf.equal(images[..., :1], images[..., 1:]))
            out = tf.cond(gray, lambda: tf.tile(warp(images[..., :1]), [1, 1, 1, 3]), lambda: warp(images))
        else:
            out = warp(images)
        return tf.ensure_shape(out, images.shape)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "rotation_deg": self.rotation_deg, "translate": self.translate,
                "zoom": self.zoom, "shear_deg": self.shear_deg, "horizontal_flip": self.horizontal_flip,
                "contrast": self.contrast, "brightness": self.brightness, "fill_mode": self.fill_mode,
                "seed": self.seed}
