"""Same data + config + seed on CPU → the same training metrics; another seed → different ones."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest

from pipeline.config import Settings, with_overrides

pytestmark = pytest.mark.slow


@pytest.fixture
def op_determinism_reset() -> Iterator[None]:
    """Op determinism is process-wide and disables XLA: leave it off for the tests that follow."""
    from pipeline.training.train import set_op_determinism

    yield
    set_op_determinism(False)


@pytest.mark.usefixtures("op_determinism_reset")
def test_same_seed_same_metrics_other_seed_differs(train_settings: Callable[..., Settings]) -> None:
    from pipeline.training.train import run_train

    # with op determinism (train.deterministic), which is what guarantees equal results: without it, one
    # of four full-suite CI runs saw the first-epoch loss differ by 0.8 % between two identical runs
    # (0.7098 vs 0.7154; not reproduced when this file or tests/model ran alone)
    settings = train_settings("train.epochs=2", "train.model=mnist_cnn", "train.deterministic=true")
    first, second = run_train(settings), run_train(settings)
    assert first.run_id != second.run_id
    for key in ("loss", "auc", "val_loss", "val_auc"):
        np.testing.assert_allclose(first.history[key], second.history[key], rtol=1e-5, atol=1e-6, err_msg=key)
    weights_a, weights_b = first.model.get_weights(), second.model.get_weights()
    assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(weights_a, weights_b, strict=True))

    other = run_train(with_overrides(settings, ["base.seed=7"]))
    assert not np.allclose(first.history["loss"], other.history["loss"])
