"""What an archive holds and how it is served: its file names, its configuration and the metrics it reports.

``unhans archive`` writes a :class:`ServingConfig` into the archive's ``model-config.yaml`` (TorchServe's keys for
batching and workers at the top, unhans's under ``unhans``), and every server adapter reads it back with
:meth:`ServingConfig.from_yaml`: the TorchServe handler, the KServe predictor, and ``unhans monitor reference``.
Each default is defined here once. Nothing in this module imports a server.
"""

from __future__ import annotations

import importlib.resources
import json
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from .contract import InputContract
from .errors import InputError
from .run_folder import MODEL_FILE, WEIGHTS_FILE


@dataclass(frozen=True)
class ArchiveFiles:
    """The files of an archive, by role (one folder: the unpacked ``.mar``)."""

    graph: str = "model.onnx"  # the corrected prediction graph (TorchServe's serializedFile)
    explain: str = "explain.onnx"  # the explain graph, when 'unhans export --explain' wrote one
    correction: str = "correction.npz"  # the correction and the layer it follows
    model: str = MODEL_FILE  # the PyTorch twin's model file ...
    weights: str = WEIGHTS_FILE  # ... and state dict
    classes: str = "index_to_name.json"
    config: str = "model-config.yaml"
    metrics: str = "metrics.yaml"
    manifest: str = "MAR-INF/MANIFEST.json"


FILES = ArchiveFiles()
# the TorchServe configuration unhans ships (package data): loopback, token auth, gRPC ports named, file URLs only
TORCHSERVE_CONFIG = importlib.resources.files("unhans.model_store") / "config.properties"
SERVERS = ("kserve", "torchserve")  # what serves an archive: the KServe predictor (the default) or the TorchServe handler
DEFAULT_CPU_BUDGET = 0.01  # share of one core a worker's sampler may use (handlers.relevance.Sampler measures why)


@dataclass
class SampleConfig:
    """Recording served instances for ``unhans monitor``."""

    fraction: float = 0.0  # share of served instances recorded, with their relevance
    sink: str | None = None  # folder or fsspec URL; None: $UNHANS_SINK, else ./unhans-sink
    max_shard_seconds: float = 60.0  # a shard is closed (readable by the monitor) after this long
    max_total_bytes: int = 1 << 30  # per worker; its oldest closed shards go beyond it
    cpu_budget: float = DEFAULT_CPU_BUDGET

    def __post_init__(self):
        if not 0.0 <= self.fraction <= 1.0:
            raise InputError("--sample-fraction", f"{self.fraction} is outside [0, 1]", "pass the share of requests to record, e.g. 0.1")
        if not 0.0 < self.cpu_budget <= 1.0:
            raise InputError("--sample-cpu-budget", f"{self.cpu_budget} is outside (0, 1]", "pass the share of one core sampling may use, e.g. 0.01")


SAMPLE_SETTINGS = {"sample_fraction": "fraction", "sink": "sink", "max_shard_seconds": "max_shard_seconds",
                   "sample_cpu_budget": "cpu_budget"}  # unhans archive's option names for SampleConfig's fields


@dataclass
class ServingConfig:
    """How an archive is served; written by ``unhans archive``, read by every adapter."""

    contract: InputContract
    layer: str  # the layer the correction follows ("" for an archive without a correction)
    monitor_layer: str | None = None  # the layer whose relevance per channel sampled records carry (the monitor's evidence)
    version: str = "1.0"
    topk: int = 3  # probabilities returned per instance, unless a request asks otherwise
    intra_op_threads: int = 1  # onnxruntime and torch threads per worker
    composite: str = "epsilon_plus_flat"  # LRP composite of the PyTorch twin (no explain graph)
    batch_size: int = 8  # requests answered together (TorchServe's batchSize; the KServe predictor's batch)
    max_batch_delay_ms: int = 20  # TorchServe waits this long to fill a batch
    workers: int = 1
    response_timeout_s: int = 120  # TorchServe's responseTimeout; the KServe predictor answers 503 past it
    max_queued_requests: int = 512  # the KServe predictor's requests waiting for an answer; more are answered 503
    max_queued_bytes: int = 128 * 1024 * 1024  # ... and the bodies they hold (4 of the largest the contract takes)
    sample: SampleConfig = field(default_factory=SampleConfig)

    @classmethod
    def of(cls, contract: InputContract, layer: str, **settings) -> "ServingConfig":
        """A configuration from ``unhans archive``'s settings, by their option names: ``threads`` (intra-op threads),
        ``sample_fraction``, ``sink``, ``max_shard_seconds`` and ``sample_cpu_budget`` (the sampler's), and this
        class's own field names; what is not given keeps its default here."""
        sample = {SAMPLE_SETTINGS[k]: settings.pop(k) for k in list(settings) if k in SAMPLE_SETTINGS}
        if "threads" in settings:
            settings["intra_op_threads"] = settings.pop("threads")
        unknown = set(settings) - {f.name for f in fields(cls)} - {"contract", "layer", "sample"}
        if unknown:
            raise TypeError(f"unknown archive settings {sorted(unknown)}")
        return cls(contract=contract, layer=layer, sample=SampleConfig(**sample), **settings)

    def to_yaml(self) -> str:
        """TorchServe's model-config.yaml: its own keys at the top, ours under ``unhans``."""
        ours = {"contract": self.contract.to_dict(), "sample": asdict(self.sample),
                **{f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("contract", "sample")}}
        return yaml.safe_dump({"minWorkers": self.workers, "maxWorkers": self.workers, "batchSize": self.batch_size,
                               "maxBatchDelay": self.max_batch_delay_ms, "responseTimeout": self.response_timeout_s,
                               "unhans": ours}, sort_keys=False)

    @classmethod
    def from_dict(cls, config: dict) -> "ServingConfig":
        """The ``unhans`` section of a model-config.yaml."""
        known = {f.name for f in fields(cls)}
        return cls(contract=InputContract(**config["contract"]), sample=SampleConfig(**config.get("sample", {})),
                   **{k: v for k, v in config.items() if k in known and k not in ("contract", "sample")})

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ServingConfig":
        try:
            return cls.from_dict(yaml.safe_load(Path(path).read_text())["unhans"])
        except (OSError, KeyError, TypeError, yaml.YAMLError) as error:
            raise InputError(str(path), f"is not an unhans archive's configuration ({error})", "rebuild the archive with 'unhans archive'") from None


def class_names(folder: str | Path) -> dict[str, str]:
    """An archive's class names by index (as strings), empty when it has none."""
    path = Path(folder) / FILES.classes
    return json.loads(path.read_text()) if path.is_file() else {}


@contextmanager
def unpacked(archive: str | Path):
    """The folder of an archive: a ``.mar`` (or a folder holding one) unpacked into a temporary folder for the block,
    or an unpacked one as is."""
    archive = Path(archive)
    if archive.is_dir() and not (archive / FILES.manifest).is_file():  # KServe's /mnt/models: a folder holding the .mar
        held = sorted(archive.glob("*.mar"))
        if len(held) != 1:
            raise InputError(str(archive), f"holds {len(held)} .mar files and is not an unpacked archive", "pass one archive")
        archive = held[0]
    if archive.is_dir():
        folder = archive
    elif archive.is_file():
        scratch = tempfile.TemporaryDirectory(prefix="unhans-archive-")
        try:
            zipfile.ZipFile(archive).extractall(scratch.name)
        except zipfile.BadZipFile:
            scratch.cleanup()
            raise InputError(str(archive), "is not a TorchServe archive (.mar)", "pass the file 'unhans archive' wrote") from None
        folder = Path(scratch.name)
    else:
        raise InputError(str(archive), "does not exist", "pass the .mar file 'unhans archive' wrote, or its unpacked folder")
    try:
        if not (folder / FILES.manifest).is_file() or not (folder / FILES.config).is_file():
            raise InputError(str(archive), f"has no {FILES.manifest} or {FILES.config}", "pass an archive built by 'unhans archive'")
        yield folder
    finally:
        if folder is not archive:
            scratch.cleanup()


def manifest(folder: str | Path) -> dict:
    """The archive's model name, version and graph file, from its TorchServe manifest."""
    return json.loads((Path(folder) / FILES.manifest).read_text())["model"]


@dataclass(frozen=True)
class Metric:
    kind: str  # "counter" or "histogram"
    unit: str
    labels: tuple[str, ...]
    help: str


METRICS = {  # what a served archive reports, whichever server runs it (Prometheus names)
    "unhans_relevance_requests_total": Metric("counter", "count", (), "instances whose relevance was computed"),
    "unhans_relevance_seconds": Metric("histogram", "s", (), "time to compute the relevance of one batch"),
    "unhans_artifact_score": Metric("histogram", "score", (), "artifact detector score of each served instance"),
    "unhans_rejected_requests_total": Metric("counter", "count", ("reason",), "requests answered with a 4xx, by reason"),
    "unhans_internal_errors_total": Metric("counter", "count", ("stage",), "requests answered with a 500: a fault of ours, logged"),
    "unhans_sampled_total": Metric("counter", "count", (), "instances recorded to the sink for the monitor"),
    "unhans_sample_dropped_total": Metric("counter", "count", (), "sampled instances dropped: the sampler was behind"),
    "unhans_sink_errors_total": Metric("counter", "count", (), "sampled instances the sink could not write"),
    "unhans_sample_recovered_total": Metric("counter", "count", (), "sampled instances a dead worker journaled, recorded by this one"),
}
