"""ONNX graph surgery: find the tensor a layer writes, and put a P-ClArC correction after it, folded or inserted.

Folding (no new node): when the corrected tensor reaches a Gemm (or MatMul + bias Add) only through
Flatten/Reshape, or in ``channel`` mode through global average pooling, the affine map h' = (I − P) h + P z is
absorbed into that op: W' = W − W P, c' = c + W P z. P is V Vᵀ on the flattened vector (flat), V Vᵀ at every
position (channel, then flattened), or V Vᵀ on the pooled channel vector with z averaged over positions
(averaging commutes with a per-position map). Where the tensor is read by anything else, or through anything
else (flat mode into a global average pool mixes what the projection keeps apart), and for every reactive
correction (its per-sample gate is not affine), the correction is inserted as 1-4 nodes (:func:`_project`); a
dense D×D matrix is never built (NOTES.md §3: +500-700 %): V (k×D) is carried as it is.
"""

from __future__ import annotations

import ast
import difflib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..core.errors import InputError
from .correction import Correction

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
SCORE_OUTPUT = "artifact_score"
LAYER_OUTPUT = "layer_relevance"  # the explain graph's relevance at its named layer (the archive's monitor layer)
PREFIX = "unhans.pclarc"
DENSE_CHANNELS_MAX = 256  # C×C 1×1 Conv + Add (2 nodes) up to here, 3 rank-k nodes beyond (C² MACs per position)


def _consumers(graph: onnx.GraphProto, name: str) -> list[onnx.NodeProto]:
    return [node for node in graph.node if name in node.input]


def _producer(graph: onnx.GraphProto, name: str) -> int | None:
    return next((i for i, node in enumerate(graph.node) if name in node.output), None)


def _scopes(node: onnx.NodeProto) -> list[str]:
    """Module paths owning ``node``, from the metadata torch's dynamo exporter writes (a repr'd list of strings)."""
    value = next((p.value for p in node.metadata_props if p.key == SCOPES_KEY), "[]")
    try:
        return [str(s) for s in ast.literal_eval(value)]
    except (ValueError, SyntaxError):
        return []


def scope_names(model: onnx.ModelProto) -> list[str]:
    """Every module path recorded in the graph, in order of first appearance."""
    return list(dict.fromkeys(scope for node in model.graph.node for scope in _scopes(node)[:-1]))


def tensor_names(graph: onnx.GraphProto) -> list[str]:
    """Every tensor a node can read: graph inputs and node outputs."""
    return list(dict.fromkeys([i.name for i in graph.input] + [o for node in graph.node for o in node.output]))


def _unknown(kind: str, name: str, known: list[str]) -> InputError:
    near = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"did you mean {near}?" if near else f"{kind}s in the graph include {known[:12]}"
    return InputError(kind, f"{name!r} is not a {kind} of the graph", hint)


def scope_output(model: onnx.ModelProto, layer: str) -> str:
    """The one tensor that leaves module scope ``layer``: the layer's output as the rest of the graph sees it."""
    graph = model.graph
    inside = [node for node in graph.node if layer in _scopes(node)[:-1]]
    if not inside and not scope_names(model):
        raise InputError("layer", f"the graph records no module names, so {layer!r} cannot be found in it (only "
                         "torch.onnx.export(..., dynamo=True) writes them)", "name the tensor to correct with --tensor NAME "
                         "('unhans inspect' lists inputs and outputs; onnx.load(...).graph.node the rest)")
    if not inside:
        raise _unknown("layer", layer, scope_names(model))
    inside_ids = {id(node) for node in inside}
    graph_outputs = {o.name for o in graph.output}
    leaving = list(dict.fromkeys(
        out for node in inside for out in node.output
        if out in graph_outputs or any(id(c) not in inside_ids for c in _consumers(graph, out))
    ))
    if len(leaving) != 1:
        raise InputError("layer", f"{layer!r} hands {len(leaving)} tensors to the rest of the graph {leaving}",
                         "name one tensor with --tensor, or a layer that is called once and returns one tensor")
    return leaving[0]


def resolve(model: onnx.ModelProto, tensor: str | None = None, layer: str | None = None) -> str:
    """The tensor to correct, named directly or as a module scope's output."""
    if (tensor is None) == (layer is None):
        raise InputError("--tensor/--layer", "name exactly one of them", "pass --layer MODULE.PATH or --tensor NAME")
    if layer is not None:
        return scope_output(model, layer)
    if tensor not in tensor_names(model.graph):
        raise _unknown("tensor", tensor, tensor_names(model.graph))
    return tensor


def shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    """Inferred shape of every tensor (dims are ints, or strings for symbolic ones such as the batch)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    out = {}
    for info in list(graph.input) + list(graph.value_info) + list(graph.output):
        dims = info.type.tensor_type.shape.dim
        out[info.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims)
    return out


def activation_shape(model: onnx.ModelProto, tensor: str, seen: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Shape of one sample of ``tensor`` (batch axis dropped). Where shape inference leaves dimensions symbolic (a
    graph exported with dynamic height and width), ``seen``, the shape onnxruntime computed for the activations the
    correction was fitted on, fills them in (the corrected graph is then verified in onnxruntime on a probe)."""
    shape = shapes(model).get(tensor)
    static = shape is not None and len(shape) >= 2 and all(isinstance(d, int) and d > 0 for d in shape[1:])
    if static:
        return tuple(shape[1:])
    fits = seen is not None and (shape is None or (len(shape) == len(seen) + 1 and all(
        not isinstance(d, int) or d <= 0 or d == k for d, k in zip(shape[1:], seen))))
    if not fits:
        raise InputError("tensor", f"{tensor!r} has no static per-sample shape ({shape}) and its activations were not "
                         f"seen{'' if seen is None else f' with a matching rank ({seen})'}",
                         "pick a tensor of shape (batch, ...), or fit the correction on its activations")
    return tuple(seen)


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also returns the intermediate tensors ``names`` (to read activations from ORT)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    exposed.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names if n not in present)
    return exposed


class _Builder:
    """Appends nodes and initializers under one prefix, keeping names unique; flattens ``x`` at most once."""

    def __init__(self, graph: onnx.GraphProto, x: str, shape: tuple[int, ...]):
        self.graph, self.x, self.shape = graph, x, shape
        self.nodes: list[onnx.NodeProto] = []
        self.taken = set(tensor_names(graph)) | {i.name for i in graph.initializer} | {o.name for o in graph.output}
        self._flat = x if len(shape) == 1 else None

    def name(self, stem: str) -> str:
        name, k = f"{PREFIX}.{stem}", 1
        while name in self.taken:
            name, k = f"{PREFIX}.{stem}_{k}", k + 1
        self.taken.add(name)
        return name

    def const(self, stem: str, array: np.ndarray, dtype=np.float32) -> str:
        name = self.name(stem)
        self.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], stem: str, output: str | None = None, **attributes) -> str:
        out = output or self.name(stem)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"{PREFIX}.{stem}/{op_type}", **attributes))
        return out

    def flat(self) -> str:
        """x as (N, D): a Flatten that onnxruntime runs as a view."""
        if self._flat is None:
            self._flat = self.op("Flatten", [self.x], "flat", axis=1)
        return self._flat

    def row_dot(self, weight: np.ndarray, bias, stem: str) -> str:
        """W·f + b for every sample as (k, N) rows (one row for a vector w): Gemm with the constant as A is
        onnxruntime's fast dot product (about half the time of f·wᵀ at batch 1 and 32)."""
        rows = np.reshape(weight, (-1, np.shape(weight)[-1]))
        bias = np.reshape(bias, -1) if len(rows) == 1 else np.reshape(bias, (-1, 1))  # one row: bias shaped [1], as before
        return self.op("Gemm", [self.const(f"{stem}_row", rows), self.flat(), self.const(f"{stem}_bias", bias)], stem, transB=1)


def _project(correction: Correction, b: _Builder) -> str:
    """Insert h' = h − V Vᵀ(h − z) in the cheapest exact form measured (bench/export.py; never a dense D×D matrix).

    V is k×D (rows orthonormal). flat: s = Vh − Vz as one Gemm (k rows), then h − sᵀV as one Gemm reading h as its C
    input: 2 nodes, plus the Flatten and Reshape (views) around them for (N, C, H, W) tensors. channel: one 1×1 Conv
    with weights I − VᵀV plus an Add of VᵀV z_p, which varies by position p (folded into the Conv's bias when it does
    not); past ``DENSE_CHANNELS_MAX`` channels the C×C Conv costs more than 3 rank-k nodes (two k-channel 1×1 Convs and
    a Sum) and those are used instead.
    """
    v, z, shape = correction.direction.astype(np.float64), correction.clean_mean.astype(np.float64), b.shape
    if correction.mode == "flat":
        s = b.row_dot(v, -(v @ z.ravel()), "dot_v")
        corrected = b.op("Gemm", [s, b.const("minus_v", -v), b.flat()], "corrected", transA=1)
        return corrected if len(shape) == 1 else b.op("Reshape", [corrected, b.const("shape", [-1, *shape], np.int64)], "unflat")
    k, channels, spatial = len(v), v.shape[1], (1,) * (len(shape) - 1)
    restore = np.tensordot(v.T @ v, z, axes=(1, 0))  # VᵀV z_p, shaped like z
    varies = not np.all(restore == restore.reshape(channels, -1)[:, :1].reshape(channels, *spatial))
    if channels > DENSE_CHANNELS_MAX:
        dot = b.op("Conv", [b.x, b.const("v_kernel", v.reshape(k, channels, *spatial))], "dot_v")
        shift = b.op("Conv", [dot, b.const("minus_v", -v.T.reshape(channels, k, *spatial))], "shift")
        return b.op("Sum", [b.x, shift, b.const("restore", restore[None])], "corrected")
    weight = b.const("projection", (np.eye(channels) - v.T @ v).reshape(channels, channels, *spatial))
    if not varies:
        return b.op("Conv", [b.x, weight, b.const("projection_bias", restore.reshape(channels, -1)[:, 0])], "corrected")
    return b.op("Add", [b.op("Conv", [b.x, weight], "projected"), b.const("restore", restore[None])], "corrected")


def _initializer(graph: onnx.GraphProto, name: str) -> onnx.TensorProto | None:
    return next((i for i in graph.initializer if i.name == name), None)


def _set_initializer(graph: onnx.GraphProto, node: onnx.NodeProto, index: int, array: np.ndarray) -> None:
    """Give ``node`` a new value at input ``index``: in place if no other node reads it, else under a new name."""
    old = node.input[index] if index < len(node.input) else ""
    shared = old and sum(name == old for n in graph.node for name in n.input) > 1
    name = f"{old}.{PREFIX}" if shared else (old or f"{PREFIX}.{node.name}.bias")
    tensor = numpy_helper.from_array(np.ascontiguousarray(array, np.float32), name)
    existing = _initializer(graph, name)
    if existing is not None:
        existing.CopyFrom(tensor)
    else:
        graph.initializer.append(tensor)
    while len(node.input) <= index:
        node.input.append("")
    node.input[index] = name


def _attribute(node: onnx.NodeProto, name: str, default):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _sole_consumer(graph: onnx.GraphProto, name: str) -> onnx.NodeProto | None:
    consumers = _consumers(graph, name)
    outputs = {o.name for o in graph.output}
    return consumers[0] if len(consumers) == 1 and name not in outputs else None


def _is_global_average(graph: onnx.GraphProto, node: onnx.NodeProto, rank: int) -> bool:
    spatial = set(range(2, rank))
    if node.op_type == "GlobalAveragePool":
        return True
    if node.op_type != "ReduceMean":
        return False
    axes_input = _initializer(graph, node.input[1]) if len(node.input) > 1 and node.input[1] else None
    axes = numpy_helper.to_array(axes_input).tolist() if axes_input is not None else _attribute(node, "axes", None)
    return axes is not None and {a % rank for a in axes} == spatial


def _fold(model: onnx.ModelProto, x: str, correction: Correction, shape: tuple[int, ...]) -> bool:
    """Fold the correction into the linear op that reads ``x`` (see the module doc); False where it cannot."""
    graph = model.graph
    node, pooled, t = _sole_consumer(graph, x), False, x
    if node is not None and correction.mode == "channel" and len(shape) >= 2 and _is_global_average(graph, node, len(shape) + 1):
        pooled, t = True, node.output[0]
        node = _sole_consumer(graph, t)
    while node is not None and node.op_type in ("Flatten", "Reshape"):
        t = node.output[0]
        node = _sole_consumer(graph, t)
    width = shape[0] if pooled else int(np.prod(shape))
    if node is None or shapes(model).get(t, ())[1:] != (width,) or node.input[0] != t:
        return False
    if node.op_type == "Gemm" and not _attribute(node, "transA", 0):
        weight_index, bias_node, bias_index = 1, node, 2
    elif node.op_type == "MatMul":
        bias_node = _sole_consumer(graph, node.output[0])
        if bias_node is None or bias_node.op_type != "Add":
            return False
        weight_index, bias_index = 1, 1 if bias_node.input[0] == node.output[0] else 0
    else:
        return False
    weight_init = _initializer(graph, node.input[weight_index])
    bias_name = bias_node.input[bias_index] if len(bias_node.input) > bias_index else ""
    bias_init = _initializer(graph, bias_name) if bias_name else None
    if weight_init is None or (bias_name and bias_init is None):  # weights or bias computed at run time
        return False
    transposed = node.op_type == "Gemm" and _attribute(node, "transB", 0)
    w = numpy_helper.to_array(weight_init).astype(np.float64)
    w = w if transposed else w.T  # (outputs, width)
    if w.ndim != 2 or w.shape[1] != width:
        return False
    bias = numpy_helper.to_array(bias_init).astype(np.float64) if bias_init is not None else np.zeros(w.shape[0])
    if bias.size not in (1, w.shape[0]):
        return False

    v, z = correction.direction.astype(np.float64), correction.clean_mean.astype(np.float64)
    if pooled:
        z = z.reshape(v.shape[1], -1).mean(1)
    if correction.mode == "channel" and not pooled:  # V Vᵀ at every position, C-major flattening
        w3 = w.reshape(len(w), v.shape[1], -1)
        wp = np.einsum("okp,kc->ocp", np.einsum("ocp,kc->okp", w3, v), v).reshape(w.shape)
    else:
        wp = (w @ v.T) @ v
    alpha, beta = (_attribute(node, "alpha", 1.0), _attribute(node, "beta", 1.0)) if node.op_type == "Gemm" else (1.0, 1.0)
    new_w = w - wp
    new_bias = beta * np.broadcast_to(bias.ravel(), (w.shape[0],)) + alpha * (wp @ z.ravel())
    _set_initializer(graph, node, weight_index, new_w if transposed else new_w.T)
    _set_initializer(graph, bias_node, bias_index, new_bias.reshape(bias.shape) if bias.size == w.shape[0] else new_bias)
    if node.op_type == "Gemm":
        for attribute in node.attribute:
            if attribute.name == "beta":
                attribute.f = 1.0
    return True


def apply_correction(model: onnx.ModelProto, x: str, correction: Correction, fold: bool = True) -> tuple[onnx.ModelProto, bool]:
    """A copy of ``model`` with ``correction`` applied to tensor ``x``; returns it and whether it was folded.

    With a detector the graph gains the output ``artifact_score`` (w·f(h) + b per sample, h before the correction).
    """
    corrected = onnx.ModelProto()
    corrected.CopyFrom(model)
    graph = corrected.graph
    if x in {o.name for o in graph.output}:
        raise InputError("tensor", f"{x!r} is an output of the graph", "correct an intermediate layer")
    if SCORE_OUTPUT in tensor_names(graph) or SCORE_OUTPUT in {o.name for o in graph.output}:
        raise InputError("model", f"the graph already has a tensor {SCORE_OUTPUT!r}", "export from the uncorrected model")
    shape = activation_shape(corrected, x, tuple(correction.clean_mean.shape))
    correction.check_shape(shape, f"tensor {x!r}")

    b = _Builder(graph, x, shape)
    folded = fold and not correction.reactive and _fold(corrected, x, correction, shape)
    if correction.has_detector:
        weight = correction.detector_weight
        if correction.mode == "channel":  # w·mean_p(h) = Σ (w_c / P) h_cp
            weight = np.repeat(weight / np.prod(shape[1:]), np.prod(shape[1:]))
        score = b.row_dot(weight, correction.detector_bias, "score")
        b.op("Reshape", [score, b.const("score_shape", [-1], np.int64)], "score_vector", output=SCORE_OUTPUT)
        batch = next(iter(graph.input[0].type.tensor_type.shape.dim), None)
        batch_dim = (batch.dim_param or batch.dim_value) if batch is not None else None
        graph.output.append(helper.make_tensor_value_info(SCORE_OUTPUT, TensorProto.FLOAT, [batch_dim]))
    if not folded:
        out = _project(correction, b)
        if correction.reactive:
            per_sample = b.op("Reshape", [score, b.const("gate_shape", [-1] + [1] * len(shape), np.int64)], "gate_shape")
            gate = b.op("Greater", [per_sample, b.const("threshold", np.array(correction.threshold))], "gate")
            out = b.op("Where", [gate, out, x], "gated")
        for node in graph.node:  # the new nodes are not in the graph yet, so they keep reading x
            node.input[:] = [out if name == x else name for name in node.input]
    at = _producer(graph, x)
    position = 0 if at is None else at + 1
    for offset, node in enumerate(b.nodes):
        graph.node.insert(position + offset, node)
    return corrected, folded
