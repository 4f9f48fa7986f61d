"""The model input, defined once for training, evaluation, export and serving.

decode → grayscale → resize → normalise, as two entry points that share every step after decoding:

- image files (training, evaluation, explanations, export parity; :func:`pipeline.training.inputs.decode_resize`):
  :func:`decode_file` → :func:`to_model_input`, inside ``tf.data``;
- decoded uploads (serving, the clinician UI, production simulation; ``Predictor.preprocess``):
  :func:`unit_pixels` → the same :func:`to_model_input`, compiled once per shape (:func:`preprocess_decoded`).

Training reads the ingested image store, serving raw uploads; the two decoders agree because
ingestion stores exactly the pixels :func:`pipeline.data.imaging.decode_bytes` (the admission
decoder) returns whenever a file's own pixels would decode differently (DICOM, files with
metadata, colour containers holding a grayscale image: :mod:`pipeline.data.image_store`),
and because :func:`decode_file` decodes JPEG with libjpeg's accurate integer DCT, the one
Pillow uses (TensorFlow's default fast DCT differs by up to 3/255 per pixel).
``tests/serving/test_preprocess_parity.py`` holds the two paths to 1/255 on PNG (8/16-bit),
JPEG and DICOM (MONOCHROME1/2).

Output: float32 ``(size, size, channels)`` in [0, 1]; models do their own normalisation beyond
that (transfer backbones apply their preprocessing inside the model).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from pipeline.data.imaging import DecodedImage

JPEG_DCT_METHOD = "INTEGER_ACCURATE"  # libjpeg JDCT_ISLOW, Pillow's (and libjpeg's) default


def decode_file(raw: Any, channels: int) -> Any:
    """Encoded PNG (8/16-bit) or JPEG bytes (a string tensor) → float32 ``(H, W, channels)`` in [0, 1]."""
    import tensorflow as tf

    def jpeg() -> Any:
        img = tf.io.decode_jpeg(raw, channels=channels, dct_method=JPEG_DCT_METHOD)
        return tf.image.convert_image_dtype(img, tf.float32)

    def other() -> Any:
        return tf.image.decode_image(raw, channels=channels, dtype=tf.float32, expand_animations=False)

    return tf.ensure_shape(tf.cond(tf.io.is_jpeg(raw), jpeg, other), (None, None, channels))


def to_model_input(img: Any, size: int, channels: int) -> Any:
    """Float ``(H, W, 1 | channels)`` in [0, 1] → ``(size, size, channels)``: antialiased resize, clip to
    [0, 1], grayscale repeated to ``channels`` (after the resize: the same values, one channel's work)."""
    import tensorflow as tf

    out = tf.clip_by_value(tf.image.resize(img, (size, size), antialias=True), 0.0, 1.0)
    if img.shape[-1] == 1 and channels != 1:
        out = tf.tile(out, (1, 1, channels))
    return out


def unit_pixels(image: DecodedImage, channels: int, gray01: np.ndarray | None = None) -> np.ndarray:
    """A decoded image as float32 ``(H, W, 1 | 3)`` in [0, 1]: grayscale as one channel (``gray01``
    when the caller has it already), colour kept for 3-channel models.

    Colour reaches a 1-channel model only outside serving (admission rejects colour uploads):
    it is reduced by :meth:`DecodedImage.gray01`.
    """
    if image.channels == 1 or channels == 1:
        return (image.gray01() if gray01 is None else gray01)[..., None]
    return image.pixels.astype(np.float32) / float((1 << image.bit_depth) - 1)


@functools.cache
def compiled_model_input(size: int, channels: int, in_channels: int) -> Any:
    """:func:`to_model_input` as a ``tf.function`` for any image size (one trace per shape kind)."""
    import tensorflow as tf

    sig = tf.TensorSpec([None, None, in_channels], tf.float32)
    return tf.function(lambda x: to_model_input(x, size, channels), input_signature=[sig])


def preprocess_decoded(image: DecodedImage, size: int, channels: int,
                       gray01: np.ndarray | None = None) -> np.ndarray:
    """The model input ``(size, size, channels)`` float32 of one decoded image (serving's path)."""
    import tensorflow as tf

    px = unit_pixels(image, channels, gray01)
    return compiled_model_input(size, channels, px.shape[-1])(tf.constant(px, tf.float32)).numpy()
