"""Replay explained traffic into a sink, in the handler's record format, without serving it.

For rehearsing the monitor and its alerts (benchmarks, tests, a drill before going live): the records are exactly
what the handler's sampler writes (:class:`~unhans.handlers.sink.Record` through a
:class:`~unhans.handlers.sink.ShardWriter`), spread over several writers as replicas would write them.
"""

from __future__ import annotations

import numpy as np

from unhans.handlers.relevance import thumbnail
from unhans.handlers.sink import Record, ShardWriter


def replay(sink: str, model: str, version: str, images: np.ndarray, relevance: np.ndarray, logits: np.ndarray,
           scores: np.ndarray | None = None, request_ids: list[str] | None = None, timestamps: np.ndarray | None = None,
           writers: int = 2, max_shard_bytes: int = 4 << 20) -> list[str]:
    """Write one record per row (round-robin over ``writers``) and close the shards; returns the request ids.

    ``relevance`` (N, C, H, W) or (N, H, W) is summed over channels as the sampler does; ``logits`` (N, classes) give
    the prediction and probabilities.
    """
    relevance = np.asarray(relevance)
    heat = relevance.sum(axis=1) if relevance.ndim == 4 else relevance
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = exp / exp.sum(axis=1, keepdims=True)
    ids = request_ids if request_ids is not None else [f"replay-{i}" for i in range(len(images))]
    base = np.arange(len(images), dtype=np.float64) * 1e-3 + 1.7e9 if timestamps is None else np.asarray(timestamps, np.float64)
    shards = [ShardWriter(sink, model, version, f"replay-{w}", max_shard_bytes=max_shard_bytes, max_shard_seconds=1e9,
                          max_total_bytes=1 << 40, flush_every=256, fsync=False, clock=lambda: 0.0) for w in range(writers)]
    try:
        for i in range(len(images)):
            prediction = int(probabilities[i].argmax())
            shards[i % writers].append(Record(
                prediction=prediction, target=prediction, probabilities=probabilities[i].round(6).tolist(), relevance=heat[i],
                thumbnail=thumbnail(images[i]), score=None if scores is None else float(scores[i]), timestamp=float(base[i]),
                model=model, version=version, request_id=ids[i]))
    finally:
        for shard in shards:
            shard.close()
    return list(ids)
