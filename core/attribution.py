"""LRP relevance maps through zennit, batched, with hooks kept registered so repeated calls pay no set-up.

:class:`LRP` owns a private copy of the model on which the composite's canonizers (BatchNorm merged, residual
additions made explicit) and rule hooks stay registered for its lifetime. A corrected model (one with a P-ClArC
module inserted, :func:`unhans.core.layers.insert_after`) is explained through its correction: the relevance is
that of the model that predicts.

Output relevance is one-hot at the target class, so each input map sums to about 1 (exactly, up to the
epsilon stabiliser, for a model without biases).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from rich.progress import track
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat
from zennit.torchvision import ResNetCanonizer

from .errors import InputError
from .layers import get_layer

COMPOSITES = ("epsilon_plus_flat", "epsilon_gamma_box")


def _composite_key(name: str) -> str:
    """Accept zennit's class names too: EpsilonPlusFlat -> epsilon_plus_flat."""
    key = "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_").replace("-", "_")
    if key not in COMPOSITES:
        raise InputError("composite", f"{name!r} is not supported", f"use one of {COMPOSITES}")
    return key


def canonizers_for(model: nn.Module) -> list:
    """The canonizers a model needs: residual blocks (torchvision's) or plain BatchNorm merging."""
    modules = list(model.modules())
    if any(isinstance(m, (BasicBlock, Bottleneck)) for m in modules):
        return [ResNetCanonizer()]
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules):
        return [SequentialMergeBatchNorm()]
    return []


def make_composite(name: str, model: nn.Module, low: float = 0.0, high: float = 1.0, epsilon: float = 1e-6, gamma: float = 0.25):
    """A fresh zennit composite by name, with the canonizers ``model`` needs. ``low``/``high`` bound the input (ZBox)."""
    key = _composite_key(name)
    canonizers = canonizers_for(model)
    if key == "epsilon_plus_flat":
        return EpsilonPlusFlat(epsilon=epsilon, canonizers=canonizers)
    return EpsilonGammaBox(low=low, high=high, epsilon=epsilon, gamma=gamma, canonizers=canonizers)


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
                 low: float = 0.0, high: float = 1.0, epsilon: float = 1e-6, gamma: float = 0.25):
        self.layers = tuple(layers)
        self.model = copy.deepcopy(model).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self._outputs: dict[str, torch.Tensor] = {}
        self._composite = make_composite(composite, self.model, low, high, epsilon, gamma)
        self._composite.register(self.model)
        # registered after the composite, so each sees the tensor that flows on (and carries its relevance)
        self._layer_handles = [
            get_layer(self.model, name).register_forward_hook(self._recorder(name)) for name in self.layers
        ]

    def _recorder(self, name):
        def record(_module, _inputs, output):
            self._outputs[name] = output
        return record

    def close(self) -> None:
        """Remove the hooks and undo the canonizers (the private copy is then a plain model again)."""
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
        x = torch.as_tensor(x, dtype=torch.float32).detach().clone().requires_grad_(True)
        self._outputs.clear()
        with torch.enable_grad():
            logits = self.model(x)
            targets = self._targets(target, logits.detach())
            seed = torch.nn.functional.one_hot(targets, logits.shape[1]).to(logits.dtype)
            tensors = [x] + [self._outputs[name] for name in self.layers]
            grads = torch.autograd.grad(logits, tensors, grad_outputs=seed)
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
