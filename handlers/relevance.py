"""Relevance of the served model and the sampling of traffic for the monitor, both off TorchServe's plumbing.

:class:`Explainer` answers with the relevance of the model that predicts: the archive's explain graph
(onnxruntime, ``unhans export --explain``) when it has one, else the PyTorch twin through zennit with hooks kept.
An explain graph exported with the correction's detector also gives the artifact score, so an explained instance
needs no run of the prediction graph.
:class:`Sampler` records a fraction of served instances off the request path: a bounded queue, drained by one
thread that computes relevance for the sampled instances in batches and appends them to the sink; when the queue
is full, instances are dropped and counted rather than slowing requests down. What it accepts is journaled before
the answer leaves, so a killed worker loses none of it: the next worker on the host records it.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from unhans.core.attribution import LRP
from unhans.core.errors import InputError
from unhans.core.serving import DEFAULT_CPU_BUDGET, FILES
from unhans.core.layers import insert_after
from unhans.core.models import load_model
from unhans.export.correction import load_correction
from unhans.export.graph import SCORE_OUTPUT
from unhans.export.onnx import META
from unhans.export.runtime import session

from .sink import Journal, Record, ShardReader, ShardWriter, claim_journal, orphaned_journals, read_journal, seal_stale

logger = logging.getLogger(__name__)
RECOVER_EVERY_S = 10.0  # how often a sampler looks for journals of dead writers on its host
THUMBNAIL_SIDE = 16  # the monitor's evidence pages show what was served, small
# DEFAULT_CPU_BUDGET, the share of one core a worker's sampler may use: on a saturated 2-core machine
# (bench/serving.py) the sampled worker spent 4.6-5.7% more CPU per request at 0.02, 2.8-3.9% at 0.01. At 0.01 the
# VGG explain graph still records about 3.5 relevance maps a second per worker (12,000 an hour) for the monitor.


class Explainer:
    """``explainer(inputs, targets) -> (logits, relevance, scores)``, ``scores`` the artifact detector's where
    :attr:`scores` says the explainer has them, else None; thread-safe (one call at a time)."""

    @staticmethod
    def available(model_dir: str) -> bool:
        """Whether an archive can explain at all: an explain graph, or a PyTorch twin (model.py beside its graph)."""
        return os.path.isfile(os.path.join(model_dir, FILES.explain)) or os.path.isfile(os.path.join(model_dir, FILES.model))

    def __init__(self, model_dir: str, composite: str = "epsilon_plus_flat", threads: int = 1):
        self._lock = threading.Lock()
        explain = os.path.join(model_dir, FILES.explain)
        self.scores = False
        if os.path.isfile(explain):
            self.kind = "onnx explain graph"
            self._graph = session(explain, threads=threads)
            self._outputs = ["logits", "relevance"] + [o.name for o in self._graph.get_outputs() if o.name == SCORE_OUTPUT]
            self.scores = SCORE_OUTPUT in self._outputs
            self._lrp = None
            recorded = self._graph.get_modelmeta().custom_metadata_map.get(f"{META}verify.conservation_rel_err")
            self._conservation = (f"relevance conservation error {recorded} (bias-free, measured at export)" if recorded
                                  else "relevance conservation not recorded in this explain graph (exported before it was measured)")
        else:
            self.kind = "zennit on the PyTorch twin"
            correction, layer = load_correction(os.path.join(model_dir, FILES.correction))
            model = load_model(os.path.join(model_dir, FILES.model), os.path.join(model_dir, FILES.weights))
            self._lrp = LRP(insert_after(model, layer, correction.module()), composite)

    @property
    def conservation(self) -> str:
        """How conservative the served relevance is, for the start-up log (the PyTorch twin measures it on its first
        batch, and refuses a model that is not)."""
        if self._lrp is None:
            return self._conservation
        return self._lrp.conservation.describe() if self._lrp.conservation else "relevance conservation not yet measured"

    def __call__(self, inputs: np.ndarray, targets: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Logits, relevance and scores of ``inputs``; no targets explain the predicted classes, and so does a negative
        target on the explain graph (the PyTorch twin takes classes only)."""
        with self._lock:
            if self._lrp is not None:
                explanation = self._lrp(torch.from_numpy(inputs), targets)
                return explanation.logits, explanation.relevance, None
            target = np.full(len(inputs), -1, np.int64) if targets is None else np.asarray(targets, np.int64)
            logits, relevance, *scores = self._graph.run(self._outputs, {"input": inputs, "target": target})
        if target.size and target.max() >= logits.shape[1]:  # the graph would explain no class: a zero map
            raise InputError("target", f"class {int(target.max())} is out of range", f"use 0-{logits.shape[1] - 1}")
        return logits, relevance, scores[0] if scores else None


@dataclass
class _Pending:
    image: np.ndarray
    prediction: int
    probabilities: list[float]
    score: float | None
    timestamp: float
    request_id: str
    generation: int = -1  # its journal generation (-1: not journaled)


class Sampler:
    """Record the served instances :meth:`pick` chooses (each with probability ``fraction``), with their relevance for
    the predicted class, to ``writer``.

    ``cpu_budget`` caps the share of one core the sampler may use: after each batch it rests for as long as keeps
    its CPU time (its explainer runs single-threaded on its own thread) at that share of wall time. Relevance costs
    a few forward passes, so under a saturating load an unbounded sampler would take that much throughput from
    requests; bounded, it falls behind instead, its queue fills, and what it drops is counted. 1.0 means no cap.
    """

    def __init__(self, writer: ShardWriter, explainer: Explainer, fraction: float, model: str, version: str,
                 queue_size: int = 1024, batch: int = 32, cpu_budget: float = DEFAULT_CPU_BUDGET, journal: Journal | None = None):
        if not 0.0 < cpu_budget <= 1.0:
            raise ValueError(f"cpu_budget {cpu_budget} is outside (0, 1]: give the share of one core sampling may use")
        self.cpu_budget = cpu_budget
        self.writer, self.explainer, self.fraction, self.journal = writer, explainer, fraction, journal
        self.model, self.version, self.batch = model, version, batch
        self._queue: queue.Queue[_Pending] = queue.Queue(queue_size)
        self._rng = np.random.default_rng()
        self._counts = {"sampled": 0, "dropped": 0, "errors": 0, "recovered": 0}
        self._counts_lock = threading.Lock()
        threading.Thread(target=self._drain, name="unhans-sampler", daemon=True).start()

    def pick(self, n: int) -> np.ndarray:
        """Which of ``n`` served instances to record: each with probability ``fraction`` (the request path asks first,
        so the many batches with nothing picked cost one random draw)."""
        return np.flatnonzero(self._rng.random(n) < self.fraction)

    def offer(self, inputs: np.ndarray, predicted: np.ndarray, probabilities: np.ndarray, scores, request_ids: list[str]) -> None:
        """Queue picked instances (one request id each) for recording, journaled first; called on the request path
        (one thread: the handler's), never blocks and never raises: what it cannot take is counted."""
        dropped = errors = 0
        for k in range(len(inputs)):
            if self._queue.full():  # only this thread adds: a free slot stays free until the put
                dropped += 1
                continue
            item = _Pending(inputs[k].copy(), int(predicted[k]), probabilities[k].tolist(),
                            None if scores is None else float(scores[k]), time.time(), request_ids[k])
            if self.journal is not None:
                try:
                    item.generation = self.journal.append(_record(item, self.model, self.version, journaled=True))
                except OSError as error:
                    logger.warning("unhans: the sampler's journal failed (%s): this instance is recorded unjournaled", error)
                    errors += 1
            self._queue.put_nowait(item)
        if dropped:
            self._count("dropped", dropped)
        if errors:
            self._count("errors", errors)

    def take_counts(self) -> dict[str, int]:
        """Counts since the last call (the handler turns them into metrics on the request path)."""
        with self._counts_lock:
            counts, self._counts = self._counts, {k: 0 for k in self._counts}
        return counts

    def _count(self, key: str, n: int) -> None:
        with self._counts_lock:
            self._counts[key] += n

    def _drain(self) -> None:
        recover_due = 0.0
        while True:
            if time.monotonic() >= recover_due:  # a writer on this host may die at any time, not only before we start
                self._recover()
                recover_due = time.monotonic() + RECOVER_EVERY_S
            items = []
            try:
                items.append(self._queue.get(timeout=0.5))
                while len(items) < self.batch:
                    items.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            try:
                if items:
                    started = time.thread_time()
                    self._write(items)
                    if self.journal is not None:  # durable in the shard: the journal before this batch may go
                        self.writer.flush()
                        self.journal.release(items[-1].generation)
                    time.sleep((time.thread_time() - started) * (1.0 / self.cpu_budget - 1.0))  # stay within the budget
                self.writer.poll()  # time-based flush and rotation happen here even when traffic stops
            except Exception as error:  # the sampler must outlive any failure; losses are counted
                logger.warning("unhans: sampling failed (%s)", error)
                self._count("errors", len(items))

    def _recover(self) -> None:
        """Record what workers on this host journaled and did not record before they died (killed, crashed)."""
        if self.journal is None:
            return
        url, model, version = self.writer.url, self.model, self.version
        for writer_id, found in orphaned_journals(url, model, version).items():
            paths = [claimed for path in found if (claimed := claim_journal(path, self.writer.writer_id))]
            if not paths:
                continue
            try:
                seal_stale(url, model, float("inf"))  # their open shards are final: closed at once, for the monitor too
                recorded = {(r.request_id, r.timestamp) for _, r in ShardReader(url, model, version, writer_id=writer_id).read()}
                lost = [r for path in paths for r in read_journal(path) if (r.request_id, r.timestamp) not in recorded]
                for start in range(0, len(lost), self.batch):
                    self._write([_Pending(r.input, r.prediction, r.probabilities, r.score, r.timestamp, r.request_id)
                                 for r in lost[start:start + self.batch]])
                self.writer.flush()
                for path in paths:
                    os.remove(path)
                self._count("recovered", len(lost))
                logger.info("unhans: recorded %d sampled instances that writer %s had journaled and not recorded", len(lost), writer_id)
            except Exception as error:  # a bad journal must not stop sampling; it stays for a look
                logger.warning("unhans: could not recover the journal of writer %s (%s)", writer_id, error)

    def _write(self, items: list[_Pending]) -> None:
        images = np.stack([item.image for item in items])
        targets = np.array([item.prediction for item in items])
        _, relevance, _ = self.explainer(images, targets)
        for item, heat in zip(items, relevance):
            self.writer.append(_record(item, self.model, self.version, relevance=heat.sum(axis=0)))
        self._count("sampled", len(items))


def _record(item: _Pending, model: str, version: str, relevance: np.ndarray | None = None, journaled: bool = False) -> Record:
    """The sink's record of a sampled instance: with its relevance for a shard, with its model input for the journal."""
    return Record(prediction=item.prediction, target=item.prediction, probabilities=item.probabilities, relevance=relevance,
                  thumbnail=thumbnail(item.image), score=item.score, timestamp=item.timestamp, model=model, version=version,
                  request_id=item.request_id, input=item.image if journaled else None)


def thumbnail(image: np.ndarray) -> np.ndarray:
    """A small uint8 (H, W, C) copy of an input for evidence pages (inputs are assumed scaled to [0, 1])."""
    from PIL import Image

    pixels = (np.clip(image.transpose(1, 2, 0), 0, 1) * 255).astype(np.uint8)
    picture = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
    picture.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    return np.asarray(picture).reshape(picture.height, picture.width, -1)
