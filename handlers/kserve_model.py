"""KServe predictor for unhans archives: a thin adapter over the serving core (:mod:`unhans.handlers.service`).

    python -m unhans.handlers.kserve_model --archive model_store/vgg.mar [--http_port 8080] [--grpc_port 8081]

The same archive ``unhans archive`` builds (``.mar`` or unpacked folder) answers KServe's protocols through
``kserve.ModelServer``: v1 ``:predict`` / ``:explain``, v2 ``/v2/models/NAME/infer`` (JSON and binary tensors) with
``/v2/health/*`` and metadata, and gRPC v2 where the server runs it. Answers are the TorchServe handler's: the core
makes them. Requests are batched for the runtime: while one batch runs, arriving requests queue, and the next batch
takes what has queued (up to the archive's ``batch_size``) without waiting for more, so a lone request is answered
at once and concurrent ones share the graph's batch. A request's 4xx/500 is raised as :class:`AnswerError` and
answered by our handler on the server's app with its own status and JSON body. Metrics are the core's, as
prometheus_client metrics on the server's ``/metrics``; sampling writes to the same sink as under TorchServe.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor

import kserve
import numpy as np
from fastapi.responses import JSONResponse
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from prometheus_client import Counter, Histogram

from unhans.core.serving import METRICS, manifest, unpacked
from unhans.handlers.requests import V2_DATATYPES
from unhans.handlers.service import Answer, Row, Service

logger = logging.getLogger(__name__)


class AnswerError(Exception):
    """A request the core refused (4xx) or failed (500): answered with its status and JSON body."""

    def __init__(self, answer: Answer):
        super().__init__(answer.problem)
        self.answer = answer


async def answer_error_handler(_, error: AnswerError) -> JSONResponse:
    return JSONResponse(status_code=error.answer.status, content=error.answer.body)


class _Batcher:
    """Runs ``answer(rows)`` on one thread, each batch taking the rows that queued while the previous one ran."""

    def __init__(self, answer, batch_size: int):
        self.answer, self.batch_size = answer, batch_size
        self._queue: asyncio.Queue | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="unhans-batch")

    async def submit(self, row: Row) -> Answer:
        if self._queue is None:  # created on the server's event loop, at the first request
            self._queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._run())
        done = asyncio.get_running_loop().create_future()
        await self._queue.put((row, done))
        return await done

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                answers = await loop.run_in_executor(self._thread, self.answer, [row for row, _ in batch])
            except Exception as error:  # the core answers every row itself; this is a bug of ours: fail the batch, keep serving
                logger.exception("unhans: a batch failed")
                answers = [error] * len(batch)
            for (_, done), answer in zip(batch, answers):
                if not done.cancelled():
                    done.set_exception(answer) if isinstance(answer, Exception) else done.set_result(answer)


class UnhansModel(kserve.Model):
    """An unhans archive as a KServe model: ``predict`` and ``explain`` for v1 dicts and v2 :class:`InferRequest`."""

    def __init__(self, archive: str, name: str | None = None):
        self._archive, self._files = archive, contextlib.ExitStack()
        self._folder = self._files.enter_context(unpacked(archive))  # unpacked for the model's lifetime
        self.service = None
        super().__init__(name or _archive_name(self._folder))
        self._metrics = _prometheus_metrics()

    def load(self) -> bool:
        self.service = Service(self._folder, metric=self._metric)
        self._batcher = _Batcher(self.service.answer, self.service.config.batch_size)
        self.ready = True
        return self.ready

    def stop(self) -> None:
        self._files.close()
        super().stop()

    async def predict(self, payload, headers: dict | None = None):
        return await self._answer(payload, headers, explain=False)

    async def explain(self, payload, headers: dict | None = None):
        return await self._answer(payload, headers, explain=True)

    async def _answer(self, payload, headers: dict | None, explain: bool):
        headers = {str(k).lower(): str(v) for k, v in (headers or {}).items()}
        request_id = headers.get("x-request-id") or str(uuid.uuid4())
        v2 = isinstance(payload, InferRequest)
        try:
            body = _v2_body(payload) if v2 else payload
        except Exception as error:  # kserve's decoding of a malformed tensor
            raise AnswerError(Answer(400, {"error": {"field": "inputs[0]", "problem": f"is not a readable tensor ({error})", "status": 400}})) from None
        answer = await self._batcher.submit(Row(body, request_id, explain=explain, headers=headers))
        if answer.status != 200:
            raise AnswerError(answer)
        return _infer_response(answer.body, payload) if v2 else answer.body

    def get_input_types(self) -> list[dict]:
        return self.service.v2_metadata()[0]

    def get_output_types(self) -> list[dict]:
        return self.service.v2_metadata()[1]

    def _metric(self, name: str, value: float, **labels) -> None:
        metric = self._metrics[name].labels(model_name=self.name, **labels)
        metric.inc(value) if METRICS[name].kind == "counter" else metric.observe(value)


def _archive_name(folder) -> str:
    return manifest(folder)["modelName"]


_PROMETHEUS: dict = {}


def _prometheus_metrics() -> dict:
    """The core's metrics as prometheus_client ones, registered once per process (KServe serves the default registry)."""
    if not _PROMETHEUS:
        for name, metric in METRICS.items():
            kind = Counter if metric.kind == "counter" else Histogram
            _PROMETHEUS[name] = kind(name.removesuffix("_total"), metric.help, ["model_name", *metric.labels])
    return _PROMETHEUS


def _v2_body(request: InferRequest) -> dict:
    """A v2 request as the core's parser reads it (tensor data as kserve decoded it)."""
    body = {"id": request.id, "inputs": [{"name": t.name, "shape": list(t.shape), "datatype": t.datatype, "data": t.as_numpy()}
                                         for t in request.inputs]}
    if request.parameters:
        body["parameters"] = {k: _parameter(v) for k, v in dict(request.parameters).items() if k not in ("binary_data_output",)}
    if request.request_outputs:
        body["outputs"] = [{"name": o.name} for o in request.request_outputs]
    return body


def _parameter(value):
    """A request parameter's value: gRPC sends InferParameter messages (bool_param, int64_param, ...), REST plain JSON."""
    which = getattr(value, "WhichOneof", None)
    return getattr(value, which("parameter_choice")) if which else value


def _infer_response(answer: dict, request: InferRequest) -> InferResponse:
    outputs = []
    for o in answer["outputs"]:
        output = InferOutput(o["name"], o["shape"], o["datatype"])
        # gRPC carries raw bytes; REST a JSON list, which kserve packs as binary when the client asked for it
        output.set_data_from_numpy(np.asarray(o["data"], V2_DATATYPES[o["datatype"]]).reshape(o["shape"]), binary_data=request.from_grpc)
        outputs.append(output)
    return InferResponse(answer["id"], answer["model_name"], outputs, model_version=answer["model_version"],
                         from_grpc=request.from_grpc, use_binary_outputs=request.use_binary_outputs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(parents=[kserve.model_server.parser], description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", required=True, help="the .mar 'unhans archive' wrote, or its unpacked folder")
    args, _ = parser.parse_known_args(argv)
    model = UnhansModel(args.archive, args.model_name if args.model_name != "model" else None)
    model.load()
    kserve.model_server.app.add_exception_handler(AnswerError, answer_error_handler)
    kserve.ModelServer().start([model])


if __name__ == "__main__":
    main()
