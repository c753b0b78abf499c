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


BATCH_INPUT_BYTES = 8 * 1024 * 1024  # inputs per forward: a 224-px CNN's forward holds ~30x its input at its peak


def batch_rows(images: np.ndarray, most: int = 256, budget: int = BATCH_INPUT_BYTES) -> int:
    """Images per forward: up to ``most``, fewer for large inputs. EfficientNet-Lite0 at 224 px in batches of 256 held
    several 411 MB maps at once (an export of 500 photos peaked at 5.7 GB); 26 images of 0.6 MB took 470 MB, so 13."""
    size = int(np.prod(images.shape[1:])) * 4 if len(images) else 1
    return max(1, min(most, budget // max(size, 1)))


@torch.no_grad()
def activations(model: nn.Module, images: np.ndarray, layer: str, batch_size: int | None = None) -> np.ndarray:
    """Output of ``layer`` for every image, as float32 numpy (N, ...); ``batch_size`` defaults to :func:`batch_rows`."""
    module = get_layer(model, layer)
    outputs = []
    handle = module.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach()))
    batch_size = batch_size or batch_rows(images)
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
def _called_once_where(model: nn.Module, probe: torch.Tensor, keep, leaves_only: bool = False) -> list[str]:
    """Names of the modules (leaf modules only, if asked) called once in ``model``'s forward on ``probe`` whose call
    satisfies ``keep(input, output)``, in the order they finished."""
    kept: list[str] = []
    calls: dict[str, int] = {}

    def hook(name):
        def record(_module, inputs, output):
            calls[name] = calls.get(name, 0) + 1
            x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            if isinstance(output, torch.Tensor) and keep(x, output):
                kept.append(name)
        return record

    _run_hooked(model, probe, [module.register_forward_hook(hook(name)) for name, module in model.named_modules()
                               if name and not (leaves_only and any(module.children()))])
    return [name for name in kept if calls[name] == 1]


def _run_hooked(model: nn.Module, probe: torch.Tensor, handles: list) -> None:
    """One forward of ``probe`` in eval mode while ``handles`` (hooks that record) are registered; removed after."""
    try:
        with torch.no_grad():
            model.eval()(probe)
    finally:
        for handle in handles:
            handle.remove()


def positions_axes(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The axes of a layer's output that hold positions: (N, C, H, W) feature maps -> (2, 3); (N, T, D) tokens of a
    transformer -> (1,); anything else -> ()."""
    return (2, 3) if len(shape) == 4 else (1,) if len(shape) == 3 else ()


def last_spatial_layer(model: nn.Module, probe: torch.Tensor) -> str:
    """The module that finishes last in ``model``'s forward with an output of several positions, (N, C, H, W) maps or
    (N, T, D) tokens, and is called once: the end of the feature extractor (VGG's ``features``, ResNet's ``layer4``,
    a transformer's ``encoder``), where SpRAy on relevance pooled over positions finds artifacts wherever they sit."""
    def spread(_x, y):
        axes = positions_axes(tuple(y.shape))
        return bool(axes) and int(torch.tensor([y.shape[a] for a in axes]).prod()) > 1

    once = _called_once_where(model, probe, spread)
    if not once:
        raise InputError("layer", f"no layer of {type(model).__name__} outputs (N, C, H, W) feature maps or (N, T, D) tokens",
                         "audit with --layer input")
    return once[-1]


def middle_spatial_layer(model: nn.Module, probe: torch.Tensor) -> str:
    """The block halfway through ``model``'s spatial forward pass (counted in called-once modules with (N, C, H, W)
    outputs), taken whole: the highest module holding that midpoint short of either end of the pass (ResNet-18's
    ``layer2``, EfficientNet-Lite0's ``_blocks.8``, the small VGG's ``features.conv3``; a ViT's patch embedding).

    Where the monitor describes what a decision rests on: mid-level channels respond to patterns such as text, tags and
    textures, wherever the object is. Measured on EfficientNet-Lite0 with the ImageNet-W watermark (400 reference
    views, 150 paired photos): whitened in the reference's top 64 principal directions, the watermark's mean shift of
    the channel shares (held-out D²) was 4.97 at ``_blocks.6``, 1.99 at ``_blocks.10``, 0.60 at ``_blocks.15``; whitened
    in all directions (Ledoit-Wolf) they were alike (4.7, 4.8, 7.3), but 320 channels need a large reference to whiten."""
    spatial = _spatial(model, probe, "name a monitor layer")
    return _block(spatial[len(spatial) // 2], spatial) or spatial[len(spatial) // 2]


def _spatial(model: nn.Module, probe: torch.Tensor, fix: str) -> list[str]:
    """The called-once modules with (N, C, H, W) outputs of more than one position, in the order they finish."""
    spatial = _called_once_where(model, probe, lambda _x, y: y.dim() == 4 and y.shape[2] * y.shape[3] > 1)
    if not spatial:
        raise InputError("layer", f"no layer of {type(model).__name__} outputs (N, C, H, W) feature maps", fix)
    return spatial


def _block(name: str, spatial: list[str]) -> str | None:
    """The highest ancestor of ``name`` (itself included) in ``spatial`` that holds neither end of the pass, or None."""
    def holds(block: str, other: str) -> bool:
        return other == block or other.startswith(block + ".")

    parts = name.split(".")
    for depth in range(1, len(parts) + 1):
        block = ".".join(parts[:depth])
        if block in spatial and not holds(block, spatial[0]) and not holds(block, spatial[-1]):
            return block
    return None


def candidate_layers(model: nn.Module, probe: torch.Tensor, count: int) -> list[str]:
    """Up to ``count`` blocks spread evenly from a third of ``model``'s spatial pass to its last block but one, the
    layers ``unhans export --layer auto`` tries (EfficientNet-Lite0: ``_blocks.5, .7, .10, .13, .15``).

    Earlier blocks hold the most dimensions and the least meaning: on EfficientNet-Lite0 with the ImageNet-W watermark
    (19 photos) ``_blocks.2`` and ``_blocks.6`` were refused or cost 10-20% of clean agreement; the last block (its head
    convolution, 62,720 dimensions) is left out for its size."""
    spatial = _spatial(model, probe, "name the layer to correct with --layer")
    blocks = list(dict.fromkeys(b for b in (_block(n, spatial) for n in spatial) if b is not None))
    if len(blocks) <= count:
        return blocks
    positions = np.linspace(len(blocks) // 3, len(blocks) - 2, count).round().astype(int)
    return [blocks[i] for i in np.unique(positions)]


def global_pooling_layer(model: nn.Module, probe: torch.Tensor) -> str | None:
    """The last leaf module, called once, that pools (N, C, H, W) feature maps (H·W > 1) over every position into C
    features (ResNet's ``avgpool``, EfficientNet's ``_avg_pooling``), or None (a head that flattens the map instead).

    There an artifact lands in the same features wherever it sits, so a correction there removes one that moves."""
    def pools(x, y):
        return (x is not None and x.dim() == 4 and x.shape[2] * x.shape[3] > 1 and y.shape[:2] == x.shape[:2]
                and y[0].numel() == x.shape[1])

    once = _called_once_where(model, probe, pools, leaves_only=True)
    return once[-1] if once else None


def patch_embedding_layer(model: nn.Module, probe: torch.Tensor) -> str | None:
    """The last convolution, called once, that finishes before ``model``'s first attention layer starts (a vision
    transformer's patch embedding: ViT's ``conv_proj``, Swin's ``features.0.0``), or None (no attention).

    A correction for an artifact at one place belongs there: measured on the small ViT with a corner patch (MNIST-5k,
    10% backdoor), a paired P-ClArC on the patch embeddings took attack success from 100% to 0.4% at no clean cost,
    while after any encoder block (rank 1 or 5) 83-100% was left, for 8-78 points of clean accuracy: attention has
    mixed the patch into every token by then."""
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    attention_types = (nn.MultiheadAttention, ShiftedWindowAttention)
    finished: list[str] = []  # convolutions, in the order they finish
    first_attention: list[int] = []  # how many had finished when each attention layer started

    handles = [m.register_forward_hook(lambda *_, n=n: finished.append(n)) for n, m in model.named_modules()
               if isinstance(m, nn.Conv2d)]
    handles += [m.register_forward_pre_hook(lambda *_: first_attention.append(len(finished))) for m in model.modules()
                if isinstance(m, attention_types)]
    _run_hooked(model, probe, handles)
    if not first_attention:
        return None
    once = [n for n in finished[: first_attention[0]] if finished.count(n) == 1]
    return once[-1] if once else None
