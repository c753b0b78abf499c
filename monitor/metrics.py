"""The monitor's Prometheus metrics, and the one HTTP endpoint that serves them with the alert evidence.

Names follow Prometheus conventions: the ``unhans_monitor_`` prefix, base units (seconds), ``_total`` counters,
labels bounded to model, version, class and a fixed set of reasons/kinds. ``/evidence/...`` serves the evidence
pages on the same port, so an alert's annotation can link to ``http://<instance>/evidence/latest/class-<c>.html``.
"""

from __future__ import annotations

import mimetypes
import threading
from pathlib import Path
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from .evidence import LATEST, class_slug

SKIP_REASONS = ("torn", "corrupt", "other_version", "missing_shard", "no_relevance", "wrong_shape", "not_finite", "constant_map",
                "unknown_class", "no_latent")  # no_latent: left out of the cross-class test only
CLASS_SKIP_REASONS = ("too_few_samples", "reference_too_small")
ALERT_KINDS = ("new_strategy", "known_artifact")


class MonitorMetrics:
    """Every metric the monitor exports, on a registry of its own."""

    def __init__(self, model: str, version: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.labels = {"model": model, "version": version}
        base, per_class = ["model", "version"], ["model", "version", "class"]
        r = self.registry
        self.windows = Counter("unhans_monitor_windows_total", "Windows of served traffic analysed", base, registry=r)
        self.windows_empty = Counter("unhans_monitor_windows_empty_total", "Windows that held no usable record", base, registry=r)
        self.samples = Counter("unhans_monitor_samples_total", "Sampled records analysed", base, registry=r)
        self.records_skipped = Counter("unhans_monitor_records_skipped_total", "Records not analysed, by reason", [*base, "reason"], registry=r)
        self.classes_skipped = Counter("unhans_monitor_classes_skipped_total", "Class windows not analysed, by reason",
                                       [*per_class, "reason"], registry=r)
        self.other_version_shards = Gauge("unhans_monitor_other_version_shards", "Shards of other model versions in the sink", base, registry=r)
        self.class_samples = Gauge("unhans_monitor_class_samples", "Samples of the class in the last window", per_class, registry=r)
        self.eigengap = Gauge("unhans_monitor_eigengap", "SpRAy eigengap of the class in its last analysed window", per_class, registry=r)
        self.fisher_tau = Gauge("unhans_monitor_fisher_tau", "log1p of the Fisher separability of the class's 2-way split", per_class, registry=r)
        self.concentration = Gauge("unhans_monitor_relevance_concentration", "Most concentrated cluster's share of relevance on 2% of pixels",
                                   per_class, registry=r)
        self.distance = Gauge("unhans_monitor_relevance_distance", "Distance of the window's mean relevance to the reference's, in reference spreads",
                              per_class, registry=r)
        self.drift_score = Gauge("unhans_monitor_drift_score", "Largest z-score of the class's evidence against resampled reference windows",
                                 per_class, registry=r)
        self.drift_threshold = Gauge("unhans_monitor_drift_threshold", "Drift score above which the class alerts (calibrated)", per_class, registry=r)
        self.crossclass = Gauge("unhans_monitor_crossclass_evidence", "Cross-class evidence of the last window, by statistic "
                                "(shift, channel_shift, novelty)", [*base, "statistic"], registry=r)
        self.artifact_share = Gauge("unhans_monitor_artifact_share", "Share of the class's samples the artifact detector flags", per_class, registry=r)
        self.alert = Gauge("unhans_monitor_alert", "1 while the class alerts, by kind", [*per_class, "kind"], registry=r)
        self.last_window = Gauge("unhans_monitor_last_window_timestamp_seconds", "When the last window was analysed (Unix time)", base, registry=r)
        self.false_alarm_rate = Gauge("unhans_monitor_false_alarm_rate", "Stated new-strategy false-alarm rate per window", base, registry=r)
        self.duration = Histogram("unhans_monitor_analysis_seconds", "Time to analyse one window", base, registry=r,
                                  buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120))
        self.windows.labels(**self.labels)
        self.samples.labels(**self.labels)
        for reason in SKIP_REASONS:  # every series exists from the start, so rate() sees the first increment
            self.records_skipped.labels(**self.labels, reason=reason)

    def of_class(self, metric, name: str, **extra):
        return metric.labels(**self.labels, **{"class": name}, **extra)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # scrapes every few seconds would flood the log
        pass


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def _app(metrics_app, evidence_root: Path):
    root = evidence_root.resolve()

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path.startswith("/evidence/"):
            relative = path[len("/evidence/"):]
            if relative.startswith(f"{LATEST}/class-") and relative.endswith(".html"):  # alerts link by the raw class label
                relative = f"{LATEST}/class-{class_slug(relative[len(LATEST) + 7:-5])}.html"
            file = (root / relative).resolve()
            if root in file.parents and file.is_file():
                kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
                start_response("200 OK", [("Content-Type", kind)])
                return [file.read_bytes()]
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"no such evidence\n"]
        if path in ("/", "/healthz"):
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"unhans monitor: /metrics, /evidence/\n"]
        return metrics_app(environ, start_response)

    return app


def serve(metrics: MonitorMetrics, evidence_root: str | Path, host: str = "127.0.0.1", port: int = 9108):
    """Serve /metrics and /evidence/ in a background thread; returns the server (``.server_port``, ``.shutdown()``)."""
    server = make_server(host, port, _app(make_wsgi_app(metrics.registry), Path(evidence_root)), _ThreadingServer, _QuietHandler)
    threading.Thread(target=server.serve_forever, name="unhans-monitor-http", daemon=True).start()
    return server
