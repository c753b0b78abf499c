"""LRP relevance maps through zennit, batched, with hooks kept registered so repeated calls pay no set-up.

:class:`LRP` owns a canonized copy of the model (:func:`unhans.core.canonize.canonize`: BatchNorm merged, additions
made explicit sums, gates made constants, read from the model's own trace) on which the composite's rule hooks stay
registered for its lifetime. A corrected model (one with a P-ClArC module inserted,
:func:`unhans.core.layers.insert_after`) is explained through its correction: the relevance is that of the model that
predicts.

Output relevance is one-hot at the target class, so each input map sums to about 1 (exactly, up to the epsilon
stabiliser, for a model without biases). That is checked, not assumed: on its first batch :class:`LRP` compares the
canonized logits with the model's and measures :func:`conservation` on a bias-free copy, and refuses a model that
fails either, naming the layer that loses or creates relevance.
"""

from __future__ import annotations

import copy
import logging
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
from rich.progress import track
from torch import nn
from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat
from zennit.layer import Sum
from zennit.core import BasicHook, Hook, Identity, Stabilizer
from zennit.rules import ClampMod, Epsilon, Gamma, NoMod, Norm, Pass, ZPlus, zero_bias
from zennit.types import AvgPool, BatchNorm, Convolution

from .attention import BilinearProduct
from .canonize import Activate, Canonization, HeldScaleNorm, Pool, Reduction, canonize
from .errors import InputError
from .layers import Corrected, get_layer

logger = logging.getLogger(__name__)


class ZPlusOrEpsilon(BasicHook):
    """The z+ rule where some input contributes positively to an output, the epsilon rule where none does.

    z+ drops the relevance of an output whose positive contributions are all zero. Behind a ReLU such an output has
    no relevance to drop; a layer whose output flows on unrectified (the last convolution of a residual branch, a
    linear bottleneck, a depthwise convolution before SiLU or Hardswish) loses it: 1-3.5% of all relevance on
    EfficientNet-B0, MobileNetV3 and a small ResNet. Identical to zennit's ``ZPlus`` wherever that conserves.
    """

    def __init__(self, stabilizer=1e-6, epsilon=1e-6, zero_params=None):
        plus = Stabilizer.ensure(stabilizer)

        def gradient_mapper(out_grad, outputs):
            positive = outputs[0] + outputs[1]
            found = (positive > 0).to(out_grad.dtype)
            share = out_grad / plus(positive) * found
            # the epsilon rule's z + ε·sign(z) as min(z, 0) - ε: an output without positive contributions has z ≤ 0,
            # and at z = 0 every contribution x·w is 0, so the sign of ε changes nothing (one pass less, no sign test)
            return [share, share, out_grad / (outputs[2].clamp(max=0) - epsilon) * (1 - found)]

        super().__init__(
            input_modifiers=[lambda x: x.clamp(min=0), lambda x: x.clamp(max=0), lambda x: x],
            param_modifiers=[ClampMod(min=0.0, zero_params=zero_params), ClampMod(max=0.0, zero_params=zero_bias(zero_params)),
                             NoMod(zero_params=zero_params)],
            output_modifiers=[lambda output: output] * 3,
            gradient_mapper=gradient_mapper,
            reducer=lambda inputs, gradients: sum(x * g for x, g in zip(inputs, gradients)),
        )


class RectifiedEpsilon(BasicHook):
    """zennit's epsilon rule for a layer whose output reaches only rectifiers, with the denominator ``max(z, 0) + ε``
    in place of ``z + ε·sign(z)``: the relevance is zennit's, the denominator cheaper.

    Where such an output is ≤ 0 the rectifier zeroes it, so the relevance arriving there is exactly 0 (every rule
    multiplies by its input) and the quotient is 0 under either denominator; where it is > 0 both denominators are
    ``z + ε``. The sign test is a full pass over the layer's largest tensor that onnxruntime runs outside its blocked
    layout; without it the explain graph of MobileNet-V2 (its expansion convolutions) runs faster (``bench/models.py``).
    """

    def __init__(self, epsilon=1e-6, zero_params=None):
        super().__init__(
            input_modifiers=[lambda x: x],
            param_modifiers=[NoMod(zero_params=zero_params)],
            output_modifiers=[lambda output: output],
            gradient_mapper=lambda out_grad, outputs: out_grad / (outputs[0].clamp(min=0) + epsilon),
            reducer=lambda inputs, gradients: inputs[0] * gradients[0],
        )


class UniformProduct(Hook):
    """AttnLRP's uniform rule for a product of two tensors (:class:`~unhans.core.attention.BilinearProduct`): each
    factor that carries relevance gets an equal share, distributed by the epsilon rule with the other factor held
    fixed; a factor held constant (a detached attention matrix: CP-LRP) gets none, so the values get it all.

    zennit's hooks follow a layer's first input only; this one follows both."""

    def __init__(self, stabilizer=1e-6):
        super().__init__()
        self.stabilizer = stabilizer

    def pre_forward(self, module, input):
        carries = tuple(isinstance(t, torch.Tensor) and t.requires_grad for t in input)
        self.stored_tensors["carries"] = carries
        if not any(carries):
            return input
        hook_ref = weakref.ref(self)

        def wrapper(grad_input, grad_output):
            hook = hook_ref()
            if hook is not None and hook.active:
                return hook.backward(module, grad_input, hook.stored_tensors["grad_output"])
            return None

        passed = Identity.apply(*input)
        self.tensor_handles.append(passed[carries.index(True)].grad_fn.register_hook(wrapper))
        return tuple(t.clone() for t in passed)  # as zennit does: in-place operations after the layer stay legal

    def forward(self, module, input, output):
        self.stored_tensors["input"] = input

    def backward(self, module, grad_input, grad_output):
        factors = [t.detach().requires_grad_() for t in self.stored_tensors["input"]]
        carries = self.stored_tensors["carries"]
        with torch.enable_grad():
            output = module.forward(*factors)
        share = grad_output[0] / Stabilizer.ensure(self.stabilizer)(output) / sum(carries)
        gradients = torch.autograd.grad(output, factors, grad_outputs=share)
        return tuple(f.detach() * g if c else None for f, g, c in zip(factors, gradients, carries))

    def copy(self):
        return UniformProduct(self.stabilizer)


class _SignAwareRules:
    """Composite mixin, the two exceptions to the composite's convolution rule (z+ or gamma), by what canonization
    found: a layer whose input can be negative (behind SiLU, Hardswish, a linear bottleneck) takes the epsilon rule
    (:class:`RectifiedEpsilon` where its output reaches only rectifiers, as a sum does whose output is rectified),
    as deep Taylor decomposition prescribes z+ only for non-negative inputs (it also halves that layer's cost: z+ of
    a signed input needs two convolutions each way); a z+ layer whose output flows on unrectified takes
    :class:`ZPlusOrEpsilon`. The first layer keeps the composite's own rule (flat, or the box rule)."""

    def __init__(self, *args, signed_input=(), unrectified=(), rectified_sums=(), epsilon=1e-6, stabilizer=1e-6, **kwargs):
        self.signed_input, self.unrectified = frozenset(signed_input), frozenset(unrectified)
        self.rectified_sums = frozenset(rectified_sums)
        self.signed_rule = Epsilon(epsilon=epsilon)
        self.rectified_signed_rule = RectifiedEpsilon(epsilon=epsilon)
        self.rectified_sum_rule = RectifiedEpsilon(epsilon=stabilizer)  # zennit's Norm is Epsilon on a layer without parameters
        self.fallback = ZPlusOrEpsilon(stabilizer=stabilizer, epsilon=epsilon)
        super().__init__(*args, epsilon=epsilon, stabilizer=stabilizer, **kwargs)

    def mapping(self, ctx, name, module):
        hook = super().mapping(ctx, name, module)
        if isinstance(hook, (ZPlus, Gamma)) and name in self.signed_input:
            return self.signed_rule if name in self.unrectified else self.rectified_signed_rule
        if isinstance(hook, Norm) and isinstance(module, Sum) and name in self.rectified_sums:
            return self.rectified_sum_rule
        return self.fallback if isinstance(hook, ZPlus) and name in self.unrectified else hook


class _EpsilonPlusFlat(_SignAwareRules, EpsilonPlusFlat):
    pass


class _EpsilonGammaBox(_SignAwareRules, EpsilonGammaBox):
    pass


# Each composite by name; the rules it gives the layers canonization makes are the table below, prepended to its own.
COMPOSITES = {"epsilon_plus_flat": _EpsilonPlusFlat, "epsilon_gamma_box": _EpsilonGammaBox}
CANONICAL_RULES = (((Activate,), lambda stabilizer: Pass()), ((Reduction, Pool), lambda stabilizer: Norm(stabilizer=stabilizer)),
                   ((HeldScaleNorm,), lambda stabilizer: Epsilon(epsilon=stabilizer)),
                   ((BilinearProduct,), lambda stabilizer: UniformProduct(stabilizer)))
STABILIZER = 1e-6
CHECK_EPSILON = 1e-100  # epsilon and stabiliser of the float64 check: bias-free activations of deep random nets reach 1e-20
# |Σ input relevance − output relevance| of the bias-free model, worst row, float64. A mis-canonized model is off by
# O(1) (a duplicating addition: 2-4x); with ZPlusOrEpsilon the matrix conserves to 1e-15. Above the warning level
# the figure is logged with its worst layer; above the tolerance the model is refused.
CONSERVATION_TOLERANCE = 1e-2
CONSERVATION_WARNING = 1e-4
OUTPUT_TOLERANCE = 1e-4  # max |Δlogit| of the canonized model, relative to max(1, max |logit|)
CONSERVATION_ROWS = 4  # rows of the first batch the conservation check runs on


def _composite_key(name: str) -> str:
    """Accept zennit's class names too: EpsilonPlusFlat -> epsilon_plus_flat."""
    key = "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_").replace("-", "_")
    if key not in COMPOSITES:
        raise InputError("composite", f"{name!r} is not supported", f"use one of {tuple(COMPOSITES)}")
    return key


def make_composite(name: str, low: float = 0.0, high: float = 1.0, epsilon: float = 1e-6, gamma: float = 0.25,
                   stabilizer: float = STABILIZER, canonization: Canonization | None = None):
    """A fresh zennit composite by name for a canonized model. ``low``/``high`` bound the input (ZBox); the layers
    ``canonization`` found with signed inputs or unrectified outputs get the rules of :class:`_SignAwareRules`."""
    key = _composite_key(name)
    layer_map = [(types, rule(stabilizer)) for types, rule in CANONICAL_RULES]
    found = ({"signed_input": canonization.signed_input, "unrectified": canonization.unrectified,
              "rectified_sums": canonization.rectified_sums} if canonization else {})
    if key == "epsilon_plus_flat":
        return _EpsilonPlusFlat(epsilon=epsilon, stabilizer=stabilizer, layer_map=layer_map, **found)
    return _EpsilonGammaBox(low=low, high=high, epsilon=epsilon, gamma=gamma, stabilizer=stabilizer, layer_map=layer_map, **found)


@dataclass
class Conservation:
    """How far bias-free LRP relevance is from conserving the output relevance (1 per row)."""

    rel_err: float  # worst row's |Σ input relevance − 1|
    worst_layer: str  # the layer whose input relevance departs most from its output relevance
    worst_layer_err: float

    def describe(self) -> str:
        where = f"; worst layer {self.worst_layer!r} ({self.worst_layer_err:.2g})" if self.worst_layer else ""
        return f"relevance conservation error {self.rel_err:.2g} (bias-free, tolerance {CONSERVATION_TOLERANCE:g}){where}"


# layers whose rule redistributes relevance (everything else passes it whole by its gradient)
_REDISTRIBUTING = (Convolution, nn.Linear, AvgPool, Sum, Reduction, Pool, HeldScaleNorm, BilinearProduct)


def without_corrections(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with each inserted correction taken out again (its layer kept)."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, Corrected):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.layer)
    return model


def _zero_biases(model: nn.Module, constants=()) -> None:
    """Zero, in place, every bias, BatchNorm mean and learned constant added to the signal (``constants``: paths of
    class tokens and position embeddings, :attr:`Canonization.constants`): what absorbs relevance by design."""
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "bias", None) is not None and isinstance(module.bias, torch.Tensor):
                module.bias.zero_()
            if isinstance(module, BatchNorm):
                module.running_mean.zero_()
        for path in constants:
            owner, _, name = path.rpartition(".")
            getattr(model.get_submodule(owner) if owner else model, name).zero_()


def conservation(model: nn.Module, x: torch.Tensor, composite: str = "epsilon_plus_flat", low: float = 0.0,
                 high: float = 1.0) -> Conservation:
    """Conservation of LRP on ``model`` with biases zeroed (and corrections taken out: the P-ClArC projection is an
    edit of the user's, not a rule), for the rows of ``x``; the worst redistributing layer is named."""
    # in float64 with a tiny epsilon, so that only a rule, never rounding, can break conservation
    lrp = LRP(without_corrections(model), composite, low=low, high=high, epsilon=CHECK_EPSILON,
              stabilizer=CHECK_EPSILON, check=False)
    _zero_biases(lrp.model, lrp.canonization.constants)  # on the canonized copy: merged BatchNorms, split projections
    lrp.model.double()
    sums: dict[str, list] = {}

    def record(name, side):
        return lambda g: None if g is None else sums.setdefault(name, {}).__setitem__(side, g.flatten(1).sum(1))

    def watch_input(name):  # runs before zennit's pre-hook: a private copy of the input carries this layer's share
        def hook(_module, inputs):
            if not inputs[0].requires_grad:
                return None
            mine = inputs[0].clone()
            mine.register_hook(record(name, "in"))
            return (mine, *inputs[1:])
        return hook

    def watch_output(name):  # runs after zennit's forward hook: the relevance that arrives at the layer
        def hook(_module, _inputs, output):
            if output.requires_grad:
                output.register_hook(record(name, "out"))
        return hook

    handles = []
    for name, module in lrp.model.named_modules():
        if isinstance(module, _REDISTRIBUTING):
            handles += [module.register_forward_pre_hook(watch_input(name), prepend=True),
                        module.register_forward_hook(watch_output(name))]
    try:
        relevance = lrp(torch.as_tensor(x).double()).relevance
    finally:
        for handle in handles:
            handle.remove()
        lrp.close()
    rel_err = float(np.abs(relevance.reshape(len(relevance), -1).astype(np.float64).sum(1) - 1.0).max())
    worst, worst_err = "", 0.0
    for name, pair in sums.items():
        if "in" in pair and "out" in pair:
            out = pair["out"].double()
            err = float(((pair["in"].double() - out).abs() / out.abs().clamp_min(1e-3)).max())
            if err > worst_err:
                worst, worst_err = name, err
    return Conservation(rel_err, worst, worst_err)


@dataclass
class Explanation:
    """What one LRP pass yields, row-aligned with the input batch."""

    logits: np.ndarray  # (N, classes), of the model that predicts
    targets: np.ndarray  # (N,) class whose relevance was propagated
    relevance: np.ndarray  # (N, C, H, W) at the input
    layer_relevance: dict[str, np.ndarray] = field(default_factory=dict)
    layer_activations: dict[str, np.ndarray] = field(default_factory=dict)


class LRP:
    """Relevance of ``model`` under a zennit composite, at the input and at the named ``layers``.

    >>> lrp = LRP(model, "epsilon_plus_flat", layers=["features.pool2"])
    >>> explanation = lrp.explain(images)            # predicted class of each row
    >>> explanation = lrp.explain(images, target=3)  # or one class for all, or one per row
    """

    def __init__(self, model: nn.Module, composite: str = "epsilon_plus_flat", layers: tuple[str, ...] = (),
                 low: float = 0.0, high: float = 1.0, epsilon: float = 1e-6, gamma: float = 0.25, check: bool = True,
                 stabilizer: float = STABILIZER):
        self.layers = tuple(layers)
        for name in self.layers:
            get_layer(model, name)
        self.source = model.eval()
        self.composite, self._bounds = _composite_key(composite), (low, high)
        self.model, taps, self.canonization = canonize(model, self.layers)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        called = {n.target for n in self.model.graph.nodes if n.op == "call_module"}
        for name in self.layers:
            if taps[name] not in called:
                raise InputError("layer", f"{name!r} is never called in {type(model).__name__}'s forward", "name a layer the model uses")
        self._outputs: dict[str, torch.Tensor] = {}
        self._composite = make_composite(composite, low, high, epsilon, gamma, stabilizer, canonization=self.canonization)
        self._composite.register(self.model)
        # registered after the composite, so each sees the tensor that flows on (and carries its relevance)
        self._layer_handles = [
            self.model.get_submodule(taps[name]).register_forward_hook(self._recorder(name)) for name in self.layers
        ]
        self.conservation: Conservation | None = None
        self._checked = not check

    def check(self, x: torch.Tensor) -> Conservation:
        """Verify the canonization and measure conservation on a batch ``x`` (done on the first call anyway).

        Raises :class:`InputError` when the canonized model computes other logits than the model, or when
        bias-free relevance is not conservative beyond ``CONSERVATION_TOLERANCE``.
        """
        x = torch.as_tensor(x, dtype=torch.float32)[:CONSERVATION_ROWS]
        with torch.no_grad():
            expected = self.source(x)
            got = self.model(x)
        scale = max(1.0, float(expected.abs().max()))
        diff = float((got - expected).abs().max())
        if not diff <= OUTPUT_TOLERANCE * scale:
            raise InputError("model", f"canonizing {type(self.source).__name__} for LRP changed its logits by {diff:.3g} "
                             f"({self.canonization.summary()})", "report this model; relevance for it would not be its own")
        self.output_max_abs_diff = diff
        self.conservation = conservation(self.source, x, self.composite, *self._bounds)
        if not self.conservation.rel_err <= CONSERVATION_TOLERANCE:
            raise InputError("model", f"LRP on {type(self.source).__name__} is not conservative: {self.conservation.describe()}",
                             "the named layer has no correct rule; replace it, or explain this model with another method")
        if self.conservation.rel_err > CONSERVATION_WARNING:
            logger.warning("LRP on %s loses relevance: %s", type(self.source).__name__, self.conservation.describe())
        self._checked = True
        return self.conservation

    def _recorder(self, name):
        def record(_module, _inputs, output):  # an attention layer answers (output, weights): its output
            self._outputs[name] = output[0] if isinstance(output, tuple) else output
        return record

    def close(self) -> None:
        """Remove the hooks (the canonized copy then computes plain gradients again)."""
        for handle in self._layer_handles:
            handle.remove()
        self._composite.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _targets(self, target, logits: torch.Tensor) -> torch.Tensor:
        n, classes = logits.shape
        if target is None:
            return logits.argmax(1)
        target = torch.as_tensor(np.asarray(target), dtype=torch.long).reshape(-1)
        if target.numel() == 1:
            target = target.expand(n)
        if target.numel() != n:
            raise InputError("target", f"{target.numel()} targets for {n} rows", "give one target, or one per row")
        if target.min() < 0 or target.max() >= classes:
            raise InputError("target", f"class {int(target.max() if target.max() >= classes else target.min())} is out of range", f"use 0-{classes - 1}")
        return target

    def __call__(self, x: torch.Tensor, target=None) -> Explanation:
        """Explain one batch (a tensor (N, C, H, W))."""
        if not self._checked:
            self.check(x)
        dtype = next(self.model.parameters()).dtype  # float32, or float64 in the conservation check
        x = torch.as_tensor(x, dtype=dtype).detach().clone().requires_grad_(True)
        self._outputs.clear()
        with torch.enable_grad():
            logits = self.model(x)
            targets = self._targets(target, logits.detach())
            seed = torch.nn.functional.one_hot(targets, logits.shape[1]).to(logits.dtype)
            tensors = [x] + [self._outputs[name] for name in self.layers]
            # a layer no relevance reaches (the queries and keys of held attention) has relevance 0
            grads = [torch.zeros_like(t) if g is None else g for t, g in
                     zip(tensors, torch.autograd.grad(logits, tensors, grad_outputs=seed, allow_unused=True))]
        return Explanation(
            logits=logits.detach().numpy(),
            targets=targets.numpy(),
            relevance=grads[0].numpy(),
            layer_relevance={name: g.numpy() for name, g in zip(self.layers, grads[1:])},
            layer_activations={name: self._outputs[name].detach().numpy() for name in self.layers},
        )

    def explain(self, images: np.ndarray, target=None, batch_size: int = 256, show_progress: bool = False,
                description: str = "relevance") -> Explanation:
        """Explain many images in batches; ``target`` is None (predicted), one class, or one per row."""
        images = np.asarray(images, dtype=np.float32)
        if not np.isfinite(images).all():
            bad = np.flatnonzero(~np.isfinite(images).reshape(len(images), -1).all(1))
            raise InputError("images", f"rows {bad[:5].tolist()} contain NaN or Inf", "drop or repair them before explaining")
        per_row = target is not None and np.ndim(target) > 0
        parts = []
        starts = range(0, len(images), batch_size)
        for start in track(starts, description=description, disable=not show_progress):
            batch_target = np.asarray(target)[start : start + batch_size] if per_row else target
            parts.append(self(torch.from_numpy(images[start : start + batch_size]), batch_target))
        return Explanation(
            logits=np.concatenate([p.logits for p in parts]),
            targets=np.concatenate([p.targets for p in parts]),
            relevance=np.concatenate([p.relevance for p in parts]),
            layer_relevance={n: np.concatenate([p.layer_relevance[n] for p in parts]) for n in self.layers},
            layer_activations={n: np.concatenate([p.layer_activations[n] for p in parts]) for n in self.layers},
        )


def relevance_share(relevance: np.ndarray, masks: np.ndarray) -> float:
    """Share of absolute relevance inside the masks, Σ|R·mask| / Σ|R| over all samples (channels summed)."""
    magnitude = np.abs(relevance).sum(axis=1) if relevance.ndim == 4 else np.abs(relevance)
    return float((magnitude * masks).sum() / magnitude.sum())
