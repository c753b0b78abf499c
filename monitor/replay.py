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
           writers: int = 2, max_shard_bytes: int = 4 << 20, latent: np.ndarray | None = None) -> list[str]:
    """Write one record per row (round-robin over ``writers``) and close the shards; returns the request ids.

    ``relevance`` (N, C, H, W) or (N, H, W) is summed over channels as the sampler does; ``logits`` (N, classes) give
    the prediction and probabilities; ``latent`` (N, C, ...) is the relevance at the monitor layer, summed over
    positions as the sampler does.
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
                model=model, version=version, request_id=ids[i],
                latent=None if latent is None else np.asarray(latent[i], np.float32).reshape(np.shape(latent[i])[0], -1).sum(axis=1)))
    finally:
        for shard in shards:
            shard.close()
    return list(ids)


def mixed_windows(clean: dict, tagged: dict, windows: int, window_size: int, share: float, rng: np.random.Generator,
                  first_id: int = 0) -> dict:
    """Traffic for ``windows`` windows: ``share`` of each from ``tagged``, the rest from ``clean``, shuffled together.

    ``clean`` and ``tagged`` hold arrays under the same keys (e.g. images, relevance, logits), one row per sample;
    rows are drawn without replacement within a window (with, where the pool is smaller). The result holds the
    concatenated arrays and ``ids``, a unique request id per row starting at ``first_id``.
    """
    n_tagged = int(round(share * window_size))
    parts = {key: [] for key in clean}
    for _ in range(windows):
        picks = []
        for pool, count in ((clean, window_size - n_tagged), (tagged, n_tagged)):
            size = len(next(iter(pool.values())))
            picks.append((pool, rng.choice(size, count, replace=count > size)))
        order = rng.permutation(window_size)
        for key, values in parts.items():
            values.append(np.concatenate([pool[key][rows] for pool, rows in picks])[order])
    batch = {key: np.concatenate(values) for key, values in parts.items()}
    batch["ids"] = [f"r{first_id + i}" for i in range(windows * window_size)]
    return batch
