"""Run a real TorchServe on this machine for tests, benchmarks and the demo: loopback only, token auth on.

TorchServe's traps, all handled here: its pid file lives in ``TMPDIR`` and its worker sockets in ``TEMP``, so each
server gets private ones or parallel servers collide; ``torchserve --start`` hangs when its output is a pipe, so it
writes to a file; the inference and management keys appear in ``key_file.json`` of its working directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from unhans.core.contract import torchserve_limits
from unhans.local_server import LocalServer, free_port
from unhans.core.serving import TORCHSERVE_CONFIG

# lines of TorchServe's logs that name why it or a worker failed, first match reported
FAILURE_MARKS = ("Address already in use", "BindException", "refusing to start", "Traceback", "Error:", "ERROR")


class LocalTorchServe(LocalServer):
    """A real TorchServe on free loopback ports, token authorization on, in its own working and temp folder.

    ``with LocalTorchServe(store, "name", work) as server:`` starts it with ``store/name.mar`` (or several names),
    waits until every worker is READY, and stops it on exit, also after an error.
    """

    def __init__(self, store, names: str | list[str], work, extra_config: str = "", ready_timeout: float = 120,
                 keep_alive: bool = False):
        self.names = [names] if isinstance(names, str) else list(names)
        self.name, self.work, self.ready_timeout = self.names[0], Path(work).resolve(), ready_timeout  # TorchServe wants absolute paths
        self.extra_config = extra_config
        self._configure()
        self.bin = Path(sys.executable).parent
        # TMPDIR holds TorchServe's pid file, TEMP its worker sockets: both private, so parallel servers don't collide
        self.env = {**os.environ, "TMPDIR": str(self.work), "TEMP": str(self.work), "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}"}
        self.store = Path(store).resolve()
        self.key = self.management_key = None
        super().__init__(keep_alive)

    def _configure(self) -> None:
        """Write config.properties on free loopback ports (all of them, gRPC too: another server may hold the defaults)."""
        config = TORCHSERVE_CONFIG.read_text()
        self.ports = {}
        for key, default in (("inference_address", 8080), ("management_address", 8081), ("metrics_address", 8082)):
            self.ports[key] = free_port()
            config = config.replace(f"{key}=http://127.0.0.1:{default}", f"{key}=http://127.0.0.1:{self.ports[key]}")
        for key, default in (("grpc_inference_port", 7070), ("grpc_management_port", 7071)):
            self.ports[key] = free_port()
            config = config.replace(f"{key}={default}", f"{key}={self.ports[key]}")
        assert "disable_token_authorization=false" in config
        limits = "".join(f"{key}={value}\n" for key, value in torchserve_limits().items())  # the contract's defaults
        (self.work / "config.properties").write_text(config + f"\ninitial_worker_port={free_port()}\n{limits}{self.extra_config}\n")
        self.url = f"http://127.0.0.1:{self.ports['inference_address']}"
        self.management_url = f"http://127.0.0.1:{self.ports['management_address']}"
        self.metrics_url = f"http://127.0.0.1:{self.ports['metrics_address']}/metrics"

    def __enter__(self):
        try:
            return self._start()
        except RuntimeError as error:
            if "Address already in use" not in str(error):
                raise
        # a port picked free was taken before TorchServe bound it (another server starting on the host): once more
        self._configure()
        return self._start()

    def _start(self):
        command = [str(self.bin / "torchserve"), "--start", "--ncs", "--model-store", str(self.store), "--ts-config",
                   str(self.work / "config.properties"), "--models", *(f"{n}={n}.mar" for n in self.names)]
        # the Java server inherits stdout: a file, not a pipe, or waiting for the launcher never ends
        self.log = open(self.work / "torchserve.out", "wb")
        subprocess.run(command, cwd=self.work, env=self.env, check=True, stdout=self.log, stderr=subprocess.STDOUT, timeout=60)
        try:
            deadline = time.monotonic() + self.ready_timeout
            while time.monotonic() < deadline:
                time.sleep(0.5)
                if not self.running():
                    raise RuntimeError(f"TorchServe exited during start-up: {self.failure()}")
                if self.key is None:
                    self._read_keys()
                if self.key is not None and all(self.workers_ready(n) for n in self.names):
                    return self
            raise RuntimeError(f"TorchServe did not get ready in {self.ready_timeout:.0f} s: {self.failure()}")
        except BaseException:
            self.__exit__()  # never leave a server behind: a leaked one starves the next of CPU and ports
            raise

    def running(self) -> bool:
        """Whether the Java server that ``torchserve --start`` launched (its pid file, in our private TMPDIR) is alive."""
        try:
            pid = int((self.work / ".model_server.pid").read_text().split()[0])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            return False
        return True

    def failure(self) -> str:
        """The line that says why the server or its workers failed (a bind error, a handler's exception), else the
        logs' tails."""
        logs = {"stdout": self.work / "torchserve.out", "ts_log": self.work / "logs" / "ts_log.log",
                "model_log": self.work / "logs" / "model_log.log"}
        texts = {name: path.read_text(errors="replace") if path.is_file() else "" for name, path in logs.items()}
        for name, text in texts.items():
            for line in text.splitlines():
                if any(mark in line for mark in FAILURE_MARKS):
                    return f"{line.strip()} ({logs[name]})"
        return " | ".join(f"{name}: {text[-1500:]}" for name, text in texts.items() if text) or "no log was written"

    def _read_keys(self) -> None:
        """The inference and management keys, once TorchServe has written key_file.json completely."""
        try:
            keys = json.loads((self.work / "key_file.json").read_text())
            self.key, self.management_key = keys["inference"]["key"], keys["management"]["key"]
        except (OSError, ValueError, KeyError):
            pass  # not there yet, or half written

    def workers(self, name: str | None = None) -> list[dict]:
        """A model's workers as the management API describes them (status, pid, ...)."""
        status, body = self.request("GET", f"/models/{name or self.name}", management=True)
        return body[0]["workers"] if status == 200 and isinstance(body, list) and body else []

    def workers_ready(self, name: str | None = None) -> bool:
        workers = self.workers(name)
        return bool(workers) and all(w["status"] == "READY" for w in workers)

    def model_log(self) -> str:
        log = self.work / "logs" / "model_log.log"
        return log.read_text() if log.is_file() else ""

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None, authorize: bool = True,
                management: bool = False):
        """(status, decoded JSON body) of one HTTP call; status 0 when nothing answered."""
        headers = dict(headers or {})
        key = self.management_key if management else self.key
        if authorize and key:
            headers["Authorization"] = f"Bearer {key}"
        return self.call(self.management_url if management else self.url, method, path, body, headers)

    def post(self, path: str, body: bytes, content_type: str, headers: dict | None = None, authorize: bool = True):
        return self.request("POST", path, body, {"Content-Type": content_type, **(headers or {})}, authorize)

    def __exit__(self, *exc):
        subprocess.run([str(self.bin / "torchserve"), "--stop", "--foreground"], cwd=self.work, env=self.env, stdout=self.log,
                       stderr=subprocess.STDOUT, timeout=90)
        self.log.close()


