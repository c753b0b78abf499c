"""The KServe predictor's gRPC side: KServe's v2 servicer with ``ModelInfer`` answered by the core, on the address asked.

A ``ModelInferRequest`` becomes the core's row without KServe's decoding: raw input contents are the binary
extension's bytes (the same parser as HTTP reads them, BYTES images included), typed contents a JSON-like v2 request.
A refusal is ``INVALID_ARGUMENT`` (``NOT_FOUND`` for another model, ``UNAUTHENTICATED`` without the token,
``UNAVAILABLE`` when busy) whose details are the same JSON body HTTP answers, logged as one line. Messages up to 4 MiB
over the archive's ``max_payload_bytes`` reach the core (its JSON 413 as ``RESOURCE_EXHAUSTED``); larger ones are
refused by gRPC itself (``RESOURCE_EXHAUSTED``, its own text) before they are read.
"""

from __future__ import annotations

import json
import logging
import uuid
from concurrent import futures

import grpc
from grpc import aio
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
from kserve.protocol.grpc.servicer import InferenceServicer

from unhans.core.contract import torchserve_limits
from unhans.handlers.kserve_http import authorized, tensor_bytes, too_large
from unhans.handlers.kserve_model import UnhansModel, error
from unhans.handlers.requests import V2_BINARY_HEADER
from unhans.handlers.service import Answer, Row

logger = logging.getLogger(__name__)
SERVICE = "/inference.GRPCInferenceService/"
OPEN_METHODS = {SERVICE + name for name in ("ServerLive", "ServerReady", "ModelReady")}  # the health probes
STATUS_CODES = {401: grpc.StatusCode.UNAUTHENTICATED, 404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
                500: grpc.StatusCode.INTERNAL, 503: grpc.StatusCode.UNAVAILABLE}  # other 4xx: INVALID_ARGUMENT
# the InferTensorContents field that holds each datatype's values
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
            "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}


class AnswerError(Exception):
    """A request the core (or the adapter) refused or failed: aborted with its status's code and its JSON body."""

    def __init__(self, answer: Answer):
        super().__init__(answer.problem)
        self.answer = answer


def row(request: pb.ModelInferRequest, headers: dict) -> Row:
    """A gRPC inference request as the core's row: raw contents as the binary extension's body, typed contents as JSON."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise AnswerError(error(400, "raw_input_contents", f"has {len(raw)} tensors for {len(request.inputs)} inputs"))
    tensors = []
    for k, tensor in enumerate(request.inputs):
        fields = {"name": tensor.name, "shape": list(tensor.shape), "datatype": tensor.datatype,
                  "parameters": {name: _parameter(value) for name, value in tensor.parameters.items()}}
        if raw:  # a size the client declares is checked against the bytes, as over HTTP
            fields["parameters"].setdefault("binary_data_size", len(raw[k]))
        elif tensor.datatype in CONTENTS:
            fields["data"] = list(getattr(tensor.contents, CONTENTS[tensor.datatype]))
        tensors.append(fields)
    body = {"id": request.id or str(uuid.uuid4()), "inputs": tensors,
            "parameters": {name: _parameter(value) for name, value in request.parameters.items()}}
    if request.outputs:
        body["outputs"] = [{"name": output.name} for output in request.outputs]
    request_id = headers.get("x-request-id") or body["id"]
    if not raw:
        return Row(body, request_id, headers=headers)
    head = json.dumps(body).encode()
    return Row(head + b"".join(raw), request_id, headers={**headers, V2_BINARY_HEADER.lower(): str(len(head))})


def _parameter(value: pb.InferParameter):
    return getattr(value, value.WhichOneof("parameter_choice") or "string_param")


def reply(body: dict) -> pb.ModelInferResponse:
    """The core's v2 answer as a gRPC response, every tensor as raw contents."""
    response = pb.ModelInferResponse(model_name=body["model_name"], model_version=body["model_version"], id=body["id"] or "")
    for output in body["outputs"]:
        response.outputs.add(name=output["name"], datatype=output["datatype"], shape=output["shape"])
        response.raw_output_contents.append(tensor_bytes(output))
    return response


class Servicer(InferenceServicer):
    """KServe's v2 servicer, ``ModelInfer`` answered by the model's scheduler."""

    def __init__(self, dataplane, model_repository_extension, model: UnhansModel):
        super().__init__(dataplane, model_repository_extension)
        self.model = model

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        refused = self.model.refuses(request.model_name, request.model_version)
        if refused:
            raise AnswerError(refused)
        size, limit = request.ByteSize(), self.model.service.contract.max_payload_bytes
        if size > limit:  # refused before its contents are copied into a row
            raise AnswerError(too_large(size, limit))
        the_row = row(request, {key.lower(): value for key, value in context.invocation_metadata() if isinstance(value, str)})
        refused = self.model.scheduler.admit(size)
        if refused:
            raise AnswerError(refused)
        try:
            answer = await self.model.scheduler.answer(the_row, size)
        finally:
            self.model.scheduler.release(size)
        if answer.status != 200:
            raise AnswerError(answer)
        return reply(answer.body)


class StatusInterceptor(ExceptionToStatusInterceptor):
    """KServe's exception mapping, and ours: an :class:`AnswerError` aborts with its code and JSON body, one log line."""

    async def handle_exception(self, ex, request_or_iterator, context, method_name):
        if not isinstance(ex, AnswerError):
            return await super().handle_exception(ex, request_or_iterator, context, method_name)
        status = ex.answer.status
        code = STATUS_CODES.get(status, grpc.StatusCode.INVALID_ARGUMENT if 400 <= status < 500 else grpc.StatusCode.INTERNAL)
        logger.warning("unhans: grpc %s: %s %s", method_name, code.name, ex.answer.problem)
        await context.abort(code, json.dumps(ex.answer.body))


class TokenInterceptor(aio.ServerInterceptor):
    """Every method but the health probes needs ``authorization: Bearer <token>`` metadata."""

    def __init__(self, token: str):
        self.token = token

    async def intercept_service(self, continuation, details):
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if details.method in OPEN_METHODS or authorized(given if isinstance(given, str) else "", self.token):
            return await continuation(details)
        problem = json.dumps(error(401, "authorization", "is missing or not 'Bearer <token>' with this server's token").body)

        async def refuse(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)
        return grpc.unary_unary_rpc_method_handler(refuse)


class GRPCServer:
    """KServe's gRPC v2 server on ``host``, our servicer and interceptors, messages up to the archive's body limit."""

    def __init__(self, port: int, dataplane, model_repository_extension, model: UnhansModel, host: str, token: str | None,
                 grace_period: int = 30):
        self.port, self.dataplane, self.extension, self.model, self.host, self.token = port, dataplane, model_repository_extension, model, host, token
        self.grace_period, self._server = grace_period, None

    async def start(self, max_workers: int) -> None:
        limit = torchserve_limits(self.model.service.contract)["max_request_size"]  # room above ours: the core answers the JSON 413
        # the first is the outermost: a call without the token is refused before anything else runs
        interceptors = ([TokenInterceptor(self.token)] if self.token else []) + [LoggingInterceptor(), StatusInterceptor()]
        self._server = aio.server(futures.ThreadPoolExecutor(max_workers=max_workers), interceptors=interceptors,
                                  options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", -1)])
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(self.dataplane, self.extension, self.model), self._server)
        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        self._server.add_insecure_port(address)
        logger.info("unhans: gRPC server on %s", address)
        await self._server.start()
        await self._server.wait_for_termination()

    async def stop(self, sig: int | None = None) -> None:
        if self._server:
            await self._server.stop(grace=self.grace_period)
