"""The final model as one ONNX graph, preprocessing included:
`selector export STUDY --model onnx -o model.onnx`.

A service feeds the raw feature columns and gets what `selector predict` computes, with no
Python and no selector: the graph replays `artifact.transform` (median imputation and standard
scaling of numeric columns, most-frequent imputation and one-hot encoding of categorical ones, an
unknown category as all zeros), runs the saved MLP (exported by `torch.onnx.export` in eval mode:
dropout off, batch norm with its running statistics) and reads its output as `engine.predict`
does (softmax, or the target's scaling undone).

The graph's interface (`describe` prints it):

- one input per encoded feature column, named after the column, shape `[N, 1]`: `double` for a
  numeric column (NaN is missing), `string` for a categorical one (`""` is missing; a category is
  the text of its value in `preprocess.json`, booleans as `"True"`/`"False"`);
- classification: `probabilities` (double, `[N, C]`, the classes in `model.json`'s order) and
  `label` (string, `[N]`, the most probable class); regression: `prediction` (double, `[N]`, on
  the target's original scale).

Numeric inputs and the outputs are double because `preprocess.json`'s statistics and `predict`'s
arithmetic are: the preprocessing is then bit-identical to `artifact.transform`, and only the
float32 network's own rounding (a few 1e-7) separates the two.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from selector import artifact, predict
from selector.errors import SelectorError

try:
    import onnx
    import onnxscript  # noqa: F401  (torch.onnx.export's exporter needs it)
    from onnx import NodeProto, TensorProto, ValueInfoProto, helper, numpy_helper
except ImportError as e:  # pragma: no cover  (the dev extra installs them)
    raise SelectorError(
        f"ONNX export needs {e.name}, which is not installed: pip install 'selector[onnx]'"
    ) from None

# Equal on strings (the one-hot encoding) is in the default domain from opset 19.
OPSET = 20
BATCH = "N"
NET = "mlp/"  # prefix of the exported network's names
OWN = "selector/"  # prefix of the preprocessing's and the output's names
MISSING = ""  # the categorical value that means missing


@dataclass(frozen=True)
class Port:
    """One input or output of the graph, as documented to a service."""

    name: str
    type: str  # "double" or "string"
    dims: tuple[int | str, ...]  # ("N", 1), ("N", 3), ("N",)
    note: str

    @property
    def shape(self) -> str:
        return "[" + ", ".join(str(d) for d in self.dims) + "]"


@dataclass(frozen=True)
class Exported:
    path: Path
    bytes: int
    meta: artifact.Meta
    inputs: list[Port]
    outputs: list[Port]


def _const(name: str, values: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(values, OWN + name)


def _strings(name: str, values: list[str], shape: tuple[int, ...]) -> TensorProto:
    return _const(name, np.array(values, dtype=object).reshape(shape))


def category_text(value: artifact.Scalar) -> str:
    """A category as the graph's string input spells it (Python's `str`: `True`, `3`, `Dream`)."""
    return str(value)


# --- the interface ---------------------------------------------------------------------------


def input_ports(pre: artifact.Preprocess) -> list[Port]:
    """The graph's inputs: the encoded feature columns, in `preprocess.json`'s column order (a
    column the preprocessing drops, such as an all-missing one, is not an input)."""
    categories = dict(zip(pre.categorical, pre.categories, strict=True))
    ports = []
    for col in pre.columns:
        if col in pre.numeric:
            ports.append(Port(col, "double", (BATCH, 1), "numeric; NaN is missing"))
        elif col in categories:
            known = ", ".join(repr(category_text(c)) for c in categories[col])
            note = f"categorical: {known}; '' is missing; any other value encodes as none of them"
            ports.append(Port(col, "string", (BATCH, 1), note))
    return ports


def output_ports(meta: artifact.Meta) -> list[Port]:
    if meta.task == "regression":
        note = f"{meta.target or 'the target'}, on its original scale"
        return [Port("prediction", "double", (BATCH,), note)]
    classes = ", ".join(meta.classes)
    return [
        Port("probabilities", "double", (BATCH, meta.n_out), f"columns: {classes}"),
        Port("label", "string", (BATCH,), "the most probable class"),
    ]


def value_info(port: Port) -> ValueInfoProto:
    kind = TensorProto.DOUBLE if port.type == "double" else TensorProto.STRING
    return helper.make_tensor_value_info(port.name, kind, list(port.dims), doc_string=port.note)


def _check_names(inputs: list[Port], outputs: list[Port]) -> None:
    """Column names become input names: one equal to an output, or in the graph's own name
    spaces, would make an invalid or ambiguous graph."""
    taken = {p.name for p in outputs}
    for port in inputs:
        if port.name in taken or port.name.startswith((NET, OWN)):
            raise SelectorError(
                f"feature column {port.name!r}: its name is taken in the ONNX graph (outputs "
                f"{sorted(taken)}, names starting {NET!r} or {OWN!r}); `selector predict` "
                "serves this model instead"
            )


# --- the preprocessing: `artifact.transform` in ONNX operators ------------------------------


def _numeric_nodes(pre: artifact.Preprocess) -> tuple[list[NodeProto], list[TensorProto]]:
    """NaN → median, then (x − mean) / scale, all numeric columns at once (`[N, n_numeric]`)."""
    n = len(pre.numeric)
    inits = [
        _const("medians", np.array(pre.medians, dtype=np.float64).reshape(1, n)),
        _const("means", np.array(pre.means, dtype=np.float64).reshape(1, n)),
        _const("scales", np.array(pre.scales, dtype=np.float64).reshape(1, n)),
    ]
    o = OWN
    nodes = [
        helper.make_node("Concat", list(pre.numeric), [o + "num/raw"], axis=1),
        helper.make_node("IsNaN", [o + "num/raw"], [o + "num/nan"]),
        helper.make_node("Where", [o + "num/nan", o + "medians", o + "num/raw"], [o + "num/x"]),
        helper.make_node("Sub", [o + "num/x", o + "means"], [o + "num/centred"]),
        helper.make_node("Div", [o + "num/centred", o + "scales"], [o + "num"]),
    ]
    return nodes, inits


def _categorical_nodes(
    k: int, col: str, fill: artifact.Scalar, cats: list[artifact.Scalar]
) -> tuple[list[NodeProto], list[TensorProto]]:
    """'' → the most frequent category, then one 0/1 column per category (`[N, n_categories]`):
    an unknown category matches none of them."""
    p = f"{OWN}cat{k}/"
    inits = [
        _strings(f"cat{k}/missing", [MISSING], ()),
        _strings(f"cat{k}/fill", [category_text(fill)], ()),
        _strings(f"cat{k}/categories", [category_text(c) for c in cats], (1, len(cats))),
    ]
    nodes = [
        helper.make_node("Equal", [col, p + "missing"], [p + "absent"]),
        helper.make_node("Where", [p + "absent", p + "fill", col], [p + "filled"]),
        helper.make_node("Equal", [p + "filled", p + "categories"], [p + "match"]),
        helper.make_node("Cast", [p + "match"], [p + "onehot"], to=TensorProto.DOUBLE),
    ]
    return nodes, inits


def preprocess_nodes(
    pre: artifact.Preprocess, features: str
) -> tuple[list[NodeProto], list[TensorProto]]:
    """Nodes from the raw input columns to the network's float32 input `features`, in
    `artifact.transform`'s feature order (numeric columns, then each categorical one's levels),
    computed in double as it is and cast to float32 at the end."""
    nodes: list[NodeProto] = []
    inits: list[TensorProto] = []
    parts: list[str] = []
    if pre.numeric:
        nodes, inits = _numeric_nodes(pre)
        parts.append(OWN + "num")
    for k, (col, fill, cats) in enumerate(
        zip(pre.categorical, pre.fills, pre.categories, strict=True)
    ):
        more, consts = _categorical_nodes(k, col, fill, cats)
        nodes += more
        inits += consts
        parts.append(f"{OWN}cat{k}/onehot")
    if not parts:
        raise SelectorError("the final model has no input features; there is nothing to export")
    nodes += [
        helper.make_node("Concat", parts, [OWN + "features64"], axis=1),
        helper.make_node("Cast", [OWN + "features64"], [features], to=TensorProto.FLOAT),
    ]
    return nodes, inits


# --- the network and its output --------------------------------------------------------------


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch's exporter warns about torchvision operators and deprecated internals it uses,
    none of which concerns an MLP."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        registration.setLevel(level)


def network(model: torch.nn.Module, n_in: int) -> onnx.ModelProto:
    """The MLP in eval mode as ONNX (`torch.onnx.export`; batch norm folded into the linear layers
    by its optimizer), float32 `x` `[N, n_in]` → `logits`, its names prefixed with `mlp/`."""
    model.eval()
    example = (torch.zeros(2, n_in, dtype=torch.float32),)
    with _quiet_exporter():
        program = torch.onnx.export(
            model,
            example,
            dynamo=True,
            input_names=["x"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim(BATCH)},),
            opset_version=OPSET,
            optimize=True,
            verbose=False,
        )
    if program is None:  # pragma: no cover  (dynamo=True always returns the program)
        raise SelectorError("torch.onnx.export returned no ONNX program")
    return onnx.compose.add_prefix(program.model_proto, NET)


def output_nodes(meta: artifact.Meta, logits: str) -> tuple[list[NodeProto], list[TensorProto]]:
    """`engine.predict` on the logits, in double: softmax and the most probable class, or the
    target's standardisation undone."""
    o = OWN
    cast = helper.make_node("Cast", [logits], [o + "logits64"], to=TensorProto.DOUBLE)
    if meta.task == "regression":
        inits = [
            _const("axis", np.array([1], dtype=np.int64)),
            _const("y_std", np.array(meta.y_std, dtype=np.float64)),
            _const("y_mean", np.array(meta.y_mean, dtype=np.float64)),
        ]
        nodes = [
            cast,
            helper.make_node("Squeeze", [o + "logits64", o + "axis"], [o + "standard"]),
            helper.make_node("Mul", [o + "standard", o + "y_std"], [o + "scaled"]),
            helper.make_node("Add", [o + "scaled", o + "y_mean"], ["prediction"]),
        ]
        return nodes, inits
    inits = [_strings("classes", list(meta.classes), (len(meta.classes),))]
    nodes = [
        cast,
        helper.make_node("Softmax", [o + "logits64"], ["probabilities"], axis=-1),
        helper.make_node("ArgMax", ["probabilities"], [o + "best"], axis=1, keepdims=0),
        helper.make_node("Gather", [o + "classes", o + "best"], ["label"], axis=0),
    ]
    return nodes, inits


def feeds(pre: artifact.Preprocess, rows: pd.DataFrame) -> dict[str, np.ndarray]:
    """The graph's inputs for the rows of a data frame, as a Python service would build them:
    numeric columns as double (missing → NaN), categorical ones as text (missing → '')."""
    missing = artifact.missing_columns(pre, rows)
    if missing:
        raise SelectorError(
            f"feature column {missing[0]!r} is missing (the model needs {pre.columns})"
        )
    out: dict[str, np.ndarray] = {}
    for col in pre.numeric:
        out[col] = artifact._numeric(rows, col).reshape(-1, 1)
    for col in pre.categorical:
        text = [MISSING if pd.isna(v) else category_text(v) for v in rows[col]]
        out[col] = np.array(text, dtype=object).reshape(-1, 1)
    return out


# --- the whole graph -------------------------------------------------------------------------


def to_onnx(bundle: artifact.Bundle) -> onnx.ModelProto:
    """One checked ONNX model: raw feature columns → preprocessing → MLP → probabilities and
    label, or the prediction."""
    pre, meta = bundle.pre, bundle.meta
    inputs, outputs = input_ports(pre), output_ports(meta)
    _check_names(inputs, outputs)
    net = network(bundle.model, meta.n_in)
    pre_nodes, pre_inits = preprocess_nodes(pre, net.graph.input[0].name)
    out_nodes, out_inits = output_nodes(meta, net.graph.output[0].name)
    graph = helper.make_graph(
        [*pre_nodes, *net.graph.node, *out_nodes],
        f"selector {meta.study} trial {meta.trial}",
        [value_info(p) for p in inputs],
        [value_info(p) for p in outputs],
        initializer=[*pre_inits, *net.graph.initializer, *out_inits],
        value_info=list(net.graph.value_info),
    )
    model = helper.make_model(
        graph,
        opset_imports=list(net.opset_import),
        ir_version=net.ir_version,
        functions=list(net.functions),
        producer_name="selector",
        doc_string=f"The final model of study {meta.study!r} (trial {meta.trial}), "
        "preprocessing included: feed the raw feature columns.",
    )
    helper.set_model_props(
        model,
        {
            "study": meta.study,
            "trial": str(meta.trial),
            "task": meta.task,
            "target": meta.target or "",
            "classes": ",".join(meta.classes),
        },
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def export_final(url: str, name: str, path: Path) -> Exported:
    """Write the model `selector final` saved for study `name` as ONNX to `path`; refused (exit 1)
    before `final` ran."""
    bundle = artifact.load(predict.model_dir(url, name))
    model = to_onnx(bundle)
    content = model.SerializeToString()
    try:
        path.write_bytes(content)
    except OSError as e:
        raise SelectorError(f"{path}: cannot write the ONNX model ({e.strerror or e})") from None
    return Exported(
        path, len(content), bundle.meta, input_ports(bundle.pre), output_ports(bundle.meta)
    )


def describe(done: Exported) -> list[str]:
    """What `selector export --model onnx` prints: the file, then its inputs and outputs."""
    m = done.meta
    lines = [
        f"wrote {done.path}: the final model of study {m.study!r} (trial {m.trial}) as ONNX, "
        f"preprocessing included ({done.bytes / 1e3:.0f} kB, opset {OPSET})"
    ]
    for title, ports in (("inputs", done.inputs), ("outputs", done.outputs)):
        lines.append(f"{title}:")
        lines += [f"  {p.name}: {p.type} {p.shape} ({p.note})" for p in ports]
    return lines
