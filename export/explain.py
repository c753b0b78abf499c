"""LRP relevance maps as an ONNX graph: the model's forward pass and zennit's rule backward in one graph.

Route: zennit's hooked backward (composite and canonizers registered on :class:`unhans.core.attribution.LRP`'s
private copy, outside the trace) is traced with ``make_fx`` in symbolic mode, so the batch axis stays symbolic, and
the few backward ops the ONNX exporter cannot translate (``convolution_backward``, ``max_pool2d_with_indices_backward``,
``threshold_backward``, ``_adaptive_avg_pool2d_backward``) are decomposed into forward ops (Conv with a flipped kernel
or ConvTranspose, scatter, where, expand) on the way. ``torch.autograd.grad`` itself does not export (NOTES.md §3).
zennit stays the oracle: every graph is run in onnxruntime against :class:`LRP` on a probe batch (predicted and given
targets) and refused unless it matches (see :func:`_verify` for models whose LRP is ill-conditioned in float32).

The graph: inputs ``input`` (N, C, H, W) float32 and ``target`` (N,) int64, where a negative target means "the
predicted class" (feed ``-1`` for every row to explain predictions); outputs ``logits``, ``relevance`` (shaped like
``input``) and, when a layer is named, ``layer_relevance`` (shaped like that layer's output, for latent SpRAy).
A corrected model (:func:`unhans.core.clarc.pclarc`) is explained through its correction, exactly as ``LRP`` does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from torch._decomp import get_decompositions
from torch.fx.experimental.proxy_tensor import make_fx
from torchvision.models.resnet import BasicBlock

from .. import __version__
from ..core.attribution import LRP, _composite_key
from ..core.clarc import PClArC
from ..core.errors import InputError
from ..core.layers import Corrected, get_layer
from .onnx import META, OPSET, _first_line, _with_ir_version, write_atomic
from .runtime import session

SUPPORTED_LAYERS = (nn.Conv2d, nn.Linear, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.BatchNorm2d,
                    nn.Dropout, nn.Identity, PClArC, nn.Sequential, Corrected, BasicBlock)
RELEVANCE_TOLERANCE = 1e-4  # relative L2 of relevance (input and layer) vs zennit
LOGIT_TOLERANCE = 1e-5  # max |Δlogit| vs torch, relative to max(1, max |logit|): float32 cannot promise more on large logits
FLOAT32_SLACK = 4.0  # an ill-conditioned model passes if the graph's error vs float64 zennit is within 4x zennit's own
OUTPUTS = ("logits", "relevance", "layer_relevance")


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


def check_supported(model: nn.Module) -> None:
    """Refuse a model with a layer the graph cannot explain, naming it (the root module's own forward is traced)."""
    for name, module in model.named_modules():
        if not name:
            continue
        if not isinstance(module, SUPPORTED_LAYERS):
            supported = ", ".join(t.__name__ for t in SUPPORTED_LAYERS)
            raise InputError("explain", f"layer {name!r} ({type(module).__name__}) is not supported by the explain graph",
                             f"supported layers: {supported}")
        if isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size not in (1, (1, 1)):
            raise InputError("explain", f"layer {name!r} pools to {module.output_size}", "only AdaptiveAvgPool2d(1) is supported")


def _convolution_backward(grad, x, weight, bias_sizes, stride, padding, dilation, transposed, output_padding, groups, mask):
    """Input gradient of a convolution as a transposed convolution (zennit's rules never ask for weight gradients)."""
    if transposed or mask[1] or mask[2] or x.dim() != 4:
        raise NotImplementedError("only the input gradient of a 2-D convolution is supported")
    kernel = weight.shape[2:]
    if tuple(stride) == (1, 1) and tuple(dilation) == (1, 1) and groups == 1 and all(p < k for p, k in zip(padding, kernel)):
        # the same map as a plain convolution with the kernel flipped: onnxruntime's Conv is much faster than ConvTranspose
        flipped = weight.flip(2, 3).transpose(0, 1)
        return torch.nn.functional.conv2d(grad, flipped, None, 1, [k - 1 - p for p, k in zip(padding, kernel)]), None, None
    extra = [x.shape[i + 2] - ((grad.shape[i + 2] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel[i] - 1) + 1)
             for i in range(2)]
    return torch.nn.functional.conv_transpose2d(grad, weight, None, stride, padding, extra, groups, dilation), None, None


def _adaptive_avg_pool2d_backward(grad, x):
    """Global average pooling spreads the gradient evenly (the only adaptive pooling :func:`check_supported` admits)."""
    return grad.expand(x.shape) / (x.shape[2] * x.shape[3])


def _decompositions() -> dict:
    table = get_decompositions([torch.ops.aten.max_pool2d_with_indices_backward, torch.ops.aten.threshold_backward])
    table[torch.ops.aten.convolution_backward.default] = _convolution_backward
    table[torch.ops.aten._adaptive_avg_pool2d_backward.default] = _adaptive_avg_pool2d_backward
    return table


class _Explainer(nn.Module):
    """Forward plus rule backward of an :class:`LRP`'s hooked model, as one function of (input, target)."""

    def __init__(self, lrp: LRP):
        super().__init__()
        self.lrp = lrp

    def forward(self, x: torch.Tensor, target: torch.Tensor):
        lrp = self.lrp
        x = x.requires_grad_(True)
        lrp._outputs.clear()
        logits = lrp.model(x)
        target = torch.where(target < 0, logits.argmax(1), target)
        seed = (torch.arange(logits.shape[1])[None, :] == target[:, None]).to(logits.dtype)
        tensors = [x] + [lrp._outputs[name] for name in lrp.layers]
        return (logits, *torch.autograd.grad(logits, tensors, grad_outputs=seed))


def _rel_l2(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm((got - expected).ravel()) / max(np.linalg.norm(expected.ravel()), 1e-30))


def explain_graph(model: nn.Module, composite: str = "epsilon_plus_flat", layer: str | None = None, *, probe: np.ndarray,
                  low: float = 0.0, high: float = 1.0) -> onnx.ModelProto:
    """The explain graph of ``model`` (plain or corrected), verified in onnxruntime against zennit on ``probe``.

    ``probe`` is a batch of real inputs (≥ 2 rows). ``low``/``high`` bound the input for ``epsilon_gamma_box``.
    Raises :class:`InputError` for an unsupported layer, a failed trace or export, or a mismatch with zennit; the
    verification figures are in the graph's metadata.
    """
    return _build(model, composite, layer, probe, low, high)[0]


def _build(model: nn.Module, composite: str, layer: str | None, probe: np.ndarray, low: float,
           high: float) -> tuple[onnx.ModelProto, ExplainReport]:
    started = time.perf_counter()
    key = _composite_key(composite)
    check_supported(model)
    if layer is not None:
        get_layer(model, layer)
    probe = np.ascontiguousarray(probe, np.float32)
    if probe.ndim != 4 or len(probe) < 2:
        raise InputError("probe", f"has shape {probe.shape}", "pass at least 2 real images (N, C, H, W)")
    layers = (layer,) if layer else ()
    names = list(OUTPUTS[: 2 + len(layers)])
    # traced with >= 3 rows: symbolic tracing specialises batches of 0 and 1, and the batch axis must stay dynamic
    x = torch.from_numpy(probe[:4] if len(probe) >= 3 else np.concatenate([probe, probe[:1]]))
    target = torch.full((len(x),), -1, dtype=torch.long)
    with LRP(model, key, layers=layers, low=low, high=high) as lrp:
        try:
            with torch.enable_grad():
                traced = make_fx(_Explainer(lrp), decomposition_table=_decompositions(), tracing_mode="symbolic",
                                 _allow_non_fake_inputs=True)(x, target)
            batch = torch.export.Dim("batch")
            program = torch.onnx.export(traced.eval(), (x, target), dynamo=True, input_names=["input", "target"], output_names=names,
                                        dynamic_shapes=({0: batch}, {0: batch}), external_data=False, opset_version=OPSET,
                                        verbose=False)
            # serialised before the canonizers are removed: the program reads the (merged) weights lazily
            graph = _with_ir_version(program.model_proto)
        except Exception as error:  # tracer and exporter raise many types; the user needs the first line
            raise InputError("explain", f"tracing the LRP backward failed ({_first_line(error)})",
                             "explain this model with zennit (unhans.core.attribution.LRP) instead") from None
    figures = _verify(graph, model, key, layers, probe, low, high)
    metadata = {"version": __version__, "explain.composite": key, "explain.layer": layer or "",
                "explain.target": "int64 per row; negative = predicted class", "verify.probe_rows": str(len(probe)),
                **{f"verify.{k}": f"{v:.3g}" for k, v in figures.items()}}
    for k, v in metadata.items():
        graph.metadata_props.add(key=META + k, value=v)
    return graph, ExplainReport(None, figures, len(graph.graph.node), time.perf_counter() - started,
                                {META + k: v for k, v in metadata.items()})


def _verify(graph: onnx.ModelProto, model: nn.Module, key: str, layers: tuple, probe: np.ndarray, low: float,
            high: float) -> dict[str, float]:
    """onnxruntime vs zennit on ``probe`` (predicted and shifted targets), or refuse.

    Figures: worst relative L2 of relevance and layer relevance, max |Δlogit| (allowed relative to the logit scale). Some models are ill-conditioned
    for LRP in float32 (zennit's own float32 maps then differ from its float64 ones by more than the tolerance,
    e.g. a P-ClArC-corrected ResNet); those are accepted when the graph's error against zennit in float64 is
    within ``FLOAT32_SLACK`` times zennit's own float32 error, and both figures are recorded.
    """
    sess = session(graph.SerializeToString(), cuda=False)
    figures = {"rel_l2_vs_zennit": 0.0, "logit_max_abs_diff": 0.0}
    runs = []
    with LRP(model, key, layers=layers, low=low, high=high) as lrp:
        predicted = lrp(torch.from_numpy(probe))
        figures["logit_scale"] = float(np.abs(predicted.logits).max())
        shifted = (predicted.targets + 1) % predicted.logits.shape[1]
        for feed, expected in ((np.full(len(probe), -1), predicted), (shifted, lrp(torch.from_numpy(probe), shifted))):
            got = sess.run(None, {"input": probe, "target": feed.astype(np.int64)})
            figures["logit_max_abs_diff"] = max(figures["logit_max_abs_diff"], float(np.abs(got[0] - expected.logits).max()))
            figures["rel_l2_vs_zennit"] = max(figures["rel_l2_vs_zennit"], _rel_l2(got[1], expected.relevance),
                                              *(_rel_l2(g, expected.layer_relevance[n]) for g, n in zip(got[2:], layers)))
            runs.append((expected.targets, got[1], expected.relevance))
    rel = figures["rel_l2_vs_zennit"]
    if not rel <= RELEVANCE_TOLERANCE:
        with LRP(model, key, layers=layers, low=low, high=high) as lrp64:
            lrp64.model.double()
            references = [_relevance64(lrp64, probe, targets) for targets, *_ in runs]
        figures["rel_l2_vs_zennit64"] = max(_rel_l2(got, ref) for (_, got, _), ref in zip(runs, references))
        figures["zennit32_rel_l2_vs_zennit64"] = max(_rel_l2(z32, ref) for (_, _, z32), ref in zip(runs, references))
        if not figures["rel_l2_vs_zennit64"] <= max(RELEVANCE_TOLERANCE, FLOAT32_SLACK * figures["zennit32_rel_l2_vs_zennit64"]):
            raise InputError("explain", f"relevance differs from zennit by relative L2 {rel:.3g} (allowed {RELEVANCE_TOLERANCE:g}; "
                             f"vs zennit in float64 {figures['rel_l2_vs_zennit64']:.3g}, zennit's own float32 error "
                             f"{figures['zennit32_rel_l2_vs_zennit64']:.3g}); nothing was written",
                             "explain this model with zennit (unhans.core.attribution.LRP) instead")
    allowed = LOGIT_TOLERANCE * max(1.0, figures["logit_scale"])
    if not figures["logit_max_abs_diff"] <= allowed:
        raise InputError("explain", f"logits differ from torch by {figures['logit_max_abs_diff']:.3g} (allowed {allowed:.3g}); "
                         "nothing was written", "explain this model with zennit (unhans.core.attribution.LRP) instead")
    return figures


def _relevance64(lrp: LRP, probe: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Input relevance of a float64 copy of ``lrp``'s hooked model (the reference for ill-conditioned models)."""
    x = torch.from_numpy(probe).double().requires_grad_(True)
    with torch.enable_grad():
        logits = lrp.model(x)
        seed = torch.nn.functional.one_hot(torch.from_numpy(targets), logits.shape[1]).double()
        return torch.autograd.grad(logits, x, grad_outputs=seed)[0].float().numpy()


def export_explain(model: nn.Module, out: str | Path, composite: str = "epsilon_plus_flat", layer: str | None = None, *,
                   probe: np.ndarray, low: float = 0.0, high: float = 1.0) -> ExplainReport:
    """Build, verify and atomically write the explain graph of ``model`` to ``out``; nothing is written on failure."""
    out = Path(out)
    if out.is_dir():
        raise InputError(str(out), "is a folder", "pass the path of the .onnx file to write")
    graph, report = _build(model, composite, layer, probe, low, high)
    write_atomic(out, graph.SerializeToString())
    report.path = out
    return report
