"""``unhans monitor run``: cut the sink's stream of sampled records into windows and analyse each one.

State lives in one folder (``--state``): ``reference.npz`` (built by ``unhans monitor reference``),
``calibration.json`` (resampled null models, reused across restarts), ``state.json`` (the sink position after the
last analysed window, that window's number and the carry file it holds), ``carry-<window>.bin`` (samples of classes
too thin in their window, waiting for more: :mod:`unhans.monitor.carry`), ``windows.jsonl`` (one line per analysed window: its figures,
alerts and the request ids it analysed) and ``evidence/``.

A window is committed in this order: evidence pages, its ``windows.jsonl`` line, then ``state.json`` replaced
atomically. A monitor killed at any point resumes from the last ``state.json``: records of the window in flight are
read again (none lost), and a ``windows.jsonl`` line written past the committed window is dropped on start (none
counted twice).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.progress import Progress

from unhans.core.spray import preprocess
from unhans.handlers.sink import Position, Record, ShardReader, seal_stale
from unhans.output import console

from .carry import CARRY_WINDOWS, MAX_CARRIED, Carry, remove_stale
from .crossclass import MIN_REFERENCE, CrossClassDetector, CrossClassDrift, describe
from .detector import ClassDrift, DriftDetector, known_artifact_share
from .evidence import write_crossclass_evidence, write_evidence
from .metrics import MonitorMetrics, serve
from .reference import REFERENCE_FILE, Reference

STATE_FILE, CALIBRATION_FILE, LEDGER_FILE, EVIDENCE_DIR = "state.json", "calibration.json", "windows.jsonl", "evidence"
ALL_CLASSES = "(all)"  # the class label of the cross-class test's metrics, alerts and evidence


def _atomic_json(path: Path, data: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


@dataclass
class Window:
    """Records of one window, with the sink position just past its last one."""

    records: list[Record]
    end: Position
    closed_by: str  # "count", "time" (record time span) or "idle" (no new record for window_seconds)


class Monitor:
    """Reads ``sink`` for the reference's model and version, analyses windows, exports metrics, writes evidence.

    ``window_size`` closes a window after that many records; ``window_seconds`` (optional) also closes it once its
    records span that long, or once its first record is that old and no new one comes. ``carry_windows``: how many
    windows a class's samples wait for more of their class when one window brings too few (0: none wait).
    """

    def __init__(self, state_dir: str | Path, sink: str, detector: DriftDetector, window_size: int = 1000,
                 window_seconds: float | None = None, metrics: MonitorMetrics | None = None, seal_after_seconds: float = 300.0,
                 carry_windows: int = CARRY_WINDOWS, max_carried: int = MAX_CARRIED):
        self.state_dir = Path(state_dir)
        self.sink = sink
        self.reference = Reference.load(self.state_dir / REFERENCE_FILE)
        calibration_file = self.state_dir / CALIBRATION_FILE
        calibration = json.loads(calibration_file.read_text()) if calibration_file.is_file() else {}
        self.detector = detector.fit(self.reference, calibration)
        self.crossclass = self._crossclass(detector, calibration.get("cross_class"))
        self.window_size, self.window_seconds, self.seal_after_seconds = window_size, window_seconds, seal_after_seconds
        self.metrics = metrics or MonitorMetrics(self.reference.model, self.reference.version)
        self.metrics.false_alarm_rate.labels(**self.metrics.labels).set(detector.false_alarm_rate)
        self.evidence_root = self.state_dir / EVIDENCE_DIR
        self.evidence_root.mkdir(exist_ok=True)
        state_file = self.state_dir / STATE_FILE
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
        self.window_index = int(state.get("window_index", 0))
        self.alert_since = state.get("crossclass_alert_since")  # first window of the cross-class alert now running
        self.committed = Position.of(state.get("position"))
        self.carry_windows, self.max_carried = carry_windows, max_carried
        self.carry = Carry.load(self.state_dir, state) if carry_windows else Carry()
        self._drop_uncommitted_ledger()
        self._buffer: list[Record] = []
        self._read_to = Position.of(self.committed)  # past everything read, committed or not
        self._committed_at = time.time()
        self.stop = threading.Event()

    def _crossclass(self, detector: DriftDetector, calibration: dict | None) -> CrossClassDetector | None:
        """The cross-class test on the reference's relevance at the monitor layer, or None where the reference has too
        little of it; samples the known artifact's detector flags are left out (they are reported as a warning)."""
        reference = self.reference
        if reference.latent is None:
            return None
        kept = np.ones(len(reference.latent), bool) if reference.scores is None else ~(reference.scores > 0)
        if kept.sum() < MIN_REFERENCE:
            console.print(f"[yellow]cross-class test off[/]: the reference has {int(kept.sum())} samples with relevance at the "
                          f"monitor layer, it needs {MIN_REFERENCE}")
            return None
        cross = CrossClassDetector(false_alarm_rate=detector.false_alarm_rate, n_resamples=detector.n_resamples,
                                   random_state=detector.random_state)
        return cross.fit(describe(reference.latent[kept]), reference.groups[kept], calibration, key=self.detector.reference_fingerprint_)

    def _drop_uncommitted_ledger(self) -> None:
        ledger = self.state_dir / LEDGER_FILE
        if not ledger.is_file():
            return
        lines = ledger.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line)["index"] < self.window_index]
        if len(kept) != len(lines):
            partial = ledger.with_name(ledger.name + ".partial")
            partial.write_text("".join(line + "\n" for line in kept))
            os.replace(partial, ledger)

    def calibrate(self, show_progress: bool = True) -> None:
        """Resample null models for the class sizes a full window is expected to hold (others come when met)."""
        shares = np.bincount(self.reference.predictions, minlength=len(self.reference.classes)) / len(self.reference.predictions)
        wanted = []
        for c, share in enumerate(shares):
            capacity = self.detector.capacity(c)
            n = min(int(round(share * self.window_size)), capacity)
            if n >= self.detector.min_samples and capacity >= self.detector.min_samples:
                wanted.append((c, min(self.detector.bucket(n), capacity)))
        todo = [key for key in wanted if key not in self.detector.null_]
        cross = self.crossclass is not None and self.crossclass.null_ is None
        if not todo and not cross:
            return
        with Progress(console=console, disable=not show_progress) as progress:
            task = progress.add_task(f"calibrating on resampled reference windows ({self.detector.n_resamples} per test)",
                                     total=len(todo) + cross)
            for c, size in todo:
                self.detector.null_model(c, size)
                progress.advance(task)
            if cross:
                self.crossclass.calibrate()
                progress.advance(task)
        self._save_calibration()

    def _save_calibration(self) -> None:
        calibration = self.detector.calibration_to_dict()
        if self.crossclass is not None and self.crossclass.null_ is not None:
            calibration["cross_class"] = self.crossclass.calibration_to_dict()
        _atomic_json(self.state_dir / CALIBRATION_FILE, calibration)

    # reading -------------------------------------------------------------------------------------------------------
    def _windows(self, follow: bool):
        """Yield complete windows from the sink; in ``follow`` mode poll until :attr:`stop` is set."""
        while not self.stop.is_set():
            if follow:
                seal_stale(self.sink, self.reference.model, self.seal_after_seconds)
            reader = ShardReader(self.sink, self.reference.model, self.reference.version)
            last = self._read_to
            for position, record in reader.read(self._read_to):
                if self.window_seconds and self._buffer and record.timestamp - self._buffer[0].timestamp >= self.window_seconds:
                    yield self._take(last, "time")
                self._read_to = last = position
                reason = self._unusable(record)
                if reason:
                    self.metrics.records_skipped.labels(**self.metrics.labels, reason=reason).inc()
                    continue
                self._buffer.append(record)
                if len(self._buffer) >= self.window_size:
                    yield self._take(position, "count")
                if self.stop.is_set():
                    return
            self._read_to = Position.of(reader.position)  # past skipped bytes too
            self._count_reader(reader)
            if follow and self.window_seconds:
                if self._buffer and time.time() - self._buffer[0].timestamp >= self.window_seconds:
                    yield self._take(self._read_to, "idle")
                elif not self._buffer and self._read_to != self.committed and time.time() - self._committed_at >= self.window_seconds:
                    yield self._take(self._read_to, "idle")  # only unusable records came: an empty window moves the position on
            if not follow:
                return
            self.stop.wait(1.0)

    def _count_reader(self, reader: ShardReader) -> None:
        stats = reader.stats
        for reason, count in (("torn", stats.torn_records), ("corrupt", stats.corrupt_records),
                              ("other_version", stats.other_version_records), ("missing_shard", stats.missing_shards)):
            if count:
                self.metrics.records_skipped.labels(**self.metrics.labels, reason=reason).inc(count)
        self.metrics.other_version_shards.labels(**self.metrics.labels).set(stats.other_version_shards)

    def _unusable(self, record: Record) -> str | None:
        """Why a record cannot be analysed, or None."""
        if record.relevance is None:
            return "no_relevance"
        if tuple(record.relevance.shape[-2:]) != self.reference.map_shape or record.relevance.ndim not in (2, 3):
            return "wrong_shape"
        if not 0 <= record.prediction < len(self.reference.classes):
            return "unknown_class"
        heat = np.asarray(record.relevance, np.float32)
        if not np.isfinite(heat).all():
            return "not_finite"
        if heat.max() == heat.min():
            return "constant_map"
        return None

    def _take(self, end: Position, closed_by: str) -> Window:
        window, self._buffer = Window(self._buffer, Position.of(end), closed_by), []
        return window

    # analysing -----------------------------------------------------------------------------------------------------
    def run(self, follow: bool = True) -> int:
        """Analyse windows until stopped (or the sink is exhausted, without ``follow``); returns how many."""
        done = 0
        for window in self._windows(follow):
            self.analyse(window)
            done += 1
        return done

    def analyse(self, window: Window) -> list[ClassDrift]:
        started = time.perf_counter()
        m, labels, classes = self.metrics, self.metrics.labels, self.reference.classes
        records = window.records
        carried = self.carry.records
        results: list[ClassDrift] = []
        cross: CrossClassDrift | None = None
        known_all: tuple[float, bool] | None = None
        pages = []
        if not records:
            m.windows_empty.labels(**labels).inc()
        else:
            # the per-class test sees the carried samples first, then the window's; the whole-window tests the window's
            tested = carried + records
            fresh = np.arange(len(tested)) >= len(carried)
            raw = np.stack([np.asarray(r.relevance, np.float32).reshape(self.reference.map_shape) for r in tested])
            predictions = np.array([r.prediction for r in tested])
            scores = np.array([np.nan if r.score is None else r.score for r in tested])
            known = len(self.detector.null_)
            results = self.detector.analyse(preprocess(raw, self.reference.pooling), predictions,
                                            None if np.isnan(scores).all() else scores, seed=self.window_index, fresh=fresh)
            cross = self._analyse_across_classes(records, scores[fresh])
            known_all = self._known_artifact(scores[fresh])
            if len(self.detector.null_) != known:
                self._save_calibration()
            alerting = [r for r in results if r.alert]
            title = f"unhans monitor: {self.reference.model} {self.reference.version}, window {self.window_index}"
            thumbnails, ids = [r.thumbnail for r in tested], [r.request_id for r in tested]
            if alerting:
                means = {r.class_index: self._reference_mean(r.class_index) for r in alerting}
                pages.append(write_evidence(self.evidence_root, self.window_index, title, classes, alerting, raw, thumbnails, ids, means))
            if cross is not None and cross.alert:
                since = self.window_index if self.alert_since is None else self.alert_since
                offset = len(carried)  # the cross-class test's rows count from the window's first record
                pages.append(write_crossclass_evidence(self.evidence_root, self.window_index, title, ALL_CLASSES, classes, cross,
                                                       raw[offset:], thumbnails[offset:], ids[offset:], predictions[offset:], since,
                                                       records[0].timestamp))
            self._export(results, cross, known_all)
        self.alert_since = (self.window_index if self.alert_since is None else self.alert_since) if cross is not None and cross.alert else None
        seconds = time.perf_counter() - started
        if self.carry_windows:
            analysed = {r.class_index for r in results if not r.skipped}
            self.carry = self.carry.update(self.window_index, records, analysed, self.detector.testable, self.carry_windows,
                                           self.max_carried)
        self._commit(window, results, cross, known_all is not None and known_all[1], pages[-1] if pages else None, seconds, len(carried))
        m.windows.labels(**labels).inc()
        m.samples.labels(**labels).inc(len(records))
        m.duration.labels(**labels).observe(seconds)
        m.last_window.labels(**labels).set(time.time())
        alerts = [f"class {classes[r.class_index]} (drift {r.drift_score:.1f} > {r.threshold:.1f})" for r in results if r.alert]
        if cross is not None and cross.alert:
            alerts.append(f"across classes (drift {cross.drift_score:.1f} > {cross.threshold:.1f})")
        known = [f"class {classes[r.class_index]} ({r.artifact_share:.0%} flagged)" for r in results if r.artifact_alert]
        if known_all is not None and known_all[1]:
            known.append(f"all classes ({known_all[0]:.0%} flagged)")
        known = ", ".join(known)
        console.print(f"window {self.window_index - 1}: {len(records)} records ({window.closed_by}), {seconds:.1f} s"
                      + (f"; [bold red]new strategy[/]: {', '.join(alerts)} -> {pages[-1]}" if alerts else "; no new strategy")
                      + (f"; [yellow]known artifact[/]: {known}" if known else ""), soft_wrap=True)
        return results

    def _known_artifact(self, scores: np.ndarray) -> tuple[float, bool] | None:
        """The known artifact's share in the whole window and whether it exceeds the reference's beyond chance (a
        1,000-class model's traffic is too thin per class for the per-class warning)."""
        if np.isnan(scores).all() or self.reference.scores is None:
            return None
        share, _, alert = known_artifact_share(scores, self.reference.scores, self.detector.false_alarm_rate)
        return share, alert

    def _analyse_across_classes(self, records: list[Record], scores: np.ndarray) -> CrossClassDrift | None:
        """The cross-class test on the window's records that carry relevance at the monitor layer and that the known
        artifact's detector does not flag; records without it are counted."""
        if self.crossclass is None:
            return None
        width = self.reference.latent.shape[1]
        usable = np.array([r.latent is not None and np.size(r.latent) == width and np.isfinite(r.latent).all() for r in records])
        missing = int((~usable).sum())
        if missing:
            self.metrics.records_skipped.labels(**self.metrics.labels, reason="no_latent").inc(missing)
        tested = np.flatnonzero(usable & ~(scores > 0))
        latent = np.stack([np.asarray(records[i].latent, np.float32).ravel() for i in tested]) if len(tested) else np.zeros((0, width))
        return self.crossclass.analyse(describe(latent), tested)

    def _reference_mean(self, class_index: int) -> np.ndarray:
        """The reference's mean map of a class at the pooled resolution, scaled back up to the raw map size."""
        pooling = self.reference.pooling
        mean = self.reference.features[self.reference.pool(class_index)].mean(axis=0).reshape(self.detector.pooled_shape_)
        height, width = self.reference.map_shape
        return np.kron(mean, np.ones((pooling, pooling)))[:height, :width] / pooling**2

    def _export(self, results: list[ClassDrift], cross: CrossClassDrift | None, known_all: tuple[float, bool] | None) -> None:
        m = self.metrics
        for result in results:
            name = self.reference.classes[result.class_index]
            m.of_class(m.class_samples, name).set(result.n)
            if result.artifact_share is not None:
                m.of_class(m.artifact_share, name).set(result.artifact_share)
                m.of_class(m.alert, name, kind="known_artifact").set(int(result.artifact_alert))
            if result.skipped:
                if result.n:
                    reason = "reference_too_small" if "reference" in result.skipped else "too_few_samples"
                    m.of_class(m.classes_skipped, name, reason=reason).inc()
                continue  # the class keeps its last verdict: too little evidence either way
            m.of_class(m.eigengap, name).set(result.statistics["eigengap"])
            m.of_class(m.fisher_tau, name).set(result.statistics["fisher_tau"])
            m.of_class(m.concentration, name).set(result.statistics["concentration"])
            m.of_class(m.distance, name).set(result.statistics["distance"])
            m.of_class(m.drift_score, name).set(result.drift_score)
            m.of_class(m.drift_threshold, name).set(result.threshold)
            m.of_class(m.alert, name, kind="new_strategy").set(int(result.alert))
        if known_all is not None:
            m.of_class(m.artifact_share, ALL_CLASSES).set(known_all[0])
            m.of_class(m.alert, ALL_CLASSES, kind="known_artifact").set(int(known_all[1]))
        if cross is None:
            return
        m.of_class(m.class_samples, ALL_CLASSES).set(len(cross.rows))
        if cross.skipped:
            m.of_class(m.classes_skipped, ALL_CLASSES, reason="too_few_samples").inc()
            return
        for statistic, value in cross.statistics.items():
            m.crossclass.labels(**m.labels, statistic=statistic).set(value)
        m.of_class(m.drift_score, ALL_CLASSES).set(cross.drift_score)
        m.of_class(m.drift_threshold, ALL_CLASSES).set(cross.threshold)
        m.of_class(m.alert, ALL_CLASSES, kind="new_strategy").set(int(cross.alert))

    def _commit(self, window: Window, results: list[ClassDrift], cross: CrossClassDrift | None, known_all: bool,
                page: Path | None, seconds: float, carried: int) -> None:
        entry = {"index": self.window_index, "closed_by": window.closed_by, "n": len(window.records), "seconds": round(seconds, 3),
                 "first_timestamp": window.records[0].timestamp if window.records else None,
                 "alerts": [self.reference.classes[r.class_index] for r in results if r.alert] + ([ALL_CLASSES] if cross and cross.alert else []),
                 "known_artifact_alerts": [self.reference.classes[r.class_index] for r in results if r.artifact_alert]
                                          + ([ALL_CLASSES] if known_all else []),
                 "evidence": None if page is None else str(page.relative_to(self.state_dir)),
                 "classes": [r.summary() for r in results], "cross_class": None if cross is None else cross.summary(),
                 "analysed": self._analysed(results, cross, carried), "carried": carried,
                 "request_ids": [r.request_id for r in window.records],
                 "end": window.end.to_dict()}
        with open(self.state_dir / LEDGER_FILE, "a") as ledger:
            ledger.write(json.dumps(entry, separators=(",", ":")) + "\n")
            ledger.flush()
            os.fsync(ledger.fileno())
        self.window_index += 1
        self.committed, self._committed_at = window.end, time.time()
        carry = self.carry.save(self.state_dir, self.window_index)
        _atomic_json(self.state_dir / STATE_FILE, {"window_index": self.window_index, "position": window.end.to_dict(),
                                                   "reference": self.detector.reference_fingerprint_,
                                                   "crossclass_alert_since": self.alert_since, "carry": carry})
        remove_stale(self.state_dir, carry)

    def _analysed(self, results: list[ClassDrift], cross: CrossClassDrift | None, carried: int) -> int:
        """How many of the window's records entered some test (the cross-class one, or their class's SpRAy, whose
        rows count the ``carried`` samples first)."""
        rows = {int(i) - carried for r in results if not r.skipped for i in r.analysed if i >= carried}
        if cross is not None and not cross.skipped:
            rows.update(int(i) for i in cross.rows)
        return len(rows)


def run_monitor(state_dir: str | Path, sink: str, detector: DriftDetector, window_size: int, window_seconds: float | None,
                host: str, port: int | None, follow: bool, carry_windows: int = CARRY_WINDOWS) -> int:
    """The command: calibrate, serve metrics and evidence, analyse until SIGTERM/SIGINT (or the sink is exhausted)."""
    monitor = Monitor(state_dir, sink, detector, window_size, window_seconds, carry_windows=carry_windows)
    server = None
    if port is not None:
        server = serve(monitor.metrics, monitor.evidence_root, host, port)
        console.print(f"metrics on http://{host}:{server.server_port}/metrics, evidence under http://{host}:{server.server_port}/evidence/")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: monitor.stop.set())
    try:
        monitor.calibrate()
        done = monitor.run(follow=follow)
    finally:
        if server is not None:
            server.shutdown()
    return done
