"""``unhans export --layer auto``: the block to correct, chosen on held-out pairs of the user's own photos.

Which layer a projection should sit at is not known in advance, and a wrong guess is costly either way: on
EfficientNet-Lite0 with the ImageNet-W watermark (19 photos) ``_blocks.2`` and ``_blocks.6`` were refused or cost
10-20% of clean agreement, ``_blocks.15`` left more of the watermark's effect than ``_blocks.10``. So the export tries
a few blocks (:func:`unhans.core.layers.candidate_layers`): the photos are split by position, the correction is fitted
at every candidate on the pairs of one half (one forward per batch feeds all candidates' hooks) and judged on the
pairs of the other half, which it never saw:

- the artifact's effect: the share of held-out photos whose top-1 class the artifact changes, and the mean length of
  the logit shift it causes, both with the uncorrected model and with the corrected one; ``removed`` is the mean of
  the shares of the two that the correction takes away;
- the cost on the held-out photos without the artifact, judged as the export judges it (:mod:`unhans.core.cost`:
  accuracy with labels, else agreement within the bound's noise);
- the detector's accuracy on the held-out photos with and without the artifact.

The block that removes most of the effect within the cost bound is taken; where none stays within it, the one that
removes most, and the export's own cost check then refuses it or turns to the reactive gate as it does for any layer.

A bare ONNX graph is searched the same way over its module scopes (:class:`OnnxLayers`: onnxruntime's activations,
the graph cut at each candidate's tensor and run on the corrected values); on a small CNN a block both can name gets
the same figures from either.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..core.cav import CAV
from ..core.clarc import PClArC
from ..core.cost import Cost, HeldOut
from ..core.errors import InputError
from ..core.layers import batch_rows, candidate_layers, get_layer

CANDIDATES = 5  # blocks tried: each costs a CAV fit and two forwards of the held-out half
AUTO_NAME = "--layer auto"


@dataclass(frozen=True)
class Trial:
    """One candidate block's correction, fitted on one half of the pairs and judged on the other."""

    layer: str
    dims: int
    detection: float  # the detector right on this share of the held-out photos, with and without the artifact
    flips: tuple[float, float]  # share of held-out photos whose top-1 the artifact changes: uncorrected, corrected
    shift: tuple[float, float]  # mean L2 length of the artifact's logit shift: uncorrected, corrected
    cost: Cost

    @staticmethod
    def _share(pair: tuple[float, float]) -> float | None:
        before, after = pair
        return None if before <= 0 else float(np.clip(1 - after / before, 0, 1))

    @property
    def removed(self) -> float:
        """The mean of the shares of the artifact's top-1 changes and logit shift the correction removes."""
        shares = [s for s in (self._share(self.flips), self._share(self.shift)) if s is not None]
        return float(np.mean(shares)) if shares else 0.0

    @property
    def within(self) -> bool:
        """The cost passes the export's check (overall and per class)."""
        try:
            self.cost.check()
        except InputError:
            return False
        return True

    def row(self) -> dict[str, str]:
        """The trial as a row of the table the export prints and records."""
        cost = self.cost
        figure = (f"{cost.overall.pt:+.1f} pt accuracy" if cost.labelled else f"{cost.changes} of {cost.overall.samples} changed "
                  f"(<= {cost.allowed_changes} within the bound)")
        return {"layer": self.layer, "dims": str(self.dims), "top-1 changed by the artifact": f"{self.flips[0]:.0%} -> {self.flips[1]:.0%}",
                "logit shift": f"{self.shift[0]:.2f} -> {self.shift[1]:.2f}", "removed": f"{self.removed:.0%}",
                "held-out cost": figure + ("" if self.within else ", over the bound"), "detector held out": f"{self.detection:.1%}"}


@dataclass(frozen=True)
class LayerChoice:
    """The block taken and every trial it was chosen from."""

    layer: str
    trials: tuple[Trial, ...]
    fitted: int
    judged: int

    @property
    def within_bound(self) -> bool:
        return any(t.layer == self.layer and t.within for t in self.trials)

    def metadata(self) -> dict[str, str]:
        """Graph metadata (after ``unhans.``) recording how the layer was chosen; ``unhans inspect`` shows it."""
        import json

        return {"layer.chosen_by": "auto", "layer.split": f"{self.fitted} photos fitted, {self.judged} judged",
                "layer.trials": json.dumps([t.row() for t in self.trials])}


class TorchLayers:
    """A PyTorch model's blocks: activations from forward hooks, corrections by a hook that replaces a block's output."""

    def __init__(self, model: nn.Module):
        self.model = model.eval()

    def candidates(self, probe: np.ndarray, count: int) -> list[str]:
        return candidate_layers(self.model, torch.from_numpy(probe[:2]), count)

    def run(self, images: np.ndarray, layers: list[str], replace: dict | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits on ``images`` and every layer's activations, from one forward per batch; ``replace[layer]`` (a
        module) corrects that layer's output on the way (then no activations are kept)."""
        kept = {layer: [] for layer in layers}
        handles = []
        for layer in layers:
            def hook(_module, _inputs, output, layer=layer):
                if replace is not None:
                    return replace[layer](output)
                kept[layer].append(output.detach().numpy().copy())
            handles.append(get_layer(self.model, layer).register_forward_hook(hook))
        rows = batch_rows(images)
        try:
            with torch.no_grad():
                logits = np.concatenate([self.model(torch.from_numpy(np.ascontiguousarray(images[i:i + rows]))).numpy()
                                         for i in range(0, len(images), rows)])
        finally:
            for handle in handles:
                handle.remove()
        return logits, {layer: np.concatenate(parts) for layer, parts in kept.items() if parts}

    def corrected(self, images: np.ndarray, layer: str, correction: nn.Module) -> np.ndarray:
        return self.run(images, [layer], replace={layer: correction})[0]


class OnnxLayers:
    """A bare ONNX graph's module scopes (torch's dynamo exporter records them): activations from onnxruntime with the
    scopes' tensors exposed as outputs, corrections by running the graph cut at the tensor (as ``export_onnx``
    verifies its graph)."""

    def __init__(self, graph):
        self.graph = graph
        self.input = graph.graph.input[0].name
        self.logits = graph.graph.output[0].name

    def candidates(self, probe: np.ndarray, count: int) -> list[str]:
        """The outermost module scopes with one (N, C, H, W) output (a scope holding all of them, VGG's ``features``,
        opened into its children), the first and last left out, spread as :func:`unhans.core.layers.candidate_layers`."""
        from .graph import scope_names, scope_output, shapes

        inferred, names = shapes(self.graph), [n for n in scope_names(self.graph) if n]
        outer = [n for n in names if not any(n.startswith(other + ".") for other in names)]
        for _ in range(3):
            spatial = []
            for scope in outer:
                try:
                    shape = inferred.get(scope_output(self.graph, scope))
                except InputError:  # a scope that hands on several tensors is no block to correct after
                    continue
                if shape is not None and len(shape) == 4 and all(isinstance(d, int) for d in shape[2:]) and shape[2] * shape[3] > 1:
                    spatial.append(scope)
            if len(spatial) >= 3:
                break
            outer = [n for n in names if any(n.startswith(s + ".") and "." not in n[len(s) + 1:] for s in spatial)]
        blocks = spatial[1:-1]
        if not blocks:
            raise InputError("--layer", f"{AUTO_NAME} found no block with (N, C, H, W) outputs among the graph's module scopes",
                             "name the layer (--layer SCOPE) or the tensor (--tensor NAME)")
        if len(blocks) <= count:
            return blocks
        return [blocks[i] for i in np.unique(np.linspace(len(blocks) // 3, len(blocks) - 2, count).round().astype(int))]

    def _tensor(self, layer: str) -> str:
        from .graph import scope_output

        return scope_output(self.graph, layer)

    def run(self, images: np.ndarray, layers: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        from .graph import with_outputs
        from .runtime import run_batched, session

        tensors = [self._tensor(layer) for layer in layers]
        exposed = session(with_outputs(self.graph, tensors).SerializeToString(), cuda=False)
        logits, *values = run_batched(exposed, images, [self.logits, *tensors])
        return logits, dict(zip(layers, values))

    def corrected(self, images: np.ndarray, layer: str, correction: nn.Module) -> np.ndarray:
        import onnx

        from .graph import with_outputs
        from .runtime import session

        name = self._tensor(layer)
        prefix = session(with_outputs(self.graph, [name]).SerializeToString(), cuda=False)
        suffix = session(onnx.utils.Extractor(onnx.shape_inference.infer_shapes(self.graph)).extract_model(
            [self.input, name], [self.logits]).SerializeToString(), cuda=False)
        wanted = [i.name for i in suffix.get_inputs()]
        rows, out = batch_rows(images), []
        for start in range(0, len(images), rows):
            x = np.ascontiguousarray(images[start:start + rows])
            with torch.no_grad():
                h = correction(torch.from_numpy(prefix.run([name], {self.input: x})[0])).numpy()
            feeds = {self.input: x, name: h}
            out.append(suffix.run(None, {k: feeds[k] for k in wanted})[0])
        return np.concatenate(out)


def _effect(with_: np.ndarray, without: np.ndarray) -> tuple[float, float]:
    """(share of top-1 changed, mean L2 length of the logit shift) the artifact causes."""
    return float((with_.argmax(1) != without.argmax(1)).mean()), float(np.linalg.norm(with_ - without, axis=1).mean())


def choose_layer(layers: TorchLayers | OnnxLayers, artifact: np.ndarray, clean: np.ndarray, labels: np.ndarray | None,
                 classes: list[str] | None, max_pt: float, max_class_pt: float, method: str = "pattern", mode: str = "flat",
                 n_directions: int | str = 1, reactive: bool = False, threshold: float = 0.0, count: int = CANDIDATES) -> LayerChoice:
    """Try up to ``count`` blocks of a model (``layers``: a PyTorch model's or an ONNX graph's) on the pairs
    ``artifact``/``clean`` (the same photos with and without the artifact): fitted on the even positions, judged on
    the odd ones (module docstring)."""
    if len(clean) < 8:
        raise InputError("--layer auto", f"needs held-out pairs, and {len(clean)} photos leave too few",
                         "give at least 8 photos (a few dozen make a reliable choice), or name the layer")
    candidates = layers.candidates(clean, count)
    fit, judge = np.arange(len(clean)) % 2 == 0, np.arange(len(clean)) % 2 == 1
    _, with_fit = layers.run(artifact[fit], candidates)
    _, without_fit = layers.run(clean[fit], candidates)
    cavs = {}
    for layer in candidates:  # each layer's activations are released as soon as its CAV is fitted
        cavs[layer] = CAV(method=method, mode=mode, n_directions=n_directions).fit_paired(with_fit.pop(layer), without_fit.pop(layer))
    del with_fit, without_fit
    logits_with, judged_with = layers.run(artifact[judge], candidates)
    logits_without, judged_without = layers.run(clean[judge], candidates)
    held_out = HeldOut(clean[judge], None if labels is None else labels[judge], "the held-out half of your photos", classes,
                       max_pt, max_class_pt)
    flips, shift = _effect(logits_with, logits_without)
    trials = []
    for layer in candidates:
        cav = cavs[layer]
        scores = np.r_[cav.decision_function(judged_with.pop(layer)), cav.decision_function(judged_without.pop(layer))]
        detection = float(((scores > 0) == (np.arange(len(scores)) < judge.sum())).mean())
        correction = PClArC.from_cav(cav, reactive, threshold).eval()
        after_with, after_without = (layers.corrected(images[judge], layer, correction) for images in (artifact, clean))
        after_flips, after_shift = _effect(after_with, after_without)
        trials.append(Trial(layer, int(np.prod(cav.activation_shape_)), detection, (flips, after_flips), (shift, after_shift),
                            held_out.cost(logits_without, after_without)))
    within = [t for t in trials if t.within]
    best = max(within or trials, key=lambda t: (t.removed, -t.cost.overall.pt))
    return LayerChoice(best.layer, tuple(trials), int(fit.sum()), int(judge.sum()))
