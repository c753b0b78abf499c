"""Named layers of a model: look one up, read its activations, insert a module after it.

Layers are named by their dotted module path (``features.pool2``), as ``model.named_modules()`` gives them and as
the ONNX exporter records them in each node's name scope.
"""

from __future__ import annotations

import copy
import difflib

import numpy as np
import torch
from torch import nn

from .errors import InputError


def layer_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The sub-module at ``name``; an unknown name lists the close matches and the valid names."""
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    names = layer_names(model)
    near = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"did you mean {near}?" if near else f"valid layers: {names}"
    raise InputError("layer", f"{name!r} is not a layer of {type(model).__name__}", hint)


@torch.no_grad()
def activations(model: nn.Module, images: np.ndarray, layer: str, batch_size: int = 256) -> np.ndarray:
    """Output of ``layer`` for every image, as float32 numpy (N, ...)."""
    module = get_layer(model, layer)
    outputs = []
    handle = module.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach()))
    try:
        model.eval()
        for start in range(0, len(images), batch_size):
            model(torch.as_tensor(images[start : start + batch_size]))
    finally:
        handle.remove()
    return torch.cat(outputs).numpy() if outputs else np.zeros((0,), np.float32)


class Corrected(nn.Module):
    """A layer followed by its correction; the path of the layer keeps naming the (now corrected) output. The layer
    is called as the model calls it, keyword arguments included (EfficientNet's ``block(x, drop_connect_rate=…)``)."""

    def __init__(self, layer: nn.Module, correction: nn.Module):
        super().__init__()
        self.layer, self.correction = layer, correction

    def forward(self, *args, **kwargs):
        return self.correction(self.layer(*args, **kwargs))


def insert_after(model: nn.Module, name: str, correction: nn.Module) -> nn.Module:
    """A copy of ``model`` in which the output of layer ``name`` passes through ``correction``."""
    get_layer(model, name)
    corrected = copy.deepcopy(model)
    parent_name, _, child = name.rpartition(".")
    parent = corrected.get_submodule(parent_name) if parent_name else corrected
    setattr(parent, child, Corrected(getattr(parent, child), correction))
    return corrected.eval()


@torch.no_grad()
def last_spatial_layer(model: nn.Module, probe: torch.Tensor) -> str:
    """The module that finishes last in ``model``'s forward with a (N, C, H, W) output (H·W > 1) and is called once: the end
    of the feature extractor (VGG's ``features``, ResNet's ``layer4``), where SpRAy on relevance pooled over positions
    finds artifacts wherever they sit."""
    finished: list[tuple[str, int]] = []
    calls: dict[str, int] = {}

    def hook(name):
        def record(_module, _inputs, output):
            calls[name] = calls.get(name, 0) + 1
            if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[2] * output.shape[3] > 1:
                finished.append(name)
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in model.named_modules() if name]
    try:
        model.eval()(probe)
    finally:
        for handle in handles:
            handle.remove()
    once = [name for name in finished if calls[name] == 1]
    if not once:
        raise InputError("layer", f"no layer of {type(model).__name__} outputs (N, C, H, W) feature maps", "audit with --layer input")
    return once[-1]
