"""The KServe predictor's HTTP side: our inference routes ahead of KServe's, the gate in front of every route, and the
server started on the address asked for.

:class:`Gate` (outermost, before KServe's app and its middleware) checks the bearer token and refuses a body whose
``Content-Length`` passes the archive's ``max_payload_bytes`` before a byte of it is read (so ``Expect:
100-continue`` gets the 413, never a ``100 Continue``); uvicorn then discards the rest of that body and keeps the
connection. Our routes read a chunked body up to the same limit and close the connection past it. They answer v1
``:predict`` / ``:explain`` and v2 ``/infer`` (a version in the path must be the archive's) by handing the raw bytes
and headers to the core through the :class:`~unhans.handlers.kserve_model.Scheduler`: KServe's parsers never see an
inference body. Every refusal is JSON naming the field, malformed HTTP included (:class:`JsonHttpProtocol`), and a
client's mistake is one access-log line, never a traceback (tracebacks are for our own faults).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import uuid

import kserve
import numpy as np
from fastapi.responses import ORJSONResponse
from kserve.logging import logger as kserve_logger
from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady, UnsupportedProtocol
from kserve.protocol.rest.server import RESTServer
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from unhans.handlers.kserve_model import UnhansModel, error
from unhans.handlers.requests import V2_BINARY_HEADER, V2_DATATYPES
from unhans.handlers.service import Answer, Row

logger = logging.getLogger(__name__)
# what a probe may ask without the token (Kubernetes' liveness and readiness probes carry none)
OPEN_PATHS = re.compile(r"/|/v2/health/(live|ready)|/v1/models/[^/:]+|/v2/models/[^/]+(/versions/[^/]+)?/ready")
REQUEST_ID = "x-request-id"


class BodyTooLarge(Exception):
    pass


def refusal(answer: Answer, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(answer.body, status_code=answer.status, headers=headers)


class Gate:
    """ASGI middleware in front of everything: the bearer token, and a body's declared size against the limit."""

    def __init__(self, app, limit: int, token: str | None):
        self.app, self.limit, self.token = app, limit, token

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            if self.token and not OPEN_PATHS.fullmatch(scope["path"]) and not authorized(headers.get(b"authorization", b"").decode("latin-1"), self.token):
                answer = error(401, "Authorization", "is missing or not 'Bearer <token>' with this server's token")
                return await refusal(answer, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
            declared = headers.get(b"content-length")
            if declared is not None and int(declared) > self.limit:  # uvicorn refused a non-numeric one already
                return await refusal(too_large(int(declared), self.limit))(scope, receive, send)
        await self.app(scope, receive, send)


def authorized(header: str, token: str) -> bool:
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def too_large(size: int | None, limit: int) -> Answer:
    held = f"has {size} bytes" if size is not None else "was streamed past"
    return error(413, "body", f"{held}, more than the limit of {limit} bytes (the archive's max_payload_bytes); send fewer "
                 "instances, or encoded images instead of JSON numbers")


def install_routes(app, model: UnhansModel, limit: int) -> None:
    """Our inference routes on KServe's app, ahead of KServe's own (which it adds when the server starts)."""

    async def infer(request: HttpRequest) -> Response:
        params = request.path_params
        refused = model.refuses(params["model_name"], params.get("model_version"))
        if refused:
            return refusal(refused)
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            return refusal(error(415, "Content-Encoding", f"is {encoding!r}; send the body uncompressed"))
        declared = request.headers.get("content-length")
        size = int(declared) if declared is not None else limit  # a chunked body may take up to the limit
        refused = model.scheduler.admit(size)
        if refused:
            return refusal(refused, {"Retry-After": "1"})
        try:
            try:
                body = await read_body(request, limit)
            except BodyTooLarge:
                return refusal(too_large(None, limit), {"Connection": "close"})  # stop reading a stream without end
            except ClientDisconnect:  # the client left mid-body: no one reads this answer, nothing is logged
                return refusal(error(400, "body", "ended before its Content-Length"))
            request_id = request.headers.get(REQUEST_ID) or str(uuid.uuid4())
            headers = {name.lower(): value for name, value in request.headers.items()}
            row = Row(body, request_id, explain=request.url.path.endswith(":explain"), headers=headers)
            answer = await model.scheduler.answer(row, len(body))
        finally:
            model.scheduler.release(size)
        if answer.status != 200:
            return refusal(answer, {REQUEST_ID: request_id})
        return response(answer, {REQUEST_ID: request_id})

    async def metadata(request: HttpRequest) -> Response:
        params = request.path_params
        refused = model.refuses(params["model_name"], params["model_version"])
        if refused:
            return refusal(refused)
        if request.url.path.endswith("/ready"):
            return ORJSONResponse({"name": model.name, "ready": model.ready})
        return ORJSONResponse({"name": model.name, "versions": [model.version], "platform": "",
                               "inputs": model.get_input_types(), "outputs": model.get_output_types()})

    for path in ("/v1/models/{model_name}:predict", "/v1/models/{model_name}:explain", "/v2/models/{model_name}/infer",
                 "/v2/models/{model_name}/versions/{model_version}/infer"):
        app.add_route(path, infer, methods=["POST"])
    for path in ("/v2/models/{model_name}/versions/{model_version}", "/v2/models/{model_name}/versions/{model_version}/ready"):
        app.add_route(path, metadata, methods=["GET"])


async def read_body(request: HttpRequest, limit: int) -> bytes:
    """The body, read up to ``limit`` bytes (a chunked one has no Content-Length the gate could check)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def response(answer: Answer, headers: dict) -> Response:
    """A 200: JSON, or for a v2 answer with outputs asked for as raw bytes, the binary extension (its JSON part, then
    those tensors' bytes, the JSON part's length in ``Inference-Header-Content-Length``)."""
    binary = [o for o in answer.body.get("outputs", []) if o["name"] in answer.binary] if isinstance(answer.body, dict) else []
    if not binary:
        return ORJSONResponse(answer.body, headers=headers)
    raws, outputs = [], []
    for output in answer.body["outputs"]:
        if output in binary:
            raws.append(tensor_bytes(output))
            output = {**{k: v for k, v in output.items() if k != "data"}, "parameters": {"binary_data_size": len(raws[-1])}}
        outputs.append(output)
    head = json.dumps({**answer.body, "outputs": outputs}).encode()
    return Response(head + b"".join(raws), media_type="application/octet-stream", headers={**headers, V2_BINARY_HEADER: str(len(head))})


def tensor_bytes(output: dict) -> bytes:
    """An output tensor of the core's v2 answer as the raw little-endian bytes of the binary extension and gRPC."""
    return np.asarray(output["data"], V2_DATATYPES[output["datatype"]]).tobytes()


class JsonHttpProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol, answering a request it cannot parse with a JSON 400 instead of plain text."""

    def send_400_response(self, msg: str) -> None:
        body = json.dumps(error(400, "request", f"is not a valid HTTP/1.1 request ({msg})").body).encode()
        self.transport.write(STATUS_LINE[400] + b"content-type: application/json\r\ncontent-length: " + str(len(body)).encode()
                             + b"\r\nconnection: close\r\n\r\n" + body)
        self.transport.close()


# KServe's errors that a client causes, answered as JSON without the traceback KServe's own handlers log
CLIENT_ERRORS = {InvalidInput: 400, ModelNotFound: 404, NotImplementedError: 501, UnsupportedProtocol: 501, ModelNotReady: 503}


async def client_error(request: HttpRequest, exc: Exception) -> JSONResponse:
    status = next(code for kind, code in CLIENT_ERRORS.items() if isinstance(exc, kind))
    logger.warning("unhans: %s %s: %s %s", request.method, request.url.path, status, exc)
    return refusal(error(status, None, str(exc)))


class _RESTServer(RESTServer):
    """KServe's REST server on ``host``, behind the :class:`Gate`, with our JSON 400 and quiet client errors."""

    def __init__(self, *args, host: str, gate, **kwargs):
        super().__init__(*args, **kwargs)
        self.config.host, self.config.app, self.config.http = host, gate, JsonHttpProtocol

    def _add_exception_handlers(self, app) -> None:
        super()._add_exception_handlers(app)
        for kind in CLIENT_ERRORS:
            app.add_exception_handler(kind, client_error)


class _ModelServer(kserve.ModelServer):
    """``kserve.ModelServer`` serving one unhans model on ``host`` (HTTP and gRPC), with our routes and gate."""

    def __init__(self, model: UnhansModel, host: str, token: str | None):
        super().__init__()  # configures KServe's logging: ours goes to the same handlers
        self.model, self.host, self.token = model, host, token
        ours = logging.getLogger("unhans")
        ours.setLevel(logging.INFO)
        ours.handlers, ours.propagate = list(kserve_logger.handlers), False

    def start(self, models) -> None:
        from unhans.handlers.kserve_grpc import GRPCServer

        self._register_and_check_atleast_one_model_is_ready(models)
        app, limit = kserve.model_server.app, self.model.service.contract.max_payload_bytes
        install_routes(app, self.model, limit)
        self._rest_server = _RESTServer("kserve.model_server:app", self.dataplane, self.model_repository_extension, self.http_port,
                                        access_log_format=self.access_log_format, grace_period=self.grace_period,
                                        event_loop=self.event_loop, timeout_keep_alive=self.timeout_keep_alive,
                                        host=self.host, gate=Gate(app, limit, self.token))
        self.servers.append(self._rest_server.start())
        if self.enable_grpc:
            self._grpc_server = GRPCServer(self.grpc_port, self.dataplane, self.model_repository_extension, self.model, self.host,
                                           self.token, grace_period=self.grace_period)
            self.servers.append(self._grpc_server.start(self.max_threads))
        self.setup_event_loop()
        self.register_signal_handler()
        logger.info("unhans: serving %s on %s (HTTP %d, gRPC %s), %s", self.model.name, self.host, self.http_port,
                    self.grpc_port if self.enable_grpc else "off", "bearer token required" if self.token else "no authentication")
        asyncio.run(self._serve())


def serve(model: UnhansModel, host: str, token: str | None) -> None:
    """Serve a loaded model until the process is stopped."""
    _ModelServer(model, host, token).start([model])
