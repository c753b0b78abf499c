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
from ..core.errors import InputError
from ..core.layers import insert_after
from ..core.models import load_model
from ..core.training import DATASET_FILE, MODEL_FILE, WEIGHTS_FILE, load_run
from ..handlers.relevance import DEFAULT_CPU_BUDGET
from .correction import load_correction
from .onnx import META, TOLERANCE, correction_path, load_onnx
from .runtime import run_batched, session
from ..output import warn

GRAPH_FILE, SPEC_FILE, EXPLAIN_FILE = "model.onnx", "correction.npz", "explain.onnx"
HANDLER_MODULE = "unhans.handlers.unhans_handler"
NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")  # what TorchServe accepts in /predictions/NAME


def build_archive(onnx_file: str | Path, run_dir: str | Path | None, name: str, model_store: str | Path, batch_size: int = 8,
                  max_batch_delay_ms: int = 20, workers: int = 1, topk: int = 3, threads: int = 1, version: str = "1.0",
                  force: bool = False, sample_fraction: float = 0.0, sink: str | None = None,
                  max_shard_seconds: float = 60.0, sample_cpu_budget: float = DEFAULT_CPU_BUDGET, *,
                  model_file: str | Path | None = None, weights: str | Path | None = None, classes: str | Path | None = None,
                  contract: InputContract | None = None) -> Path:
    """Write ``model_store/NAME.mar`` for the corrected graph ``onnx_file``.

    The model comes from the run ``run_dir`` it was exported from (twin, classes, input shape), or from the user:
    ``model_file``/``weights`` (the PyTorch twin, optional: without it and without an explain graph the archive serves
    predictions and artifact scores but no relevance), ``classes`` (one name a line, or an ``index_to_name.json``) and
    ``contract`` (the input contract: size, resize, mean, std; default the graph's input shape, pixels in [0, 1]).
    ``batch_size`` / ``max_batch_delay_ms`` become TorchServe's server-side batching; ``threads`` the intra-op threads
    of each worker's onnxruntime session (TorchServe's own ONNX loader would take every core per worker).
    ``sample_fraction`` of served instances are recorded with their relevance to ``sink`` (a folder or fsspec URL;
    default ``$UNHANS_SINK``, else ``unhans-sink`` in TorchServe's working directory) for ``unhans monitor``, in shards
    closed after ``max_shard_seconds`` (the monitor reads closed shards only), using at most ``sample_cpu_budget`` of one
    core per worker for their relevance (beyond it, samples are dropped and counted).
    """
    if not 0.0 < sample_cpu_budget <= 1.0:
        raise InputError("--sample-cpu-budget", f"{sample_cpu_budget} is outside (0, 1]", "pass the share of one core sampling may use, e.g. 0.01")
    if not 0.0 <= sample_fraction <= 1.0:
        raise InputError("--sample-fraction", f"{sample_fraction} is outside [0, 1]", "pass the share of requests to record, e.g. 0.1")
    onnx_file, model_store = Path(onnx_file), Path(model_store)
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
    graph = load_onnx(onnx_file)
    spec_file = correction_path(onnx_file)
    if not spec_file.is_file():
        raise InputError("--onnx", f"{spec_file} is missing", "export the graph with 'unhans export', which writes the spec beside it")
    correction, layer = load_correction(spec_file)
    recorded = {p.key: p.value for p in graph.metadata_props}.get(META + "cav.fingerprint")
    if recorded != correction.fingerprint():
        raise InputError("--onnx", f"{spec_file.name} (fingerprint {correction.fingerprint()}) is not the correction in the graph ({recorded})",
                         "export again so graph and spec match")
    if run_dir is not None:
        model, train, test, *_ = load_run(run_dir)
        class_names, contract, probe = list(train.classes), contract or InputContract(*map(int, train.image_shape)), test.images[:32]
    else:
        contract = contract or _contract_of(graph)
        probe = contract.normalise(np.random.default_rng(0).random((8, *contract.shape), dtype=np.float32))
        class_names = _class_names(classes, run_batched(session(graph.SerializeToString(), cuda=False), probe[:2])[0].shape[1])
        model = load_model(model_file, weights) if model_file is not None else None
    if model is not None:
        _check_twin(graph, model, layer, correction, probe)
    explain = onnx_file.with_name(f"{onnx_file.stem}.explain.onnx")  # written by 'unhans export --explain'
    if model is None and not explain.is_file():
        warn(f"{onnx_file.name} has no explain graph and no PyTorch twin was given: the archive serves predictions and "
             "artifact scores, and refuses relevance (pass --model/--weights, or export with --explain)")

    staging = Path(tempfile.mkdtemp(prefix=".unhans-archive-", dir=model_store))
    try:
        files = staging / "files"
        files.mkdir()
        shutil.copyfile(onnx_file, files / GRAPH_FILE)
        shutil.copyfile(spec_file, files / SPEC_FILE)
        twin = [MODEL_FILE, WEIGHTS_FILE] if model is not None else []
        if model is not None:
            shutil.copyfile(model_file, files / MODEL_FILE)
            shutil.copyfile(weights, files / WEIGHTS_FILE)
        (files / "index_to_name.json").write_text(json.dumps({str(i): c for i, c in enumerate(class_names)}))
        (files / "metrics.yaml").write_text(yaml.safe_dump(_metrics_config(), sort_keys=False))
        config = {"minWorkers": workers, "maxWorkers": workers, "batchSize": batch_size, "maxBatchDelay": max_batch_delay_ms,
                  "responseTimeout": 120, "unhans": {
                      "topk": topk, "intra_op_threads": threads, "layer": layer,
                      "preprocess": contract.to_dict(),
                      "sample": {"fraction": sample_fraction, "max_shard_seconds": max_shard_seconds, "cpu_budget": sample_cpu_budget, **({"sink": sink} if sink else {})},
                  }}
        (files / "model-config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        extra = [files / n for n in (*twin, SPEC_FILE, "index_to_name.json", "metrics.yaml")]
        if explain.is_file():
            shutil.copyfile(explain, files / EXPLAIN_FILE)
            extra.append(files / EXPLAIN_FILE)
        command = [sys.executable, "-m", "model_archiver.model_packaging", "--model-name", name, "--version", version,
                   "--serialized-file", str(files / GRAPH_FILE), "--handler", importlib.util.find_spec(HANDLER_MODULE).origin,
                   "--extra-files", ",".join(map(str, extra)), "--config-file", str(files / "model-config.yaml"),
                   "--export-path", str(staging), "--force"]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TMPDIR": str(staging)})
        if done.returncode != 0 or not (staging / f"{name}.mar").is_file():
            problem = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise InputError("archive", f"torch-model-archiver failed ({problem[0]})", "check that torch-model-archiver is installed")
        (staging / f"{name}.mar").replace(target)
        _configure_torchserve(model_store / "config.properties", contract)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


TORCHSERVE_DEFAULT_SIZE = 6553500  # TorchServe's max_request_size and max_response_size when not set


def _configure_torchserve(config_file: Path, contract: InputContract) -> None:
    """Write the configuration 'unhans archive' tells people to start TorchServe with, its size limits set from the
    archive's (:func:`unhans.core.contract.torchserve_limits`); an existing one is kept, and a warning names a limit
    that is too small for this archive (TorchServe would reset large requests, or kill the worker on large answers)."""
    needed = torchserve_limits(contract)
    if not config_file.exists():
        from unhans.torchserve import CONFIG_TEMPLATE

        limits = "".join(f"{key}={value}\n" for key, value in needed.items())
        config_file.write_text(CONFIG_TEMPLATE.read_text() + "# request and answer sizes, set from the archive's limits\n" + limits)
        return
    present = dict(line.split("=", 1) for line in config_file.read_text().splitlines() if "=" in line and not line.startswith("#"))
    for key, value in needed.items():
        if int(present.get(key, TORCHSERVE_DEFAULT_SIZE)) < value:
            warn(f"{config_file}: {key} is {present.get(key, f'{TORCHSERVE_DEFAULT_SIZE} (the default)')}, this archive needs "
                 f"{key}={value}; set it, or TorchServe answers large requests or answers itself (a reset, a dead worker)")


def _contract_of(graph) -> InputContract:
    """The input contract a graph's own input shape implies (pixels in [0, 1], no resize)."""
    dims = [d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or not all(dims[1:]):
        raise InputError("--size", f"the graph's input has no static (C, H, W) shape ({dims})", "pass --size H,W (and --channels)")
    return InputContract(*dims[1:])


def _class_names(classes: str | Path | None, count: int) -> list[str]:
    """Class names from a text file (one a line) or an index_to_name.json; numbered when none is given."""
    if classes is None:
        return [str(i) for i in range(count)]
    path = Path(classes)
    try:
        text = path.read_text()
        names = ([v if isinstance(v, str) else v[-1] for _, v in sorted(json.loads(text).items(), key=lambda kv: int(kv[0]))]
                 if path.suffix == ".json" else [line.strip() for line in text.splitlines() if line.strip()])
    except (OSError, ValueError, TypeError, IndexError) as error:
        raise InputError("--classes", f"cannot read {path} ({error})", "pass a text file with one class name a line, or index_to_name.json") from None
    if len(names) != count:
        raise InputError("--classes", f"{path} names {len(names)} classes, the model predicts {count}", "give one name per output")
    return names


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
    from ..handlers.unhans_handler import METRICS

    by_kind: dict[str, list] = {}
    for name, (kind, unit, dimensions, _) in METRICS.items():
        by_kind.setdefault(kind.value, []).append({"name": name, "unit": unit, "dimensions": ["ModelName", "Level", *dimensions]})
    return {"dimensions": ["ModelName", "Level"], "model_metrics": by_kind}
