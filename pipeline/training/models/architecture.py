"""Architecture report (the seed's Q1–Q5 as a tool): shapes, parameters, receptive field, FLOPs per layer.

Every number is computed from the layer's hyper-parameters with the textbook formulas and
then checked against what Keras built:

- output side  ``⌊(n + p_before + p_after − k_eff) / s⌋ + 1`` with ``k_eff = d·(k − 1) + 1``
  (``'same'`` padding: ``p_total = max((⌈n/s⌉ − 1)·s + k_eff − n, 0)``, the extra pixel after);
- parameters   ``F_out·(F_in·K·K) + F_out`` for a convolution (``/groups``), ``in·out + out`` for Dense;
- receptive field ``r_out = r_in + (k_eff − 1)·j_in`` and jump ``j_out = j_in·s`` (height axis; a
  Dense or global-pooling unit sees the whole input: "all");
- FLOPs        2 × multiply–accumulates of convolutions and dense layers per image (forward pass;
  biases, activations, normalisation and pooling are not counted; training ≈ 3× forward).

Nested models (transfer backbones) are walked layer by layer. ``architecture_report(model)``
returns an :class:`ArchitectureReport` with ``to_dict()`` / ``to_text()``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

Shape = tuple[int, ...]


@dataclass
class LayerRow:
    """One layer of the report; ``keras_*`` are what Keras built, the rest is computed."""

    name: str
    kind: str
    output_shape: Shape
    keras_shape: Shape | None
    params: int | None
    keras_params: int
    params_formula: str
    shape_formula: str
    rf: int | None  # None = the whole input
    jump: int | None
    flops: int

    @property
    def shape_ok(self) -> bool:
        return self.keras_shape is None or tuple(self.keras_shape) == tuple(self.output_shape)

    @property
    def params_ok(self) -> bool:
        return self.params is None or self.params == self.keras_params


@dataclass
class ArchitectureReport:
    model: str
    input_shape: Shape
    rows: list[LayerRow]
    keras_total_params: int
    trainable_params: int
    notes: list[str] = field(default_factory=list)

    @property
    def total_params(self) -> int:
        """Sum of the per-layer counts (formula where one applies, Keras' count otherwise)."""
        return sum(r.params if r.params is not None else r.keras_params for r in self.rows)

    @property
    def total_flops(self) -> int:
        return sum(r.flops for r in self.rows)

    @property
    def mismatches(self) -> list[str]:
        """Layers whose computed shape or parameter count differs from Keras (empty when all agree)."""
        out = [f"{r.name}: shape {r.output_shape} vs Keras {r.keras_shape}" for r in self.rows if not r.shape_ok]
        out += [f"{r.name}: params {r.params} vs Keras {r.keras_params}" for r in self.rows if not r.params_ok]
        if self.total_params != self.keras_total_params:
            out.append(f"total params {self.total_params} vs count_params() {self.keras_total_params}")
        return out

    def flatten_features(self) -> dict[str, int]:
        return {r.name: r.output_shape[0] for r in self.rows if r.kind == "Flatten"}

    def to_dict(self) -> dict[str, Any]:
        rows = [{**asdict(r), "shape_ok": r.shape_ok, "params_ok": r.params_ok} for r in self.rows]
        return {"model": self.model, "input_shape": list(self.input_shape), "layers": rows,
                "total_params": self.total_params, "keras_total_params": self.keras_total_params,
                "trainable_params": self.trainable_params, "forward_flops": self.total_flops,
                "train_flops_per_image": 3 * self.total_flops, "mismatches": self.mismatches,
                "notes": self.notes}

    def to_text(self) -> str:
        head = ("layer", "type", "output", "computed as", "params", "= formula", "RF", "jump", "MFLOPs")
        body = [(r.name, r.kind, "×".join(map(str, r.output_shape)) + ("" if r.shape_ok else " ≠Keras"),
                 r.shape_formula, f"{r.keras_params:,}" + ("" if r.params_ok else f" ≠{r.params}"),
                 r.params_formula, "all" if r.rf is None else str(r.rf),
                 "-" if r.jump is None else str(r.jump), f"{r.flops / 1e6:.2f}" if r.flops else "")
                for r in self.rows]
        widths = [max(len(str(row[i])) for row in [head, *body]) for i in range(len(head))]
        lines = [f"{self.model}  input {'×'.join(map(str, self.input_shape))}", ""]
        lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                  for row in [head, tuple("-" * w for w in widths), *body]]
        ok = "✓ matches" if self.total_params == self.keras_total_params else "✗ differs from"
        lines += ["", f"parameters: {self.total_params:,} by formula ({ok} count_params() = "
                      f"{self.keras_total_params:,}); trainable {self.trainable_params:,}",
                  f"FLOPs per image: {self.total_flops / 1e6:,.2f} M forward, ≈ {3 * self.total_flops / 1e6:,.2f} M "
                  "per training step (forward + backward ≈ 3×)"]
        lines += [f"shape/parameter mismatches: {'; '.join(self.mismatches)}"] if self.mismatches else \
            ["every computed output shape and parameter count agrees with Keras"]
        lines += ["", *self.notes] if self.notes else []
        return "\n".join(lines)


# --------------------------------------------------------------------------- per-layer rules


@dataclass
class _T:
    """What the walk knows about one tensor: shape without batch, receptive field and jump."""

    shape: Shape
    rf: int | None = 1
    jump: int | None = 1


def _pads(n: int, k_eff: int, s: int, padding: str) -> tuple[int, int]:
    if padding == "valid":
        return 0, 0
    total = max((math.ceil(n / s) - 1) * s + k_eff - n, 0)
    return total // 2, total - total // 2


def _window(t: _T, k: int, s: int, d: int, padding: str, channels: int) -> tuple[_T, str]:
    """Output of a k×k window op (conv or pool) with stride s and dilation d."""
    k_eff = d * (k - 1) + 1
    sides, texts = [], []
    for n in t.shape[:2]:
        pb, pa = _pads(n, k_eff, s, padding)
        out = (n + pb + pa - k_eff) // s + 1
        sides.append(out)
        texts.append(f"⌊({n}+{pb}+{pa}−{k_eff})/{s}⌋+1={out}")
    text = texts[0] if texts[0] == texts[1] else " × ".join(texts)
    rf = None if t.rf is None else t.rf + (k_eff - 1) * (t.jump or 1)
    jump = None if t.jump is None else t.jump * s
    return _T((sides[0], sides[1], channels), rf, jump), text


def _conv(layer: Any, t: _T) -> tuple[_T, int, str, int, str]:
    k, s, d = layer.kernel_size[0], layer.strides[0], layer.dilation_rate[0]
    cin, kind = t.shape[-1], type(layer).__name__
    bias = 1 if layer.use_bias else 0
    if kind == "DepthwiseConv2D":
        cout = cin * layer.depth_multiplier
        params, formula = cout * k * k + bias * cout, f"{cout}·({k}·{k})" + (f"+{cout}" if bias else "")
        macs_per_pos = cout * k * k
    elif kind == "SeparableConv2D":
        dw, cout = cin * layer.depth_multiplier, layer.filters
        params = dw * k * k + dw * cout + bias * cout
        formula = f"{dw}·({k}·{k})+{cout}·{dw}" + (f"+{cout}" if bias else "")
        macs_per_pos = dw * k * k + dw * cout
    else:
        groups, cout = getattr(layer, "groups", 1), layer.filters
        fin = cin // groups
        params, formula = cout * fin * k * k + bias * cout, f"{cout}·({fin}·{k}·{k})" + (f"+{cout}" if bias else "")
        macs_per_pos = cout * fin * k * k
    out, text = _window(t, k, s, d, layer.padding, cout)
    return out, params, formula, 2 * out.shape[0] * out.shape[1] * macs_per_pos, text


def _dense(layer: Any, t: _T) -> tuple[_T, int, str, int, str]:
    fin, units = t.shape[-1], layer.units
    bias = 1 if layer.use_bias else 0
    positions = math.prod(t.shape[:-1]) if len(t.shape) > 1 else 1
    params = fin * units + bias * units
    out = _T((*t.shape[:-1], units), None if len(t.shape) == 1 else t.rf, None if len(t.shape) == 1 else t.jump)
    return out, params, f"{units}·{fin}" + (f"+{units}" if bias else ""), 2 * positions * fin * units, f"{units} units"


def _norm_params(layer: Any, c: int) -> tuple[int, str]:
    kind = type(layer).__name__
    n_affine = int(getattr(layer, "center", True)) + int(getattr(layer, "scale", True))
    if kind == "BatchNormalization":
        return (n_affine + 2) * c, f"{n_affine + 2}·{c} (γ,β + moving mean,var)"
    return n_affine * c, f"{n_affine}·{c} (γ,β)"


def _reshape_like(layer: Any, t: _T) -> tuple[_T, str]:
    kind = type(layer).__name__
    if kind == "Flatten":
        n = math.prod(t.shape)
        return _T((n,), t.rf, t.jump), f"{' × '.join(map(str, t.shape))} = {n}"
    if kind in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
        keep = getattr(layer, "keepdims", False)
        return _T((1, 1, t.shape[-1]) if keep else (t.shape[-1],), None, None), f"mean over {t.shape[0]}×{t.shape[1]}"
    if kind == "ZeroPadding2D":
        (pt, pb), (pl, pr) = layer.padding
        h, w = t.shape[0] + pt + pb, t.shape[1] + pl + pr
        return _T((h, w, t.shape[2]), t.rf, t.jump), f"{t.shape[0]}+{pt}+{pb}={h}"
    if kind == "Cropping2D":
        (ct, cb), (cl, cr) = layer.cropping
        return _T((t.shape[0] - ct - cb, t.shape[1] - cl - cr, t.shape[2]), t.rf, t.jump), "cropped"
    if kind == "Reshape":
        return _T(tuple(layer.target_shape), t.rf, t.jump), "reshape"
    if kind == "GrayscaleToRGB":
        return _T((*t.shape[:-1], 3), t.rf, t.jump), "repeat channel ×3" if t.shape[-1] == 1 else "RGB as is"
    return t, ""


_WINDOW_POOLS = ("MaxPooling2D", "AveragePooling2D")
_NORMS = ("BatchNormalization", "GroupNormalization", "LayerNormalization")


def _merge(kind: str, ins: list[_T]) -> tuple[_T, str]:
    rfs = [t.rf for t in ins]
    rf = None if any(r is None for r in rfs) else max(rfs)  # type: ignore[type-var]
    jump = None if rf is None else max(t.jump or 1 for t in ins)
    if kind == "Concatenate":
        c = sum(t.shape[-1] for t in ins)
        return _T((*ins[0].shape[:-1], c), rf, jump), " + ".join(str(t.shape[-1]) for t in ins) + f" = {c} ch"
    shape = tuple(max(dims) for dims in zip(*(t.shape for t in ins), strict=True))
    return _T(shape, rf, jump), f"{kind.lower()} of {len(ins)}"


def _layer_row(layer: Any, ins: list[_T]) -> tuple[_T, int | None, str, int, str]:
    """(output, params by formula or None, formula text, FLOPs, shape text) of one layer."""
    kind = type(layer).__name__
    t = ins[0] if ins else _T(())
    if len(ins) > 1:
        out, text = _merge(kind, ins)
        return out, 0, "0", 0, text
    if kind in ("Conv2D", "DepthwiseConv2D", "SeparableConv2D"):
        return _conv(layer, t)
    if kind == "Dense":
        return _dense(layer, t)
    if kind in _WINDOW_POOLS:
        out, text = _window(t, layer.pool_size[0], layer.strides[0], 1, layer.padding, t.shape[-1])
        return out, 0, "0", 0, text
    if kind in _NORMS:
        params, formula = _norm_params(layer, t.shape[-1])
        return t, params, formula, 0, ""
    if kind == "Normalization":
        c = t.shape[-1]
        return t, 2 * c + 1, f"2·{c}+1 (mean, variance, count)", 0, ""
    out, text = _reshape_like(layer, t)
    if layer.weights:  # a layer with weights and no formula here: take Keras' count, flag it
        return out, None, "n/a", 0, text
    return out, 0, "0", 0, text


# --------------------------------------------------------------------------- graph walk


def _keras_shape(layer: Any) -> Shape | None:
    try:
        shape = layer.output.shape
    except (AttributeError, ValueError):
        return None
    if isinstance(shape, list) or shape is None:
        return None
    return tuple(int(d) for d in shape[1:]) if all(d is not None for d in shape[1:]) else None


def _walk(model: Any, known: dict[int, _T], rows: list[LayerRow], prefix: str = "") -> None:
    import keras

    for op in model.operations:
        if not op._inbound_nodes:
            continue
        node = op._inbound_nodes[0]
        if type(op).__name__ == "InputLayer":
            if id(op.output) not in known:
                known[id(op.output)] = _T(tuple(int(d) for d in op.batch_shape[1:]))
            continue
        ins = [known[id(x)] for x in node.input_tensors if id(x) in known]
        if isinstance(op, keras.Model):
            for inner, outer in zip(op.inputs, ins, strict=True):
                known[id(inner)] = outer
            _walk(op, known, rows, prefix=f"{prefix}{op.name}/")
            for inner, outer in zip(op.outputs, node.output_tensors, strict=True):
                known[id(outer)] = known[id(inner)]
            continue
        out, params, formula, flops, text = _layer_row(op, ins)
        for x in node.output_tensors:
            known[id(x)] = out
        rows.append(LayerRow(name=prefix + op.name, kind=type(op).__name__, output_shape=out.shape,
                             keras_shape=_keras_shape(op), params=params, keras_params=int(op.count_params()),
                             params_formula=formula, shape_formula=text, rf=out.rf, jump=out.jump, flops=flops))


def architecture_report(model: Any) -> ArchitectureReport:
    """Compute the report of a built functional Keras model (any zoo model)."""
    rows: list[LayerRow] = []
    _walk(model, {}, rows)
    trainable = sum(int(math.prod(w.shape)) for w in model.trainable_weights)
    report = ArchitectureReport(model=model.name, input_shape=tuple(int(d) for d in model.input_shape[1:]),
                                rows=rows, keras_total_params=int(model.count_params()), trainable_params=trainable)
    report.notes = _notes(report)
    return report


def _notes(report: ArchitectureReport) -> list[str]:
    from pipeline.errors import UnknownModel
    from pipeline.training.models.zoo import get_spec

    notes = []
    for name in report.flatten_features():
        row = next(r for r in report.rows if r.name == name)
        notes.append(f"{name}: {row.shape_formula} features enter the first Dense layer.")
    try:
        spec = get_spec(report.model)
    except UnknownModel:
        return notes
    if spec.seed_flatten and report.flatten_features():
        expected, code, error = spec.seed_flatten
        got = next(iter(report.flatten_features().values()))
        idx = next(i for i, r in enumerate(report.rows) if r.kind == "Flatten")
        h, w, c = report.rows[idx - 1].output_shape
        pools = sum(1 for r in report.rows if r.kind in _WINDOW_POOLS)
        notes.append(
            f"seed check: the seed declared {code} = {expected} inputs, but this network flattens "
            f"{c}·{h}·{w} = {got}: "
            f"'same'/pad-1 3×3 convolutions keep the input side and there {'is' if pools == 1 else 'are'} "
            f"{pools} 2×2 pooling{'' if pools == 1 else 's'}, so {report.input_shape[0]} → "
            f"{report.input_shape[0] // 2 ** pools}; {expected} would need two poolings "
            f"({report.input_shape[0]} → {report.input_shape[0] // 4}). That is the seed's crash: {error}."
            if got != expected else f"seed check: flatten size {got} matches the seed's {code}.")
    return notes
