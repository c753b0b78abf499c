"""The serving core: an archive's model answering requests, whichever server runs it.

:class:`Service` loads an unpacked archive (its :class:`~unhans.core.serving.ServingConfig`, the corrected ONNX graph,
what explains it, the sampler) and answers a batch of :class:`Row`\\ s, one :class:`Answer` each. Predictions and the
artifact detector's score come from onnxruntime (CPU unless a GPU is really there, explicit threads, no spinning).
Relevance comes from the archive's explain graph when it has one, else from the PyTorch twin (the model with the same
correction inserted) through zennit, so the explanation is that of the model that predicted; it is computed once per
batch, for every instance of it that asked. An explain graph that also scores the artifact answers its instances
alone: they skip the prediction graph. At start the service checks that both runtimes agree and refuses to start if
they do not.

Every row is answered on its own: a client mistake is its JSON 4xx naming the field, a fault of ours its JSON 500
(logged, counted), and neither touches the other rows. The adapters (``unhans_handler`` for TorchServe,
``kserve_model`` for KServe) only turn their server's requests into rows and answers back, and report the metrics
this core emits through the ``metric`` callback.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from unhans.core.serving import FILES, ServingConfig, class_names, manifest
from unhans.export.graph import SCORE_OUTPUT
from unhans.export.onnx import TOLERANCE
from unhans.export.runtime import session
from unhans.handlers.relevance import Explainer, Sampler
from unhans.handlers.requests import V2_BINARY_HEADER, Request, RequestError, encode_relevance, parse
from unhans.handlers.sink import Journal, ShardWriter

logger = logging.getLogger(__name__)
PROBE_ROWS = 8
COUNTS_INTERVAL_S = 1.0  # how often the sampler's counts become metrics


@dataclass
class Row:
    """One request as a server hands it over: its body (bytes, text, or JSON the server already decoded), its headers
    (names lower-cased), its request id, and whether its endpoint asks for relevance."""

    body: Any
    request_id: str = ""
    explain: bool = False
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Answer:
    """One request's answer: HTTP status and JSON body (``{"error": {...}}`` unless 200)."""

    status: int
    body: dict | list
    binary: tuple[str, ...] = ()  # v2 output tensors the client asked for as raw bytes: the adapter encodes them

    @property
    def problem(self) -> str | None:
        return self.body["error"]["problem"] if self.status != 200 else None


def _no_metric(name: str, value: float, **labels) -> None:
    pass


class Service:
    """An archive's model, answering batches of rows: ``Service(folder).answer(rows) -> answers``.

    ``lanes`` explainers are loaded, one per thread that may answer at the same time (``answer(..., lane=k)``): an
    explainer takes one call at a time, so a lane of large requests with its own keeps small ones from waiting on it.
    Inference runs in chunks of the archive's ``batch_size`` instances, which bounds the memory a large request takes."""

    def __init__(self, folder: str | Path, metric: Callable[..., None] = _no_metric, lanes: int = 1):
        folder = str(folder)
        self.metric, self.config = metric, ServingConfig.from_yaml(os.path.join(folder, FILES.config))
        model = manifest(folder)
        self.name, self.version = model["modelName"], str(model.get("modelVersion", self.config.version))
        threads = self.config.intra_op_threads
        torch.set_num_threads(threads)
        self.graph = session(os.path.join(folder, model["serializedFile"]), threads=threads)
        self.input_name = self.graph.get_inputs()[0].name
        self.outputs = [o.name for o in self.graph.get_outputs()]
        self.contract = self.config.contract
        self.classes = class_names(folder)
        available = Explainer.available(folder)
        self.explainers = [Explainer(folder, self.config.composite, threads) if available else None for _ in range(lanes)]
        self.explainer = self.explainers[0]
        if self.explainer is None:
            logger.warning("unhans: this archive has no explain graph and no PyTorch twin: relevance requests are refused")
        self.num_classes = self._check_agreement()
        self._start_sampling(folder)

    def _start_sampling(self, folder: str) -> None:
        """Record ``sample.fraction`` of served instances (with relevance, computed if the client did not ask).

        The sampler gets an explainer of its own: sharing the request path's (one call at a time) would make requests
        that ask for relevance wait behind a batch of sampled ones."""
        self.sampler, self._counts_due, sample = None, 0.0, self.config.sample
        self._sampler_lock = threading.Lock()
        if sample.fraction <= 0:
            return
        if self.explainer is None:
            logger.warning("unhans: sampling is off: the monitor needs relevance, and this archive has no explainer")
            return
        url = sample.sink or os.environ.get("UNHANS_SINK") or os.path.join(os.getcwd(), "unhans-sink")
        # restarts reuse hostnames and pids: the start time keeps two live writers from sharing an id
        writer_id = f"{socket.gethostname()}-{os.getpid()}-{int(time.time())}"
        writer = ShardWriter(url, self.name, self.version, writer_id, max_shard_seconds=sample.max_shard_seconds,
                             max_total_bytes=sample.max_total_bytes)
        try:  # what a killed worker had answered and not yet recorded survives in it (local sinks)
            journal = Journal(url, self.name, self.version, writer_id)
        except ValueError:
            journal = None
            logger.warning("unhans: %s is not a local folder: sampled instances are not journaled, a killed worker loses "
                           "those it had not yet recorded", url)
        self.sampler = Sampler(writer, Explainer(folder, self.config.composite, threads=1), sample.fraction, self.name,
                               self.version, cpu_budget=sample.cpu_budget, journal=journal, pixels=self.contract.denormalise)
        logger.info("unhans: sampling %.1f%% of instances to %s as %s", 100 * sample.fraction, url, writer_id)

    def _check_agreement(self) -> int:
        """Refuse to serve if the prediction graph and what explains it disagree on a probe batch; the class count."""
        probe = np.random.default_rng(0).random((PROBE_ROWS, *self.contract.shape), dtype=np.float32)
        probe = self.contract.normalise(probe)
        outputs = dict(zip(self.outputs, self.graph.run(None, {self.input_name: probe})))
        if self.explainer is None:
            return outputs["logits"].shape[1]
        explained_logits, _, explained_scores = self.explainer(probe)
        pairs = [("logits", outputs["logits"], explained_logits)]
        if explained_scores is not None and SCORE_OUTPUT in outputs:  # explained instances take their score from it
            pairs.append((SCORE_OUTPUT, outputs[SCORE_OUTPUT].ravel(), explained_scores))
        for name, served, explained in pairs:
            diff, scale = float(np.abs(served - explained).max()), float(np.abs(explained).max())
            if not diff <= TOLERANCE * max(scale, 1e-12):
                message = (f"unhans: the ONNX graph and its explainer ({self.explainer.kind}) disagree on {name} by {diff:.3g} "
                           f"(max |{name}| {scale:.3g}); refusing to start: rebuild the archive with 'unhans archive'")
                logger.error(message)
                raise RuntimeError(message)
            logger.info("unhans: ONNX graph and %s agree on %s to %.3g on %d probe rows", self.explainer.kind, name, diff, PROBE_ROWS)
        logger.info("unhans: %s: %s", self.explainer.kind, self.explainer.conservation)
        return outputs["logits"].shape[1]

    def read(self, row: Row, parser: Callable[..., Request] = parse) -> Request | Answer:
        """One row parsed into its request, or its answer when it cannot be: a 4xx naming the field, or our 500.
        ``parser``: :func:`~unhans.handlers.requests.parse`, or a function that runs it elsewhere (another process)."""
        try:
            return self._parse(row, parser)
        except RequestError as error:
            return self._reject(error)
        except Exception:
            return self._fault("parsing", row)

    def answer(self, rows: list[Row], read: list[Request | Answer] | None = None, lane: int = 0) -> list[Answer]:
        """One answer per row, in order; a row that fails fails alone. ``read``: the rows already read (:meth:`read`)."""
        read = read if read is not None else [self.read(row) for row in rows]
        answers = [r if isinstance(r, Answer) else None for r in read]
        accepted = [(i, r) for i, r in enumerate(read) if isinstance(r, Request)]
        if accepted:
            self._answer(rows, accepted, answers, self.explainers[lane])
        if self.sampler is not None and time.monotonic() >= self._counts_due:
            self._emit_sampler_counts()
        return answers

    def _parse(self, row: Row, parser: Callable[..., Request] = parse) -> Request:
        request = parser({"body": row.body}, self.contract, explain_header=row.explain, classes=self.num_classes,
                        binary_header_length=row.headers.get(V2_BINARY_HEADER.lower()), topk=self.config.topk)
        if _wants_relevance(request) and self.explainer is None:
            raise RequestError("explain", "this archive serves no relevance (it has no explain graph and no PyTorch twin); "
                               "ask for predictions, or rebuild it with 'unhans archive --model'", 422, reason="no_explainer")
        return request

    def _answer(self, rows: list[Row], accepted: list[tuple[int, Request]], answers: list, explainer) -> None:
        """Predict (and explain) the accepted requests together; if that fails, each one alone, so a fault stays with
        the request that caused it."""
        try:
            self._answer_together(rows, accepted, answers, explainer)
        except Exception:
            if len(accepted) == 1:
                answers[accepted[0][0]] = self._fault("inference", rows[accepted[0][0]])
                return
            for one in accepted:
                self._answer(rows, [one], answers, explainer)

    def _answer_together(self, rows_in: list[Row], accepted: list[tuple[int, Request]], answers: list, explainer) -> None:
        inputs = np.concatenate([self.contract.normalise(r.inputs) for _, r in accepted])
        accepted_by_row = dict(accepted)
        answered, start = [], 0
        for i, request in accepted:
            answered.append((i, request, slice(start, start + len(request.inputs))))
            start += len(request.inputs)
        logits, scores, relevance = self._infer(inputs, [(request, rows) for _, request, rows in answered if _wants_relevance(request)],
                                                explainer)
        k, results = 0, []
        for i, request, rows in answered:
            heat = None
            if _wants_relevance(request):
                heat = relevance[k:k + len(request.inputs)]
                k += len(request.inputs)
            request_scores = None if scores is None else scores[rows]
            results.append((i, rows, self._v2_answer(rows_in[i], request, logits[rows], request_scores, heat) if request.protocol == "v2"
                            else self._unhans_answer(request, logits[rows], request_scores, heat)))
        if self.sampler is not None:
            with self._sampler_lock:  # the sampler takes one thread at a time; lanes answer on several
                self._offer(inputs, logits, scores, [(rows_in[i], rows) for i, rows, _ in results])
        for i, _, answer in results:  # only now: a fault above leaves no request half answered
            answers[i] = Answer(200, answer, accepted_by_row[i].binary_outputs)

    def _unhans_answer(self, request: Request, logits: np.ndarray, scores, relevance) -> dict:
        predictions = self._predictions(request, logits, scores)
        if relevance is not None:
            for prediction, heat in zip(predictions, relevance):
                prediction["relevance"] = encode_relevance(heat, request.format, request.downsample)
        return {"predictions": predictions} if request.many else predictions[0]

    def v2_metadata(self) -> tuple[list[dict], list[dict]]:
        """KServe v2 model metadata: the input tensor taken, and the output tensors answered (-1: any size)."""
        inputs = [{"name": "input", "datatype": "FP32", "shape": [-1, *self.contract.shape]}]
        outputs = [{"name": "probabilities", "datatype": "FP32", "shape": [-1, self.num_classes]},
                   {"name": "label", "datatype": "INT64", "shape": [-1]}]
        if SCORE_OUTPUT in self.outputs:
            outputs.append({"name": "artifact_score", "datatype": "FP32", "shape": [-1]})
        if self.explainer is not None:
            outputs.append({"name": "relevance", "datatype": "FP32", "shape": [-1, -1, -1]})
        return inputs, outputs

    def _v2_answer(self, row: Row, request: Request, logits: np.ndarray, scores, relevance) -> dict:
        """KServe v2 output tensors: probabilities (N, classes), label (N), artifact_score (N), relevance (N, h, w)."""
        n = len(logits)
        tensors = {"probabilities": ("FP32", [n, logits.shape[1]], _softmax(logits)), "label": ("INT64", [n], logits.argmax(1))}
        if scores is not None:
            tensors["artifact_score"] = ("FP32", [n], scores)
            for score in scores:
                self.metric("unhans_artifact_score", float(score))
        if relevance is not None:
            maps = np.stack([np.asarray(encode_relevance(heat, "list", request.downsample), np.float32) for heat in relevance])
            tensors["relevance"] = ("FP32", list(maps.shape), maps)
        names = [name for name in (request.outputs or tensors) if name in tensors]
        return {"model_name": self.name, "model_version": self.version,
                "id": request.id if request.id is not None else row.request_id,
                "outputs": [{"name": name, "datatype": tensors[name][0], "shape": tensors[name][1],
                             "data": np.asarray(tensors[name][2]).ravel().tolist()} for name in names]}

    def _offer(self, inputs: np.ndarray, logits: np.ndarray, scores, answered: list[tuple[Row, slice]]) -> None:
        """Hand the sampler the answered instances it picks, once per batch: most batches pick none and pay one draw."""
        picked = self.sampler.pick(sum(rows.stop - rows.start for _, rows in answered))
        if not picked.size:
            return
        owners = [(row, k) for row, rows in answered for k in range(rows.start, rows.stop)]  # (request, input row)
        rows = np.array([owners[p][1] for p in picked])
        ids = [owners[p][0].request_id for p in picked]
        self.sampler.offer(inputs[rows], logits[rows].argmax(1), _softmax(logits[rows]), None if scores is None else scores[rows], ids)

    def _emit_sampler_counts(self) -> None:
        """The sampler's counts as metrics, once a second: every metric a handler emits is a log line TorchServe's
        frontend parses, and per batch these lines cost the sampled worker more throughput than the sampling itself."""
        self._counts_due = time.monotonic() + COUNTS_INTERVAL_S
        counts = self.sampler.take_counts()
        for key, name in (("sampled", "unhans_sampled_total"), ("dropped", "unhans_sample_dropped_total"),
                          ("errors", "unhans_sink_errors_total"), ("recovered", "unhans_sample_recovered_total")):
            if counts[key]:
                self.metric(name, counts[key])

    def _reject(self, error: RequestError) -> Answer:
        self.metric("unhans_rejected_requests_total", 1, reason=error.reason)
        return Answer(error.status, error.body())

    def _fault(self, stage: str, row: Row) -> Answer:
        """An internal fault while ``stage`` one request: logged with its traceback, counted, answered as JSON 500."""
        logger.exception("unhans: internal error while %s request %s", stage, row.request_id)
        self.metric("unhans_internal_errors_total", 1, stage=stage)
        problem = f"internal error while {stage} this request; it is logged in the server's log (request id {row.request_id})"
        return Answer(500, {"error": {"field": None, "problem": problem, "status": 500}})

    def _infer(self, inputs: np.ndarray, explained: list, explainer) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Logits, artifact scores and the relevance of the ``explained`` (request, rows) pairs' instances, in order.

        Both runtimes take the instances in chunks of ``batch_size``, the relevance one explainer call a chunk. When the
        explainer gives everything the prediction graph would (an explain graph with the detector's score), the
        explained instances run through it alone.
        """
        asked = np.concatenate([np.arange(rows.start, rows.stop) for _, rows in explained]) if explained else np.zeros(0, int)
        alone = explainer is not None and explainer.kind == "onnx explain graph" and (explainer.scores or SCORE_OUTPUT not in self.outputs)
        plain = np.setdiff1d(np.arange(len(inputs)), asked) if alone else np.arange(len(inputs))
        logits = np.empty((len(inputs), self.num_classes), np.float32)
        scores = np.empty(len(inputs), np.float32) if SCORE_OUTPUT in self.outputs else None
        for chunk in self._chunks(plain):
            outputs = dict(zip(self.outputs, self.graph.run(None, {self.input_name: inputs[chunk]})))
            logits[chunk] = outputs["logits"]
            if scores is not None:
                scores[chunk] = outputs[SCORE_OUTPUT].ravel()
        if not asked.size:
            return logits, scores, None
        given = [t for request, _ in explained for t in request.targets]
        if alone:  # the graph explains a negative target's predicted class
            targets = np.array([-1 if t is None else t for t in given], np.int64)
        else:
            targets = np.array([logits[row].argmax() if t is None else t for row, t in zip(asked, given)], np.int64)
        relevance = np.empty(inputs[asked].shape, np.float32)
        for chunk in self._chunks(np.arange(len(asked))):
            started = time.perf_counter()
            explained_logits, relevance[chunk], explained_scores = explainer(inputs[asked[chunk]], targets[chunk])
            self.metric("unhans_relevance_seconds", time.perf_counter() - started)
            if alone:
                logits[asked[chunk]] = explained_logits
                if scores is not None:
                    scores[asked[chunk]] = explained_scores
        self.metric("unhans_relevance_requests_total", len(asked))
        return logits, scores, relevance

    def _chunks(self, rows: np.ndarray) -> list[np.ndarray]:
        step = max(self.config.batch_size, 1)
        return [rows[k:k + step] for k in range(0, len(rows), step)]

    def _predictions(self, request, logits: np.ndarray, scores) -> list[dict]:
        """Label, top-k probabilities and artifact score per instance; for an explained one the class it explains."""
        probabilities = _softmax(logits)
        predicted = logits.argmax(1)
        predictions = []
        for k, p in enumerate(probabilities):
            top = np.argsort(-p)[: request.topk]
            predictions.append({
                "label": int(predicted[k]),
                "class": self.classes.get(str(int(predicted[k])), str(int(predicted[k]))),
                "probabilities": {self.classes.get(str(c), str(c)): float(p[c]) for c in top},
                "artifact_score": None if scores is None else float(scores[k]),
            })
            if scores is not None:
                self.metric("unhans_artifact_score", float(scores[k]))
        if _wants_relevance(request):
            for k, (prediction, target) in enumerate(zip(predictions, request.targets)):
                prediction["target"] = int(predicted[k]) if target is None else target
        return predictions


def _wants_relevance(request) -> bool:
    return request.explain and request.format != "none"


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
