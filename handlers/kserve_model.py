"""KServe predictor for unhans archives: a thin adapter over the serving core (:mod:`unhans.handlers.service`).

    python -m unhans.handlers.kserve_model --archive model_store/vgg.mar [--host 127.0.0.1] [--token-file PATH]
        [--http_port 8080] [--grpc_port 8081]

The same archive ``unhans archive`` builds (``.mar`` or unpacked folder) answers KServe's protocols through
``kserve.ModelServer``: v1 ``:predict`` / ``:explain``, v2 ``/v2/models/NAME[/versions/V]/infer`` (JSON, with or
without a Content-Type, and the binary tensor extension) with ``/v2/health/*`` and metadata, and gRPC v2. Answers are
the TorchServe handler's: the core makes them. Inference requests never reach KServe's own parsers: our routes
(:mod:`unhans.handlers.kserve_http`) and gRPC servicer (:mod:`unhans.handlers.kserve_grpc`) read them within the
archive's limits and hand the bytes to the core, which parses them as under TorchServe.

Nothing runs on the event loop but I/O: a :class:`Scheduler` answers on two threads, small requests batched on one
(the next batch takes what queued while the previous one ran, up to the archive's ``batch_size``), large ones (bodies
over :data:`LARGE_BODY_BYTES`, or more instances than a batch) one at a time on the other, with an explainer of their
own, at a lower CPU priority, their bodies parsed in a process of their own (:class:`ParsingProcess`): a large request
never holds up health checks or small requests. Waiting requests are bounded (count and bytes, the archive's
``max_queued_requests`` / ``max_queued_bytes``: more are answered 503 at once) and each is answered within the
archive's ``response_timeout_s`` (a 503 past it). The server listens on 127.0.0.1 unless ``--host`` says otherwise;
with ``--token-file`` every call but the health probes needs ``Authorization: Bearer <token>``. Metrics are the
core's, as prometheus_client metrics on the server's ``/metrics``; sampling writes to the same sink as under TorchServe.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing
import os
import queue
import secrets
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import kserve
from prometheus_client import Counter, Histogram

from unhans.core.serving import METRICS, manifest, unpacked
from unhans.handlers.requests import Request, parse
from unhans.handlers.service import Answer, Row, Service

logger = logging.getLogger(__name__)
LARGE_BODY_BYTES = 1 << 20  # parsing a body this large holds the interpreter for ~10 ms: it goes to the large lane
SMALL, LARGE = 0, 1  # the lanes, and the Service explainer each one uses
LARGE_NICENESS = 10  # the large lane's thread and parsing process yield the CPU to the small lane and the event loop


def error(status: int, field: str | None, problem: str) -> Answer:
    """An answer refusing a request, in the core's JSON shape."""
    return Answer(status, {"error": {"field": field, "problem": problem, "status": status}})


@dataclass
class _Job:
    row: Row
    done: asyncio.Future
    loop: asyncio.AbstractEventLoop
    read: Request | Answer | None = None  # the row, parsed
    abandoned: bool = False  # its client stopped waiting: no work is spent on it

    def deliver(self, answer: Answer) -> None:
        try:
            self.loop.call_soon_threadsafe(_settle, self.done, answer)
        except RuntimeError:  # its event loop is closed: no one waits for this answer
            pass


def _settle(future: asyncio.Future, answer: Answer) -> None:
    if not future.done():
        future.set_result(answer)


class ParsingProcess:
    """:func:`~unhans.handlers.requests.parse` in a process of its own, for the large lane: decoding a large body
    (``json.loads`` of 4 MB holds the interpreter for ~0.1 s in one call) would otherwise stall the event loop and the
    small lane. A process that dies (its request answered 500) is replaced for the next one."""

    def __init__(self):
        self._pool = self._start()

    @staticmethod
    def _start() -> ProcessPoolExecutor:
        # spawned, not forked (a threaded server), and at the large lane's lower CPU priority
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=os.nice, initargs=(LARGE_NICENESS,))
        with _main_module_hidden():
            pool.submit(int).result()  # started now, not at the first large request
        return pool

    def __call__(self, *args, **kwargs) -> Request:
        try:
            return self._pool.submit(parse, *args, **kwargs).result()
        except BrokenProcessPool:
            self._pool = self._start()
            raise


@contextlib.contextmanager
def _main_module_hidden():
    """Within the block, processes spawned do not import this process's main module: multiprocessing would, for
    functions defined there, and the predictor's (this module) imports torch and KServe, 0.9 GB the parsing process
    does not need (it imports unhans.handlers.requests alone)."""
    main = sys.modules["__main__"]
    saved = {name: main.__dict__[name] for name in ("__spec__", "__file__") if name in main.__dict__}
    main.__spec__ = None
    main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        main.__dict__.update(saved)


class Scheduler:
    """Answers rows off the event loop on two lanes (small requests batched, large ones alone), within a bounded
    queue and a deadline per request."""

    def __init__(self, service: Service):
        config = service.config
        self.service, self.batch_size, self.deadline_s = service, max(config.batch_size, 1), config.response_timeout_s
        self.max_requests, self.max_bytes = config.max_queued_requests, config.max_queued_bytes
        self.waiting = self.waiting_bytes = 0  # touched on the event loop only
        self._lanes, self._parse_large = (queue.SimpleQueue(), queue.SimpleQueue()), ParsingProcess()
        for lane, work in ((SMALL, self._small_lane), (LARGE, self._large_lane)):
            threading.Thread(target=work, name=f"unhans-lane-{lane}", daemon=True).start()

    def admit(self, size: int) -> Answer | None:
        """Count a request of ``size`` body bytes (declared; read or not) as waiting, or its 503 when there is no room:
        the routes ask before they read a body. Each admitted request is released (:meth:`release`) once answered."""
        if self.waiting >= self.max_requests or (self.waiting and self.waiting_bytes + size > self.max_bytes):
            return error(503, None, f"the server is busy ({self.waiting} requests, {self.waiting_bytes / 2**20:.0f} MiB waiting, "
                         f"limits {self.max_requests} and {self.max_bytes / 2**20:.0f} MiB); retry later")
        self.waiting, self.waiting_bytes = self.waiting + 1, self.waiting_bytes + size
        return None

    def release(self, size: int) -> None:
        self.waiting, self.waiting_bytes = self.waiting - 1, self.waiting_bytes - size

    async def answer(self, row: Row, size: int) -> Answer:
        """An admitted row's answer, within the deadline."""
        loop = asyncio.get_running_loop()
        job = _Job(row, loop.create_future(), loop)
        self._lanes[LARGE if size > LARGE_BODY_BYTES else SMALL].put(job)
        try:
            return await asyncio.wait_for(asyncio.shield(job.done), self.deadline_s)
        except asyncio.TimeoutError:
            logger.warning("unhans: request %s was not answered within %s s", row.request_id, self.deadline_s)
            return error(503, None, f"was not answered within {self.deadline_s} s (the archive's response_timeout_s); retry later")
        finally:
            job.abandoned = not job.done.done()

    def _small_lane(self) -> None:
        while True:
            jobs = [self._lanes[SMALL].get()]
            while len(jobs) < self.batch_size:
                try:
                    jobs.append(self._lanes[SMALL].get_nowait())
                except queue.Empty:
                    break
            jobs = [job for job in jobs if not job.abandoned]
            for job in jobs:
                job.read = self.service.read(job.row)
            large = [job for job in jobs if isinstance(job.read, Request) and len(job.read.inputs) > self.batch_size]
            for job in large:
                self._lanes[LARGE].put(job)
            self._answer([job for job in jobs if job not in large], SMALL)

    def _large_lane(self) -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LARGE_NICENESS)  # Linux: this thread alone
        while True:
            job = self._lanes[LARGE].get()
            if not job.abandoned:
                if job.read is None:
                    job.read = self.service.read(job.row, self._parse_large)
                self._answer([job], LARGE)

    def _answer(self, jobs: list[_Job], lane: int) -> None:
        if not jobs:
            return
        try:
            answers = self.service.answer([job.row for job in jobs], [job.read for job in jobs], lane=lane)
        except Exception:  # the core answers every row itself: this is a bug of ours; fail these rows, keep serving
            logger.exception("unhans: a batch failed")
            answers = [error(500, None, "internal error; it is logged in the server's log")] * len(jobs)
        for job, answer in zip(jobs, answers):
            job.deliver(answer)


class UnhansModel(kserve.Model):
    """An unhans archive as a KServe model: its readiness and metadata for KServe's routes, its answers for ours."""

    def __init__(self, archive: str, name: str | None = None):
        self._archive, self._files = archive, contextlib.ExitStack()
        self._folder = self._files.enter_context(unpacked(archive))  # unpacked for the model's lifetime
        self.service = self.scheduler = None
        super().__init__(name or manifest(self._folder)["modelName"])
        self._metrics = _prometheus_metrics()

    def load(self) -> bool:
        self.service = Service(self._folder, metric=self._metric, lanes=2)
        self.scheduler = Scheduler(self.service)
        self.ready = True
        return self.ready

    def stop(self) -> None:
        self._files.close()
        super().stop()

    @property
    def version(self) -> str:
        return self.service.version

    def refuses(self, name: str, version: str | None) -> Answer | None:
        """None when a request names this model (and, if it names one, its version), else the 404 naming what is served."""
        if name != self.name:
            return error(404, "model_name", f"{name!r} is not served here; this server serves {self.name!r}")
        if version and not _same_version(version, self.version):
            return error(404, "model_version", f"{version!r} is not served here; {self.name!r} is version {self.version!r}")
        return None

    def get_input_types(self) -> list[dict]:
        return self.service.v2_metadata()[0]

    def get_output_types(self) -> list[dict]:
        return self.service.v2_metadata()[1]

    def _metric(self, name: str, value: float, **labels) -> None:
        metric = self._metrics[name].labels(model_name=self.name, **labels)
        metric.inc(value) if METRICS[name].kind == "counter" else metric.observe(value)


def _same_version(asked: str, served: str) -> bool:
    """Whether a client's version names the archive's: "1" names "1.0" (tritonclient sends integers)."""
    def parts(version: str) -> list[str]:
        split = version.strip().split(".")
        while len(split) > 1 and split[-1] == "0":
            split.pop()
        return split
    return parts(asked) == parts(served)


_PROMETHEUS: dict = {}


def _prometheus_metrics() -> dict:
    """The core's metrics as prometheus_client ones, registered once per process (KServe serves the default registry)."""
    if not _PROMETHEUS:
        for name, metric in METRICS.items():
            kind = Counter if metric.kind == "counter" else Histogram
            _PROMETHEUS[name] = kind(name.removesuffix("_total"), metric.help, ["model_name", *metric.labels])
    return _PROMETHEUS


def read_token(path: str | None) -> str | None:
    """The bearer token in ``path`` (stripped); a new random one is written there (mode 0600) when it does not exist,
    as TorchServe writes its key_file.json. None: no ``--token-file``, no authentication."""
    if path is None:
        return None
    file = Path(path)
    if not file.exists():
        file.touch(mode=0o600)
        file.write_text(secrets.token_urlsafe(24) + "\n")
        logger.info("unhans: wrote a new bearer token to %s", file)
    token = file.read_text().strip()
    if not token:
        raise SystemExit(f"unhans: {file} is empty; put the bearer token clients send in it, or remove it to have one written")
    return token


def main(argv: list[str] | None = None) -> None:
    from unhans.handlers.kserve_http import serve

    parser = argparse.ArgumentParser(parents=[kserve.model_server.parser], description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", required=True, help="the .mar 'unhans archive' wrote, or its unpacked folder")
    parser.add_argument("--host", default="127.0.0.1", help="address the HTTP and gRPC servers listen on (0.0.0.0: all, as in a container)")
    parser.add_argument("--token-file", help="require 'Authorization: Bearer <token>' (gRPC: 'authorization' metadata) on every "
                        "call but the health probes; the token is this file's content, written at random if the file is missing")
    args, _ = parser.parse_known_args(argv)
    if args.workers != 1:
        parser.error("--workers must be 1: each replica answers on its own threads; scale with replicas")
    model = UnhansModel(args.archive, args.model_name if args.model_name != "model" else None)
    model.load()
    serve(model, args.host, read_token(args.token_file))


if __name__ == "__main__":
    main()
