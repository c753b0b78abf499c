"""The one place unhans opens onnxruntime sessions, so every session avoids the same traps (NOTES.md §3).

onnxruntime's thread pool spins between runs and can slow PyTorch in the same process 30-50×, so spinning is off
and thread counts are explicit. The CUDA provider is requested only where a GPU is really there: onnxruntime-gpu
lists it even without one and logs errors when it is asked for blindly.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def cuda_available() -> bool:
    """True where onnxruntime has its CUDA provider and a CUDA device is present."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def session(model: bytes | str | Path, threads: int = 1, cuda: bool | None = None) -> ort.InferenceSession:
    """An inference session on ``model`` (serialised bytes or a path) with ``threads`` intra-op threads, no spinning.

    ``cuda=None`` uses the GPU when one is available; verification passes ``cuda=False`` so it compares float32 CPU
    kernels with PyTorch's rather than GPU kernels that may use reduced precision.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    use_cuda = cuda_available() if cuda is None else cuda
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, sess_options=options, providers=providers)


def run_batched(sess: ort.InferenceSession, images: np.ndarray, outputs: list[str] | None = None, batch_size: int | None = None) -> list[np.ndarray]:
    """Run ``sess`` on ``images`` in batches (default: :func:`unhans.core.layers.batch_rows`, fewer for large inputs:
    onnxruntime's arena keeps the largest batch's maps); returns the requested outputs (default: all), concatenated."""
    from ..core.layers import batch_rows

    name = sess.get_inputs()[0].name
    batch_size = batch_size or batch_rows(images)
    chunks = [sess.run(outputs, {name: np.ascontiguousarray(images[i : i + batch_size], np.float32)})
              for i in range(0, len(images), batch_size)]
    return [np.concatenate(parts) for parts in zip(*chunks)]


def interleaved_overhead(sessions: dict, x: np.ndarray, rounds: int) -> dict[str, float]:
    """Median over rounds of each session's time relative to ``sessions['plain']``, in percent.

    Each round times every session once (in rotating order) for the same number of calls, so slow phases of a
    shared machine hit all of them alike and the per-round ratio cancels them out.
    """
    feeds = {name: {s.get_inputs()[0].name: x} for name, s in sessions.items()}
    for name, s in sessions.items():  # warm-up
        for _ in range(20):
            s.run(None, feeds[name])
    started = time.perf_counter()
    for _ in range(20):
        sessions["plain"].run(None, feeds["plain"])
    calls = max(1, int(0.01 / ((time.perf_counter() - started) / 20)))  # about 10 ms per measurement
    names = list(sessions)
    times = {name: [] for name in names}
    gc.disable()
    try:
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                s, feed = sessions[name], feeds[name]
                started = time.perf_counter()
                for _ in range(calls):
                    s.run(None, feed)
                times[name].append(time.perf_counter() - started)
    finally:
        gc.enable()
    plain = np.array(times["plain"])
    return {name: float(np.median(np.array(times[name]) / plain - 1.0) * 100) for name in names if name != "plain"}
