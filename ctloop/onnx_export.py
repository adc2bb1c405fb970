"""Export a trained model pipeline (``ctloop.modeling.build_pipeline``) to ONNX, computing in float64 throughout.

skl2onnx converts the linear model and the scaler as they are. Four parts of the pipeline need converters of
their own, registered here:
- the input coercions (``to_float64``, ``to_category_strings``): identities, since the ONNX inputs are typed
  already (the caller maps a missing category to ``MISSING_CATEGORY``, as ``to_category_strings`` does);
- ``SimpleImputer(add_indicator=True)`` on float64 (skl2onnx drops the indicator and rounds the statistics
  to float32);
- ``OneHotEncoder`` with unknown and infrequent categories (skl2onnx fails on an unknown category instead of
  mapping it to the infrequent column or to zeros);
- ``HistGradientBoostingClassifier`` as an ``ai.onnx.ml`` opset 5 ``TreeEnsemble`` in float64 (skl2onnx
  writes float32 thresholds and leaves, which flips splits for values near a threshold).
Only training imports this module (skl2onnx is not part of the serving image).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
from onnx import TensorProto, helper
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.impute import SimpleImputer
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler

from ctloop.model_runtime import to_category_strings, to_float64

# skl2onnx converts to ai.onnx.ml opset 3 at most; TreeEnsemble (ours) needs 5, set on the finished model.
OPSET = {"": 18, "ai.onnx.ml": 3}
_IDENTITIES = (to_float64, to_category_strings)
_ML_VERSIONS = {"LabelEncoder": 2, "TreeEnsemble": 5}


def export_onnx(pipeline: Any, numeric: Sequence[str], categorical: Sequence[str]) -> bytes:
    """The serialized ONNX model of a fitted pipeline: one ``[N, 1]`` input per feature column, outputs
    ``label`` and ``probabilities`` (float64 ``[N, 2]``). Raises whatever skl2onnx raises on a pipeline it
    cannot convert."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import DoubleTensorType, StringTensorType

    _register()
    inputs = ([(c, DoubleTensorType([None, 1])) for c in numeric]
              + [(c, StringTensorType([None, 1])) for c in categorical])
    classifier = pipeline.steps[-1][1]
    options = {id(classifier): {"zipmap": False}, StandardScaler: {"div": "div"}}
    model = convert_sklearn(pipeline, initial_types=inputs, target_opset=OPSET, options=options)
    if any(node.op_type == "TreeEnsemble" for node in model.graph.node):
        for opset in model.opset_import:
            if opset.domain == "ai.onnx.ml":
                opset.version = _ML_VERSIONS["TreeEnsemble"]
    return model.SerializeToString()


@functools.cache
def _register() -> None:
    from skl2onnx import update_registered_converter
    from skl2onnx.common.shape_calculator import calculate_linear_classifier_output_shapes

    update_registered_converter(FunctionTransformer, "SklearnFunctionTransformer", _same_shape, _identity)
    update_registered_converter(SimpleImputer, "SklearnSimpleImputer", _imputer_shape, _imputer)
    update_registered_converter(OneHotEncoder, "SklearnOneHotEncoder", _onehot_shape, _onehot)
    update_registered_converter(HistGradientBoostingClassifier, "SklearnHistGradientBoostingClassifier",
                                calculate_linear_classifier_output_shapes, _hist_gradient_boosting,
                                options={"zipmap": [True, False, "columns"], "nocl": [True, False]})


class _Graph:
    """Adds nodes and constants to the graph skl2onnx is building, with names unique in its scope."""

    def __init__(self, scope: Any, container: Any) -> None:
        self.scope, self.container = scope, container

    def name(self, hint: str) -> str:
        return self.scope.get_unique_variable_name(hint)

    def const(self, hint: str, dtype: int, shape: list[int], values: Any) -> str:
        name = self.name(hint)
        self.container.add_initializer(name, dtype, shape, list(values))
        return name

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs: Any) -> str:
        """Add ``op``; an ``ai.onnx.ml`` operator takes its version from ``_ML_VERSIONS``."""
        out = output or self.name(op.lower())
        if op in _ML_VERSIONS:
            # Declared within skl2onnx's opset limit; export_onnx raises the model's opset for TreeEnsemble.
            attrs.update(op_domain="ai.onnx.ml", op_version=min(_ML_VERSIONS[op], OPSET["ai.onnx.ml"]))
        self.container.add_node(op, inputs, [out], name=self.scope.get_unique_operator_name(op), **attrs)
        return out

    def concat(self, parts: list[str], output: str) -> str:
        if len(parts) == 1:
            return self.node("Identity", parts, output)
        return self.node("Concat", parts, output, axis=1)


def _inputs(operator: Any, graph: _Graph) -> str:
    """The operator's inputs as one ``[N, C]`` tensor."""
    names = [v.full_name for v in operator.inputs]
    return names[0] if len(names) == 1 else graph.node("Concat", names, axis=1)


def _width(operator: Any) -> int | None:
    widths = [v.type.shape[1] for v in operator.inputs]
    return None if any(w is None for w in widths) else sum(widths)


# ------------------------------------------------------------------------------------------- coercions
def _same_shape(operator: Any) -> None:
    kind = type(operator.inputs[0].type)
    operator.outputs[0].type = kind([operator.inputs[0].get_first_dimension(), _width(operator)])


def _identity(scope: Any, operator: Any, container: Any) -> None:
    func = operator.raw_operator.func
    if func not in _IDENTITIES:
        raise NotImplementedError(f"FunctionTransformer({getattr(func, '__name__', func)!r}) has no ONNX form; "
                                  f"only {[f.__name__ for f in _IDENTITIES]} do")
    graph = _Graph(scope, container)
    graph.node("Identity", [_inputs(operator, graph)], operator.outputs[0].full_name)


# ---------------------------------------------------------------------------------------------- imputer
def _imputer_shape(operator: Any) -> None:
    from skl2onnx.common.data_types import DoubleTensorType

    op = operator.raw_operator
    kept = int((~np.isnan(op.statistics_.astype(np.float64))).sum())
    indicators = len(op.indicator_.features_) if op.add_indicator else 0
    operator.outputs[0].type = DoubleTensorType([operator.inputs[0].get_first_dimension(), kept + indicators])


def _imputer(scope: Any, operator: Any, container: Any) -> None:
    op = operator.raw_operator
    stats = np.asarray(op.statistics_, dtype=np.float64)
    if not (isinstance(op.missing_values, float) and np.isnan(op.missing_values)):
        raise NotImplementedError(f"SimpleImputer(missing_values={op.missing_values!r}): only NaN is converted")
    graph = _Graph(scope, container)
    x = _inputs(operator, graph)
    if operator.inputs[0].type.__class__.__name__ != "DoubleTensorType":
        raise NotImplementedError("SimpleImputer: only float64 inputs are converted")
    missing = graph.node("IsNaN", [x])
    fill = graph.const("fill", TensorProto.DOUBLE, [1, stats.size], np.nan_to_num(stats))
    filled = graph.node("Where", [missing, fill, x])
    keep = np.flatnonzero(~np.isnan(stats))
    if keep.size != stats.size:  # columns all-missing at fit time are dropped, as scikit-learn does
        filled = graph.node("Gather", [filled, graph.const("keep", TensorProto.INT64, [keep.size], keep)], axis=1)
    parts = [filled]
    if op.add_indicator:
        features = np.asarray(op.indicator_.features_, dtype=np.int64)
        picked = graph.node("Gather", [missing, graph.const("ind", TensorProto.INT64, [features.size], features)],
                            axis=1)
        parts.append(graph.node("Cast", [picked], to=TensorProto.DOUBLE))
    graph.concat(parts, operator.outputs[0].full_name)


# ----------------------------------------------------------------------------------------------- one-hot
def _onehot_layout(op: OneHotEncoder, i: int) -> tuple[dict[str, int], int, int]:
    """(category -> output column, width, column of an unknown category; == width means all zeros)."""
    out = list(op._compute_transformed_categories(i))
    infrequent = bool(op._infrequent_enabled) and op.infrequent_categories_[i] is not None
    width = len(out)
    index = {str(c): j for j, c in enumerate(out[:-1] if infrequent else out)}
    if infrequent:
        index.update({str(c): width - 1 for c in op.infrequent_categories_[i]})
    unknown = width - 1 if infrequent and op.handle_unknown == "infrequent_if_exist" else width
    return index, width, unknown


def _onehot_shape(operator: Any) -> None:
    from skl2onnx.common.data_types import DoubleTensorType

    op = operator.raw_operator
    width = sum(_onehot_layout(op, i)[1] for i in range(len(op.categories_)))
    operator.outputs[0].type = DoubleTensorType([operator.inputs[0].get_first_dimension(), width])


def _onehot(scope: Any, operator: Any, container: Any) -> None:
    op = operator.raw_operator
    if op.drop_idx_ is not None or op.handle_unknown == "error":
        raise NotImplementedError("OneHotEncoder: drop= and handle_unknown='error' are not converted")
    graph = _Graph(scope, container)
    x = _inputs(operator, graph)
    parts = []
    for i in range(len(op.categories_)):
        index, width, unknown = _onehot_layout(op, i)
        column = graph.node("Gather", [x, graph.const("col", TensorProto.INT64, [1], [i])], axis=1)
        keys = list(index)
        codes = graph.node("LabelEncoder", [column], keys_strings=keys,
                           values_int64s=[index[k] for k in keys], default_int64=unknown)
        positions = graph.const("positions", TensorProto.INT64, [1, width], range(width))
        parts.append(graph.node("Cast", [graph.node("Equal", [codes, positions])], to=TensorProto.DOUBLE))
    graph.concat(parts, operator.outputs[0].full_name)


# ------------------------------------------------------------------------------------- gradient boosting
def _hist_gradient_boosting(scope: Any, operator: Any, container: Any) -> None:
    op = operator.raw_operator
    if type(op._loss).__name__ != "HalfBinomialLoss" or any(len(trees) != 1 for trees in op._predictors):
        raise NotImplementedError("HistGradientBoostingClassifier: only binary classification is converted")
    if op.is_categorical_ is not None and np.any(op.is_categorical_):
        raise NotImplementedError("HistGradientBoostingClassifier: native categorical splits are not converted")
    attrs = _tree_ensemble([trees[0].nodes for trees in op._predictors])
    graph = _Graph(scope, container)
    x = _inputs(operator, graph)
    raw = graph.node("TreeEnsemble", [x], **attrs)
    baseline = float(np.asarray(op._baseline_prediction).ravel()[0])
    raw = graph.node("Add", [raw, graph.const("baseline", TensorProto.DOUBLE, [1, 1], [baseline])])
    positive = graph.node("Sigmoid", [raw])
    negative = graph.node("Sub", [graph.const("one", TensorProto.DOUBLE, [1, 1], [1.0]), positive])
    graph.node("Concat", [negative, positive], operator.outputs[1].full_name, axis=1)
    is_positive = graph.node("Greater", [positive, graph.const("half", TensorProto.DOUBLE, [1, 1], [0.5])])
    label = graph.node("Cast", [is_positive], to=TensorProto.INT64)
    graph.node("Reshape", [label, graph.const("flat", TensorProto.INT64, [1], [-1])],
               operator.outputs[0].full_name)


def _tree_ensemble(trees: list[np.ndarray]) -> dict[str, Any]:
    """``TreeEnsemble`` attributes (float64) summing every tree's leaf; go left when ``x <= threshold`` (or
    when ``x`` is missing and ``missing_go_to_left``), as scikit-learn's predictor does."""
    roots: list[int] = []
    feature, split, true_id, true_leaf, false_id, false_leaf, missing_true = [], [], [], [], [], [], []
    leaf_weights: list[float] = []
    for nodes in trees:
        interior = {i: len(feature) + k for k, i in enumerate(np.flatnonzero(nodes["is_leaf"] == 0))}
        leaves = {i: len(leaf_weights) + k for k, i in enumerate(np.flatnonzero(nodes["is_leaf"] == 1))}
        leaf_weights.extend(float(nodes["value"][i]) for i in leaves)
        if not interior:  # a one-leaf tree: one node whose both branches lead to the leaf
            leaf = next(iter(leaves.values()))
            roots.append(len(feature))
            feature.append(0)
            split.append(0.0)
            true_id.append(leaf)
            true_leaf.append(1)
            false_id.append(leaf)
            false_leaf.append(1)
            missing_true.append(0)
            continue
        roots.append(interior[0])
        for i in interior:
            node = nodes[i]
            feature.append(int(node["feature_idx"]))
            split.append(float(node["num_threshold"]))
            missing_true.append(int(node["missing_go_to_left"]))
            for child, ids, is_leaf in ((int(node["left"]), true_id, true_leaf),
                                        (int(node["right"]), false_id, false_leaf)):
                if child in leaves:
                    ids.append(leaves[child])
                    is_leaf.append(1)
                else:
                    ids.append(interior[child])
                    is_leaf.append(0)
    return {
        "aggregate_function": 1,  # SUM
        "post_transform": 0,  # NONE: the baseline and the sigmoid follow as nodes
        "n_targets": 1,
        "tree_roots": roots,
        "nodes_featureids": feature,
        "nodes_splits": helper.make_tensor("nodes_splits", TensorProto.DOUBLE, [len(split)], split),
        "nodes_modes": helper.make_tensor("nodes_modes", TensorProto.UINT8, [len(split)], [0] * len(split)),
        "nodes_truenodeids": true_id,
        "nodes_trueleafs": true_leaf,
        "nodes_falsenodeids": false_id,
        "nodes_falseleafs": false_leaf,
        "nodes_missing_value_tracks_true": missing_true,
        "leaf_targetids": [0] * len(leaf_weights),
        "leaf_weights": helper.make_tensor("leaf_weights", TensorProto.DOUBLE, [len(leaf_weights)], leaf_weights),
    }
