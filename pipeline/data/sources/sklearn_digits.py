"""``sklearn:digits``: scikit-learn's 1,797 handwritten digits (bundled, offline), as image files.

The 8x8, 17-level images are materialised as 28x28 8-bit PNGs under
``ROOT/<digit>/digit_<i>.png`` so they version, validate and train exactly like any
other folder dataset (each image is its own "patient").
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.sources.base import RawRecord, SourceProfile
from pipeline.data.sources.folder import FolderSource

SIDE = 28


class SklearnDigitsSource:
    name = "sklearn:digits"
    profile = SourceProfile(
        classes=tuple(str(d) for d in range(10)), positive_class=None, min_size=8, size_range=(8, 64),
        modality="digits",
    )

    def prepare(self, root: Path) -> None:
        marker = root / "digits.done"
        if marker.exists():
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        for i, (img, target) in enumerate(zip(digits.images, digits.target, strict=True)):
            px = (img / 16.0 * 255).astype(np.float32)
            im = Image.fromarray(px, mode="F").resize((SIDE, SIDE), Image.Resampling.BILINEAR)
            out = root / str(target) / f"digit_{i:04d}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8)).save(out)
        marker.write_text(f"{len(digits.images)} images\n")

    def records(self, root: Path, labels: Path | None) -> Iterator[RawRecord]:
        return FolderSource(self.profile).records(root, labels)
