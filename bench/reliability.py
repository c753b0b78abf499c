"""Benchmark: serving that survives hostile input, oversized work, load and a killed worker, in one real TorchServe.

    python bench/reliability.py [--json PATH] [--run DIR] [--quick]

One TorchServe (loopback, token auth, unhans.torchserve.LocalTorchServe) serves the VGG archive as bench/serving.py
builds it (the backdoored MNIST VGG, trained into --run if missing, its P-ClArC correction and ONNX explain graph),
batch size 8, 5 ms batch delay, no service_envelope, three times: `vgg` (plain), `vgg_sampled` (10% of instances
recorded to a sink) and `vgg_kill` (every instance recorded, sampler CPU budget 1.0, a local sink). Every client keeps
its HTTP/1.1 connection alive and sends the inference key, as production clients do. A request that gets no answer
(a reset or closed connection, no reply within 120 s) counts as status 0, a server failure; an error of this script
stops it instead. Keys (--quick shrinks each phase for a smoke run: 500 hostile requests, 10 s of load, 2 pairs):

- fuzz_requests: hostile requests (unhans/hostile.py: every kind in turn, randomised, the heavy ones in every tenth
  round) sent to `vgg` by 16 clients over /predictions, /explanations, KServe v1 :predict / :explain and v2 /infer;
  10,000 (500 with --quick). fuzz_5xx: those answered >= 500 or not at all (target 0); fuzz_non_json: answers whose
  body is not JSON (target 0); fuzz_accepted: answered 200 although their kind is not a valid request
  (hostile.MAY_SUCCEED; target 0); the JSON holds every kind's statuses under fuzz_by_kind;
- canary_failures: valid requests sent by 3 more clients while the fuzz runs (MNIST test images as PNG and as JSON
  instances, to /predictions and /explanations) that did not get a 200 with the image's label (and a relevance map
  when explained); target 0. Every phase uses the test images the model labels with a margin (top-1 minus top-2
  probability >= 0.2), so that no label flips with the batch an image is computed in;
- fuzz_peak_worker_rss_mb: the peak resident memory of `vgg`'s worker during the fuzz (psutil, every 0.1 s);
  target <= 1500;
- envelope_concurrent_errors: 200 concurrent KServe requests of 1 to 4 instances each, v1 {"instances"} to :predict
  and :explain and v2 JSON FP32 tensors [n, 1, 28, 28] to /infer, each on its own connection: a non-200, or an
  answer without n predictions (v2: n labels, n x classes probabilities) carrying the right labels, is an error;
  target 0. request_id_mismatches: v2 answers whose id (the handler's request id) is not TorchServe's x-request-id
  header (the kill phase relies on the two being the same);
- load_errors: requests not answered 200 with a label during 60 s (10 s) of 32 clients on `vgg_sampled`, a quarter
  of them explanations; target 0. load_p99_ms: their 99th-percentile latency;
- sampling_cost_pct: throughput `vgg_sampled` loses against `vgg`, bench/serving.py's method (common.paired_loss_pct:
  the median over 12 (2) interleaved pairs of rounds of 768 PNG predictions); target <= 3. Single pairs scatter by
  about +-15% on 2 cores, so 12 pairs move the median by a few points between runs;
- kill_answered_without_record: 4 clients send PNG predictions to `vgg_kill` at a steady pace; after 5 s (3 s) its
  worker is SIGKILLed (pid from the management API) while requests are in flight, and they keep sending until the
  restarted worker is READY, and 1 s more. Requests answered 200 before the kill whose x-request-id has no record in
  the sink (unhans.handlers.sink.ShardReader, open shards included), read every second until all are there or for
  120 s (the new worker records what the dead one journaled), are lost; target 0. kill_answered_before_kill is how
  many were answered, kill_lost_ms_before_kill how long before the kill the lost ones were, and
  kill_answered_after_kill_without_record counts the same for the answers after the kill. kill_restart_seconds:
  from the SIGKILL until a new worker is READY. kill_sampled_dropped: the handler's unhans_sample_dropped_total for
  `vgg_kill` on TorchServe's metrics endpoint (None when it could not be read); the handler emits its sampler's
  counts once a second, so drops in the killed worker's last second are not in it;
- worker_deaths: worker pids that changed, for any model, over the whole run (the management API, every 0.5 s),
  oversized requests included, the deliberate kill excluded; target 0.
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
from typing import Any

import numpy as np
import psutil
import torch
from common import paired_loss_pct, report, throughput, vgg_archives
from PIL import Image
from rich.console import Console
from rich.table import Table

from unhans.core.contract import InputContract
from unhans.handlers.sink import ShardReader
from unhans.hostile import MAY_SUCCEED, hostile_requests, path
from unhans.torchserve import LocalTorchServe

TARGETS = {"fuzz_requests": ">= 10000", "fuzz_5xx": "0", "fuzz_non_json": "0", "fuzz_accepted": "0", "canary_failures": "0",
           "fuzz_peak_worker_rss_mb": "<= 1500", "envelope_concurrent_errors": "0", "request_id_mismatches": "0",
           "load_errors": "0", "sampling_cost_pct": "<= 3", "kill_answered_without_record": "0",
           "kill_answered_after_kill_without_record": "0", "worker_deaths": "0"}
FUZZ_CLIENTS, CANARY_CLIENTS, LOAD_CLIENTS, KILL_CLIENTS, ENVELOPE_REQUESTS = 16, 3, 32, 4, 200
SAMPLING_ROUND_REQUESTS = 768
MODELS = ("vgg", "vgg_sampled", "vgg_kill")
RECORDS_WAIT_S = 120  # the restarted worker first records what the killed one journaled


@dataclass(frozen=True)
class Sizes:
    fuzz: int
    load_seconds: float
    sampling_pairs: int
    before_kill_s: float


FULL, QUICK = Sizes(10_000, 60.0, 12, 5.0), Sizes(500, 10.0, 2, 3.0)


@dataclass
class Reply:
    status: int  # 0: no answer
    body: Any  # the decoded JSON, None when not JSON
    is_json: bool
    headers: dict  # names lower-cased


class Http:
    """Keep-alive connections to TorchServe's inference port, one per calling thread, with the inference key.

    No request is resent: a connection the server drops without an answer is that request's status 0. One the
    server closes after answering (``Connection: close``) is reopened for the next request."""

    def __init__(self, server: LocalTorchServe):
        self.port, self.key, self._local = server.ports["inference_address"], server.key, threading.local()

    def post(self, target: str, body: bytes, content_type: str, headers: dict | None = None) -> Reply:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            connection.request("POST", target, body, {"Content-Type": content_type, "Authorization": f"Bearer {self.key}", **(headers or {})})
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


class Workers(threading.Thread):
    """Watches every model's workers for the whole run: each pid the management API reports, every 0.5 s (a new pid is
    a worker that died and was restarted), and the peak resident memory of one model's worker, every 0.1 s, while
    :meth:`watching_memory` names that model."""

    def __init__(self, server: LocalTorchServe, names):
        super().__init__(daemon=True)
        self.server, self.names = server, list(names)
        self.pids = {name: [] for name in self.names}  # distinct pids seen, in order
        self.peak_rss_mb, self._watched, self._done, self._lock = 0.0, None, threading.Event(), threading.Lock()

    @contextmanager
    def watching_memory(self, name: str):
        """Within the block, :attr:`peak_rss_mb` is the peak of ``name``'s worker since the block began."""
        self._watched, self.peak_rss_mb = name, 0.0
        try:
            yield
        finally:
            self._watched = None

    def ready_pid(self, name: str) -> int | None:
        """The pid of the model's worker when it is READY, else None; every pid reported is recorded as seen."""
        workers = self.server.workers(name)
        with self._lock:
            started = dict.fromkeys(w["pid"] for w in workers if isinstance(w.get("pid"), int) and w["pid"] > 0)  # -1: starting
            self.pids[name].extend(pid for pid in started if pid not in self.pids[name])
        return workers[0]["pid"] if workers and workers[0]["status"] == "READY" else None

    def run(self) -> None:
        tick = 0
        while True:
            if tick % 5 == 0:
                for name in self.names:
                    self.ready_pid(name)
            tick += 1
            watched = self._watched
            if watched and self.pids[watched]:
                try:
                    self.peak_rss_mb = max(self.peak_rss_mb, psutil.Process(self.pids[watched][-1]).memory_info().rss / 2**20)
                except psutil.Error:
                    pass  # it died: the next poll sees its successor
            if self._done.wait(0.1):
                break
        for name in self.names:  # a change since the last poll
            self.ready_pid(name)

    def stop(self) -> None:
        self._done.set()
        self.join()


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((image[0] * 255).round().astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _instances(images: np.ndarray) -> bytes:
    return json.dumps({"instances": images.tolist()}).encode()


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


def fuzz(http_: Http, workers: Workers, contract: InputContract, count: int, images: np.ndarray, labels: list[int]) -> dict:
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
                reply = http_.post(f"/{endpoint}/vgg", _instances(images[i:i + 1]), "application/json")
            else:
                reply = http_.post(f"/{endpoint}/vgg", pngs[i], "image/png")
            ok = _labels(reply, endpoint == "explanations") == [labels[i]]
            with lock:
                canary["sent"] += 1
                canary["failed"] += not ok
            sent += 1

    def send(request) -> tuple[str, Reply]:
        return request.kind, http_.post(path(request.endpoint, "vgg"), request.body, request.content_type, request.headers)

    canaries = [threading.Thread(target=canary_client, args=(k,)) for k in range(CANARY_CLIENTS)]
    with workers.watching_memory("vgg"):
        for thread in canaries:
            thread.start()
        started = time.perf_counter()
        try:
            with ThreadPoolExecutor(FUZZ_CLIENTS) as pool:
                replies = list(pool.map(send, requests))
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


def envelopes(http_: Http, images: np.ndarray, labels: list[int], classes: int) -> dict:
    """200 concurrent KServe v1 and v2 requests of 1-4 instances, each checked for its count and labels."""
    def call(k: int) -> tuple[bool, bool]:
        n, i = 1 + k % 4, (5 * k) % (len(images) - 4)
        expected = labels[i:i + n]
        if k % 3 == 2:
            tensor = {"name": "input", "shape": [n, *images.shape[1:]], "datatype": "FP32", "data": images[i:i + n].ravel().tolist()}
            reply = http_.post("/v2/models/vgg/infer", json.dumps({"inputs": [tensor]}).encode(), "application/json")
            mismatch = reply.status == 200 and isinstance(reply.body, dict) and reply.body.get("id") != reply.headers.get("x-request-id")
            return _v2_labels(reply, n, classes) == expected, mismatch
        verb = "predict" if k % 3 == 0 else "explain"
        reply = http_.post(f"/v1/models/vgg:{verb}", _instances(images[i:i + n]), "application/json")
        return _labels(reply, verb == "explain") == expected, False

    with ThreadPoolExecutor(ENVELOPE_REQUESTS) as pool:
        results = list(pool.map(call, range(ENVELOPE_REQUESTS)))
    return {"envelope_concurrent_errors": sum(not ok for ok, _ in results), "request_id_mismatches": sum(m for _, m in results)}


def load(http_: Http, images: np.ndarray, seconds: float) -> dict:
    """32 clients for ``seconds`` on `vgg_sampled`, every fourth request an explanation."""
    pngs, deadline = [_png(image) for image in images], time.monotonic() + seconds

    def client(k: int) -> list[tuple[float, bool]]:
        results, n = [], k
        while time.monotonic() < deadline:
            endpoint = "explanations" if n % 4 == 0 else "predictions"
            started = time.perf_counter()
            reply = http_.post(f"/{endpoint}/vgg_sampled", pngs[n % len(pngs)], "image/png")
            results.append((time.perf_counter() - started, _labels(reply, endpoint == "explanations") is not None))
            n += LOAD_CLIENTS
        return results

    with ThreadPoolExecutor(LOAD_CLIENTS) as pool:
        results = [result for client_results in pool.map(client, range(LOAD_CLIENTS)) for result in client_results]
    return {"load_requests": len(results), "load_errors": sum(not ok for _, ok in results),
            "load_p99_ms": round(1000 * float(np.percentile([latency for latency, _ in results], 99)), 1)}


def _metric_total(server: LocalTorchServe, metric: str, model: str) -> float | None:
    """The sum of a metric's series for ``model`` on TorchServe's Prometheus endpoint; 0 when the handler never
    emitted it, None when the endpoint did not answer."""
    request = urllib.request.Request(server.metrics_url, headers={"Authorization": f"Bearer {server.key}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read().decode()
    except OSError:
        return None
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(metric + "{") and f'="{model}"' in line)


def kill(server: LocalTorchServe, http_: Http, workers: Workers, images: np.ndarray, sink: Path, before_kill_s: float) -> dict:
    """Steady PNG predictions to `vgg_kill`, a SIGKILL of its worker while they run: is every answered one recorded?"""
    pngs, answers, lock, stop = [_png(image) for image in images], [], threading.Lock(), threading.Event()

    def client(k: int) -> None:
        n = k
        while not stop.is_set():
            reply = http_.post("/predictions/vgg_kill", pngs[n % len(pngs)], "image/png")
            with lock:
                answers.append((time.monotonic(), reply.status, reply.headers.get("x-request-id")))
            n += KILL_CLIENTS
            time.sleep(0.02)

    clients = [threading.Thread(target=client, args=(k,)) for k in range(KILL_CLIENTS)]
    for thread in clients:
        thread.start()
    try:
        time.sleep(before_kill_s)
        pid = workers.ready_pid("vgg_kill")
        if pid is None:
            raise RuntimeError("vgg_kill has no READY worker to kill")
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        while workers.ready_pid("vgg_kill") in (None, pid) and time.monotonic() - killed_at < 300:
            time.sleep(0.1)
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
            "kill_restart_seconds": round(restart_seconds, 1),
            "kill_sampled_dropped": _metric_total(server, "unhans_sample_dropped_total", "vgg_kill")}


def _confident(http_: Http, images: np.ndarray) -> tuple[np.ndarray, list[int], int]:
    """The images the model labels with a margin (top-1 minus top-2 probability >= 0.2), their labels and the class
    count: a label near a tie could flip with the batch an image is computed in, which would fail a good answer."""
    reply = http_.post("/predictions/vgg", json.dumps({"instances": images.tolist(), "topk": 10**6}).encode(), "application/json")
    labels = _labels(reply, explained=False)
    if labels is None:
        raise RuntimeError(f"the labels of the test images could not be read: {reply.status} {str(reply.body)[:300]}")
    probabilities = [sorted(p["probabilities"].values(), reverse=True) for p in reply.body["predictions"]]
    keep = [i for i, p in enumerate(probabilities) if p[0] - p[1] >= 0.2]
    return images[keep], [labels[i] for i in keep], len(probabilities[0])


def measure(run: Path, scratch: Path, sizes: Sizes) -> dict:
    store, kill_sink = scratch / "store", scratch / "kill-sink"
    store.mkdir()
    images = vgg_archives(run, scratch, store, {
        "vgg": {}, "vgg_sampled": {"sample_fraction": 0.1, "sink": str(scratch / "sink")},
        "vgg_kill": {"sample_fraction": 1.0, "sample_cpu_budget": 1.0, "sink": str(kill_sink)}})[:256]
    (scratch / "work").mkdir()
    with LocalTorchServe(store, list(MODELS), scratch / "work", ready_timeout=300, keep_alive=True) as server:
        http_ = Http(server)
        images, labels, classes = _confident(http_, images)
        workers = Workers(server, MODELS)
        workers.start()
        try:
            figures = fuzz(http_, workers, InputContract(*images.shape[1:]), sizes.fuzz, images, labels)
            figures.update(envelopes(http_, images, labels, classes))
            figures.update(load(http_, images, sizes.load_seconds))
            pngs = [_png(image) for image in images]
            bodies = [pngs[k % len(pngs)] for k in range(SAMPLING_ROUND_REQUESTS)]
            figures["sampling_cost_pct"] = float(np.median(paired_loss_pct(lambda name: throughput(server, name, bodies), "vgg",
                                                                           "vgg_sampled", sizes.sampling_pairs)))
            figures.update(kill(server, http_, workers, images, kill_sink, sizes.before_kill_s))
        finally:
            workers.stop()
    deliberate = 1 if len(workers.pids["vgg_kill"]) > 1 else 0
    figures["worker_deaths"] = sum(len(pids) - 1 for pids in workers.pids.values()) - deliberate
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the figures as one JSON object here")
    parser.add_argument("--run", type=Path, help="run folder of the backdoored VGG (trained here if missing)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: every phase shrunk (a few minutes; the full run takes 10-15)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        figures = measure(args.run or Path(scratch) / "vgg", Path(scratch), QUICK if args.quick else FULL)
    by_kind = figures.pop("fuzz_by_kind")
    report("reliability: hostile input, load and a killed worker, one real TorchServe (VGG-style MNIST archive)", figures, TARGETS, None)
    table = Table(title="fuzz: answers by kind of hostile request (status: count)")
    for column in ("kind", "statuses"):
        table.add_column(column)
    for kind, statuses in by_kind.items():
        table.add_row(kind, ", ".join(f"{status}: {n}" for status, n in statuses.items()))
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps({**figures, "fuzz_by_kind": by_kind}, indent=2))


if __name__ == "__main__":
    main()
