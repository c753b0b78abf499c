"""LRP relevance maps as an ONNX graph: the model's forward pass and zennit's rule backward in one graph.

Route: zennit's hooked backward (composite and canonizers registered on :class:`unhans.core.attribution.LRP`'s
private copy, outside the trace) is traced with ``make_fx`` in symbolic mode, so the batch axis stays symbolic, and
the few backward ops the ONNX exporter cannot translate (``convolution_backward``, ``max_pool2d_with_indices_backward``,
``threshold_backward``, ``_adaptive_avg_pool2d_backward``) are decomposed into forward ops (Conv with a flipped kernel
or ConvTranspose, scatter, where, expand) on the way. ``torch.autograd.grad`` itself does not export (NOTES.md §3).
Before export, :class:`_Simplifier` drops the work of zennit's rules that cannot change the result (z+ branches fed by
the negative part of a ReLU's output, recomputed forwards, materialised expands), which onnxruntime cannot see; the
max-pool backward routes by the input itself, so the forward keeps onnxruntime's fast MaxPool (``bench/explain.py``).
zennit stays the oracle: every graph is run in onnxruntime against :class:`LRP` on a probe batch (predicted and given
targets) and refused unless it matches (see :func:`_verify` for models whose LRP is ill-conditioned in float32).

The graph: inputs ``input`` (N, C, H, W) float32 and ``target`` (N,) int64, where a negative target means "the
predicted class" (feed ``-1`` for every row to explain predictions); outputs ``logits``, ``relevance`` (shaped like
``input``), when a layer is named, ``layer_relevance`` (shaped like that layer's output, for latent SpRAy), and, when
a detector is given, ``artifact_score`` (N,) as the prediction graph computes it, so a served explanation needs no
second graph. A corrected model (:func:`unhans.core.clarc.pclarc`) is explained through its correction, exactly as
``LRP`` does.
"""

from __future__ import annotations

import operator
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from torch._decomp import get_decompositions
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw
from zennit.layer import Sum
from zennit.types import Activation

from .. import __version__
from ..core.attribution import LRP, _composite_key
from ..core.attention import BilinearProduct, HeldSoftmax
from ..core.canonize import Activate, HeldScaleNorm, PassProduct, Pool, Reduction, Tap
from ..core.clarc import PClArC
from ..core.errors import InputError
from ..core.layers import Corrected, activations, batch_rows, get_layer, middle_spatial_layer
from .correction import Correction
from .graph import LAYER_OUTPUT, SCORE_OUTPUT
from .onnx import META, OPSET, TOLERANCE, _first_line, _with_ir_version, write_atomic
from .runtime import session

# the layers of a canonized model (:func:`unhans.core.canonize.canonize`) whose rule backward the graph can hold (not
# yet Swin's WindowAttention: its traced backward holds an as_strided_scatter the ONNX exporter has no function for)
SUPPORTED_LAYERS = (nn.Conv2d, nn.Linear, Activation, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten,
                    nn.BatchNorm2d, nn.Dropout, nn.Identity, nn.ZeroPad2d, nn.ConstantPad2d, PClArC, Sum, Reduction,
                    Pool, Activate, PassProduct, Tap, HeldScaleNorm, BilinearProduct, HeldSoftmax)
RELEVANCE_TOLERANCE = 1e-4  # relative L2 of relevance (input and layer) vs zennit
LOGIT_TOLERANCE = 1e-5  # max |Δlogit| vs torch, relative to max(1, max |logit|): float32 cannot promise more on large logits
FLOAT32_SLACK = 4.0  # an ill-conditioned model passes if the graph's error vs float64 zennit is within 4x zennit's own
OUTPUTS = ("logits", "relevance", LAYER_OUTPUT)
VERIFY_BYTES = 1 << 20  # input bytes verified at a time: zennit and the graph keep every activation (Lite0 at 224 px: ~100 MB an image)
MONITOR_LAYER = "monitor"  # as ``layer``: the block halfway through the model (core.layers.middle_spatial_layer)


def explain_path(onnx_path: str | Path) -> Path:
    """Where the explain graph of a prediction graph lives: beside it, ``NAME.explain.onnx``."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(f"{onnx_path.stem}.explain.onnx")


@dataclass
class ExplainReport:
    """What an explain export built and how closely onnxruntime matched zennit."""

    path: Path | None
    figures: dict[str, float]  # rel_l2_vs_zennit (worst of input and layer relevance), logit_max_abs_diff, ...
    nodes: int
    seconds: float
    metadata: dict[str, str]


def check_supported(lrp: LRP) -> None:
    """Refuse a model with layers the graph cannot explain, naming every one of them at once (the layers are those
    of the canonized model, so a block the user wrote is checked by what it calls)."""
    modules = dict(lrp.model.named_modules())
    bad = []
    for node in lrp.model.graph.nodes:
        if node.op != "call_module":
            continue
        module = modules[node.target]
        if not isinstance(module, SUPPORTED_LAYERS):
            bad.append(f"{node.target} ({type(module).__name__})")
    if bad:
        raise InputError("explain", f"{len(bad)} layer(s) are not supported by the explain graph: {', '.join(dict.fromkeys(bad))}",
                         "archive without --explain: the archive then serves relevance through zennit on the PyTorch twin")


def _convolution_backward(grad, x, weight, bias_sizes, stride, padding, dilation, transposed, output_padding, groups, mask):
    """Input gradient of a convolution as a transposed convolution (zennit's rules never ask for weight gradients)."""
    if transposed or mask[1] or mask[2] or x.dim() != 4:
        raise NotImplementedError("only the input gradient of a 2-D convolution is supported")
    kernel = weight.shape[2:]
    if tuple(stride) == (1, 1) and tuple(dilation) == (1, 1) and all(p < k for p, k in zip(padding, kernel)):
        # the same map as a plain convolution with the kernel flipped (per group, in and out channels swapped):
        # onnxruntime's Conv is much faster than ConvTranspose, depthwise ones included
        out_channels, group_in = weight.shape[:2]
        flipped = (weight.reshape(groups, out_channels // groups, group_in, *kernel).transpose(1, 2)
                   .reshape(groups * group_in, out_channels // groups, *kernel).flip(2, 3))
        return torch.nn.functional.conv2d(grad, flipped, None, 1, [k - 1 - p for p, k in zip(padding, kernel)], 1, groups), None, None
    extra = [x.shape[i + 2] - ((grad.shape[i + 2] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel[i] - 1) + 1)
             for i in range(2)]
    return torch.nn.functional.conv_transpose2d(grad, weight, None, stride, padding, extra, groups, dilation), None, None


def _adaptive_avg_pool2d_backward(grad, x):
    """Adaptive average pooling's gradient where its windows tile the input (global pooling, identity, or one side a
    multiple of the other): each window's share spread evenly over it, or each block's summed into its one input."""
    (h, w), (oh, ow) = x.shape[2:], grad.shape[2:]
    if (oh, ow) == (1, 1):
        return grad.expand(x.shape) / (h * w)
    if (oh, ow) == (h, w):
        return grad
    if oh % h == 0 and ow % w == 0:  # an upsampling (VGG's 7x7 pooling of a small input): each input fills a block
        n, c = grad.shape[:2]
        return grad.reshape(n, c, h, oh // h, w, ow // w).sum((3, 5))
    if h % oh or w % ow:
        raise NotImplementedError(f"adaptive average pooling from {h}x{w} to {oh}x{ow} (windows that overlap)")
    kh, kw = h // oh, w // ow
    return _upsample_nearest(grad, kh, kw) / (kh * kw)


def _max_pool2d_backward(grad, x, kernel, stride, padding, dilation, ceil_mode, indices):
    """Route the gradient to each window's first maximum, found from the input itself, for non-overlapping windows.

    PyTorch's choice (the first maximum in row-major order) is kept exactly: among the window's maxima, the one with
    the highest rank (k² down to 1 in row-major order) wins. Needing no indices, the forward pass runs onnxruntime's
    plain MaxPool instead of its much slower indices variant, and every step here is a full-size elementwise op, a
    nearest upsampling or a MaxPool. Other windows scatter by the indices.
    """
    kh, kw = kernel
    h, w = x.shape[2:]
    if tuple(stride or kernel) != (kh, kw) or any(padding) or tuple(dilation) != (1, 1) or h % kh or w % kw:
        return _SCATTER_MAX_POOL_BACKWARD(grad, x, kernel, stride, padding, dilation, ceil_mode, indices)
    def up(t):  # through a reshape, so onnxruntime upsamples in plain layout rather than reordering the full-size result
        n, c, th, tw = t.shape
        return _upsample_nearest(t.reshape(n, c, th * tw).reshape(n, c, th, tw), kh, kw)

    def pool(t):  # the forward's call: one MaxPool in the graph after common subexpressions are merged
        return torch.ops.aten.max_pool2d_with_indices.default(t, list(kernel), list(kernel))[0]
    rank = (kh * kw - (torch.arange(h) % kh)[:, None] * kw - (torch.arange(w) % kw)[None, :]).to(x.dtype)
    score = (x == up(pool(x))).to(x.dtype) * rank
    return (score == up(pool(score))).to(x.dtype) * up(grad)  # a product, not a where: onnxruntime's Where is slower


@torch.library.custom_op("unhans::upsample_nearest", mutates_args=())
def _upsample_nearest(x: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Nearest upsampling that ``make_fx`` keeps as one node (its own decomposition exports as GatherND between
    transposes, several times slower than onnxruntime's Resize); :class:`_Simplifier` turns it back into aten's."""
    return torch.nn.functional.interpolate(x, scale_factor=(kh, kw), mode="nearest")


@_upsample_nearest.register_fake
def _(x, kh, kw):
    return x.new_empty(x.shape[0], x.shape[1], x.shape[2] * kh, x.shape[3] * kw)


_SCATTER_MAX_POOL_BACKWARD = get_decompositions([torch.ops.aten.max_pool2d_with_indices_backward])[
    torch.ops.aten.max_pool2d_with_indices_backward.default]


def _decompositions() -> dict:
    table = get_decompositions([torch.ops.aten.threshold_backward])
    table[torch.ops.aten.max_pool2d_with_indices_backward.default] = _max_pool2d_backward
    table[torch.ops.aten.convolution_backward.default] = _convolution_backward
    table[torch.ops.aten._adaptive_avg_pool2d_backward.default] = _adaptive_avg_pool2d_backward
    return table


aten = torch.ops.aten
_VIEWS = {aten.view.default, aten.clone.default, aten.detach.default, aten._unsafe_view.default, aten.alias.default}
_SIGN_KEEPING = _VIEWS | {aten.t.default, aten.transpose.int, aten.flip.default, aten.permute.default,
                          aten.unsqueeze.default, aten.expand.default, aten.max_pool2d.default, aten.slice.Tensor}


def _shape(node) -> tuple | None:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return None if value is None else (str(value.dtype), tuple(str(d) for d in value.shape))


def _identity_source(node):
    """``node`` with view/clone/detach steps that keep its shape looked through."""
    while node.target in _VIEWS and _shape(node) == _shape(node.args[0]):
        node = node.args[0]
    return node


class _Simplifier:
    """Drops work of zennit's rules that cannot change the result, on the traced graph before export.

    onnxruntime cannot see it: it does not know that a ReLU's output is non-negative, so z+ branches fed by the
    negative part of such an input (identically zero) survive its optimiser, and so do expands it materialises. Every
    rewrite is exact in float32 for finite values (a product with a zero is taken as zero: zennit's gradients are finite)
    but two, which only round in another order: :meth:`_bias_plus` and :meth:`_box`.
    """

    def __init__(self, graph: torch.fx.Graph):
        self.graph = graph
        self.nonneg, self.zero, self.ones, self.seen, self.one_channel = set(), set(), set(), {}, {}
        # a node mutated in place may hold other values later: never reason about it, never redirect uses to it
        self.mutated = {arg for n in graph.nodes if n.op == "call_function" and getattr(n.target, "_schema", None)
                        is not None and n.target._schema.is_mutable for arg in n.args if isinstance(arg, torch.fx.Node)}

    def run(self) -> None:
        for node in list(self.graph.nodes):
            if node.op == "get_attr":  # zennit's rules read each parameter afresh
                first = self.seen.setdefault(("get_attr", node.target), node)
                if first is not node:
                    node.replace_all_uses_with(first)
            if node.op != "call_function" or node in self.mutated:
                continue
            key = self._key(node)
            replacement = (self.seen.get(key) if key else None) or self._rewrite(node)
            if replacement is not None and replacement not in self.mutated:
                node.replace_all_uses_with(replacement)
            else:
                if key:
                    self.seen[key] = node
                self._classify(node)
        self.graph.eliminate_dead_code()

    def _key(self, node):
        """What makes two nodes compute the same (pure op, same arguments), or None: zennit's rules recompute the
        forward (the epsilon rule exactly), and the max-pool backward repeats the forward's pooling."""
        schema = getattr(node.target, "_schema", None)
        if (schema is None or schema.is_mutable or torch.Tag.nondeterministic_seeded in node.target.tags
                or any(a in self.mutated for a in node.all_input_nodes)):
            return None
        return node.target, _hashable(node.args), _hashable(node.kwargs)

    def _new(self, target, *args):
        node = self.graph.call_function(target, args)
        self._classify(node)
        return node

    def _classify(self, node) -> None:
        t, args = node.target, node.args
        nodes = [a for a in args if isinstance(a, torch.fx.Node)]
        if t in (aten.zeros_like.default, aten.zeros.default):
            self.zero.add(node)
        elif (t in _SIGN_KEEPING or _zero_padding(node)) and args[0] in self.zero:
            self.zero.add(node)
        elif t is aten.clamp.default and args[0] in self.nonneg and len(args) > 2 and args[2] is not None and args[2] <= 0:
            self.zero.add(node)
        elif t is aten.mul.Tensor and any(a in self.zero for a in args):
            self.zero.add(node)
        elif t is aten.convolution.default and args[0] in self.zero and (args[2] is None or args[2] in self.zero):
            self.zero.add(node)
        if t is aten.ones_like.default or (t in _SIGN_KEEPING and args[0] in self.ones):
            self.ones.add(node)
        if node in self.zero:
            self.nonneg.add(node)
        elif (t in (aten.relu.default, aten.relu_.default, aten.ones_like.default)
              or (t in (aten.clamp.default, aten.hardtanh.default, aten.hardtanh_.default, aten.clamp_.default) and len(args) > 1 and args[1] is not None and args[1] >= 0)
              or (t is aten.full.default and args[1] >= 0)):
            self.nonneg.add(node)
        elif t in _SIGN_KEEPING or t in (operator.getitem, aten.max_pool2d_with_indices.default) or _zero_padding(node):
            if args[0] in self.nonneg:
                self.nonneg.add(node)
        elif t in (aten.convolution.default, aten.add.Tensor, aten.mul.Tensor, aten.addmm.default):
            if all(a in self.nonneg for a in nodes) and all(a >= 0 for a in args[:2] if isinstance(a, (int, float))):
                self.nonneg.add(node)

    def _rewrite(self, node):
        t, args = node.target, node.args
        if t is torch.ops.unhans.upsample_nearest.default:
            with self.graph.inserting_before(node):
                return self._new(aten.upsample_nearest2d.vec, args[0], None, [float(args[1]), float(args[2])])
        if t in _VIEWS and _shape(node) == _shape(args[0]):
            return args[0]  # clones, detaches and same-shape views: zennit's rules then recompute nothing twice
        if t is aten.convolution.default and args[1] in self.ones:
            return self._box(node)
        if t is aten.clamp.default and len(args) > 1 and args[0] in self.nonneg and args[1] is not None and args[1] <= 0 and (len(args) < 3 or args[2] is None):
            return args[0]  # the positive part of a non-negative value
        if t is aten.add.Tensor and len(args) == 2 and not node.kwargs:
            a, b = args
            if b == 0 or (b in self.zero and _shape(a) == _shape(node)):
                return a
            if a in self.zero and _shape(b) == _shape(node):
                return b
            return self._stabilizer(node, a, b)
        if t is aten.sum.dim_IntList and len(args) == 2 and len(args[1]) == 1 and not node.kwargs:
            stack = _identity_source(args[0])
            if stack.target is aten.stack.default and _dim(stack) is not None and _dim(stack) == _dim(stack, args[1][0]):
                with self.graph.inserting_before(node):
                    total = stack.args[0][0]
                    for term in stack.args[0][1:]:
                        total = self._new(aten.add.Tensor, total, term)
                return total  # the two-term sums zennit's residual canonizer forms, without the stack
        if t is aten.select.int and args[0].target is aten.mul.Tensor:
            return self._select_product(node)
        if t is aten.constant_pad_nd.default and args[0].target is aten.convolution.default:
            return self._crop_into_convolution(node)
        return None

    def _crop_into_convolution(self, node):
        """A symmetric crop (a padding by negative amounts: the backward of "same"-padding wrappers) of a stride-1
        convolution's output as that convolution with less padding: the same sums, without a pass that onnxruntime
        runs outside its blocked layout."""
        conv, pads = node.args[0], node.args[1]
        x, weight, bias, stride, padding, dilation, transposed, output_padding, groups = conv.args
        if (len(pads) != 4 or pads[0] != pads[1] or pads[2] != pads[3] or pads[0] > 0 or pads[2] > 0 or transposed
                or list(stride) != [1, 1] or list(dilation) != [1, 1] or len(conv.users) != 1):
            return None
        cropped = [padding[0] + pads[2], padding[1] + pads[0]]
        if min(cropped) < 0:
            return None
        with self.graph.inserting_before(node):
            return self._new(aten.convolution.default, x, weight, bias, stride, cropped, dilation, transposed, output_padding, groups)

    def _stabilizer(self, node, a, b):
        """zennit's ``a + eps * (sign(a) + (a == 0))`` as ``a + eps`` for a ≥ 0, else ``a + where(a < 0, -eps, eps)``."""
        if not (isinstance(b, torch.fx.Node) and b.target is aten.mul.Tensor and isinstance(b.args[1], float)):
            return None
        signs, eps = b.args
        if not (isinstance(signs, torch.fx.Node) and signs.target is aten.add.Tensor and len(signs.args) == 2):
            return None
        is_zero, sign = signs.args
        if not (sign.target is aten.sign.default and sign.args[0] is a and is_zero.target is aten._to_copy.default
                and is_zero.args[0].target is aten.eq.Scalar and is_zero.args[0].args == (a, 0.0)):
            return None
        with self.graph.inserting_before(node):
            if a in self.nonneg:
                return self._bias_plus(a, eps, {node, sign, is_zero.args[0]}) or self._new(aten.add.Tensor, a, eps)
            negative = self._new(aten.lt.Scalar, a, 0)
            low, high = (self._new(aten.scalar_tensor.default, v) for v in (-eps, eps))
            return self._new(aten.add.Tensor, a, self._new(aten.where.self, negative, low, high))

    def _bias_plus(self, conv, eps, stabilizer):
        """``conv + eps`` as one convolution with ``eps`` added to its bias, when only the ``stabilizer``'s nodes read
        ``conv``: onnxruntime then keeps the stabilised z+ in its blocked layout instead of reordering it for the Add.
        Not bit-exact: the bias and ``eps`` are added first."""
        readers = {u for u in conv.users if u.op != "call_function" or u.users}  # nodes already replaced read nothing
        if (conv.target is not aten.convolution.default or not readers <= stabilizer or conv.args[6]
                or "val" not in conv.args[1].meta):
            return None
        x, weight, bias, *rest = conv.args
        shifted = (self._new(aten.add.Tensor, bias, eps) if bias is not None
                   else self._new(aten.full.default, [weight.meta["val"].shape[0]], eps))
        return self._new(aten.convolution.default, x, weight, shifted, *rest)

    def _box(self, node):
        """A convolution with all-one weights (the flat rule's) as the channel sum convolved with one all-one kernel.

        Its every output channel is the same, so the channel sum of a quotient by it (the flat rule's backward) is taken
        before the division, and on an all-one input (the flat rule's denominator) it is computed for one image from
        constants, which onnxruntime folds. Not bit-exact (another summation order); a Conv to one or three output
        channels is onnxruntime's least efficient.
        """
        x, weight, bias, stride, padding, dilation, transposed, output_padding, groups = node.args
        shape = weight.meta["val"].shape if "val" in weight.meta else None
        if transposed or groups != 1 or shape is None or not (bias is None or bias in self.zero):
            return None
        with self.graph.inserting_before(node):
            if x in self.ones:
                _, channels, height, width = (guarding_hint_or_throw(d) for d in x.meta["val"].shape)
                total = self._new(aten.full.default, [1, 1, height, width], float(channels))
            elif shape[1] == 1:
                return None
            elif x.target is aten.div.Tensor and (divisor := self._one_channel(x.args[1])) is not None:
                total = self._new(aten.div.Tensor, self._new(aten.sum.dim_IntList, x.args[0], [1], True), divisor)
            else:
                total = self.graph.call_function(aten.sum.dim_IntList, (x, [1], True))
            kernel = self._new(aten.slice.Tensor, self._new(aten.slice.Tensor, weight, 0, 0, 1), 1, 0, 1)
            out = self._new(aten.convolution.default, total, kernel, None, stride, padding, dilation, False, output_padding, 1)
            if shape[0] == 1:
                return out
            spread = self._new(aten.expand.default, out, [-1, shape[0], -1, -1])
            self.one_channel[spread] = out
            return spread

    def _one_channel(self, node):
        """The one channel every channel of ``node`` equals (a box convolution's, or one plus a number), or None."""
        if node in self.one_channel:
            return self.one_channel[node]
        if node.target is aten.add.Tensor and isinstance(node.args[1], float) and node.args[0] in self.one_channel:
            return self._new(aten.add.Tensor, self.one_channel[node.args[0]], node.args[1])
        return None

    def _select_product(self, node):
        """``select(stack(xs, d) * expand(unsqueeze(y, d)), d, i)`` as ``xs[i] * y`` (the residual sum's rule)."""
        stacked, spread = node.args[0].args
        stack, dim = _identity_source(stacked), node.args[1]
        if not (isinstance(spread, torch.fx.Node) and spread.target is aten.expand.default
                and spread.args[0].target is aten.unsqueeze.default and stack.target is aten.stack.default):
            return None
        inner = spread.args[0]
        if not (_dim(stack) is not None and _dim(stack) == _dim(stack, dim) == _dim(stack, inner.args[1])
                and _shape(spread) == _shape(stack)):
            return None
        with self.graph.inserting_before(node):
            return self._new(aten.mul.Tensor, stack.args[0][node.args[2]], inner.args[0])


def _zero_padding(node) -> bool:
    """A constant padding with zeros (a "same"-padding wrapper's): it keeps signs and zeros."""
    return node.target is aten.constant_pad_nd.default and (len(node.args) < 3 or node.args[2] == 0)


def _hashable(value):
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, _hashable(v)) for k, v in sorted(value.items()))
    return value if isinstance(value, (torch.fx.Node, int, float, bool, str, type(None))) else repr(value)


def _dim(stack, dim=None) -> int | None:
    """A stack's axis (or ``dim`` of its result) as a non-negative index."""
    rank = len(stack.meta["val"].shape) if "val" in stack.meta else None
    if rank is None:
        return None
    dim = (stack.args[1] if len(stack.args) > 1 else 0) if dim is None else dim
    return dim % rank


def _simplify(traced: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The traced explainer with :class:`_Simplifier`'s rewrites applied and dead nodes removed."""
    _Simplifier(traced.graph).run()
    traced.recompile()
    return traced


class _Explainer(nn.Module):
    """Forward plus rule backward of an :class:`LRP`'s hooked model, as one function of (input, target); with a
    ``detector``, also its score of the activation entering the model's correction."""

    def __init__(self, lrp: LRP, detector: Correction | None = None):
        super().__init__()
        self.lrp, self.detector, self._entering = lrp, detector, []
        if detector is not None:
            self._weight = torch.from_numpy(detector.detector_weight.astype(np.float32))
            name = _corrected(lrp.source)[0]
            lrp.model.get_submodule(f"{name}.correction").register_forward_pre_hook(lambda _module, args: self._entering.append(args[0]))

    def forward(self, x: torch.Tensor, target: torch.Tensor):
        lrp = self.lrp
        x = x.requires_grad_(True)
        lrp._outputs.clear()
        self._entering.clear()
        logits = lrp.model(x)
        target = torch.where(target < 0, logits.argmax(1), target)
        seed = (torch.arange(logits.shape[1])[None, :] == target[:, None]).to(logits.dtype)
        tensors = [x] + [lrp._outputs[name] for name in lrp.layers]
        outputs = (logits, *torch.autograd.grad(logits, tensors, grad_outputs=seed))
        if self.detector is None:
            return outputs
        h = self._entering[0].detach()
        features = h.mean(dim=(2, 3)) if self.detector.mode == "channel" else h.flatten(1)
        return (*outputs, features @ self._weight + float(self.detector.detector_bias))


def _corrected(model: nn.Module) -> tuple[str, Corrected]:
    """The name and module of ``model``'s one corrected layer: the detector scores what enters its correction."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, Corrected)]
    if len(found) != 1:
        raise InputError("detector", f"the model has {len(found)} corrected layers, the detector scores the input of one",
                         "explain the model with its correction inserted (unhans.core.layers.insert_after)")
    return found[0]


def _rel_l2(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm((got - expected).ravel()) / max(np.linalg.norm(expected.ravel()), 1e-30))


def explain_graph(model: nn.Module, composite: str = "epsilon_plus_flat", layer: str | None = None, *, probe: np.ndarray,
                  low: float = 0.0, high: float = 1.0, detector: Correction | None = None) -> onnx.ModelProto:
    """The explain graph of ``model`` (plain or corrected), verified in onnxruntime against zennit on ``probe``.

    ``probe`` is a batch of real inputs (≥ 2 rows). ``low``/``high`` bound the input for ``epsilon_gamma_box``.
    ``layer``: a module whose relevance the graph also outputs, or :data:`MONITOR_LAYER` for the archive's monitor layer.
    ``detector``: the correction inserted in ``model``; when it has a detector, the graph also outputs its score.
    Raises :class:`InputError` for an unsupported layer, a failed trace or export, or a mismatch with zennit or the
    detector; the verification figures are in the graph's metadata.
    """
    return _build(model, composite, layer, probe, low, high, detector)[0]


def _build(model: nn.Module, composite: str, layer: str | None, probe: np.ndarray, low: float,
           high: float, detector: Correction | None = None) -> tuple[onnx.ModelProto, ExplainReport]:
    started = time.perf_counter()
    key = _composite_key(composite)
    probe = np.ascontiguousarray(probe, np.float32)
    if layer == MONITOR_LAYER:  # what an archive's sampled records carry for the monitor
        layer = middle_spatial_layer(model, torch.from_numpy(probe[:2]))
    if layer is not None:
        get_layer(model, layer)
    if probe.ndim != 4 or len(probe) < 2:
        raise InputError("probe", f"has shape {probe.shape}", "pass at least 2 real images (N, C, H, W)")
    layers = (layer,) if layer else ()
    detector = detector if detector is not None and detector.has_detector else None
    if detector is not None:
        _corrected(model)  # refused here, before tracing, with its own message
    names = list(OUTPUTS[: 2 + len(layers)]) + ([SCORE_OUTPUT] if detector else [])
    # traced with >= 3 rows: symbolic tracing specialises batches of 0 and 1, and the batch axis must stay dynamic
    x = torch.from_numpy(probe[:4] if len(probe) >= 3 else np.concatenate([probe, probe[:1]]))
    target = torch.full((len(x),), -1, dtype=torch.long)
    with LRP(model, key, layers=layers, low=low, high=high) as lrp:
        # refuses a model whose LRP is not conservative; one row of a large input (float64: 1 GB for 4 rows of Lite0 at 224 px)
        conservation = lrp.check(torch.from_numpy(probe[:batch_rows(probe, most=4, budget=VERIFY_BYTES)]))
        try:
            check_supported(lrp)
        except InputError as error:
            raise InputError(error.argument, error.problem, f"{error.fix} ({_zennit_speed(lrp, probe)})") from None
        try:
            with torch.enable_grad():
                traced = make_fx(_Explainer(lrp, detector), decomposition_table=_decompositions(), tracing_mode="symbolic",
                                 _allow_non_fake_inputs=True)(x, target)
            traced = _views_as_reshapes(_simplify(traced))
            batch = torch.export.Dim("batch")
            program = torch.onnx.export(traced.eval(), (x, target), dynamo=True, input_names=["input", "target"], output_names=names,
                                        dynamic_shapes=({0: batch}, {0: batch}), external_data=False, opset_version=OPSET,
                                        verbose=False)
            # serialised before the canonizers are removed: the program reads the (merged) weights lazily
            graph = _with_ir_version(program.model_proto)
        except Exception as error:  # tracer and exporter raise many types; the user needs the first line
            raise InputError("explain", f"tracing the LRP backward failed ({_first_line(error)})",
                             "explain this model with zennit (unhans.core.attribution.LRP) instead") from None
    figures = _verify(graph, model, key, layers, probe, low, high, detector)
    figures["conservation_rel_err"] = conservation.rel_err
    metadata = {"version": __version__, "explain.composite": key, "explain.layer": layer or "",
                "explain.target": "int64 per row; negative = predicted class", "verify.probe_rows": str(len(probe)),
                **{f"verify.{k}": f"{v:.3g}" for k, v in figures.items()}}
    for k, v in metadata.items():
        graph.metadata_props.add(key=META + k, value=v)
    return graph, ExplainReport(None, figures, len(graph.graph.node), time.perf_counter() - started,
                                {META + k: v for k, v in metadata.items()})


def _views_as_reshapes(traced: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Every view a reshape (one ONNX Reshape either way): the simplifier drops the clones that made a transposed or
    permuted tensor contiguous (attention's heads, Swin's and ConvNeXt's channel-last layers), after which a view of it
    would be invalid when torch.export runs the graph again."""
    for node in traced.graph.nodes:
        if node.target in (aten.view.default, aten._unsafe_view.default):
            node.target = aten.reshape.default
    traced.recompile()
    return traced


def _zennit_speed(lrp: LRP, probe: np.ndarray) -> str:
    """How fast the fallback is: zennit's relevance for one probe image, timed here."""
    x = torch.from_numpy(probe[:1])
    lrp(x)
    started = time.perf_counter()
    lrp(x)
    return f"measured here: {1000 * (time.perf_counter() - started):.0f} ms per image at batch 1"


def _verify(graph: onnx.ModelProto, model: nn.Module, key: str, layers: tuple, probe: np.ndarray, low: float,
            high: float, detector: Correction | None = None) -> dict[str, float]:
    """onnxruntime vs zennit on ``probe`` (predicted and shifted targets), or refuse.

    Figures: worst relative L2 of relevance and layer relevance, max |Δlogit| (allowed relative to the logit scale),
    with a detector max |Δscore| against :meth:`Correction.score` (allowed as the prediction graph's). Some models are ill-conditioned
    for LRP in float32 (zennit's own float32 maps then differ from its float64 ones by more than the tolerance,
    e.g. a P-ClArC-corrected ResNet); those are accepted when the graph's error against zennit in float64 is
    within ``FLOAT32_SLACK`` times zennit's own float32 error, and both figures are recorded.
    """
    sess = session(graph.SerializeToString(), cuda=False)
    figures = {"rel_l2_vs_zennit": 0.0, "logit_max_abs_diff": 0.0, "logit_scale": 0.0}
    runs, scores = [], []  # per chunk of rows and target kind: (rows, targets, graph's relevance, zennit's); the graph's scores
    rows = batch_rows(probe, budget=VERIFY_BYTES)  # a chunk at a time, so a large input's verification stays small
    with LRP(model, key, layers=layers, low=low, high=high) as lrp:
        for start in range(0, len(probe), rows):
            chunk = slice(start, start + rows)
            predicted = lrp(torch.from_numpy(probe[chunk]))
            figures["logit_scale"] = max(figures["logit_scale"], float(np.abs(predicted.logits).max()))
            shifted = (predicted.targets + 1) % predicted.logits.shape[1]
            for feed, expected in ((np.full(len(predicted.targets), -1), predicted), (shifted, lrp(torch.from_numpy(probe[chunk]), shifted))):
                got = sess.run(None, {"input": probe[chunk], "target": feed.astype(np.int64)})
                figures["logit_max_abs_diff"] = max(figures["logit_max_abs_diff"], float(np.abs(got[0] - expected.logits).max()))
                figures["rel_l2_vs_zennit"] = max(figures["rel_l2_vs_zennit"], _rel_l2(got[1], expected.relevance),
                                                  *(_rel_l2(g, expected.layer_relevance[n]) for g, n in zip(got[2:], layers)))
                runs.append((chunk, expected.targets, got[1], expected.relevance))
            scores.append(got[-1])
    scores = np.concatenate(scores)
    rel = figures["rel_l2_vs_zennit"]
    if not rel <= RELEVANCE_TOLERANCE:
        with LRP(model, key, layers=layers, low=low, high=high) as lrp64:
            lrp64.model.double()
            references = [_relevance64(lrp64, probe[chunk], targets) for chunk, targets, *_ in runs]
        figures["rel_l2_vs_zennit64"] = max(_rel_l2(got, ref) for (*_, got, _), ref in zip(runs, references))
        figures["zennit32_rel_l2_vs_zennit64"] = max(_rel_l2(z32, ref) for (*_, z32), ref in zip(runs, references))
        if not figures["rel_l2_vs_zennit64"] <= max(RELEVANCE_TOLERANCE, FLOAT32_SLACK * figures["zennit32_rel_l2_vs_zennit64"]):
            raise InputError("explain", f"relevance differs from zennit by relative L2 {rel:.3g} (allowed {RELEVANCE_TOLERANCE:g}; "
                             f"vs zennit in float64 {figures['rel_l2_vs_zennit64']:.3g}, zennit's own float32 error "
                             f"{figures['zennit32_rel_l2_vs_zennit64']:.3g}); nothing was written",
                             "explain this model with zennit (unhans.core.attribution.LRP) instead")
    allowed = LOGIT_TOLERANCE * max(1.0, figures["logit_scale"])
    if not figures["logit_max_abs_diff"] <= allowed:
        raise InputError("explain", f"logits differ from torch by {figures['logit_max_abs_diff']:.3g} (allowed {allowed:.3g}); "
                         "nothing was written", "explain this model with zennit (unhans.core.attribution.LRP) instead")
    if detector is not None:
        expected_scores = detector.score(activations(model, probe, f"{_corrected(model)[0]}.layer"))
        figures["score_max_abs_diff"] = float(np.abs(scores - expected_scores).max())
        allowed = TOLERANCE * max(float(np.abs(expected_scores).max()), 1.0)
        if not figures["score_max_abs_diff"] <= allowed:
            raise InputError("explain", f"{SCORE_OUTPUT} differs from the detector by {figures['score_max_abs_diff']:.3g} "
                             f"(allowed {allowed:.3g}); nothing was written", "export without --explain and report this")
    return figures


def _relevance64(lrp: LRP, probe: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Input relevance of a float64 copy of ``lrp``'s hooked model (the reference for ill-conditioned models)."""
    x = torch.from_numpy(probe).double().requires_grad_(True)
    with torch.enable_grad():
        logits = lrp.model(x)
        seed = torch.nn.functional.one_hot(torch.from_numpy(targets), logits.shape[1]).double()
        return torch.autograd.grad(logits, x, grad_outputs=seed)[0].float().numpy()


def export_explain(model: nn.Module, out: str | Path, composite: str = "epsilon_plus_flat", layer: str | None = None, *,
                   probe: np.ndarray, low: float = 0.0, high: float = 1.0, detector: Correction | None = None) -> ExplainReport:
    """Build, verify and atomically write the explain graph of ``model`` to ``out``; nothing is written on failure."""
    out = Path(out)
    if out.is_dir():
        raise InputError(str(out), "is a folder", "pass the path of the .onnx file to write")
    graph, report = _build(model, composite, layer, probe, low, high, detector)
    write_atomic(out, graph.SerializeToString())
    report.path = out
    return report
