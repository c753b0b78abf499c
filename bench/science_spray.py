"""Benchmark: SpRAy against CoRelAy, and at scale, on this machine's CPU.

    python bench/science_spray.py [--json PATH] [--seed N]

Keys: corelay_eigenvalue_max_abs_diff (<= 1e-4: our eigenvalues against CoRelAy's default SpectralClustering
on each real MNIST-5k digit class and on all 5,000 images, same kNN settings, identity preprocessing),
spray_speedup_vs_corelay_10k (>= 10: CoRelAy's default pipeline and our default SpRAy on the same 10,000
synthetic maps, one after the other in this process, both capped to one BLAS/OpenMP thread like SpRAy's default),
spray_seconds_100k (<= 60) and spray_peak_mb_100k (<= 4000: peak RSS, VmHWM, of a fresh process that generates
the 100,000 maps and fits them, Python and torch included), spray_ari_synthetic_100k (against the generator's
groups), spray_knn_edge_recall_100k (share of the exact 10 nearest neighbours of 1,000 random maps that the
graph links to them), plus the timings and ARIs behind the speedup.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TARGETS = {
    "corelay_eigenvalue_max_abs_diff": "<= 1e-4",
    "spray_speedup_vs_corelay_10k": ">= 10",
    "spray_seconds_100k": "<= 60",
    "spray_peak_mb_100k": "<= 4000",
    "spray_ari_synthetic_100k": "~1.0",
}


def synthetic_relevance(n: int, seed: int = 0, size: int = 28, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """``n`` relevance-like maps (n, 1, size, size) float32 and their group (0, 1, 2), deterministic from ``seed``.

    Every map is a ring of 8 Gaussian blobs (a '0'-like stroke) with random blob strengths and a random sub-pixel
    shift, plus Gaussian noise (so a few values are negative). Group 1 (30%) adds a blob in the bottom-right corner,
    the Clever-Hans patch; group 2 (20%) a vertical bar through the middle. The groups overlap enough that the kNN
    graph stays connected (λ₂ ~ 1e-4, not 0), so the eigen-solver faces one large component.
    """
    rng = np.random.default_rng(seed)
    groups = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
    grid = np.arange(size, dtype=np.float32)
    centre = (size - 1) / 2 + 0.5
    blobs = [(centre + 7 * np.sin(a), centre + 5 * np.cos(a), 1.8, None, 1.0) for a in np.linspace(0, 2 * np.pi, 8, endpoint=False)]
    blobs += [(size - 4, size - 4, 1.5, 1, 1.5)] + [(row, centre, 1.5, 2, 0.8) for row in (centre - 5, centre, centre + 5)]
    maps = np.empty((n, 1, size, size), np.float32)
    for start in range(0, n, chunk):
        group = groups[start : start + chunk]
        m = len(group)
        shift = rng.uniform(-1.5, 1.5, (m, 2)).astype(np.float32)
        x = rng.normal(0.0, 0.05, (m, size, size)).astype(np.float32)
        for row, col, sigma, only, weight in blobs:
            strength = rng.uniform(0.5, 1.5, m).astype(np.float32) * weight
            if only is not None:
                strength *= group == only
            rows = np.exp(-((grid - row - shift[:, :1]) ** 2) / (2 * sigma**2)) * strength[:, None]
            cols = np.exp(-((grid - col - shift[:, 1:]) ** 2) / (2 * sigma**2))
            x += rows[:, :, None] * cols[:, None, :]
        maps[start : start + chunk, 0] = x
    return maps, groups


def corelay_agreement() -> float:
    """Largest |our eigenvalue - CoRelAy's| over the 10 MNIST-5k digit classes (500 flattened images each: our
    dense-LAPACK path) and all 5,000 images together (our ARPACK path)."""
    from corelay.pipeline.spectral import SpectralClustering

    from unhans.core.data import load_mnist5k
    from unhans.core.spray import SpRAy

    data = load_mnist5k()
    flat_all = data.images.reshape(len(data.images), -1).astype(np.float64)
    worst = 0.0
    for flat in [flat_all[data.labels == digit] for digit in range(10)] + [flat_all]:
        (theirs, _), _ = SpectralClustering()(flat)
        ours = SpRAy(pooling=1, normalization=None).fit(flat).eigenvalues_
        worst = max(worst, float(np.abs(np.sort(theirs) - ours).max()))
    return worst


def speed_10k(seed: int) -> dict:
    """CoRelAy's default SpectralClustering and our default SpRAy on the same 10,000 maps."""
    from corelay.pipeline.spectral import SpectralClustering
    from sklearn.metrics import adjusted_rand_score
    from threadpoolctl import threadpool_limits

    from unhans.core.spray import SpRAy

    maps, groups = synthetic_relevance(10_000, seed)
    with threadpool_limits(limits=1):
        start = time.perf_counter()
        _, corelay_labels = SpectralClustering()(maps.reshape(len(maps), -1))
        corelay_seconds = time.perf_counter() - start
    start = time.perf_counter()
    spray = SpRAy(random_state=seed).fit(maps)
    spray_seconds = time.perf_counter() - start
    return {
        "corelay_seconds_10k": corelay_seconds,
        "spray_seconds_10k": spray_seconds,
        "spray_speedup_vs_corelay_10k": corelay_seconds / spray_seconds,
        "corelay_ari_synthetic_10k": adjusted_rand_score(groups, corelay_labels),
        "spray_ari_synthetic_10k": adjusted_rand_score(groups, spray.labels_),
    }


def child_100k(seed: int) -> dict:
    """Runs in a fresh process: generate 100,000 maps, fit our default SpRAy, check the graph against exact kNN."""
    import torch
    from sklearn.metrics import adjusted_rand_score

    from unhans.core.spray import SpRAy, preprocess

    maps, groups = synthetic_relevance(100_000, seed)
    start = time.perf_counter()
    spray = SpRAy(random_state=seed).fit(maps)
    seconds = time.perf_counter() - start
    features = torch.from_numpy(preprocess(maps, spray.pooling, spray.normalization))
    queries = np.random.default_rng(seed).choice(len(maps), 1000, replace=False)
    linked = []
    for block in np.array_split(queries, 10):
        distance = torch.cdist(features[torch.from_numpy(block)], features)
        distance[torch.arange(len(block)), torch.from_numpy(block)] = float("inf")
        exact = torch.topk(distance, spray.n_neighbors, dim=1, largest=False).indices.numpy()
        linked.append(np.asarray(spray.affinity_[np.repeat(block, exact.shape[1]), exact.ravel()]).ravel() > 0)
    return {
        "spray_seconds_100k": seconds,
        "spray_ari_synthetic_100k": adjusted_rand_score(groups, spray.labels_),
        "spray_n_clusters_100k": spray.n_clusters_,
        "spray_lambda2_100k": spray.lambda2_,
        "spray_knn_edge_recall_100k": float(np.concatenate(linked).mean()),
        "spray_peak_mb_100k": _peak_rss_mb(),
    }


def _peak_rss_mb() -> float:
    """This process's own peak resident memory since exec (VmHWM).

    Not getrusage: Linux folds the forking parent's peak into the child's ru_maxrss at exec, which made a 1.4 GB
    child read as 2.5 GB after the CoRelAy run had grown the parent.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (this benchmark measures memory on Linux only)")


def measure(seed: int = 0) -> dict:
    """All figures; the 100k fit runs in a fresh subprocess so its time and peak memory are its own."""
    results = {"corelay_eigenvalue_max_abs_diff": corelay_agreement()}
    results.update(speed_10k(seed))
    done = subprocess.run(
        [sys.executable, __file__, "--child-100k", "--seed", str(seed)], capture_output=True, text=True, check=True
    )
    results.update(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the figures as one JSON object here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child-100k", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_100k:
        print(json.dumps(child_100k(args.seed)))
        return

    from common import report

    report("SpRAy: agreement with CoRelAy (real MNIST), speed and memory (synthetic relevance maps)", measure(args.seed), TARGETS, args.json)

if __name__ == "__main__":
    main()
