"""Package a corrected ONNX graph for TorchServe: one ``.mar`` holding the graph, its PyTorch twin and their config.

The twin (model.py + weights.pt + the correction spec) is checked against the graph before packing, so the archive
never ships two models that disagree. torch-model-archiver runs as a subprocess with its scratch folder inside a
private staging folder: it otherwise works in ``/tmp/NAME``, which concurrent archives of one name would share.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

from ..core.contract import InputContract, torchserve_limits
from ..core.data import read_class_names
from ..core.errors import InputError
from ..core.layers import get_layer, insert_after, middle_spatial_layer
from ..core.models import load_model
from ..core.serving import FILES, METRICS, TORCHSERVE_CONFIG, ServingConfig
from ..core.run_folder import DATASET_FILE, MODEL_FILE, WEIGHTS_FILE
from ..core.training import load_run
from .correction import load_correction
from .onnx import META, TOLERANCE, correction_path, load_onnx, read_metadata, torch_to_onnx
from .runtime import run_batched, session
from ..output import warn

HANDLER_MODULE = "unhans.handlers.unhans_handler"
NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")  # what TorchServe accepts in /predictions/NAME


def build_archive(onnx_file: str | Path | None, run_dir: str | Path | None, name: str, model_store: str | Path, *,
                  force: bool = False, model_file: str | Path | None = None, weights: str | Path | None = None,
                  classes: str | Path | None = None, contract: InputContract | None = None, monitor_layer: str | None = None,
                  **settings) -> Path:
    """Write ``model_store/NAME.mar`` for the corrected graph ``onnx_file``, or, with ``onnx_file`` None, for the
    model itself with no correction (exported here): a model a team watches before it patches it.

    The model comes from the run ``run_dir`` it was exported from (twin, classes, input shape), or from the user:
    ``model_file``/``weights`` (the PyTorch twin, optional: without it and without an explain graph the archive serves
    predictions and artifact scores but no relevance), ``classes`` (one name a line, or an ``index_to_name.json``) and
    ``contract`` (the input contract: size, resize, mean, std; default the graph's input shape, pixels in [0, 1]).
    ``settings`` are :meth:`unhans.core.serving.ServingConfig.of`'s, defaults there: ``batch_size`` /
    ``max_batch_delay_ms`` become TorchServe's server-side batching; ``threads`` the intra-op threads of each worker's
    onnxruntime session (TorchServe's own ONNX loader would take every core per worker). ``sample_fraction`` of served instances are recorded with their relevance to ``sink`` (a folder or fsspec URL;
    default ``$UNHANS_SINK``, else ``unhans-sink`` in TorchServe's working directory) for ``unhans monitor``, in shards
    closed after ``max_shard_seconds`` (the monitor reads closed shards only), using at most ``sample_cpu_budget`` of one
    core per worker for their relevance (beyond it, samples are dropped and counted). Sampled records carry the relevance
    per channel at ``monitor_layer`` (default: the explain graph's layer, else the block halfway through the model,
    :func:`unhans.core.layers.middle_spatial_layer`), which the monitor compares across classes.
    """
    model_store = Path(model_store)
    if not NAME_PATTERN.match(name):
        raise InputError("--name", f"{name!r} is not a valid model name", "use letters, digits, '_' and '-', starting with a letter")
    if not model_store.is_dir():
        raise InputError("--model-store", f"{model_store} is not a folder", "create it or pass TorchServe's model store")
    target = model_store / f"{name}.mar"
    if target.exists() and not force:
        raise InputError("--name", f"{target} exists", "pass --force to replace it, or another name")
    if (model_file is None) != (weights is None):
        raise InputError("--model/--weights", "the PyTorch twin needs both", "pass --model model.py and --weights weights.pt, or neither")
    if run_dir is not None:
        run_dir = Path(run_dir)
        for needed in (MODEL_FILE, WEIGHTS_FILE, DATASET_FILE):
            if not (run_dir / needed).is_file():
                raise InputError("--run", f"{run_dir / needed} is missing", "pass the run folder the graph was exported from")
        model_file, weights = run_dir / MODEL_FILE, run_dir / WEIGHTS_FILE
    if onnx_file is None and model_file is None:
        raise InputError("--onnx", "is missing, and so is the model", "pass the graph 'unhans export' wrote, or --model/--weights "
                         "(or --run) to archive the model as it is, with no correction")
    if run_dir is not None:
        model, train, test, *_ = load_run(run_dir)
        probe = test.images[:32]
        contract = contract or InputContract(*map(int, train.image_shape))
    else:
        model = load_model(model_file, weights) if model_file is not None else None
    if onnx_file is None:  # watch before patching: the model as it is, no correction spec, no detector
        contract = contract or _contract_of(None)
        probe = probe if run_dir is not None else contract.normalise(np.random.default_rng(0).random((8, *contract.shape), dtype=np.float32))
        graph, spec_file, layer, explain = torch_to_onnx(model, probe), None, "", None
    else:
        onnx_file = Path(onnx_file)
        graph = load_onnx(onnx_file)
        spec_file = correction_path(onnx_file)
        if not spec_file.is_file():
            raise InputError("--onnx", f"{spec_file} is missing", "export the graph with 'unhans export', which writes the spec beside it")
        correction, layer = load_correction(spec_file)
        recorded = {p.key: p.value for p in graph.metadata_props}.get(META + "cav.fingerprint")
        if recorded != correction.fingerprint():
            raise InputError("--onnx", f"{spec_file.name} (fingerprint {correction.fingerprint()}) is not the correction in the graph ({recorded})",
                             "export again so graph and spec match")
        contract = contract or _contract_of(graph)
        if run_dir is None:
            probe = contract.normalise(np.random.default_rng(0).random((8, *contract.shape), dtype=np.float32))
        if model is not None:
            _check_twin(graph, model, layer, correction, probe)
        explain = onnx_file.with_name(f"{onnx_file.stem}.explain.onnx")  # written by 'unhans export --explain'
        explain = explain if explain.is_file() else None
    class_names = list(train.classes) if run_dir is not None else read_class_names(
        classes, run_batched(session(graph.SerializeToString(), cuda=False), probe[:2])[0].shape[1])
    if model is None and explain is None:
        warn(f"{onnx_file.name} has no explain graph and no PyTorch twin was given: the archive serves predictions and "
             "artifact scores, and refuses relevance (pass --model/--weights, or export with --explain)")
    monitor_layer = _monitor_layer(monitor_layer, explain, model, layer, probe)
    config = ServingConfig.of(contract, layer, monitor_layer=monitor_layer, **settings)

    staging = Path(tempfile.mkdtemp(prefix=".unhans-archive-", dir=model_store))
    try:
        files = staging / "files"
        files.mkdir()
        (files / FILES.graph).write_bytes(graph.SerializeToString())
        if spec_file is not None:
            shutil.copyfile(spec_file, files / FILES.correction)
        twin = [FILES.model, FILES.weights] if model is not None else []
        if model is not None:
            shutil.copyfile(model_file, files / FILES.model)
            shutil.copyfile(weights, files / FILES.weights)
        (files / FILES.classes).write_text(json.dumps({str(i): c for i, c in enumerate(class_names)}))
        (files / FILES.metrics).write_text(yaml.safe_dump(_metrics_config(), sort_keys=False))
        (files / FILES.config).write_text(config.to_yaml())
        extra = [files / n for n in (*twin, *([FILES.correction] if spec_file else []), FILES.classes, FILES.metrics)]
        if explain is not None:
            shutil.copyfile(explain, files / FILES.explain)
            extra.append(files / FILES.explain)
        command = [sys.executable, "-m", "model_archiver.model_packaging", "--model-name", name, "--version", config.version,
                   "--serialized-file", str(files / FILES.graph), "--handler", importlib.util.find_spec(HANDLER_MODULE).origin,
                   "--extra-files", ",".join(map(str, extra)), "--config-file", str(files / FILES.config),
                   "--export-path", str(staging), "--force"]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TMPDIR": str(staging)})
        if done.returncode != 0 or not (staging / f"{name}.mar").is_file():
            problem = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise InputError("archive", f"torch-model-archiver failed ({problem[0]})", "check that torch-model-archiver is installed")
        (staging / f"{name}.mar").replace(target)
        _configure_torchserve(model_store / "config.properties", config.contract)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


TORCHSERVE_DEFAULT_SIZE = 6553500  # TorchServe's max_request_size and max_response_size when not set


def _configure_torchserve(config_file: Path, contract: InputContract) -> None:
    """Write the configuration 'unhans archive' tells people to start TorchServe with, its size limits set from the
    archive's (:func:`unhans.core.contract.torchserve_limits`); an existing one is kept, and a warning names a limit
    that is too small for this archive (TorchServe would reset large requests, or kill the worker on large answers)
    and a service_envelope (which breaks batching)."""
    needed = torchserve_limits(contract)
    if not config_file.exists():
        limits = "".join(f"{key}={value}\n" for key, value in needed.items())
        config_file.write_text(TORCHSERVE_CONFIG.read_text() + "# request and answer sizes, set from the archive's limits\n" + limits)
        return
    present = dict(line.split("=", 1) for line in config_file.read_text().splitlines() if "=" in line and not line.startswith("#"))
    for key, value in needed.items():
        if int(present.get(key, TORCHSERVE_DEFAULT_SIZE)) < value:
            warn(f"{config_file}: {key} is {present.get(key, f'{TORCHSERVE_DEFAULT_SIZE} (the default)')}, this archive needs "
                 f"{key}={value}; set it, or TorchServe answers large requests or answers itself (a reset, a dead worker)")
    if present.get("service_envelope", "").strip():
        warn(f"{config_file}: service_envelope={present['service_envelope'].strip()} is set; remove it: the handler speaks KServe "
             "v1 and v2 itself, and TorchServe's envelopes fail every request of a batch but the first")


def _monitor_layer(asked: str | None, explain: Path | None, model, layer: str, probe: np.ndarray) -> str | None:
    """The layer whose relevance per channel the archive's sampled records carry: the explain graph's (the only one it
    can give), else ``asked``, else the block halfway through the twin; None where nothing can explain."""
    if explain is not None:
        recorded = read_metadata(explain).get(META + "explain.layer") or None
        if asked and asked != recorded:
            raise InputError("--monitor-layer", f"{asked!r} is not the layer of {explain.name} ({recorded!r})",
                             f"export with --explain --monitor-layer {asked} again, or leave --monitor-layer out")
        if recorded is None:
            warn(f"{explain.name} gives no relevance at a monitor layer: the monitor's cross-class test will be off "
                 "(export with --explain again)")
        return recorded
    if model is None:
        return None
    twin = insert_after(model, layer, torch.nn.Identity()) if layer else model
    if asked:
        get_layer(twin, asked)
        return asked
    return middle_spatial_layer(twin, torch.from_numpy(probe[:2]))


def _contract_of(graph) -> InputContract:
    """The input contract a graph's own input shape implies (pixels in [0, 1], no resize)."""
    if graph is None:
        raise InputError("--size", "is needed to archive a model without a graph", "pass --size H,W (and --resize, --mean, --std)")
    dims = [d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or not all(dims[1:]):
        raise InputError("--size", f"the graph's input has no static (C, H, W) shape ({dims})", "pass --size H,W (and --channels)")
    return InputContract(*dims[1:])


def _check_twin(graph, model, layer: str, correction, images: np.ndarray) -> None:
    """Refuse to pack a PyTorch twin whose corrected outputs differ from the graph's."""
    twin = insert_after(model, layer, correction.module())
    with torch.no_grad():
        expected = twin(torch.from_numpy(images)).numpy()
    got = run_batched(session(graph.SerializeToString(), cuda=False), images)[0]
    diff, scale = float(np.abs(got - expected).max()), float(np.abs(expected).max())
    if not diff <= TOLERANCE * max(scale, 1e-12):
        raise InputError("--run/--model", f"the PyTorch model with the correction differs from the graph by {diff:.3g} (max |logit| {scale:.3g})",
                         "pass the model (or run folder) the graph was exported from")


def _metrics_config() -> dict:
    """The metrics the handler emits, in TorchServe's metrics.yaml format. TorchServe reads the file named by
    ``metrics_config`` globally; the template config.properties sets ``model_metrics_auto_detect`` instead, and this
    copy documents what the archive's handler reports."""
    by_kind: dict[str, list] = {}
    for name, metric in METRICS.items():
        by_kind.setdefault(metric.kind, []).append({"name": name, "unit": metric.unit, "dimensions": ["ModelName", "Level", *metric.labels]})
    return {"dimensions": ["ModelName", "Level"], "model_metrics": by_kind}
