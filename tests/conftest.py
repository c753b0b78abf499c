import json
import os

import pytest
import torch

# One torch thread: tests share two cores with TorchServe and Dask workers they start, and OpenMP threads that
# oversubscribe the cores made training up to 40x slower. Speed is measured by bench/, not here.
torch.set_num_threads(1)

from unhans.core.data import load_digits8, load_mnist5k


@pytest.fixture(scope="session")
def mnist():
    return load_mnist5k()


@pytest.fixture(scope="session")
def digits():
    return load_digits8()


@pytest.fixture(scope="session")
def backdoored_vgg(tmp_path_factory):
    """A VGG-style model trained briefly on backdoored MNIST-5k (10% of classes 1-9 tagged and relabelled 0)."""
    from unhans.core.artifacts import Patch
    from unhans.core.training import TrainSpec, load_run, train_run

    run = tmp_path_factory.mktemp("backdoored_vgg")
    metrics = train_run(TrainSpec(data="mnist", architecture="vgg", epochs=5, seed=0), Patch(), run, show_progress=False)
    assert metrics["attack_success"] > 0.9, metrics
    model, train, test, attack, artifact = load_run(run)
    return {"run": run, "model": model, "train": train, "test": test, "attack": attack, "artifact": artifact, "metrics": metrics}


@pytest.fixture(scope="session")
def digits_resnet(tmp_path_factory):
    """A small ResNet (BatchNorm, residual blocks) trained briefly on 8x8 digits."""
    from unhans.core.artifacts import Patch
    from unhans.core.training import TrainSpec, load_run, train_run

    run = tmp_path_factory.mktemp("digits_resnet")
    train_run(TrainSpec(data="digits", architecture="resnet", epochs=4, seed=0), Patch(size=3), run, show_progress=False)
    model, train, test, *_ = load_run(run)
    return model, test


class TorchServe:
    """A real TorchServe on free loopback ports, token authorization on, in its own working and temp folder."""

    def __init__(self, store, name, work, extra_config: str = "", ready_timeout: float = 120):
        import socket
        import sys
        from pathlib import Path

        def free_port() -> int:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                return s.getsockname()[1]

        self.name, self.work, self.ready_timeout = name, Path(work), ready_timeout
        config = (Path(__file__).resolve().parents[1] / "model_store" / "config.properties").read_text()
        self.ports = {}
        for key, default in (("inference_address", 8080), ("management_address", 8081), ("metrics_address", 8082)):
            self.ports[key] = free_port()
            config = config.replace(f"{key}=http://127.0.0.1:{default}", f"{key}=http://127.0.0.1:{self.ports[key]}")
        assert "disable_token_authorization=false" in config
        (self.work / "config.properties").write_text(config + f"\ninitial_worker_port={free_port()}\n{extra_config}\n")
        self.bin = Path(sys.executable).parent
        # TMPDIR holds TorchServe's pid file, TEMP its worker sockets: both private, so parallel servers don't collide
        self.env = {**os.environ, "TMPDIR": str(self.work), "TEMP": str(self.work), "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}"}
        self.store = Path(store)
        self.url = f"http://127.0.0.1:{self.ports['inference_address']}"
        self.management_url = f"http://127.0.0.1:{self.ports['management_address']}"
        self.metrics_url = f"http://127.0.0.1:{self.ports['metrics_address']}/metrics"
        self.key = self.management_key = None

    def __enter__(self):
        import subprocess
        import time

        command = [str(self.bin / "torchserve"), "--start", "--ncs", "--model-store", str(self.store), "--ts-config",
                   str(self.work / "config.properties"), "--models", f"{self.name}={self.name}.mar"]
        # the Java server inherits stdout: a file, not a pipe, or waiting for the launcher never ends
        self.log = open(self.work / "torchserve.out", "wb")
        subprocess.run(command, cwd=self.work, env=self.env, check=True, stdout=self.log, stderr=subprocess.STDOUT, timeout=60)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            time.sleep(0.5)
            if self.key is None and (self.work / "key_file.json").is_file():
                keys = json.loads((self.work / "key_file.json").read_text())
                self.key, self.management_key = keys["inference"]["key"], keys["management"]["key"]
            if self.key is not None and self.workers_ready():
                return self
        self.__exit__()
        raise AssertionError("TorchServe did not get ready: " + self.model_log()[-3000:])

    def workers(self) -> list[dict]:
        """The model's workers as the management API describes them (status, pid, ...)."""
        status, body = self.request("GET", f"/models/{self.name}", management=True)
        return body[0]["workers"] if status == 200 and isinstance(body, list) and body else []

    def workers_ready(self) -> bool:
        workers = self.workers()
        return bool(workers) and all(w["status"] == "READY" for w in workers)

    def model_log(self) -> str:
        log = self.work / "logs" / "model_log.log"
        return log.read_text() if log.is_file() else ""

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None, authorize: bool = True,
                management: bool = False):
        """(status, decoded JSON body) of one HTTP call; status 0 when nothing answered."""
        import urllib.error
        import urllib.request

        headers = dict(headers or {})
        key = self.management_key if management else self.key
        if authorize and key:
            headers["Authorization"] = f"Bearer {key}"
        base = self.management_url if management else self.url
        try:
            with urllib.request.urlopen(urllib.request.Request(base + path, data=body, headers=headers, method=method), timeout=60) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            text = error.read()
            try:
                return error.code, json.loads(text)
            except ValueError:
                return error.code, text.decode(errors="replace")
        except (urllib.error.URLError, ConnectionError) as error:
            return 0, str(error)

    def post(self, path: str, body: bytes, content_type: str, headers: dict | None = None, authorize: bool = True):
        return self.request("POST", path, body, {"Content-Type": content_type, **(headers or {})}, authorize)

    def __exit__(self, *exc):
        import subprocess

        subprocess.run([str(self.bin / "torchserve"), "--stop", "--foreground"], cwd=self.work, env=self.env, stdout=self.log,
                       stderr=subprocess.STDOUT, timeout=90)
        self.log.close()


@pytest.fixture
def torchserve():
    """``with torchserve(store, name, work) as server:`` a started TorchServe serving ``store/name.mar``, ready."""
    return TorchServe
