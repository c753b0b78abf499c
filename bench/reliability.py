"""Benchmark: serving that survives hostile input, oversized and slow work, load and a killed worker, on the unhans KServe
predictor and on TorchServe.

    python bench/reliability.py [--server kserve|torchserve] [--json PATH] [--run DIR] [--quick]

Both servers by default, one after the other, each serving the VGG archive as bench/serving.py builds it (the
backdoored MNIST VGG, trained into --run if missing, its P-ClArC correction and ONNX explain graph), batch size 8, 5 ms
batch delay, three times: `vgg` (plain), `vgg_sampled` (10% of instances recorded to a sink) and `vgg_kill` (every
instance recorded, sampler CPU budget 1.0, a local sink). TorchServe (unhans.torchserve.LocalTorchServe: loopback,
token auth, no service_envelope) runs the three in one server; the KServe predictor (unhans.kserve_server.LocalKServe:
loopback, a bearer token) is one process per archive, as in a cluster. Every client keeps its HTTP/1.1 connection
alive and sends the token, as production clients do. A request that gets no answer (a reset or closed connection, no
reply within 120 s) counts as status 0, a server failure; an error of this script stops it instead. Every key below is
written once per server, suffixed `_kserve` / `_torchserve` (--quick shrinks each phase for a smoke run: 600 hostile
requests, 10 s of load, 2 pairs):

- fuzz_requests: hostile requests (unhans/hostile.py: every kind in turn, randomised, the heavy ones in every tenth
  round) sent by 16 clients, each over one of hostile.TRANSPORTS in turn: as it is (TorchServe: /predictions,
  /explanations, v1 :predict / :explain, v2 /infer; KServe: v1 and v2, its /predictions kinds to :predict), its body as
  the encoded image of a v2 BYTES tensor in the binary extension, and over gRPC v2 (KServe only: TorchServe's gRPC is
  not the Open Inference Protocol); 10,000 (600 with --quick). fuzz_5xx: those answered >= 500 or not at all (gRPC:
  INTERNAL, UNKNOWN, UNAVAILABLE, DEADLINE_EXCEEDED or no answer; target 0); fuzz_non_json: answers whose body (gRPC:
  error details) is not JSON (target 0); fuzz_accepted: answered 200 although their kind is not a valid request
  (hostile.MAY_SUCCEED; target 0); the JSON holds every kind's statuses under fuzz_by_kind_<server>;
- canary_failures: valid requests sent by 3 more clients while the fuzz runs (MNIST test images as PNG and as JSON
  instances, predicted and explained) that did not get a 200 with the image's label (and a relevance map when
  explained); target 0. Every phase uses the test images the model labels with a margin (top-1 minus top-2
  probability >= 0.2), so that no label flips with the batch an image is computed in;
- fuzz_peak_worker_rss_mb: the peak resident memory of `vgg`'s worker during the fuzz (TorchServe: its worker
  process; KServe: the predictor with its parsing process), psutil every 0.1 s; target <= 1500;
- envelope_concurrent_errors: 200 concurrent KServe requests of 1 to 4 instances each, v1 {"instances"} to :predict
  and :explain and v2 JSON FP32 tensors [n, 1, 28, 28] to /infer, each on its own connection: a non-200, or an
  answer without n predictions (v2: n labels, n x classes probabilities) carrying the right labels, is an error;
  target 0. request_id_mismatches: v2 answers whose id is not the x-request-id header answered with it;
- tritonclient_modes_failing: of tritonclient's ways to call (JSON tensors, binary tensors, a PNG as a BYTES tensor,
  gRPC, a versioned model name "1"), those whose call of 4 images does not return their labels; target 0;
- oversized_body_seconds: seconds until a 100 MiB body (Content-Length given, sent whole as http.client does) is
  answered with a 4xx; None when it is not; target <= 1;
- stall_p99_ratio: the 99th-percentile latency of 300 small requests (one PNG, predicted, one at a time; at most
  those sent in 120 s) while 4 clients keep sending maximum-size requests (max_instances random instances, explained,
  v1 JSON: 3.9 MB), over their p99 when the server is idle; target <= 5;
- load_errors: requests not answered 200 with a label during 60 s (10 s) of 32 clients on `vgg_sampled`, a quarter
  of them explanations; target 0. load_p99_ms: their 99th-percentile latency;
- sampling_cost_pct (TorchServe; bench/kserve.py measures the predictor's): throughput `vgg_sampled` loses against
  `vgg`, bench/serving.py's method (common.paired_loss_pct: the median over 12 (2) interleaved pairs of rounds of 768
  PNG predictions); target <= 3;
- kill_answered_without_record: 4 clients send PNG predictions to `vgg_kill` at a steady pace; after 5 s (3 s) its
  worker (KServe: the predictor process) is SIGKILLed while requests are in flight, and they keep sending until the
  restarted one is ready (TorchServe restarts its worker; the predictor is started again on the same sink, as
  Kubernetes restarts a container), and 1 s more. Requests answered 200 before the kill whose x-request-id has no
  record in the sink (unhans.handlers.sink.ShardReader, open shards included), read every second until all are there
  or for 120 s (the new worker records what the dead one journaled), are lost; target 0. kill_answered_before_kill is
  how many were answered, kill_restart_seconds the time from the SIGKILL until a new worker is ready;
  kill_sampled_dropped (TorchServe) the handler's unhans_sample_dropped_total for `vgg_kill`;
- worker_deaths: workers that died over the whole run (TorchServe: pids of any model's worker that changed, from the
  management API every 0.5 s; KServe: a predictor or parsing process that exited), the deliberate kill excluded;
  target 0.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import signal
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import grpc
import numpy as np
import psutil
import torch
from common import paired_loss_pct, report, throughput, vgg_archives
from tritonclient.grpc import service_pb2, service_pb2_grpc
from PIL import Image
from rich.console import Console
from rich.table import Table

from unhans.core.contract import InputContract
from unhans.core.serving import SERVERS
from unhans.handlers.sink import ShardReader
from unhans.hostile import MAY_SUCCEED, TRANSPORTS, as_grpc, as_v2_binary_image, hostile_requests, path
from unhans.kserve_server import LocalKServe
from unhans.torchserve import LocalTorchServe

TARGETS = {"fuzz_requests": ">= 10000", "fuzz_5xx": "0", "fuzz_non_json": "0", "fuzz_accepted": "0", "canary_failures": "0",
           "fuzz_peak_worker_rss_mb": "<= 1500", "envelope_concurrent_errors": "0", "request_id_mismatches": "0",
           "tritonclient_modes_failing": "0", "oversized_body_seconds": "<= 1", "stall_p99_ratio": "<= 5", "load_errors": "0",
           "sampling_cost_pct": "<= 3", "kill_answered_without_record": "0", "kill_answered_after_kill_without_record": "0",
           "worker_deaths": "0"}
FUZZ_CLIENTS, CANARY_CLIENTS, LOAD_CLIENTS, KILL_CLIENTS, ENVELOPE_REQUESTS = 16, 3, 32, 4, 200
STALL_CLIENTS, STALL_SMALL_REQUESTS, STALL_BUSY_SECONDS = 4, 300, 120
OVERSIZED_BYTES = 100 << 20
SAMPLING_ROUND_REQUESTS = 768
MODELS = ("vgg", "vgg_sampled", "vgg_kill")
RECORDS_WAIT_S = 120  # the restarted worker first records what the killed one journaled
GRPC_AS_HTTP = {grpc.StatusCode.OK: 200, grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
                grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.RESOURCE_EXHAUSTED: 413}  # any other code: a 5xx


@dataclass(frozen=True)
class Sizes:
    fuzz: int
    load_seconds: float
    sampling_pairs: int
    before_kill_s: float


FULL, QUICK = Sizes(10_000, 60.0, 12, 5.0), Sizes(600, 10.0, 2, 3.0)


@dataclass
class Reply:
    status: int  # 0: no answer
    body: Any  # the decoded JSON, None when not JSON
    is_json: bool
    headers: dict  # names lower-cased


class Http:
    """Keep-alive connections to one server's HTTP port, one per calling thread, with its token.

    No request is resent: a connection the server drops without an answer is that request's status 0. One the
    server closes after answering (``Connection: close``) is reopened for the next request."""

    def __init__(self, port: int, key: str | None):
        self.port, self.key, self._local = port, key, threading.local()

    def post(self, target: str, body: bytes, content_type: str | None, headers: dict | None = None) -> Reply:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        sent = {**({"Content-Type": content_type} if content_type else {}), "Authorization": f"Bearer {self.key}", **(headers or {})}
        try:
            connection.request("POST", target, body, sent)
            response = connection.getresponse()
            data = response.read()
        except (http.client.HTTPException, OSError):
            connection.close()
            self._local.connection = None
            return Reply(0, None, False, {})
        answer_headers = {name.lower(): value for name, value in response.getheaders()}
        if answer_headers.get("connection", "").lower() == "close":
            connection.close()
            self._local.connection = None
        try:
            return Reply(response.status, json.loads(data), True, answer_headers)
        except ValueError:
            return Reply(response.status, None, False, answer_headers)


class Grpc:
    """gRPC v2 ModelInfer calls with the token; an error's details must be JSON, its code maps to an HTTP status."""

    def __init__(self, address: str, key: str | None):
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1)])
        self.stub, self.metadata = service_pb2_grpc.GRPCInferenceServiceStub(self.channel), [("authorization", f"Bearer {key}")]

    def infer(self, message) -> Reply:
        try:
            self.stub.ModelInfer(message, metadata=self.metadata, timeout=120)
            return Reply(200, {}, True, {})
        except grpc.RpcError as error:
            status = GRPC_AS_HTTP.get(error.code(), 500)
            try:
                return Reply(status, json.loads(error.details() or ""), True, {})
            except ValueError:
                return Reply(status, None, False, {})


@dataclass
class Served:
    """One server under test: how to reach a model over HTTP (and gRPC), and the processes that answer it."""

    name: str  # "kserve" or "torchserve"
    http: Http
    grpc: Grpc | None
    paths: Callable[[str, str], str]  # (endpoint, model) -> URL path
    grpc_address: str | None = None


class Workers(threading.Thread):
    """Watches the processes that answer, every 0.1 s: ``poll()`` gives the pids of each role (a TorchServe model's
    worker; the predictor and its parsing process), a new pid in a role is a worker that died and was replaced, a role
    without pids one that died; ``peak_rss_mb`` is the peak of the watched roles' summed memory."""

    def __init__(self, poll: Callable[[], dict[str, list[int]]], every: int = 5):
        super().__init__(daemon=True)
        self.poll, self.every = poll, every
        self.pids: dict[str, list[int]] = {}
        self.vanished: Counter = Counter()
        self.peak_rss_mb, self._watched, self._done, self._lock = 0.0, (), threading.Event(), threading.Lock()

    @contextmanager
    def watching_memory(self, *roles: str):
        self._watched, self.peak_rss_mb = roles, 0.0
        try:
            yield
        finally:
            self._watched = ()

    def check(self) -> None:
        seen = self.poll()
        with self._lock:
            for role, pids in seen.items():
                known = self.pids.setdefault(role, [])
                known.extend(pid for pid in pids if pid not in known)
                if not pids and known:
                    self.vanished[role] += 1

    def run(self) -> None:
        tick = 0
        while True:
            if tick % self.every == 0:
                self.check()
            tick += 1
            rss = 0.0
            for role in self._watched:
                if self.pids.get(role):
                    try:
                        rss += psutil.Process(self.pids[role][-1]).memory_info().rss / 2**20
                    except psutil.Error:
                        pass  # it died: the next poll sees its successor
            self.peak_rss_mb = max(self.peak_rss_mb, rss)
            if self._done.wait(0.1):
                break
        self.check()

    def stop(self) -> None:
        self._done.set()
        self.join()

    def deaths(self, deliberate: int = 0) -> int:
        return sum(len(pids) - 1 for pids in self.pids.values()) + sum(self.vanished.values()) - deliberate


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((image[0] * 255).round().astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _instances(images: np.ndarray, **options) -> bytes:
    return json.dumps({"instances": images.tolist(), **options}).encode()


def _labels(reply: Reply, explained: bool) -> list[int] | None:
    """The labels of an unhans or KServe v1 answer (one prediction, or ``{"predictions": [...]}``), None unless it is a
    200 whose every prediction has an integer label (and a relevance map when explained)."""
    if reply.status != 200 or not isinstance(reply.body, dict):
        return None
    predictions = reply.body.get("predictions", [reply.body])
    if not isinstance(predictions, list) or not all(isinstance(p, dict) for p in predictions):
        return None
    if not all(isinstance(p.get("label"), int) and (not explained or p.get("relevance") is not None) for p in predictions):
        return None
    return [p["label"] for p in predictions]


def _v2_labels(reply: Reply, n: int, classes: int) -> list[int] | None:
    """The labels of a KServe v2 answer for ``n`` instances, None unless it has n labels and n x classes
    probabilities."""
    if reply.status != 200 or not isinstance(reply.body, dict) or not isinstance(reply.body.get("outputs"), list):
        return None
    outputs = {o.get("name"): o for o in reply.body["outputs"] if isinstance(o, dict)}
    label, probabilities = outputs.get("label", {}), outputs.get("probabilities", {})
    if probabilities.get("shape") != [n, classes] or label.get("shape") != [n] or not isinstance(label.get("data"), list):
        return None
    return label["data"] if len(label["data"]) == n else None


def _send(served: Served, request, k: int, model: str) -> Reply:
    """A hostile request over the k-th transport the server speaks (TorchServe has no gRPC v2)."""
    transports = TRANSPORTS if served.grpc else tuple(t for t in TRANSPORTS if t != "grpc")
    transport = transports[k % len(transports)]
    if transport == "grpc":
        return served.grpc.infer(as_grpc(request, model, service_pb2))  # kserve is bench/kserve.py here: tritonclient's
    if transport == "v2_binary":
        request = as_v2_binary_image(request)
    return served.http.post(served.paths(request.endpoint, model), request.body, request.content_type, request.headers)


def fuzz(served: Served, workers: Workers, roles: tuple[str, ...], contract: InputContract, count: int, images: np.ndarray,
         labels: list[int]) -> dict:
    """Hostile requests from 16 clients, valid canaries from 3 more beside them, the worker's memory watched."""
    requests = hostile_requests(contract, count, seed=1)
    pngs = [_png(image) for image in images]
    canary, done, lock = Counter(), threading.Event(), threading.Lock()

    def canary_client(k: int) -> None:
        sent = 0
        while not done.is_set():
            i, variant = (k + CANARY_CLIENTS * sent) % len(images), sent % 4
            endpoint = "explanations" if variant in (1, 2) else "predictions"
            if variant % 2:
                reply = served.http.post(served.paths(endpoint, "vgg"), _instances(images[i:i + 1]), "application/json")
            else:
                reply = served.http.post(served.paths(endpoint, "vgg"), pngs[i], "image/png")
            ok = _labels(reply, endpoint == "explanations") == [labels[i]]
            with lock:
                canary["sent"] += 1
                canary["failed"] += not ok
            sent += 1

    canaries = [threading.Thread(target=canary_client, args=(k,)) for k in range(CANARY_CLIENTS)]
    with workers.watching_memory(*roles):
        for thread in canaries:
            thread.start()
        started = time.perf_counter()
        try:
            with ThreadPoolExecutor(FUZZ_CLIENTS) as pool:
                replies = list(pool.map(lambda job: (job[1].kind, _send(served, job[1], job[0], "vgg")), enumerate(requests)))
        finally:
            done.set()
            for thread in canaries:
                thread.join()
        seconds, peak_rss_mb = time.perf_counter() - started, workers.peak_rss_mb
    by_kind: dict[str, Counter] = {}
    for kind, reply in replies:
        by_kind.setdefault(kind, Counter())[reply.status] += 1
    return {"fuzz_requests": len(replies), "fuzz_seconds": round(seconds, 1),
            "fuzz_5xx": sum(reply.status >= 500 or reply.status == 0 for _, reply in replies),
            "fuzz_non_json": sum(not reply.is_json for _, reply in replies),
            "fuzz_accepted": sum(reply.status == 200 and kind not in MAY_SUCCEED for kind, reply in replies),
            "canary_requests": canary["sent"], "canary_failures": canary["failed"],
            "fuzz_peak_worker_rss_mb": round(peak_rss_mb, 1),
            "fuzz_by_kind": {kind: dict(sorted(counts.items())) for kind, counts in sorted(by_kind.items())}}


def envelopes(served: Served, images: np.ndarray, labels: list[int], classes: int) -> dict:
    """200 concurrent KServe v1 and v2 requests of 1-4 instances, each checked for its count and labels."""
    def call(k: int) -> tuple[bool, bool]:
        n, i = 1 + k % 4, (5 * k) % (len(images) - 4)
        expected = labels[i:i + n]
        if k % 3 == 2:
            tensor = {"name": "input", "shape": [n, *images.shape[1:]], "datatype": "FP32", "data": images[i:i + n].ravel().tolist()}
            reply = served.http.post(served.paths("v2_infer", "vgg"), json.dumps({"inputs": [tensor]}).encode(), "application/json")
            mismatch = reply.status == 200 and isinstance(reply.body, dict) and reply.body.get("id") != reply.headers.get("x-request-id")
            return _v2_labels(reply, n, classes) == expected, mismatch
        endpoint = "v1_predict" if k % 3 == 0 else "v1_explain"
        reply = served.http.post(served.paths(endpoint, "vgg"), _instances(images[i:i + n]), "application/json")
        return _labels(reply, endpoint == "v1_explain") == expected, False

    with ThreadPoolExecutor(ENVELOPE_REQUESTS) as pool:
        results = list(pool.map(call, range(ENVELOPE_REQUESTS)))
    return {"envelope_concurrent_errors": sum(not ok for ok, _ in results), "request_id_mismatches": sum(m for _, m in results)}


def tritonclient_modes(served: Served, images: np.ndarray, labels: list[int]) -> dict:
    """tritonclient's ways to call, each with 4 images: which of them do not get the labels back."""
    import tritonclient.grpc as triton_grpc
    import tritonclient.http as triton_http

    # a copy for each call: tritonclient.http writes Inference-Header-Content-Length (an int) into the dict it is given
    batch, expected, headers = images[:4], labels[:4], {"authorization": f"Bearer {served.http.key}"}
    client = triton_http.InferenceServerClient(f"127.0.0.1:{served.http.port}", network_timeout=120)

    def http_call(binary: bool, version: str = "") -> list[int]:
        tensor = triton_http.InferInput("input", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch, binary_data=binary)
        return client.infer("vgg", [tensor], model_version=version, headers=dict(headers)).as_numpy("label").tolist()

    def png_call() -> list[int]:
        tensor = triton_http.InferInput("input", [len(batch)], "BYTES")
        tensor.set_data_from_numpy(np.array([_png(image) for image in batch], dtype=object), binary_data=True)
        return client.infer("vgg", [tensor], headers=dict(headers)).as_numpy("label").tolist()

    def grpc_call() -> list[int]:
        if served.grpc_address is None:
            raise RuntimeError("no gRPC v2 endpoint")
        grpc_client = triton_grpc.InferenceServerClient(served.grpc_address)
        tensor = triton_grpc.InferInput("input", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
        return grpc_client.infer("vgg", [tensor], headers=dict(headers), client_timeout=120).as_numpy("label").tolist()

    modes = {"json": lambda: http_call(False), "binary": lambda: http_call(True), "bytes_image": png_call, "grpc": grpc_call,
             "versioned": lambda: http_call(True, "1")}
    failing = []
    for mode, call in modes.items():
        try:
            ok = call() == expected
        except Exception as error:  # any failure of the call is that mode failing
            ok, mode = False, f"{mode} ({type(error).__name__}: {str(error)[:120]})"
        if not ok:
            failing.append(mode)
    return {"tritonclient_modes_failing": len(failing), "tritonclient_failing": failing}


def oversized_body_seconds(served: Served) -> float | None:
    """Seconds until a 100 MiB body is refused with a 4xx (None: it was not)."""
    body = b"\0" * OVERSIZED_BYTES
    started = time.perf_counter()
    reply = Http(served.http.port, served.http.key).post(served.paths("v2_infer", "vgg"), body, "application/octet-stream")
    seconds = time.perf_counter() - started
    return round(seconds, 3) if 400 <= reply.status < 500 else None


def stall(served: Served, images: np.ndarray, contract: InputContract) -> dict:
    """p99 of small requests while 4 clients send maximum-size ones, over the idle p99."""
    small_body, small_path = _png(images[0]), served.paths("predictions", "vgg")
    big = _instances(np.random.default_rng(0).random((contract.max_instances, *contract.shape)), explain=True)
    client = Http(served.http.port, served.http.key)

    def small() -> float:
        started = time.perf_counter()
        reply = client.post(small_path, small_body, "image/png")
        if reply.status != 200:
            raise RuntimeError(f"a small request failed: {reply.status} {reply.body}")
        return time.perf_counter() - started

    for _ in range(20):
        small()
    idle = [small() for _ in range(STALL_SMALL_REQUESTS)]
    stop, big_replies = threading.Event(), Counter()

    def heavy() -> None:
        own = Http(served.http.port, served.http.key)
        while not stop.is_set():
            big_replies[own.post(served.paths("predictions", "vgg"), big, "application/json").status] += 1

    threads = [threading.Thread(target=heavy) for _ in range(STALL_CLIENTS)]
    for thread in threads:
        thread.start()
    time.sleep(1)
    try:
        busy, deadline = [], time.monotonic() + STALL_BUSY_SECONDS
        while len(busy) < STALL_SMALL_REQUESTS and time.monotonic() < deadline:
            busy.append(small())
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    idle_p99, busy_p99 = (1000 * float(np.percentile(x, 99)) for x in (idle, busy))
    return {"stall_p99_ratio": round(busy_p99 / idle_p99, 2), "stall_idle_p99_ms": round(idle_p99, 1),
            "stall_busy_p99_ms": round(busy_p99, 1), "stall_busy_requests": len(busy), "stall_big_body_mb": round(len(big) / 2**20, 1),
            "stall_big_statuses": dict(big_replies)}


def load(served: Served, model: str, images: np.ndarray, seconds: float) -> dict:
    """32 clients for ``seconds`` on ``model``, every fourth request an explanation."""
    pngs, deadline = [_png(image) for image in images], time.monotonic() + seconds

    def client(k: int) -> list[tuple[float, bool]]:
        results, n = [], k
        while time.monotonic() < deadline:
            endpoint = "explanations" if n % 4 == 0 else "predictions"
            started = time.perf_counter()
            reply = served.http.post(served.paths(endpoint, model), pngs[n % len(pngs)], "image/png")
            results.append((time.perf_counter() - started, _labels(reply, endpoint == "explanations") is not None))
            n += LOAD_CLIENTS
        return results

    with ThreadPoolExecutor(LOAD_CLIENTS) as pool:
        results = [result for client_results in pool.map(client, range(LOAD_CLIENTS)) for result in client_results]
    return {"load_requests": len(results), "load_errors": sum(not ok for _, ok in results),
            "load_p99_ms": round(1000 * float(np.percentile([latency for latency, _ in results], 99)), 1)}


def kill(served: Served, images: np.ndarray, sink: Path, before_kill_s: float, kill_and_restart: Callable[[], float]) -> dict:
    """Steady PNG predictions to `vgg_kill`, a SIGKILL of its worker while they run: is every answered one recorded?
    ``kill_and_restart()`` kills it, waits until a new one is ready and returns when it killed (time.monotonic())."""
    pngs, answers, lock, stop = [_png(image) for image in images], [], threading.Lock(), threading.Event()

    def client(k: int) -> None:
        n = k
        while not stop.is_set():
            reply = served.http.post(served.paths("predictions", "vgg_kill"), pngs[n % len(pngs)], "image/png")
            with lock:
                answers.append((time.monotonic(), reply.status, reply.headers.get("x-request-id")))
            n += KILL_CLIENTS
            time.sleep(0.02)

    clients = [threading.Thread(target=client, args=(k,)) for k in range(KILL_CLIENTS)]
    for thread in clients:
        thread.start()
    try:
        time.sleep(before_kill_s)
        killed_at = kill_and_restart()
        restart_seconds = time.monotonic() - killed_at
        time.sleep(1)
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    answered = [(at - killed_at, request_id) for at, status, request_id in answers if status == 200]  # s after the kill
    deadline, missing = time.monotonic() + RECORDS_WAIT_S, answered
    while missing and time.monotonic() < deadline:
        time.sleep(1)
        recorded = {record.request_id for _, record in ShardReader(str(sink), "vgg_kill", include_open=True).read()}
        missing = [(after, request_id) for after, request_id in missing if request_id not in recorded]
    lost = sorted(-after for after, _ in missing if after < 0)
    return {"kill_answered_before_kill": sum(after < 0 for after, _ in answered),
            "kill_answered_without_record": len(lost),
            "kill_lost_ms_before_kill": [round(1000 * seconds) for seconds in lost[:10]],  # when the lost ones were answered
            "kill_answered_after_kill_without_record": sum(after >= 0 for after, _ in missing),
            "kill_not_answered_200": sum(status != 200 for _, status, _ in answers),
            "kill_ids_missing_header": sum(request_id is None for _, request_id in answered),
            "kill_restart_seconds": round(restart_seconds, 1)}


def _metric_total(server: LocalTorchServe, metric: str, model: str) -> float | None:
    """The sum of a metric's series for ``model`` on TorchServe's Prometheus endpoint; 0 when the handler never
    emitted it, None when the endpoint did not answer. The handler emits its sampler's counts once a second, so drops
    in a killed worker's last second are not in it."""
    request = urllib.request.Request(server.metrics_url, headers={"Authorization": f"Bearer {server.key}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read().decode()
    except OSError:
        return None
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(metric + "{") and f'="{model}"' in line)


def _confident(served: Served, images: np.ndarray) -> tuple[np.ndarray, list[int], int]:
    """The images the model labels with a margin (top-1 minus top-2 probability >= 0.2), their labels and the class
    count: a label near a tie could flip with the batch an image is computed in, which would fail a good answer."""
    reply = served.http.post(served.paths("predictions", "vgg"), _instances(images, topk=10**6), "application/json")
    labels = _labels(reply, explained=False)
    if labels is None:
        raise RuntimeError(f"the labels of the test images could not be read: {reply.status} {str(reply.body)[:300]}")
    probabilities = [sorted(p["probabilities"].values(), reverse=True) for p in reply.body["predictions"]]
    keep = [i for i, p in enumerate(probabilities) if p[0] - p[1] >= 0.2]
    return images[keep], [labels[i] for i in keep], len(probabilities[0])


def _common(served: Served, workers: Workers, roles: tuple[str, ...], images: np.ndarray, sizes: Sizes) -> tuple[dict, np.ndarray, list[int]]:
    """The phases on `vgg`: fuzz, envelopes, tritonclient, the oversized body and the stall."""
    images, labels, classes = _confident(served, images)
    contract = InputContract(*images.shape[1:])
    figures = fuzz(served, workers, roles, contract, sizes.fuzz, images, labels)
    figures.update(envelopes(served, images, labels, classes))
    figures.update(tritonclient_modes(served, images, labels))
    figures["oversized_body_seconds"] = oversized_body_seconds(served)
    figures.update(stall(served, images, contract))
    return figures, images, labels


def measure_torchserve(scratch: Path, store: Path, images: np.ndarray, sizes: Sizes) -> dict:
    kill_sink = scratch / "kill-sink"
    (scratch / "ts").mkdir()
    with LocalTorchServe(store, list(MODELS), scratch / "ts", ready_timeout=300, keep_alive=True) as server:
        served = Served("torchserve", Http(server.ports["inference_address"], server.key), None, path)

        def poll() -> dict[str, list[int]]:
            return {name: [w["pid"] for w in server.workers(name) if isinstance(w.get("pid"), int) and w["pid"] > 0] for name in MODELS}

        def ready_pid(name: str) -> int | None:
            workers.check()
            found = server.workers(name)
            return found[0]["pid"] if found and found[0]["status"] == "READY" else None

        def kill_and_restart() -> float:
            pid = ready_pid("vgg_kill")
            if pid is None:
                raise RuntimeError("vgg_kill has no READY worker to kill")
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            while ready_pid("vgg_kill") in (None, pid) and time.monotonic() - killed_at < 300:
                time.sleep(0.1)
            return killed_at

        workers = Workers(poll)
        workers.start()
        try:
            figures, images, _ = _common(served, workers, ("vgg",), images, sizes)
            figures.update(load(served, "vgg_sampled", images, sizes.load_seconds))
            pngs = [_png(image) for image in images]
            bodies = [pngs[k % len(pngs)] for k in range(SAMPLING_ROUND_REQUESTS)]
            figures["sampling_cost_pct"] = float(np.median(paired_loss_pct(lambda name: throughput(server, name, bodies), "vgg",
                                                                           "vgg_sampled", sizes.sampling_pairs)))
            figures.update(kill(served, images, kill_sink, sizes.before_kill_s, kill_and_restart))
            figures["kill_sampled_dropped"] = _metric_total(server, "unhans_sample_dropped_total", "vgg_kill")
        finally:
            workers.stop()
    figures["worker_deaths"] = workers.deaths(deliberate=1 if len(workers.pids.get("vgg_kill", [])) > 1 else 0)
    return figures


KSERVE_PATHS = {"predictions": "/v1/models/{}:predict", "explanations": "/v1/models/{}:explain", "v1_predict": "/v1/models/{}:predict",
                "v1_explain": "/v1/models/{}:explain", "v2_infer": "/v2/models/{}/infer"}  # KServe has no /predictions


def _kserve_served(server: LocalKServe) -> Served:
    return Served("kserve", Http(server.http_port, server.key), Grpc(server.grpc_address, server.key),
                  lambda endpoint, model: KSERVE_PATHS[endpoint].format(model), server.grpc_address)


def _predictor_pids(server: LocalKServe, role: str) -> dict[str, list[int]]:
    """The predictor's pid and its parsing process's (role/parser), empty where it exited."""
    try:
        process = psutil.Process(server.pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return {role: [], f"{role}/parser": []}
        return {role: [server.pid], f"{role}/parser": [child.pid for child in process.children(recursive=True)
                                                       if "resource_tracker" not in " ".join(child.cmdline())]}
    except psutil.Error:
        return {role: [], f"{role}/parser": []}


def measure_kserve(scratch: Path, store: Path, images: np.ndarray, sizes: Sizes) -> dict:
    kill_sink = scratch / "kill-sink"
    work = {name: scratch / f"ks-{name}" for name in MODELS}
    for folder in work.values():
        folder.mkdir()
    deaths = 0
    with LocalKServe(store / "vgg.mar", work["vgg"], keep_alive=True, token=True) as server:
        workers = Workers(lambda: _predictor_pids(server, "vgg"), every=1)
        workers.start()
        try:
            figures, images, _ = _common(_kserve_served(server), workers, ("vgg", "vgg/parser"), images, sizes)
        finally:
            workers.stop()
        deaths += workers.deaths()
    with LocalKServe(store / "vgg_sampled.mar", work["vgg_sampled"], keep_alive=True, token=True) as server:
        workers = Workers(lambda: _predictor_pids(server, "vgg_sampled"), every=1)
        workers.start()
        try:
            figures.update(load(_kserve_served(server), "vgg_sampled", images, sizes.load_seconds))
        finally:
            workers.stop()
        deaths += workers.deaths()
    first = LocalKServe(store / "vgg_kill.mar", work["vgg_kill"], keep_alive=True, token=True).__enter__()
    served, servers = _kserve_served(first), [first]

    def kill_and_restart() -> float:
        """SIGKILL the predictor (its parsing process with it, as a container's), start one on the same sink and token."""
        processes = [psutil.Process(first.pid), *psutil.Process(first.pid).children(recursive=True)]
        killed_at = time.monotonic()
        for process in processes:
            process.kill()
        second = LocalKServe(store / "vgg_kill.mar", work["vgg_kill"], keep_alive=True, token=True).__enter__()
        servers.append(second)
        served.http.port, served.http.key = second.http_port, second.key  # the clients' next requests go to it
        return killed_at

    try:
        figures.update(kill(served, images, kill_sink, sizes.before_kill_s, kill_and_restart))
    finally:
        for server in servers:
            server.__exit__()
    figures["worker_deaths"] = deaths
    return figures


def measure(run: Path, scratch: Path, sizes: Sizes, servers: tuple[str, ...]) -> dict:
    store = scratch / "store"
    store.mkdir()
    images = vgg_archives(run, scratch, store, {
        "vgg": {}, "vgg_sampled": {"sample_fraction": 0.1, "sink": str(scratch / "sink")},
        "vgg_kill": {"sample_fraction": 1.0, "sample_cpu_budget": 1.0, "sink": str(scratch / "kill-sink")}})[:256]
    figures = {}
    for name in servers:  # one after the other; both record `vgg_kill` to the same sink (each looks up its own ids)
        measured = (measure_kserve if name == "kserve" else measure_torchserve)(scratch, store, images, sizes)
        figures.update({f"{key}_{name}": value for key, value in measured.items()})
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", choices=SERVERS, action="append", help="the server to measure (repeatable; default: both)")
    parser.add_argument("--json", type=Path, help="write the figures as one JSON object here")
    parser.add_argument("--run", type=Path, help="run folder of the backdoored VGG (trained here if missing)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: every phase shrunk (minutes; the full run takes 30-40)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    servers = tuple(args.server or SERVERS)
    with tempfile.TemporaryDirectory() as scratch:
        figures = measure(args.run or Path(scratch) / "vgg", Path(scratch), QUICK if args.quick else FULL, servers)
    by_kind = {name: figures.pop(f"fuzz_by_kind_{name}") for name in servers}
    report("reliability: hostile input, oversized and slow work, load and a killed worker (VGG-style MNIST archive)", figures,
           {f"{key}_{name}": target for key, target in TARGETS.items() for name in servers}, None)
    for name, kinds in by_kind.items():
        table = Table(title=f"fuzz on {name}: answers by kind of hostile request (status: count)")
        for column in ("kind", "statuses"):
            table.add_column(column)
        for kind, statuses in kinds.items():
            table.add_row(kind, ", ".join(f"{status}: {n}" for status, n in statuses.items()))
        Console().print(table)
    if args.json:
        args.json.write_text(json.dumps({**figures, **{f"fuzz_by_kind_{name}": kinds for name, kinds in by_kind.items()}}, indent=2))


if __name__ == "__main__":
    main()
