"""TorchServe handler for unhans archives: predictions from the corrected ONNX graph, and on request the relevance
maps of that very model.

Predictions and the artifact detector's score come from onnxruntime (unhans's session helper: CPU unless a GPU is
really there, explicit threads, no spinning). Relevance comes from the archive's explain graph when it has one, else
from the PyTorch twin (the run's model with the same correction inserted) through zennit with hooks kept registered,
so the explanation is that of the model that predicted; it is computed once per TorchServe batch, for every instance
of it that asked. An explain graph that also scores the artifact answers its instances alone: they skip the
prediction graph. At start the handler checks that both runtimes agree and refuses to start if they do not.

Each HTTP request is one row of TorchServe's batch and may carry several instances; all instances of the batch run
through the graph together. A request that is malformed gets its own 4xx answer with a JSON body naming the field
and the problem; the other requests of the batch are answered normally and the worker keeps running.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

import numpy as np
import torch
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from unhans.export.graph import SCORE_OUTPUT
from unhans.export.onnx import TOLERANCE
from unhans.export.runtime import session
from unhans.handlers.relevance import DEFAULT_CPU_BUDGET, Explainer, Sampler
from unhans.core.contract import InputContract
from unhans.handlers.requests import V2_BINARY_HEADER, Request, RequestError, encode_relevance, parse
from unhans.handlers.sink import Journal, ShardWriter

logger = logging.getLogger(__name__)
PROBE_ROWS = 8
COUNTS_INTERVAL_S = 1.0  # how often the sampler's counts become metrics
# What the handler reports through TorchServe's metrics (declared in the archive's metrics.yaml; Prometheus names)
METRICS = {  # name: (type, unit, extra dimensions, what it counts)
    "unhans_relevance_requests_total": (MetricTypes.COUNTER, "count", [], "instances whose relevance was computed"),
    "unhans_relevance_seconds": (MetricTypes.HISTOGRAM, "s", [], "time to compute the relevance of one batch"),
    "unhans_artifact_score": (MetricTypes.HISTOGRAM, "score", [], "artifact detector score of each served instance"),
    "unhans_rejected_requests_total": (MetricTypes.COUNTER, "count", ["reason"], "requests answered with a 4xx, by reason"),
    "unhans_internal_errors_total": (MetricTypes.COUNTER, "count", ["stage"], "requests answered with a 500: a fault of ours, logged"),
    "unhans_sampled_total": (MetricTypes.COUNTER, "count", [], "instances recorded to the sink for the monitor"),
    "unhans_sample_dropped_total": (MetricTypes.COUNTER, "count", [], "sampled instances dropped: the sampler was behind"),
    "unhans_sink_errors_total": (MetricTypes.COUNTER, "count", [], "sampled instances the sink could not write"),
    "unhans_sample_recovered_total": (MetricTypes.COUNTER, "count", [], "sampled instances a dead worker journaled, recorded by this one"),
}


class UnhansHandler(BaseHandler):
    def initialize(self, context):
        model_dir = context.system_properties["model_dir"]
        self.manifest = context.manifest
        config = (getattr(context, "model_yaml_config", None) or {}).get("unhans", {})
        threads = int(config.get("intra_op_threads", 1))
        torch.set_num_threads(threads)
        self.graph = session(os.path.join(model_dir, self.manifest["model"]["serializedFile"]), threads=threads)
        self.input_name = self.graph.get_inputs()[0].name
        self.outputs = [o.name for o in self.graph.get_outputs()]
        self.preprocess_config = InputContract(**config["preprocess"])
        self.topk = int(config.get("topk", 3))
        names = os.path.join(model_dir, "index_to_name.json")
        self.classes = json.loads(open(names).read()) if os.path.isfile(names) else {}

        composite = config.get("composite", "epsilon_plus_flat")
        self.explainer = Explainer(model_dir, composite, threads) if Explainer.available(model_dir) else None
        if self.explainer is None:
            logger.warning("unhans: this archive has no explain graph and no PyTorch twin: relevance requests are refused")
        self.num_classes = self._check_agreement()
        self._start_sampling(config.get("sample", {}), model_dir, composite)
        self.initialized = True

    def _start_sampling(self, sample: dict, model_dir: str, composite: str) -> None:
        """Record ``fraction`` of served instances (with relevance, computed if the client did not ask) to the sink.

        The sampler gets an explainer of its own: sharing the request path's (one call at a time) would make requests
        that ask for relevance wait behind a batch of sampled ones."""
        self.sampler, self._counts_due = None, 0.0
        fraction = float(sample.get("fraction", 0.0))
        if fraction <= 0:
            return
        if self.explainer is None:
            logger.warning("unhans: sampling is off: the monitor needs relevance, and this archive has no explainer")
            return
        model = self.manifest["model"]
        url = sample.get("sink") or os.environ.get("UNHANS_SINK") or os.path.join(os.getcwd(), "unhans-sink")
        # restarts reuse hostnames and pids: the start time keeps two live writers from sharing an id
        writer_id = f"{socket.gethostname()}-{os.getpid()}-{int(time.time())}"
        version = str(model.get("modelVersion", "1.0"))
        writer = ShardWriter(url, model["modelName"], version, writer_id, max_shard_seconds=float(sample.get("max_shard_seconds", 60)),
                             max_total_bytes=int(sample.get("max_total_bytes", 1 << 30)))
        try:  # what a killed worker had answered and not yet recorded survives in it (local sinks)
            journal = Journal(url, model["modelName"], version, writer_id)
        except ValueError:
            journal = None
            logger.warning("unhans: %s is not a local folder: sampled instances are not journaled, a killed worker loses "
                           "those it had not yet recorded", url)
        self.sampler = Sampler(writer, Explainer(model_dir, composite, threads=1), fraction, model["modelName"], version,
                               cpu_budget=float(sample.get("cpu_budget", DEFAULT_CPU_BUDGET)), journal=journal)
        logger.info("unhans: sampling %.1f%% of instances to %s as %s", 100 * fraction, url, writer_id)

    def _check_agreement(self) -> int:
        """Refuse to serve if the prediction graph and what explains it disagree on a probe batch; the class count."""
        probe = np.random.default_rng(0).random((PROBE_ROWS, *self.preprocess_config.shape), dtype=np.float32)
        probe = self.preprocess_config.normalise(probe)
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

    def handle(self, data, context):
        """Answer each request of TorchServe's batch on its own: a client mistake becomes that request's JSON 4xx, an
        internal fault its JSON 500 (logged and counted), and neither touches the other requests of the batch."""
        self.context = context
        answers, accepted = [None] * len(data), []
        for i, row in enumerate(data):
            try:
                accepted.append((i, self._parse(i, row)))
            except RequestError as error:
                answers[i] = self._reject(error, i)
            except Exception:
                answers[i] = self._fault("parsing", i)
        if accepted:
            self._answer(accepted, answers)
        if self.sampler is not None and time.monotonic() >= self._counts_due:
            self._emit_sampler_counts()
        return answers

    def _parse(self, i: int, row) -> Request:
        # one request a row (TorchServe's own service_envelope would read only the first of a batch: not supported).
        # /explanations, :explain and /v2/.../explain set the explain header; TorchServe overwrites a client's
        headers = {str(k).lower(): v for k, v in (self.context.get_all_request_header(i) or {}).items()}
        request = parse(row if isinstance(row, dict) else {"body": row}, self.preprocess_config,
                        explain_header=str(headers.get("explain", "")).lower() == "true", classes=self.num_classes,
                        binary_header_length=headers.get(V2_BINARY_HEADER.lower()))
        if _wants_relevance(request) and self.explainer is None:
            raise RequestError("explain", "this archive serves no relevance (it has no explain graph and no PyTorch twin); "
                               "ask for predictions, or rebuild it with 'unhans archive --model'", 422, reason="no_explainer")
        return request

    def _answer(self, accepted: list[tuple[int, Request]], answers: list) -> None:
        """Predict (and explain) the accepted requests together; if that fails, each one alone, so a fault stays with
        the request that caused it."""
        try:
            self._answer_together(accepted, answers)
        except Exception:
            if len(accepted) == 1:
                answers[accepted[0][0]] = self._fault("inference", accepted[0][0])
                return
            for one in accepted:
                self._answer([one], answers)

    def _answer_together(self, accepted: list[tuple[int, Request]], answers: list) -> None:
        inputs = np.concatenate([self.preprocess_config.normalise(r.inputs) for _, r in accepted])
        answered, start = [], 0
        for i, request in accepted:
            answered.append((i, request, slice(start, start + len(request.inputs))))
            start += len(request.inputs)
        logits, scores, relevance = self._infer(inputs, [(request, rows) for _, request, rows in answered if _wants_relevance(request)])
        k, results = 0, []
        for i, request, rows in answered:
            heat = None
            if _wants_relevance(request):
                heat = relevance[k:k + len(request.inputs)]
                k += len(request.inputs)
            request_scores = None if scores is None else scores[rows]
            results.append((i, rows, self._v2_answer(i, request, logits[rows], request_scores, heat) if request.protocol == "v2"
                            else self._unhans_answer(request, logits[rows], request_scores, heat)))
        if self.sampler is not None:
            self._offer(inputs, logits, scores, [(i, rows) for i, rows, _ in results])
        for i, _, answer in results:  # only now: a fault above leaves no request half answered
            answers[i] = answer

    def _unhans_answer(self, request: Request, logits: np.ndarray, scores, relevance) -> dict:
        predictions = self._predictions(request, logits, scores)
        if relevance is not None:
            for prediction, heat in zip(predictions, relevance):
                prediction["relevance"] = encode_relevance(heat, request.format, request.downsample)
        return {"predictions": predictions} if request.many else predictions[0]

    def _v2_answer(self, i: int, request: Request, logits: np.ndarray, scores, relevance) -> dict:
        """KServe v2 output tensors: probabilities (N, classes), label (N), artifact_score (N), relevance (N, h, w)."""
        n = len(logits)
        tensors = {"probabilities": ("FP32", [n, logits.shape[1]], _softmax(logits)), "label": ("INT64", [n], logits.argmax(1))}
        if scores is not None:
            tensors["artifact_score"] = ("FP32", [n], scores)
            for score in scores:
                self._metric("unhans_artifact_score", float(score))
        if relevance is not None:
            maps = np.stack([np.asarray(encode_relevance(heat, "list", request.downsample), np.float32) for heat in relevance])
            tensors["relevance"] = ("FP32", list(maps.shape), maps)
        names = [name for name in (request.outputs or tensors) if name in tensors]
        model = self.manifest["model"]
        return {"model_name": model["modelName"], "model_version": str(model.get("modelVersion", "1.0")),
                "id": request.id if request.id is not None else str(self.context.get_request_id(i) or ""),
                "outputs": [{"name": name, "datatype": tensors[name][0], "shape": tensors[name][1],
                             "data": np.asarray(tensors[name][2]).ravel().tolist()} for name in names]}

    def _offer(self, inputs: np.ndarray, logits: np.ndarray, scores, answered: list[tuple[int, slice]]) -> None:
        """Hand the sampler the answered instances it picks, once per batch: most batches pick none and pay one draw."""
        picked = self.sampler.pick(sum(rows.stop - rows.start for _, rows in answered))
        if not picked.size:
            return
        owners = [(i, k) for i, rows in answered for k in range(rows.start, rows.stop)]  # (request, input row)
        rows = np.array([owners[p][1] for p in picked])
        ids = [str(self.context.get_request_id(owners[p][0]) or "") for p in picked]
        self.sampler.offer(inputs[rows], logits[rows].argmax(1), _softmax(logits[rows]), None if scores is None else scores[rows], ids)

    def _emit_sampler_counts(self) -> None:
        """The sampler's counts as metrics, once a second: every metric a handler emits is a log line TorchServe's
        frontend parses, and per batch these lines cost the sampled worker more throughput than the sampling itself."""
        self._counts_due = time.monotonic() + COUNTS_INTERVAL_S
        counts = self.sampler.take_counts()
        for key, name in (("sampled", "unhans_sampled_total"), ("dropped", "unhans_sample_dropped_total"),
                          ("errors", "unhans_sink_errors_total"), ("recovered", "unhans_sample_recovered_total")):
            if counts[key]:
                self._metric(name, counts[key])

    def _metric(self, name: str, value: float, **dimensions) -> None:
        kind, unit, _, _ = METRICS[name]
        self.context.metrics.add_metric(name, value, unit, dimensions=[Dimension(k, v) for k, v in dimensions.items()], metric_type=kind)

    def _reject(self, error: RequestError, i: int) -> dict:
        self.context.set_response_status(error.status, error.problem, idx=i)
        self._metric("unhans_rejected_requests_total", 1, reason=error.reason)
        return error.body()

    def _fault(self, stage: str, i: int) -> dict:
        """An internal fault while ``stage`` one request: logged with its traceback, counted, answered as JSON 500."""
        logger.exception("unhans: internal error while %s request %s", stage, self.context.get_request_id(i))
        self._metric("unhans_internal_errors_total", 1, stage=stage)
        problem = f"internal error while {stage} this request; it is logged in the worker's log (request id {self.context.get_request_id(i)})"
        self.context.set_response_status(500, problem, idx=i)
        return {"error": {"field": None, "problem": problem, "status": 500}}

    def _infer(self, inputs: np.ndarray, explained: list) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Logits, artifact scores and the relevance of the ``explained`` (request, rows) pairs' instances, in order.

        The relevance takes one explainer call for the whole batch. When the explainer gives everything the prediction
        graph would (an explain graph with the detector's score), the explained instances run through it alone.
        """
        asked = np.concatenate([np.arange(rows.start, rows.stop) for _, rows in explained]) if explained else np.zeros(0, int)
        alone = self.explainer is not None and self.explainer.kind == "onnx explain graph" and (self.explainer.scores or SCORE_OUTPUT not in self.outputs)
        plain = np.setdiff1d(np.arange(len(inputs)), asked) if alone else np.arange(len(inputs))
        logits = np.empty((len(inputs), self.num_classes), np.float32)
        scores = np.empty(len(inputs), np.float32) if SCORE_OUTPUT in self.outputs else None
        if plain.size:
            outputs = dict(zip(self.outputs, self.graph.run(None, {self.input_name: inputs[plain]})))
            logits[plain] = outputs["logits"]
            if scores is not None:
                scores[plain] = outputs[SCORE_OUTPUT].ravel()
        if not asked.size:
            return logits, scores, None
        given = [t for request, _ in explained for t in request.targets]
        if alone:  # the graph explains a negative target's predicted class
            targets = np.array([-1 if t is None else t for t in given], np.int64)
        else:
            targets = np.array([logits[row].argmax() if t is None else t for row, t in zip(asked, given)], np.int64)
        started = time.perf_counter()
        explained_logits, relevance, explained_scores = self.explainer(inputs[asked], targets)
        self._metric("unhans_relevance_seconds", time.perf_counter() - started)
        self._metric("unhans_relevance_requests_total", len(asked))
        if alone:
            logits[asked] = explained_logits
            if scores is not None:
                scores[asked] = explained_scores
        return logits, scores, relevance

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
                self._metric("unhans_artifact_score", float(scores[k]))
        if _wants_relevance(request):
            for k, (prediction, target) in enumerate(zip(predictions, request.targets)):
                prediction["target"] = int(predicted[k]) if target is None else target
        return predictions


def _wants_relevance(request) -> bool:
    return request.explain and request.format != "none"


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
