"""Bake a P-ClArC correction into an ONNX graph, prove it matches PyTorch, and write it with its provenance.

Two routes share one surgery (:mod:`unhans.export.graph`): from a PyTorch model (exported with torch's dynamo
exporter, then corrected after the named module's output) and from an existing ONNX file with no PyTorch source
(corrected after a named tensor or module scope, the CAV fitted on activations onnxruntime computes). Every graph
is checked (ONNX checker, strict shape inference, onnxruntime against the PyTorch P-ClArC module on a probe batch)
before anything is written, and written atomically: a failed export leaves no file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper
from torch import nn

from .. import __version__
from ..core.cav import CAV
from ..core.cost import MIN_CLASS_SAMPLES, Cost, HeldOut
from ..core.errors import InputError
from ..core.layers import activations, get_layer, insert_after
from .correction import Correction
from .effect import ArtifactProbe, Effect
from .graph import SCORE_OUTPUT, apply_correction, resolve, with_outputs
from .runtime import run_batched, session

OPSET = 18
MAX_IR_VERSION = 10  # onnx 1.23 writes IR 14 by default; some onnxruntime builds refuse anything above 10-13
TOLERANCE = 1e-4  # max |onnxruntime − PyTorch| allowed, relative to the reference's max |logit|
META = "unhans."

Reference = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # probe -> (logits, artifact scores)


@dataclass
class ExportReport:
    """What an export wrote and how closely it matched PyTorch."""

    path: Path
    spec_path: Path
    tensor: str
    folded: bool
    nodes_before: int
    nodes_after: int
    max_abs_diff: float
    logit_scale: float
    score_max_abs_diff: float | None
    seconds: float
    metadata: dict[str, str]
    cost: Cost | None = None
    effect: Effect | None = None  # what it does to the artifact (export/effect.py)


def correction_path(onnx_path: str | Path) -> Path:
    """Where the correction spec of a graph lives: beside it, ``NAME.correction.npz``."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(f"{onnx_path.stem}.correction.npz")


def torch_to_onnx(model: nn.Module, example: np.ndarray) -> onnx.ModelProto:
    """``model`` as a self-contained ONNX graph: input ``input`` with a dynamic batch axis, output ``logits``."""
    x = torch.as_tensor(np.ascontiguousarray(example[:2], np.float32))
    if len(x) < 2:  # torch.export specialises a batch of 1; two rows keep the axis symbolic
        x = x.repeat(2, *([1] * (x.dim() - 1)))
    try:
        program = torch.onnx.export(
            model.eval(), (x,), dynamo=True, input_names=["input"], output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False, opset_version=OPSET, verbose=False)
    except Exception as error:  # the exporter raises many types; the user needs the first line
        raise InputError("model", f"torch.onnx.export failed ({str(error).strip().splitlines()[0]})",
                         "make the model traceable by torch.export (no data-dependent Python control flow)") from None
    return _with_ir_version(program.model_proto)


def _with_ir_version(model: onnx.ModelProto) -> onnx.ModelProto:
    """Write the lowest IR version that the opsets need, capped where onnxruntime may refuse newer ones."""
    needed = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    model.ir_version = max(needed, min(model.ir_version, MAX_IR_VERSION))
    return model


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """An existing ONNX file, refused with one line unless it passes the checker and onnxruntime loads it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(str(path), "does not exist", "pass an .onnx file")
    try:
        model = onnx.load(str(path))
    except Exception as error:
        raise InputError(str(path), f"is not an ONNX model ({_first_line(error)})", "pass a .onnx file written by an exporter") from None
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise InputError(str(path), f"fails the ONNX checker ({_first_line(error)})", "re-export the model with a current exporter") from None
    model = _with_ir_version(model)
    try:
        session(model.SerializeToString(), cuda=False)
    except Exception as error:
        opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
        raise InputError(str(path), f"onnxruntime {ort.__version__} cannot load it (opsets {opsets}: {_first_line(error)})",
                         f"re-export it with an opset onnxruntime supports, e.g. {OPSET}") from None
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(inputs) != 1:
        raise InputError(str(path), f"has {len(inputs)} inputs", "export a model with one image input")
    return model


def _first_line(error: Exception) -> str:
    """The gist of an error in one line: onnxruntime's C++ source locations dropped, its conclusion (at the end) kept."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    line = re.sub(r"/onnxruntime_src/\S+ [^()]*\([^()]*\) ", "", line)
    return line if len(line) <= 300 else "..." + line[-300:]


def onnx_activations(model: onnx.ModelProto, tensor: str, images: np.ndarray) -> np.ndarray:
    """Values of the intermediate ``tensor`` for ``images``, computed by onnxruntime (the tensor exposed as an output)."""
    exposed = session(with_outputs(model, [tensor]).SerializeToString())
    return run_batched(exposed, images, [tensor])[0]


def fit_cav_onnx(model: onnx.ModelProto, artifact_images: np.ndarray, clean_images: np.ndarray, tensor: str | None = None,
                 layer: str | None = None, method: str = "pattern", mode: str = "flat", paired: bool = False,
                 n_directions: int | str = 1) -> CAV:
    """A CAV fitted on onnxruntime's activations of ``tensor`` (or of module scope ``layer``): no PyTorch source needed.
    ``paired``: the two image sets are the same images with and without the artifact (needed for ``n_directions`` > 1)."""
    name = resolve(model, tensor, layer)
    h_artifact, h_clean = onnx_activations(model, name, artifact_images), onnx_activations(model, name, clean_images)
    cav = CAV(method=method, mode=mode, n_directions=n_directions)
    return cav.fit_paired(h_artifact, h_clean) if paired else cav.fit(h_artifact, h_clean)


def cav_metadata(quality: dict | None) -> dict[str, str]:
    """A CAV's :attr:`~unhans.core.cav.CAV.quality_` as metadata entries (``inspect`` shows them)."""
    if not quality:
        return {}
    subspace = {"cav.directions": str(quality.get("directions", 1))}
    if quality.get("paired") and "energy_share" in quality:  # what the k directions hold of the paired differences
        subspace["cav.energy_share"] = f"{quality['energy_share']:.3g}"
    if "heldout_energy_share" in quality:
        subspace["cav.heldout_energy_share"] = f"{quality['heldout_energy_share']:.3g}"
    return {"cav.heldout_detection_acc": f"{quality['heldout_detection_acc']:.3g}", "cav.samples": str(quality["samples"]),
            "cav.dims": str(quality["dims"]), "cav.paired": str(quality["paired"]).lower(), **subspace,
            "cav.warnings": " | ".join(quality["warnings"]) or "none"}


def cost_metadata(cost: Cost | None) -> dict[str, str]:
    """A correction's :class:`~unhans.core.cost.Cost` as metadata entries (``inspect`` shows them); per class as JSON
    ``[[class, images, before, after], ...]``."""
    if cost is None:
        return {}
    worst = cost.worst_class
    return {"cost.data": cost.source, "cost.metric": cost.metric, "cost.samples": str(cost.overall.samples),
            "cost.before": f"{cost.overall.before:.4f}", "cost.after": f"{cost.overall.after:.4f}", "cost.pt": f"{cost.overall.pt:.2f}",
            "cost.agreement": f"{cost.agreement:.4f}",
            **({} if cost.labelled else {"cost.allowed_changes": f"{cost.allowed_changes} of {cost.overall.samples} (binomial, the bound's noise)"}),
            "cost.worst_class": f"{worst.name}: {worst.pt:.2f} pt" if worst else f"none with {MIN_CLASS_SAMPLES} images",
            "cost.bound_pt": f"{cost.max_pt:g}", "cost.class_bound_pt": f"{cost.max_class_pt:g}",
            "cost.per_class": json.dumps([[c.name, c.samples, round(c.before, 4), round(c.after, 4)] for c in cost.classes])}


def export_torch(model: nn.Module, layer: str, correction: Correction, probe: np.ndarray, out: str | Path,
                 fold: bool = True, cav_quality: dict | None = None, held_out: HeldOut | None = None,
                 artifact: ArtifactProbe | None = None, extra: dict[str, str] | None = None) -> ExportReport:
    """Export ``model`` with ``correction`` after module ``layer`` to ``out``, verified against PyTorch's P-ClArC.

    ``probe`` is a batch of real inputs (mix artifact and clean samples so a reactive gate is exercised both ways).
    With ``held_out``, what the correction costs on it is measured and the graph refused when over the bounds; with
    ``artifact``, what it removes of the artifact's effect, refused under its bound (export/effect.py). ``extra``: more
    metadata entries (after ``unhans.``), e.g. how the layer was chosen.
    """
    started = time.perf_counter()
    get_layer(model, layer)
    plain = torch_to_onnx(model, probe)
    reference_model = insert_after(model, layer, correction.module())  # what core.clarc.pclarc builds

    def reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            logits = reference_model(torch.from_numpy(x)).numpy()
        return logits, correction.score(activations(model, x, layer))

    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    source = {"source.kind": "pytorch state_dict", "source.sha256": digest.hexdigest(), **cav_metadata(cav_quality), **(extra or {})}
    return _bake(plain, resolve(plain, layer=layer), layer, correction, probe, reference, out, fold, source, started, held_out, artifact)


def export_onnx(source_path: str | Path, correction: Correction, probe: np.ndarray, out: str | Path,
                tensor: str | None = None, layer: str | None = None, fold: bool = True, cav_quality: dict | None = None,
                held_out: HeldOut | None = None, artifact: ArtifactProbe | None = None, extra: dict[str, str] | None = None) -> ExportReport:
    """Correct an existing ONNX file after ``tensor`` (or module scope ``layer``), without its PyTorch source.

    The reference is the source graph itself, cut at the tensor: onnxruntime computes h, PyTorch's P-ClArC module
    corrects it, onnxruntime runs the rest of the graph on the result. ``held_out``, ``artifact``, ``extra``: as for :func:`export_torch`.
    """
    started = time.perf_counter()
    source = load_onnx(source_path)
    if any(p.key.startswith(META + "correction") for p in source.metadata_props):
        raise InputError(str(source_path), "already carries an unhans correction", "export from the uncorrected graph")
    name = resolve(source, tensor, layer)
    input_name = source.graph.input[0].name
    outputs = [o.name for o in source.graph.output]
    prefix = session(with_outputs(source, [name]).SerializeToString(), cuda=False)
    inferred = onnx.shape_inference.infer_shapes(source)
    suffix = session(onnx.utils.Extractor(inferred).extract_model([input_name, name], outputs[:1]).SerializeToString(), cuda=False)
    module = correction.module()

    def reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h = prefix.run([name], {input_name: x})[0]
        with torch.no_grad():
            corrected = module(torch.from_numpy(h)).numpy()
        feeds = {input_name: x, name: corrected}
        return suffix.run(None, {i.name: feeds[i.name] for i in suffix.get_inputs()})[0], correction.score(h)

    provenance = {"source.kind": "onnx file", "source.sha256": hashlib.sha256(Path(source_path).read_bytes()).hexdigest(),
                  **cav_metadata(cav_quality), **(extra or {})}
    return _bake(source, name, layer or name, correction, probe, reference, out, fold, provenance, started, held_out, artifact)


def _bake(plain: onnx.ModelProto, tensor: str, layer: str, correction: Correction, probe: np.ndarray, reference: Reference,
          out: str | Path, fold: bool, provenance: dict, started: float, held_out: HeldOut | None,
          artifact: ArtifactProbe | None = None) -> ExportReport:
    out = Path(out)
    if out.is_dir():
        raise InputError(str(out), "is a folder", "pass the path of the .onnx file to write")
    corrected, folded = apply_correction(plain, tensor, correction, fold)
    _check(corrected)
    probe = np.ascontiguousarray(probe, np.float32)
    diff, scale, score_diff = _verify(corrected, probe, reference, correction)
    cost = effect = None
    if held_out is not None or artifact is not None:  # judged on the graph that ships, before anything is written
        sessions = [session(graph.SerializeToString(), cuda=False) for graph in (plain, corrected)]
        before, after = ((lambda images, graph=graph: run_batched(graph, images)[0]) for graph in sessions)
        if held_out is not None:
            cost = held_out.cost(before(held_out.images), after(held_out.images))
            cost.check()
        if artifact is not None:
            effect = artifact.effect(before, after)
            if effect is not None:
                effect.check(artifact.better)
    metadata = {
        "version": __version__,
        "correction.layer": layer, "correction.tensor": tensor, "correction.mode": correction.mode,
        "correction.directions": str(correction.directions),
        "correction.reactive": str(correction.reactive).lower(), "correction.threshold": repr(float(correction.threshold)),
        "correction.detector": str(correction.has_detector).lower(),
        "cav.fingerprint": correction.fingerprint(),
        **provenance, **cost_metadata(cost), **(effect.metadata() if effect is not None else {}),
        "folded": str(folded).lower(),
        "nodes_added": str(len(corrected.graph.node) - len(plain.graph.node)),
        "verify.max_abs_diff": f"{diff:.3g}", "verify.logit_scale": f"{scale:.4g}", "verify.probe_rows": str(len(probe)),
    }
    for key, value in metadata.items():
        corrected.metadata_props.add(key=META + key, value=value)

    spec_path = correction_path(out)
    spec = io.BytesIO()
    correction.save(spec, layer)
    write_atomic(spec_path, spec.getvalue())
    try:
        write_atomic(out, corrected.SerializeToString())
    except BaseException:
        spec_path.unlink(missing_ok=True)
        raise
    return ExportReport(out, spec_path, tensor, folded, len(plain.graph.node), len(corrected.graph.node), diff, scale,
                        score_diff, time.perf_counter() - started, {META + k: v for k, v in metadata.items()}, cost, effect)


def _check(model: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise InputError("correction", f"the corrected graph fails the ONNX checker ({_first_line(error)})",
                         "nothing was written; report this with the model") from None


def _verify(model: onnx.ModelProto, probe: np.ndarray, reference: Reference, correction: Correction) -> tuple[float, float, float | None]:
    """onnxruntime vs the PyTorch reference on ``probe``: (max |Δlogit|, max |logit|, max |Δscore|); refuses a mismatch."""
    sess = session(model.SerializeToString(), cuda=False)
    names = [o.name for o in sess.get_outputs()]
    results = dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: probe})))
    expected_logits, expected_scores = reference(probe)
    got = results[names[0]]
    diff = float(np.abs(got - expected_logits).max())
    scale = float(np.abs(expected_logits).max())
    if not diff <= TOLERANCE * max(scale, 1e-12):
        raise InputError("correction", f"the corrected graph differs from PyTorch by {diff:.3g} (max |logit| {scale:.3g}; "
                         f"allowed {TOLERANCE:g} of it); nothing was written",
                         "check that the layer's output is one tensor in the graph, or export with --no-fold")
    if not correction.has_detector:
        return diff, scale, None
    score_diff = float(np.abs(results[SCORE_OUTPUT] - expected_scores).max())
    if not score_diff <= TOLERANCE * max(float(np.abs(expected_scores).max()), 1.0):
        raise InputError("correction", f"the graph's {SCORE_OUTPUT} differs from the detector by {score_diff:.3g}; nothing was written",
                         "report this with the model and CAV")
    return diff, scale, score_diff


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_metadata(path: str | Path) -> dict[str, str]:
    """The model-level metadata of an ONNX file (unhans writes its provenance under ``unhans.*``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(str(path), "does not exist", "pass an .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:
        raise InputError(str(path), f"is not an ONNX model ({_first_line(error)})", "pass a .onnx file") from None
    return {p.key: p.value for p in model.metadata_props}
