"""Run the unhans KServe predictor (a real ``kserve.ModelServer`` process) on this machine for tests and benchmarks.

``with LocalKServe(archive, work) as server:`` starts ``python -m unhans.handlers.kserve_model`` on free loopback ports
(REST and gRPC; with ``token=True`` a bearer token required, in ``server.key``), waits until ``/v2/health/ready`` says so, reports a server that died at start with its log's last
lines, and stops it on exit, also after an error.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from unhans.local_server import LocalServer, free_port


class LocalKServe(LocalServer):
    def __init__(self, archive: str | Path, work: str | Path, ready_timeout: float = 120, keep_alive: bool = False,
                 extra_args: tuple[str, ...] = (), token: bool = False):
        super().__init__(keep_alive)
        self.archive, self.work, self.ready_timeout, self.extra_args = Path(archive), Path(work), ready_timeout, extra_args
        self.token_file = self.work / "token" if token else None  # written by the predictor at start: self.key
        self.key = None
        self.http_port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.grpc_address = f"127.0.0.1:{self.grpc_port}"

    def __enter__(self):
        self.log_path = self.work / "kserve.log"
        self.log = open(self.log_path, "wb")
        command = [sys.executable, "-m", "unhans.handlers.kserve_model", "--archive", str(self.archive),
                   "--http_port", str(self.http_port), "--grpc_port", str(self.grpc_port), *self.extra_args,
                   *(("--token-file", str(self.token_file)) if self.token_file else ())]
        self.process = subprocess.Popen(command, cwd=self.work, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            deadline = time.monotonic() + self.ready_timeout
            while time.monotonic() < deadline:
                time.sleep(0.3)
                if self.process.poll() is not None:
                    raise RuntimeError(f"the KServe predictor exited during start-up ({self.process.returncode}): {self.log_tail()}")
                status, body = self.request("GET", "/v2/health/ready")
                if status == 200 and isinstance(body, dict) and body.get("ready"):
                    self.key = self.token_file.read_text().strip() if self.token_file else None
                    return self
            raise RuntimeError(f"the KServe predictor did not get ready in {self.ready_timeout:.0f} s: {self.log_tail()}")
        except BaseException:
            self.__exit__()
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """(status, decoded JSON body) of one HTTP call, with the bearer token when the server has one; status 0 when
        nothing answered."""
        return self.call(self.url, method, path, body, {**({"Authorization": f"Bearer {self.key}"} if self.key else {}), **(headers or {})})

    def post(self, path: str, body: bytes, content_type: str, headers: dict | None = None):
        return self.request("POST", path, body, {"Content-Type": content_type, **(headers or {})})

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.is_file() else ""

    def __exit__(self, *exc):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
