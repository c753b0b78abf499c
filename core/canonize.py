"""Canonization of any traceable CNN for LRP, read from the model's own computation (a ``torch.fx`` trace).

zennit's canonizers recognise known block classes (torchvision's ``BasicBlock``, Conv→BN pairs inside one
``nn.Sequential``); on any other model relevance silently stops being LRP: an addition written in a ``forward``
duplicates relevance, a BatchNorm behind a padding wrapper stays unmerged. Here the model is traced instead, with
every layer that carries a rule (convolutions, also subclasses such as a "same"-padding wrapper, linear layers,
BatchNorm, activations, pooling) kept as one call, and its graph is rewritten by the tables below:

- a BatchNorm whose input is a convolution or linear layer used by nothing else is merged into it;
- a sum of two tensors becomes a :class:`zennit.layer.Sum` (the Norm rule splits relevance in proportion);
- a product with a gate (a squeeze-excitation scale, any broadcast or sigmoid-made factor) or with a number
  passes relevance to the other factor unchanged: the gate is a constant, as the LRP literature treats it;
- activations called as functions become modules (the Pass rule); means, sums and average pools called as
  functions become modules (the Norm rule);
- a layer called more than once gets one copy per call (zennit's hooks keep one input per module);
- transformer operations (:mod:`unhans.core.attention`): a layer norm (or RMS norm) becomes :class:`HeldScaleNorm`,
  its normalising scale held constant (AttnLRP's identity rule on the division, the epsilon rule on the rest, all
  linear); a softmax is held constant (CP-LRP: attention weights pass no relevance); a matrix product of two
  tensors, or an element-wise product of two same-shaped tensors neither of which is a gate, is a
  :class:`~unhans.core.attention.BilinearProduct` (AttnLRP's uniform rule); attention layers fx cannot trace are
  replaced by equivalents before the trace (:data:`SUBSTITUTES`); class tokens and position embeddings are learned
  constants, counted as biases (:attr:`Canonization.constants`).

What has no rule is refused, every offending operation named at once, with the module it sits in. The result is a
``torch.fx.GraphModule`` that computes the same logits (checked by :class:`unhans.core.attribution.LRP` on its first
batch); layers named by dotted path, as the user knows them, are recorded through :class:`Tap` modules.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn
from zennit.layer import Sum
from zennit.types import Activation, AvgPool, BatchNorm, Convolution, MaxPool

from .attention import BilinearProduct, HeldSoftmax, ValueAttention, WindowAttention
from .errors import InputError

TAPS = "unhans_taps"  # the attribute of a canonized model holding its taps


class Tap(nn.Identity):
    """Marks the output of a named layer in the canonized graph: hooks on it see that layer's output (and its
    gradient, under zennit, its relevance)."""


class PassProduct(nn.Module):
    """``x * gate`` (or ``x / gate``) whose relevance goes to ``x`` unchanged and none to the gate, a constant for
    LRP. With two tensors the gate is the factor broadcast over the other (a squeeze-excitation scale, a LayerScale),
    else factor ``gate`` (the sigmoid-made one the trace found); a number is always the gate. Two same-shaped
    factors with no gate among them are a bilinear product (``self.uniform``: AttnLRP's uniform rule)."""

    def __init__(self, gate: int | None = None, divide: bool = False):
        super().__init__()
        self.gate, self.divide = gate, divide
        self.uniform = BilinearProduct(torch.mul)

    def forward(self, a, b) -> torch.Tensor:
        if isinstance(b, torch.Tensor) and isinstance(a, torch.Tensor):
            na, nb = a.shape[1:].numel(), b.shape[1:].numel()
            if na == nb and self.gate is None:
                if self.divide:
                    raise InputError("model", f"a division of two tensors shaped {tuple(a.shape)} with no gate among "
                                     "them has no LRP rule", "divide by a number or a gate")
                return self.uniform(a, b)
            if (na < nb) if na != nb else self.gate == 0:
                a, b = b, a
            if self.divide and a.shape[1:].numel() < b.shape[1:].numel():
                raise InputError("model", "a division by a tensor that is not a gate has no LRP rule", "divide by a number or a gate")
        elif not isinstance(a, torch.Tensor):
            a, b = b, a
        gate = (1.0 / b if self.divide else b)
        # detached: no relevance and no backward pass reach the gate's branch (its layers' hooks never fire)
        return _PassProduct.apply(a, gate.detach() if isinstance(gate, torch.Tensor) else gate)


class _PassProduct(torch.autograd.Function):
    @staticmethod
    def forward(x, gate):
        return x * gate

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class HeldScaleNorm(nn.Module):
    """A layer norm (or RMS norm, ``rms=True``) over the last ``len(shape)`` axes whose normalising scale is held
    constant (detached): the map is then linear in its input (centre, scale, affine), so the epsilon rule on it
    conserves relevance, the rule AttnLRP gives normalisation. Holds the original layer's weight and bias."""

    def __init__(self, shape, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, rms: bool = False):
        super().__init__()
        self.dims = tuple(range(-len(tuple(shape)), 0))
        self.weight, self.bias, self.eps, self.rms = weight, bias, float(eps), rms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.rms:
            x = x - x.mean(self.dims, keepdim=True)
        y = x * torch.rsqrt(x.pow(2).mean(self.dims, keepdim=True) + self.eps).detach()
        if self.weight is not None:
            y = y * self.weight
        return y + self.bias if self.bias is not None else y


class Reduction(nn.Module):
    """A mean or sum over ``dim`` called as a function in the model; as a module it gets the Norm rule."""

    def __init__(self, op: str, dim, keepdim: bool = False):
        super().__init__()
        self.op, self.dim, self.keepdim = op, dim, keepdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.mean if self.op == "mean" else torch.sum)(x, dim=self.dim, keepdim=self.keepdim)


class Activate(nn.Module):
    """An activation called as a function in the model; as a module it gets the Pass rule."""

    def __init__(self, function, kwargs: dict):
        super().__init__()
        self.function, self.kwargs = function, dict(kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(x, **self.kwargs)


class Pool(nn.Module):
    """An average pooling called as a function in the model; as a module it gets the Norm rule."""

    def __init__(self, function, args: tuple, kwargs: dict):
        super().__init__()
        self.function, self.args, self.kwargs = function, tuple(args), dict(kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(x, *self.args, **self.kwargs)


def stack_pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` and ``b`` stacked on a new last axis, the input of zennit's :class:`~zennit.layer.Sum` (its hooks
    take one input), broadcast to one shape first where they differ."""
    if a.shape != b.shape:
        a, b = torch.broadcast_tensors(a, b)
    return torch.stack([a, b], dim=-1)


# --- the tables -------------------------------------------------------------------------------------------------

# Layers kept as one call in the trace: they carry a rule, or relevance passes them exactly as the gradient does.
RULED_LAYERS = (Convolution, nn.Linear, BatchNorm, Activation, AvgPool, Sum, Reduction, Activate, Pool, HeldScaleNorm,
                BilinearProduct, HeldSoftmax, WindowAttention)
# Relevance passes these by their gradient, which keeps it whole (reshapes, crops, winner-take-all routing, sums of
# copies) in eval mode; listed so that everything else of torch.nn is refused rather than explained wrongly.
GRADIENT_LAYERS = (MaxPool, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
                   nn.Flatten, nn.Unflatten, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d,
                   nn.ReplicationPad2d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
                   nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle, PassProduct)
MERGEABLE = (Convolution, nn.Linear)  # a BatchNorm right after one of these is folded into it
# zennit counts these as activations (the Pass rule) though they are not element-wise: refused unless substituted
NOT_ACTIVATIONS = (nn.MultiheadAttention,)
# Layers traced into rather than kept whole: their forward calls a function the tables below give a rule.
TRACED_THROUGH = (nn.LayerNorm, nn.RMSNorm)
# Layers replaced before the trace by an equivalent made of ruled operations (exact types: a subclass may differ).
SUBSTITUTES = {nn.MultiheadAttention: ValueAttention, torchvision.models.swin_transformer.ShiftedWindowAttention: WindowAttention}

_SHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.cat, torch.concat,
                    torch.stack, torch.chunk, torch.split, torch.squeeze, torch.unsqueeze, torch.narrow,
                    torch.swapaxes, operator.getitem, F.pad, F.max_pool2d, F.max_pool1d,
                    F.adaptive_max_pool2d, F.interpolate, F.dropout, F.dropout2d, F.pixel_shuffle,
                    F.channel_shuffle, torch.channel_shuffle, torch.clone, torch.roll,
                    torchvision.models.swin_transformer._patch_merging_pad}
_SHAPE_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "size", "chunk", "split",
                  "squeeze", "unsqueeze", "expand_as", "view_as", "reshape_as", "narrow", "clone", "__getitem__",
                  "float", "type_as", "to", "roll", "expand"}
_SIZE_FUNCTIONS = {torch.Tensor.size, len, getattr}
_SIZE_METHODS = {"size", "dim"}
_ACTIVATION_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.hardtanh, F.silu, F.hardswish, F.hardsigmoid, F.gelu,
                         torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.leaky_relu, F.elu, F.selu, F.mish,
                         F.softplus, torch.nn.functional.relu_}
_ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}
_GATE_MAKERS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, "sigmoid", "sigmoid_", nn.Sigmoid, nn.Hardsigmoid}
_ADD = {operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__iadd__"}
_SUB = {operator.sub, operator.isub, torch.sub, "sub", "sub_"}
_MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_DIV = {operator.truediv, operator.itruediv, torch.div, "div", "div_"}
_REDUCE = {torch.mean: "mean", "mean": "mean", torch.sum: "sum", "sum": "sum"}
# functions that are the identity in eval mode, each with how to read from its call whether it trains
_EVAL_IDENTITY = {torchvision.ops.stochastic_depth: lambda node: bool(node.kwargs.get("training", node.args[3] if len(node.args) > 3 else True))}
_POOL_FUNCTIONS = {F.avg_pool2d, F.avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool1d}
# normalisations, each with how to read (shape, weight, bias, eps) from its call and whether it is an RMS norm
_NORM_FUNCTIONS = {F.layer_norm: (("input", "normalized_shape", "weight", "bias", "eps"), False),
                   F.rms_norm: (("input", "normalized_shape", "weight", "eps"), True)}
_SOFTMAX = {F.softmax, torch.softmax, "softmax"}
_MATMUL = {operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm", "__matmul__"}


def _leaf(module: nn.Module) -> bool:
    return isinstance(module, RULED_LAYERS + GRADIENT_LAYERS + (Tap,)) or _is_pclarc(module)


def _is_pclarc(module: nn.Module) -> bool:
    from .clarc import PClArC  # clarc imports layers, which imports nothing of this module's: no cycle at load

    return isinstance(module, PClArC)


@dataclass
class Canonization:
    """What :func:`canonize` changed, for logs and reports."""

    merged_batchnorms: list[str] = field(default_factory=list)  # "bn <- conv" pairs
    unmerged_batchnorms: list[str] = field(default_factory=list)  # passed through (zennit's Pass rule)
    sums: int = 0
    gates: list[str] = field(default_factory=list)
    copies: list[str] = field(default_factory=list)  # layers called more than once, one copy per further call
    unrectified: list[str] = field(default_factory=list)  # convolutions whose output reaches a layer other than a ReLU
    signed_input: list[str] = field(default_factory=list)  # convolutions whose input can be negative
    rectified_sums: list[str] = field(default_factory=list)  # sums whose output reaches only rectifiers
    norms: int = 0  # layer/RMS norms given their scale held constant
    products: int = 0  # products of two tensors (the uniform rule; in Swin's window attention not counted)
    held: int = 0  # softmaxes held constant (attention weights)
    constants: list[str] = field(default_factory=list)  # learned tensors added or concatenated (class token, positions)

    def summary(self) -> str:
        return (f"{len(self.merged_batchnorms)} BatchNorm merged, {len(self.unmerged_batchnorms)} passed, "
                f"{self.sums} sums, {len(self.gates)} gates, {self.norms} norms, {self.products} products, "
                f"{len(self.copies)} reused layers copied")


class _Tracer(fx.Tracer):
    """Keeps every rule-carrying layer (also a Conv2d subclass whose forward pads) as one call, and puts a
    :class:`Tap` after each layer whose output is asked for, whatever that layer is and however it is called."""

    def __init__(self, taps: dict[str, str]):
        super().__init__()
        self.taps = taps  # layer path -> tap path

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _leaf(m) or (super().is_leaf_module(m, qualname) and not isinstance(m, (nn.Sequential,) + TRACED_THROUGH))

    def call_module(self, m, forward, args, kwargs):
        out = super().call_module(m, forward, args, kwargs)
        path = self.path_of_module(m)
        if path in self.taps:
            out = self.create_proxy("call_module", self.taps[path], (out,), {})
        return out


def canonize(model: nn.Module, layers: tuple[str, ...] = ()) -> tuple[fx.GraphModule, dict[str, str], Canonization]:
    """A canonized copy of ``model`` (eval mode), the tap path of each of ``layers``, and what was changed.

    Raises :class:`InputError` when the model cannot be traced or uses an operation with no LRP rule (all named).
    """
    root = copy.deepcopy(model).eval()
    _substitute(root)
    taps = {name: f"{TAPS}.{i}" for i, name in enumerate(layers)}
    tracer = _Tracer(taps)
    try:
        graph = tracer.trace(root)
    except Exception as error:  # fx raises many types for data-dependent control flow, unsupported calls, ...
        raise InputError("model", f"{type(model).__name__} cannot be traced with torch.fx ({_first_line(error)})",
                         "remove control flow that depends on tensor values from forward, or mark the block "
                         "torch.fx.wrap-able; relevance for it would otherwise not be LRP") from None
    holder = nn.Module()  # attached after the trace: a root Sequential would otherwise run the taps as a layer
    for tap in taps.values():
        holder.add_module(tap.rpartition(".")[2], Tap())
    root.add_module(TAPS, holder)
    traced = fx.GraphModule(root, graph, class_name=f"Canonized{type(model).__name__}")
    report = Canonization()
    _Rewriter(traced, report).run()
    traced.graph.lint()
    traced.recompile()
    return traced.eval(), taps, report


def _substitute(root: nn.Module) -> None:
    """Replace, in place, every layer of a type in :data:`SUBSTITUTES` by its equivalent of ruled operations."""
    for name, module in list(root.named_modules()):
        replacement = SUBSTITUTES.get(type(module))
        if replacement is not None and name:
            parent, _, child = name.rpartition(".")
            setattr(root.get_submodule(parent) if parent else root, child, replacement(module).eval())


class _Rewriter:
    """The graph rewrites of :func:`canonize`; collects every operation it cannot give a rule before refusing."""

    def __init__(self, gm: fx.GraphModule, report: Canonization):
        self.gm, self.graph, self.report = gm, gm.graph, report
        self.modules = dict(gm.named_modules())
        self.unsupported: list[str] = []
        self.sizes: set[fx.Node] = set()  # nodes holding sizes, not tensors
        self.constants: dict[fx.Node, set[str]] = {}  # nodes computed from learned tensors alone -> those tensors
        self._fresh = 0

    def run(self) -> None:
        self._copy_reused()
        for node in list(self.graph.nodes):
            if node.op == "get_attr":
                self.constants[node] = {node.target}
            elif node.op == "call_module":
                self._module(node)
            elif node.op in ("call_function", "call_method"):
                self._function(node)
        if self.unsupported:
            listed = "; ".join(self.unsupported[:12]) + (f"; and {len(self.unsupported) - 12} more" if len(self.unsupported) > 12 else "")
            raise InputError("model", f"{len(self.unsupported)} operation(s) have no LRP rule: {listed}",
                             "replace them with supported layers (convolutions, linear, BatchNorm, activations, "
                             "pooling, sums, gates), or explain this model with another method")
        self.graph.eliminate_dead_code()
        self._find_unrectified()

    def _find_unrectified(self) -> None:
        """Convolutions whose output flows on without a ReLU (the z+ rule alone would drop relevance there), and
        convolutions whose input can be negative (z+ is the rule for non-negative inputs: these take epsilon), and
        sums whose output is rectified (:class:`unhans.core.attribution.RectifiedEpsilon` serves them)."""
        nonneg: set[fx.Node] = set()
        for node in self.graph.nodes:
            module = self.modules.get(node.target) if node.op == "call_module" else None
            inputs = [a for a in node.all_input_nodes if a.op != "get_attr" and a not in self.sizes]
            if isinstance(module, Sum) and all(self._rectifies(user) for user in node.users):
                self.report.rectified_sums.append(node.target)
            if isinstance(module, Convolution):
                if not all(self._rectifies(user) for user in node.users):
                    self.report.unrectified.append(node.target)
                if not (inputs and inputs[0] in nonneg):
                    self.report.signed_input.append(node.target)
            elif _makes_nonneg(module) or (inputs and all(a in nonneg for a in inputs) and (
                    isinstance(module, SIGN_KEEPING_LAYERS) or (node.op in ("call_function", "call_method")
                                                                  and node.target in _SIGN_KEEPING_FUNCTIONS))):
                nonneg.add(node)

    def _rectifies(self, node) -> bool:
        if node.op != "call_module":
            return False
        module = self.modules[node.target]
        if isinstance(module, (Tap, nn.Identity, nn.Dropout)):
            return all(self._rectifies(user) for user in node.users)
        return _makes_nonneg(module) and not isinstance(module, (nn.Sigmoid, nn.Hardsigmoid))

    # -- helpers
    def _where(self, node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        scope = list(stack)[-1] if stack else ""
        return f"in {scope!r}" if scope else "in the model's forward"

    def _add_module(self, stem: str, module: nn.Module) -> str:
        self._fresh += 1
        name = f"unhans_{stem}_{self._fresh}"
        self.gm.add_module(name, module)
        self.modules[name] = module
        return name

    def _replace(self, node, module: nn.Module, stem: str, args: tuple) -> fx.Node:
        target = self._add_module(stem, module)
        with self.graph.inserting_before(node):
            new = self.graph.call_module(target, args)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        return new

    def _copy_reused(self) -> None:
        seen: dict[str, int] = {}
        for node in self.graph.nodes:
            if node.op != "call_module" or isinstance(self.modules[node.target], Tap):
                continue
            seen[node.target] = seen.get(node.target, 0) + 1
            if seen[node.target] > 1:
                module = self.modules[node.target]
                if any(True for _ in module.parameters()) or isinstance(module, RULED_LAYERS):
                    copy_name = f"{node.target.replace('.', '_')}_call{seen[node.target]}"
                    self.gm.add_module(copy_name, copy.deepcopy(module))
                    self.modules[copy_name] = self.gm.get_submodule(copy_name)
                    self.report.copies.append(node.target)
                    node.target = copy_name

    # -- modules
    def _module(self, node) -> None:
        module = self.modules[node.target]
        if isinstance(module, BatchNorm):
            self._batchnorm(node, module)
        elif isinstance(module, (BilinearProduct, HeldSoftmax)):  # written as layers (the attention substitutes)
            self.report.products += isinstance(module, BilinearProduct)
            self.report.held += isinstance(module, HeldSoftmax)
        elif not _leaf(module) or isinstance(module, NOT_ACTIVATIONS):
            self.unsupported.append(f"{node.target} ({type(module).__name__})")

    def _batchnorm(self, node, bn) -> None:
        source = node.args[0] if node.args else None
        linear = self.modules.get(source.target) if isinstance(source, fx.Node) and source.op == "call_module" else None
        if isinstance(linear, MERGEABLE) and len(source.users) == 1 and not isinstance(linear, nn.ConvTranspose2d):
            _merge(linear, bn)
            node.replace_all_uses_with(source)
            self.graph.erase_node(node)
            self.report.merged_batchnorms.append(f"{node.target} <- {source.target}")
        else:
            self.report.unmerged_batchnorms.append(node.target)

    # -- functions and methods
    def _function(self, node) -> None:
        target = node.target
        tensors = [a for a in node.args if isinstance(a, fx.Node) and a not in self.constants and a not in self.sizes]
        inputs = node.all_input_nodes
        learned = set().union(*(self.constants[a] for a in inputs if a in self.constants))
        if learned and all(a in self.constants or a in self.sizes for a in inputs):
            self.constants[node] = learned  # an expanded class token, a table's slice: still a learned constant
            return
        if learned and (target in (torch.cat, torch.concat) or target in _ADD):
            self.report.constants.extend(sorted(learned - set(self.report.constants)))  # counted as biases
        if target in _SIZE_FUNCTIONS or target in _SIZE_METHODS or (node.all_input_nodes and not tensors and any(
                a in self.sizes for a in node.all_input_nodes)):
            self.sizes.add(node)  # a shape, or arithmetic on shapes: no tensor flows here
            return
        if target in _SHAPE_FUNCTIONS or target in _SHAPE_METHODS or not tensors:
            return
        if target in _EVAL_IDENTITY:
            if _EVAL_IDENTITY[target](node):
                self.unsupported.append(f"{node.name} ({_name(target)} in training mode) {self._where(node)}")
            else:
                node.replace_all_uses_with(node.args[0])
                self.graph.erase_node(node)
            return
        if target in _ADD:
            if len(tensors) == 2 and not node.kwargs:
                with self.graph.inserting_before(node):
                    stacked = self.graph.call_function(stack_pair, tuple(node.args[:2]))
                self._replace(node, Sum(-1), "sum", (stacked,))
                self.report.sums += 1
            elif len(tensors) > 2 or node.kwargs:
                self.unsupported.append(f"{node.name} ({target}) {self._where(node)}: addition with alpha or in-place out")
            return  # a number added is a bias: the gradient passes relevance unchanged
        if target in _SUB:
            if len(tensors) >= 2:
                self.unsupported.append(f"{node.name} (difference of two tensors) {self._where(node)}")
            return
        if target in _MUL or target in _DIV:
            self._product(node, tensors, divide=target in _DIV)
            return
        if target in _ACTIVATION_FUNCTIONS or target in _ACTIVATION_METHODS:
            function = getattr(torch.Tensor, target) if isinstance(target, str) else target
            kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
            if len(node.args) > 1:
                self.unsupported.append(f"{node.name} ({_name(target)} with positional options) {self._where(node)}")
            else:
                self._replace(node, Activate(_out_of_place(function), kwargs), "activation", (node.args[0],))
            return
        if target in _REDUCE:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
            if dim is None or isinstance(dim, fx.Node):
                self.unsupported.append(f"{node.name} ({_name(target)} over every axis) {self._where(node)}")
                return
            self._replace(node, Reduction(_REDUCE[target], dim, bool(keepdim)), "reduction", (node.args[0],))
            return
        if target in _POOL_FUNCTIONS:
            self._replace(node, Pool(target, node.args[1:], node.kwargs), "pool", (node.args[0],))
            return
        if target in _NORM_FUNCTIONS:
            self._norm(node)
            return
        if target in _SOFTMAX:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            if not isinstance(dim, int) or node.kwargs.get("dtype") is not None:
                self.unsupported.append(f"{node.name} (softmax without an axis, or with a dtype) {self._where(node)}")
            else:
                self._replace(node, HeldSoftmax(dim), "softmax", (node.args[0],))
                self.report.held += 1
            return
        if target in _MATMUL:
            if len(node.args) != 2 or node.kwargs:
                self.unsupported.append(f"{node.name} ({_name(target)} with options) {self._where(node)}")
            else:
                self._replace(node, BilinearProduct(torch.matmul), "product", tuple(node.args))
                self.report.products += 1
            return
        self.unsupported.append(f"{node.name} ({_name(target)}) {self._where(node)}")

    def _norm(self, node) -> None:
        names, rms = _NORM_FUNCTIONS[node.target]
        given = dict(zip(names, node.args)) | dict(node.kwargs)
        learned = {}
        for key in ("weight", "bias"):
            value = given.get(key)
            if isinstance(value, fx.Node) and value.op != "get_attr":
                self.unsupported.append(f"{node.name} ({_name(node.target)} with a computed {key}) {self._where(node)}")
                return
            learned[key] = _attribute(self.gm, value.target) if isinstance(value, fx.Node) else value
        eps = given.get("eps")
        eps = (1e-5 if not rms else torch.finfo(torch.float32).eps) if eps is None else eps
        module = HeldScaleNorm(given["normalized_shape"], learned["weight"], learned["bias"], eps, rms)
        self._replace(node, module, "norm", (given["input"],))
        self.report.norms += 1

    def _product(self, node, tensors, divide: bool) -> None:
        if node.kwargs:
            self.unsupported.append(f"{node.name} ({_name(node.target)} with options) {self._where(node)}")
            return
        if divide and not isinstance(node.args[0], fx.Node):
            self.unsupported.append(f"{node.name} (a number divided by a tensor) {self._where(node)}")
            return
        gate = None
        if len(tensors) == 2:
            made = [self._gate_made(n) for n in node.args[:2]]
            gate = made.index(True) if made.count(True) == 1 else None
            self.report.gates.append(node.name)
        self._replace(node, PassProduct(gate, divide), "gate", tuple(node.args[:2]))

    def _gate_made(self, node) -> bool:
        """Whether ``node`` comes out of a sigmoid (the gate of a same-shaped product)."""
        if node.op == "call_module":
            module = self.modules[node.target]
            return isinstance(module, (nn.Sigmoid, nn.Hardsigmoid)) or (isinstance(module, Activate) and module.function in _GATE_MAKERS)
        return node.target in _GATE_MAKERS


# layers whose output is non-negative when their input is; and functions likewise (for the sign analysis)
SIGN_KEEPING_LAYERS = (MaxPool, AvgPool, Pool, Reduction, Sum, nn.Dropout, nn.Identity, nn.Flatten, nn.Unflatten, nn.ZeroPad2d,
                       nn.Upsample, Tap, PassProduct, nn.ReflectionPad2d, nn.ReplicationPad2d)
_SIGN_KEEPING_FUNCTIONS = {stack_pair, torch.flatten, torch.reshape, torch.cat, torch.concat, torch.stack, operator.getitem,
                           F.max_pool2d, F.interpolate, "view", "reshape", "flatten", "contiguous", "__getitem__"}


def _makes_nonneg(module) -> bool:
    """Whether ``module``'s output is never negative (a rectifier or a sigmoid)."""
    if isinstance(module, Activate):
        return module.function in (F.relu, torch.relu, F.relu6, torch.sigmoid, F.sigmoid, F.hardsigmoid)
    return isinstance(module, (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid)) or (
        isinstance(module, nn.Hardtanh) and module.min_val >= 0)


def _merge(linear: nn.Module, bn: nn.Module) -> None:
    """Fold eval-mode ``bn`` into the preceding convolution or linear layer, in place (on the canonized copy)."""
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias.detach() if bn.affine else 0.0) - bn.running_mean * scale
    weight = linear.weight.detach()
    if isinstance(linear, Convolution) and linear.weight.shape[0] != scale.shape[0]:
        raise InputError("model", f"BatchNorm of {scale.shape[0]} channels after a layer of {weight.shape[0]}", "check the model")
    shape = (-1,) + (1,) * (weight.dim() - 1)
    bias = linear.bias.detach() if linear.bias is not None else torch.zeros_like(shift)
    linear.weight = nn.Parameter(weight * scale.reshape(shape), requires_grad=False)
    linear.bias = nn.Parameter(bias * scale + shift, requires_grad=False)


def _attribute(root: nn.Module, target: str) -> torch.Tensor:
    """The parameter or buffer at dotted path ``target`` (a ``get_attr`` node's), the object itself (not a copy)."""
    owner, _, name = target.rpartition(".")
    return getattr(root.get_submodule(owner) if owner else root, name)


def _out_of_place(function):
    inplace = {torch.nn.functional.relu_: torch.relu, torch.Tensor.relu_: torch.relu, torch.Tensor.sigmoid_: torch.sigmoid,
               torch.Tensor.tanh_: torch.tanh}
    return inplace.get(function, function)


def _name(target) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", repr(target))


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]
