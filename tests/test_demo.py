"""unhans demo: refuses in one line what would fail later, and (integration) runs the whole story end to end."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

UNHANS = str(Path(sys.executable).with_name("unhans"))


def _demo(tmp_path, *extra, env=None, timeout=60):
    return subprocess.run([UNHANS, "demo", "--out", str(tmp_path / "demo"), "--model-store", str(tmp_path / "store"), *extra],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_demo_refuses_a_port_in_use_in_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        done = _demo(tmp_path, "--monitor-port", str(busy.getsockname()[1]))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "is in use" in done.stderr and "--monitor-port" in done.stderr
    assert not (tmp_path / "demo" / "model").exists()  # refused before any work


def test_demo_says_when_java_is_missing(tmp_path):
    no_java = tmp_path / "bin"
    no_java.mkdir()
    done = _demo(tmp_path, "--server", "torchserve", env={**os.environ, "PATH": str(no_java)})
    assert done.returncode == 2 and "Java 11 or newer" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert "--server kserve" in done.stderr  # the way without Java


@pytest.mark.integration
def test_demo_end_to_end(tmp_path):
    """The default: served by the KServe predictor (TorchServe's handler answers the same from the same core:
    tests/test_handler.py and tests/test_kserve.py)."""
    done = _demo(tmp_path, "--monitor-port", str(_free_port()), timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["flagged class (audit rank 1)"] == "0"
    before, after = (float(x) for x in summary["attack success before / after (PyTorch)"].split(" / "))
    clean_before, clean_after = (float(x) for x in summary["clean accuracy before / after (PyTorch)"].split(" / "))
    assert after <= 0.1 * before and clean_after >= clean_before - 0.01
    onnx_clean, onnx_attack = (float(x) for x in summary["clean accuracy / attack success after (ONNX)"].split(" / "))
    assert (onnx_clean, onnx_attack) == (clean_after, after)
    assert summary["monitor alerted on the unseen artifact only"] == "True"
    assert Path(summary["alert evidence"]).is_file() and Path(summary["audit report"]).is_file()
    leftover = subprocess.run(["pgrep", "-f", f"{tmp_path}"], capture_output=True, text=True).stdout.split()
    assert summary["served by"] == "the KServe predictor"
    assert not [pid for pid in leftover if int(pid) != os.getpid()]  # no server, worker or monitor left running


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
