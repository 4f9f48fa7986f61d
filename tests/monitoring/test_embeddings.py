"""Embedding PCA and exposing the embedding of an exported ONNX graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.serving.predictor import EmbeddingPCA, expose_embedding, fit_pca


def test_pca_is_deterministic_round_trips_and_explains_variance(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(200, 2)) * [5.0, 2.0]
    emb = latent @ rng.normal(size=(2, 16)) + rng.normal(scale=0.05, size=(200, 16))
    a, b = fit_pca(emb, 4, "embedding"), fit_pca(emb[::-1], 4, "embedding")
    np.testing.assert_allclose(a.components, b.components, atol=1e-8)  # sign convention fixed
    assert a.explained_variance_ratio[:2].sum() > 0.99 and a.columns == ["emb_pc1", "emb_pc2", "emb_pc3", "emb_pc4"]
    path = tmp_path / "pca.npz"
    path.write_bytes(a.to_bytes())
    back = EmbeddingPCA.from_file(path)
    np.testing.assert_allclose(back.transform(emb), a.transform(emb))
    assert back.layer == "embedding" and a.transform(emb).shape == (200, 4)
    assert fit_pca(emb[:3], 10, "x").components.shape[0] == 2, "at most n-1 components"


def _dense_head_graph(with_bias: bool) -> object:
    from onnx import TensorProto, helper, numpy_helper

    w1 = numpy_helper.from_array(np.ones((8, 4), np.float32), "w1")
    w2 = numpy_helper.from_array(np.ones((4, 1), np.float32), "w2")
    b2 = numpy_helper.from_array(np.zeros((1,), np.float32), "b2")
    nodes = [helper.make_node("MatMul", ["image", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["emb"]),
             helper.make_node("MatMul", ["emb", "w2"], ["logit"])]
    if with_bias:
        nodes += [helper.make_node("Add", ["logit", "b2"], ["z"]), helper.make_node("Sigmoid", ["z"], ["probability"])]
    else:
        nodes += [helper.make_node("Sigmoid", ["logit"], ["probability"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 8])],
                              [helper.make_tensor_value_info("probability", TensorProto.FLOAT, [None, 1])],
                              initializer=[w1, w2, b2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("with_bias", [True, False])
def test_expose_embedding_finds_the_head_input(with_bias: bool) -> None:
    import onnxruntime as ort

    proto = _dense_head_graph(with_bias)
    assert expose_embedding(proto) == "emb"
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out, emb = sess.run(["probability", "emb"], {"image": np.ones((2, 8), np.float32)})
    assert emb.shape == (2, 4) and np.allclose(emb, 8.0)


def test_expose_embedding_refuses_graphs_without_a_dense_head() -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["image"], ["probability"])], "g",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 8])],
                              [helper.make_tensor_value_info("probability", TensorProto.FLOAT, [None, 8])])
    with pytest.raises(ValueError, match="serve.engine=tf"):
        expose_embedding(helper.make_model(graph))
