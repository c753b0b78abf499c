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
from unhans.core.serving import DEFAULT_CPU_BUDGET, FILES, ServingConfig
from unhans.core.layers import insert_after
from unhans.core.models import load_model
from unhans.export.correction import load_correction
from unhans.export.graph import LAYER_OUTPUT, SCORE_OUTPUT
from unhans.export.onnx import META
from unhans.export.runtime import session

from .sink import Journal, Record, ShardReader, ShardWriter, claim_journal, orphaned_journals, read_journal, seal_stale

logger = logging.getLogger(__name__)
RECOVER_EVERY_S = 10.0  # how often a sampler looks for journals of dead writers on its host
THUMBNAIL_SIDE = 64  # the monitor's evidence pages show what was served, small (a 28-px digit stays 28 px)
MAX_PENDING_BYTES = 64 << 20  # model inputs waiting for their relevance (and in the journal), per worker
BATCH_INPUT_BYTES = 4 << 20  # model inputs explained together by the sampler (6 photos at 224 px, 32 MNIST digits)
BEHIND_WARNING_S = 60.0  # at most one "sampling cannot keep up" warning a minute
# DEFAULT_CPU_BUDGET, the share of one core a worker's sampler may use: on a saturated 2-core machine
# (bench/serving.py) the sampled worker spent 4.6-5.7% more CPU per request at 0.02, 2.8-3.9% at 0.01. At 0.01 the
# VGG explain graph still records about 3.5 relevance maps a second per worker (12,000 an hour) for the monitor.


class Explainer:
    """``explainer(inputs, targets) -> (logits, relevance, scores)``, ``scores`` the artifact detector's where
    :attr:`scores` says the explainer has them, else None; thread-safe (one call at a time).

    :meth:`with_latent` also gives the relevance at the archive's monitor layer (``ServingConfig.monitor_layer``)
    summed over positions, per channel: what sampled records carry for the monitor. :attr:`monitor_layer` is None
    where the explainer cannot give it (an explain graph exported without that layer)."""

    @staticmethod
    def available(model_dir: str) -> bool:
        """Whether an archive can explain at all: an explain graph, or a PyTorch twin (model.py beside its graph)."""
        return os.path.isfile(os.path.join(model_dir, FILES.explain)) or os.path.isfile(os.path.join(model_dir, FILES.model))

    def __init__(self, model_dir: str, composite: str = "epsilon_plus_flat", threads: int = 1):
        self._lock = threading.Lock()
        explain = os.path.join(model_dir, FILES.explain)
        config = os.path.join(model_dir, FILES.config)
        wanted = ServingConfig.from_yaml(config).monitor_layer if os.path.isfile(config) else None
        self.scores = False
        if os.path.isfile(explain):
            self.kind = "onnx explain graph"
            self._graph = session(explain, threads=threads)
            names = [o.name for o in self._graph.get_outputs()]
            metadata = self._graph.get_modelmeta().custom_metadata_map
            self.monitor_layer = wanted if wanted and metadata.get(f"{META}explain.layer") == wanted and LAYER_OUTPUT in names else None
            if wanted and self.monitor_layer is None:
                logger.warning("unhans: the explain graph has no relevance at the monitor layer %s: sampled records carry no "
                               "latent relevance (export with --explain again)", wanted)
            self._outputs = ["logits", "relevance"] + [n for n in names if n == SCORE_OUTPUT]
            self.scores = SCORE_OUTPUT in self._outputs
            self._lrp = None
            recorded = metadata.get(f"{META}verify.conservation_rel_err")
            self._conservation = (f"relevance conservation error {recorded} (bias-free, measured at export)" if recorded
                                  else "relevance conservation not recorded in this explain graph (exported before it was measured)")
        else:
            self.kind = "zennit on the PyTorch twin"
            model = load_model(os.path.join(model_dir, FILES.model), os.path.join(model_dir, FILES.weights))
            spec = os.path.join(model_dir, FILES.correction)
            if os.path.isfile(spec):  # an archive without a correction (watched before it is patched) has none
                correction, layer = load_correction(spec)
                model = insert_after(model, layer, correction.module())
            self.monitor_layer = wanted
            self._lrp = LRP(model, composite, layers=(wanted,) if wanted else ())

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
        return self._explain(inputs, targets, latent=False)[:3]

    def with_latent(self, inputs: np.ndarray, targets: np.ndarray | None = None):
        """As a call, plus the relevance at :attr:`monitor_layer` summed over positions, (N, C) (None without one)."""
        return self._explain(inputs, targets, latent=self.monitor_layer is not None)

    def _explain(self, inputs: np.ndarray, targets, latent: bool):
        with self._lock:
            if self._lrp is not None:
                explanation = self._lrp(torch.from_numpy(inputs), targets)
                layer = explanation.layer_relevance.get(self.monitor_layer) if latent else None
                return explanation.logits, explanation.relevance, None, _per_channel(layer)
            target = np.full(len(inputs), -1, np.int64) if targets is None else np.asarray(targets, np.int64)
            outputs = self._outputs + ([LAYER_OUTPUT] if latent else [])
            logits, relevance, *rest = self._graph.run(outputs, {"input": inputs, "target": target})
        if target.size and target.max() >= logits.shape[1]:  # the graph would explain no class: a zero map
            raise InputError("target", f"class {int(target.max())} is out of range", f"use 0-{logits.shape[1] - 1}")
        scores = rest[0] if self.scores else None
        return logits, relevance, scores, _per_channel(rest[-1]) if latent else None


def _per_channel(layer: np.ndarray | None) -> np.ndarray | None:
    """Relevance at a layer summed over its positions: (N, C) from (N, C, H, W) (or (N, C) as it is)."""
    if layer is None:
        return None
    return layer.reshape(len(layer), layer.shape[1], -1).sum(axis=2).astype(np.float32)


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
                 queue_size: int = 1024, batch: int = 32, cpu_budget: float = DEFAULT_CPU_BUDGET, journal: Journal | None = None,
                 max_pending_bytes: int = MAX_PENDING_BYTES, pixels=None):
        if not 0.0 < cpu_budget <= 1.0:
            raise ValueError(f"cpu_budget {cpu_budget} is outside (0, 1]: give the share of one core sampling may use")
        self.cpu_budget = cpu_budget
        self.writer, self.explainer, self.fraction, self.journal = writer, explainer, fraction, journal
        self.model, self.version, self.batch, self.max_pending_bytes = model, version, batch, max_pending_bytes
        self.pixels = pixels  # model input -> [0, 1] pixels for thumbnails (the archive's contract.denormalise)
        self._queue: queue.Queue[_Pending] = queue.Queue(queue_size)
        self._rng = np.random.default_rng()
        self._counts = {"sampled": 0, "dropped": 0, "errors": 0, "recovered": 0}
        self._counts_lock = threading.Lock()
        self._behind = {"dropped": 0, "offered": 0, "since": time.monotonic()}  # for the warning that sampling cannot keep up
        self._cpu_per_instance = 0.0  # seconds of CPU one recorded instance costs (moving average)
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
            # only this thread adds: a free slot stays free until the put; pending inputs are bounded in bytes too (a
            # 224-px photo is 0.6 MB as float32: a queue of 1,024 would hold 600 MB, in memory and in the journal)
            if self._queue.full() or (self._queue.qsize() + 1) * inputs[k].nbytes > self.max_pending_bytes:
                dropped += 1
                continue
            item = _Pending(inputs[k].copy(), int(predicted[k]), probabilities[k].tolist(),
                            None if scores is None else float(scores[k]), time.time(), request_ids[k])
            if self.journal is not None:
                try:
                    item.generation = self.journal.append(_record(item, self.model, self.version, journaled=True, pixels=self.pixels))
                except OSError as error:
                    logger.warning("unhans: the sampler's journal failed (%s): this instance is recorded unjournaled", error)
                    errors += 1
            self._queue.put_nowait(item)
        if dropped:
            self._count("dropped", dropped)
        if errors:
            self._count("errors", errors)
        self._warn_if_behind(len(inputs), dropped)

    def _warn_if_behind(self, offered: int, dropped: int) -> None:
        """Say, at most once a minute, that sampling cannot keep up, with what one instance costs and what would help."""
        behind = self._behind
        behind["offered"] += offered
        behind["dropped"] += dropped
        if time.monotonic() - behind["since"] < BEHIND_WARNING_S:
            return
        if behind["dropped"]:
            cost = self._cpu_per_instance
            rate = f"about {self.cpu_budget / cost:.2g} instances a second" if cost else "too few to measure yet"
            logger.warning("unhans: sampling cannot keep up: %d of %d picked instances dropped in the last %.0f s; relevance "
                           "costs %.0f ms of CPU an instance and the budget of %.2g of a core allows %s: raise "
                           "sample_cpu_budget (unhans archive --sample-cpu-budget) or lower --sample-fraction",
                           behind["dropped"], behind["offered"], time.monotonic() - behind["since"], 1000 * cost,
                           self.cpu_budget, rate)
        self._behind = {"dropped": 0, "offered": 0, "since": time.monotonic()}

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
                # LRP keeps every activation of a batch (Lite0 at 224 px: about 100 MB an image): large inputs go fewer at a time
                batch = max(1, min(self.batch, BATCH_INPUT_BYTES // items[0].image.nbytes))
                while len(items) < batch:
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
                    spent = time.thread_time() - started
                    self._cpu_per_instance = 0.8 * self._cpu_per_instance + 0.2 * spent / len(items) if self._cpu_per_instance else spent / len(items)
                    time.sleep(spent * (1.0 / self.cpu_budget - 1.0))  # stay within the budget
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
        _, relevance, _, latent = self.explainer.with_latent(images, targets)
        for k, (item, heat) in enumerate(zip(items, relevance)):
            self.writer.append(_record(item, self.model, self.version, relevance=heat.sum(axis=0),
                                       latent=None if latent is None else latent[k], pixels=self.pixels))
        self._count("sampled", len(items))


def _record(item: _Pending, model: str, version: str, relevance: np.ndarray | None = None, journaled: bool = False,
            latent: np.ndarray | None = None, pixels=None) -> Record:
    """The sink's record of a sampled instance: with its relevance for a shard, with its model input for the journal."""
    picture = item.image if pixels is None else pixels(item.image[None])[0]
    return Record(prediction=item.prediction, target=item.prediction, probabilities=item.probabilities, relevance=relevance,
                  thumbnail=thumbnail(picture), score=item.score, timestamp=item.timestamp, model=model, version=version,
                  request_id=item.request_id, input=item.image if journaled else None, latent=latent)


def thumbnail(image: np.ndarray) -> np.ndarray:
    """A small uint8 (H, W, C) copy of an input for evidence pages (inputs are assumed scaled to [0, 1])."""
    from PIL import Image

    pixels = (np.clip(image.transpose(1, 2, 0), 0, 1) * 255).astype(np.uint8)
    picture = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
    picture.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    return np.asarray(picture).reshape(picture.height, picture.width, -1)
