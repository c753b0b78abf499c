"""Spectral Relevance Analysis (SpRAy): find classes whose explanations split into separate strategies.

Per class, relevance maps are summed over channels, sum-pooled, normalised and flattened; a binary k-nearest-
neighbour graph, symmetrised as (A + Aᵀ)/2, links similar explanations; the smallest eigenvalues of its symmetric
normalised Laplacian L = I - D^-½ A D^-½ say how close the graph is to falling apart into groups (λ₂ ≈ 0: the class
splits), and k-means on the row-normalised eigenvectors finds the groups. One of them is often a Clever-Hans strategy
(Lapuschkin et al., Nat. Commun. 10, 1096, 2019).

Built for scale: the graph is sparse, the kNN search is exact and chunked for small classes and an inverted-file
(k-means cell) search above ``EXACT_KNN_MAX`` samples, and the spectrum is taken per connected component, so repeated
zero eigenvalues (one per component) are never missed. The only dense square matrix is a component's own
D^-½ A D^-½ when it has at most ``DENSE_EIGH_MAX`` nodes, where LAPACK is both faster and more reliable than ARPACK.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import scipy.sparse
import torch
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import eigsh
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.cluster import KMeans

from .errors import InputError

NORMALIZATIONS = ("abs_sum", "max_abs", None)
EMBEDDINGS_2D = (None, "tsne", "spectral")
KNN_METHODS = ("auto", "exact", "approximate")
DENSE_EIGH_MAX = 2000  # a connected component up to this size is solved with dense LAPACK eigh (<= 32 MB)
EXACT_KNN_MAX = 10_000  # above this many samples, "auto" switches to the approximate cell search
KMEANS_INITS = 10


def preprocess(maps, pooling: int = 1, normalization: str | None = "abs_sum") -> np.ndarray:
    """Relevance maps as flat float32 rows: channels summed, ``pooling`` x ``pooling`` sum-pooled, each row normalised.

    (N, C, H, W) and (N, H, W) are maps; (N, D) is taken as flat features and not pooled. ``"abs_sum"`` divides by
    the sum of absolute values: the signed sum of an LRP map is its logit share, about the same for every sample, so
    it would normalise nothing. Rows that are not finite or are constant (all zero) carry no explanation and are
    rejected with their indices.
    """
    x = np.asarray(maps)
    if x.ndim not in (2, 3, 4) or len(x) == 0 or x.size == 0:
        raise InputError(
            "relevance", f"has shape {x.shape}", "pass maps as (N, C, H, W) or (N, H, W), or flat features as (N, D), with N >= 1"
        )
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise InputError("relevance", f"has dtype {x.dtype}", "pass real-valued numbers")
    x = x.astype(np.float32, copy=False)
    if x.ndim == 4:
        x = x[:, 0] if x.shape[1] == 1 else x.sum(axis=1)
    if x.ndim == 3 and pooling > 1:
        n, height, width = x.shape
        pad_h, pad_w = -height % pooling, -width % pooling  # zero padding keeps relevance at the border
        if pad_h or pad_w:
            x = np.pad(x, ((0, 0), (0, pad_h), (0, pad_w)))
        x = x.reshape(n, x.shape[1] // pooling, pooling, x.shape[2] // pooling, pooling).sum(axis=(2, 4))
    flat = x.reshape(len(x), -1)
    bad = np.flatnonzero(~np.isfinite(flat).all(axis=1))
    if len(bad):
        raise InputError("relevance", f"rows {_some(bad)} contain NaN or Inf", "recompute those maps or drop those samples")
    if flat.shape[1] > 1:
        constant = np.flatnonzero(flat.max(axis=1) == flat.min(axis=1))
        if len(constant):
            raise InputError(
                "relevance",
                f"rows {_some(constant)} are constant (all zero after summing channels and pooling): they explain nothing",
                "drop those samples; an all-zero LRP map usually means the model's output for them was zero",
            )
    if normalization == "abs_sum":
        flat = flat / np.abs(flat).sum(axis=1, keepdims=True)
    elif normalization == "max_abs":
        flat = flat / np.abs(flat).max(axis=1, keepdims=True)
    return np.ascontiguousarray(flat, dtype=np.float32)


def _some(index: np.ndarray, show: int = 8) -> str:
    """Row indices for an error message: the first few and how many in all."""
    head = ", ".join(str(int(i)) for i in index[:show])
    return f"[{head}{', ...' if len(index) > show else ''}] ({len(index)} in all)"


def knn_affinity(features: np.ndarray, n_neighbors: int = 10, method: str = "auto", random_state: int = 0):
    """Binary kNN graph (self excluded), symmetrised as (A + Aᵀ)/2: 1 for mutual neighbours, ½ for one-sided ones.

    This is CoRelAy's ``SparseKNN(symmetric=True)``, built without its dense n x n distance matrix.
    """
    features = np.ascontiguousarray(features, dtype=np.float32)
    n = len(features)
    if not 1 <= n_neighbors < n:
        raise InputError("n_neighbors", f"is {n_neighbors} but there are {n} samples", f"use 1 <= n_neighbors <= {n - 1}")
    if method not in KNN_METHODS:
        raise InputError("knn", f"{method!r} is unknown", f"use one of {KNN_METHODS}")
    exact = method == "exact" or (method == "auto" and n <= EXACT_KNN_MAX)
    neighbors = _exact_knn(features, n_neighbors) if exact else _cell_knn(features, n_neighbors, random_state)
    rows = np.repeat(np.arange(n), n_neighbors)
    graph = scipy.sparse.csr_matrix((np.ones(rows.size), (rows, neighbors.ravel())), shape=(n, n))
    return ((graph + graph.T) / 2.0).tocsr()


def _exact_knn(features: np.ndarray, k: int, chunk: int = 1024, extra: int = 5) -> np.ndarray:
    """Exact k nearest neighbours: float32 GEMM distances pick k + ``extra`` candidates per row, float64 re-ranks them.

    The re-ranking makes the graph match a float64 ``pdist`` reference even where float32 rounding would swap two
    nearly tied neighbours.
    """
    n = len(features)
    data = torch.from_numpy(features)
    squared = (data * data).sum(dim=1)
    take = min(k + extra, n - 1)
    candidates = np.empty((n, take), np.int64)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        distance = torch.addmm(squared[None, :], data[start:stop], data.T, alpha=-2.0).add_(squared[start:stop, None])
        distance[torch.arange(stop - start), torch.arange(start, stop)] = float("inf")
        candidates[start:stop] = torch.topk(distance, take, dim=1, largest=False, sorted=False).indices.numpy()
    neighbors = np.empty((n, k), np.int64)
    exact = features.astype(np.float64)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        block = candidates[start:stop]
        distance = ((exact[block] - exact[start:stop, None, :]) ** 2).sum(axis=2)
        order = np.argsort(distance, axis=1, kind="stable")[:, :k]
        neighbors[start:stop] = np.take_along_axis(block, order, axis=1)
    return neighbors


def _cell_knn(features: np.ndarray, k: int, random_state: int, n_probe: int = 8, chunk: int = 1024) -> np.ndarray:
    """Approximate k nearest neighbours by an inverted file: ~sqrt(n) k-means cells, each point searched in its
    ``n_probe`` nearest cells.

    Queries are batched by their own cell, and a batch searches the union of its members' probe cells, so a point
    near a border still sees the cells beyond it. Probing per cell instead (one probe list per batch) misses those
    neighbours, and the missing edges cut the graph along cell borders: spurious zero eigenvalues, i.e. fake splits.
    Measured on 20,000 synthetic maps: recall 0.999 of the exact 10 neighbours, λ₂-λ₄ within 3% of exact, 4x faster
    than brute force; the advantage grows as sqrt(n).
    """
    n = len(features)
    n_cells = max(1, int(math.sqrt(n)))
    rng = np.random.default_rng(random_state)
    sample = features[rng.choice(n, size=min(n, 64 * n_cells), replace=False)]
    kmeans = KMeans(n_clusters=n_cells, n_init=1, max_iter=20, random_state=random_state).fit(sample)
    centroids = torch.from_numpy(kmeans.cluster_centers_.astype(np.float32))
    data = torch.from_numpy(features)
    squared = (data * data).sum(dim=1)
    probes = torch.cat(
        [torch.topk(torch.cdist(data[s : s + 8192], centroids), min(n_probe, n_cells), dim=1, largest=False).indices for s in range(0, n, 8192)]
    ).numpy()  # sorted: each point's own cell first
    cell = probes[:, 0]
    order = np.argsort(cell, kind="stable")
    bounds = np.searchsorted(cell[order], np.arange(n_cells + 1))
    members = [order[bounds[c] : bounds[c + 1]] for c in range(n_cells)]
    neighbors = np.empty((n, k), np.int64)
    for c in range(n_cells):
        queries = members[c]
        if len(queries) == 0:
            continue
        others = np.unique(probes[queries])
        probe = [c, *others[others != c]]
        if sum(len(members[o]) for o in probe) <= k:  # too few candidates: search everything
            probe = [c, *(o for o in range(n_cells) if o != c)]
        pool = torch.from_numpy(np.concatenate([members[o] for o in probe]))
        pool_data, pool_squared = data[pool], squared[pool]
        for start in range(0, len(queries), chunk):
            query = torch.from_numpy(queries[start : start + chunk])
            distance = torch.addmm(pool_squared[None, :], data[query], pool_data.T, alpha=-2.0)
            rows = torch.arange(len(query))
            distance[rows, rows + start] = float("inf")  # the pool starts with this cell's own members: self
            nearest = torch.topk(distance, k, dim=1, largest=False, sorted=False).indices
            neighbors[query.numpy()] = pool[nearest].numpy()
    return neighbors


def spectral_embedding(affinity, n_eigenvalues: int = 32, random_state: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Smallest eigenvalues of L = I - D^-½ A D^-½ (ascending) and their eigenvectors, rows normalised to length 1.

    Solved per connected component and merged: a graph with c components has c exact zero eigenvalues, which a
    single Lanczos run on the whole graph can miss. An isolated node is a component of its own (eigenvalue 0, not
    the NaN of D^-½ with D = 0). Rows whose eigenvector entries are all zero (nodes of components beyond the first
    ``n_eigenvalues``) stay zero instead of dividing by zero.
    """
    graph = scipy.sparse.csr_matrix(affinity, dtype=np.float64)
    n = graph.shape[0]
    wanted = min(n_eigenvalues, n)
    n_components, component = connected_components(graph, directed=False)
    order = np.argsort(component, kind="stable")
    bounds = np.searchsorted(component[order], np.arange(n_components + 1))
    rng = np.random.default_rng(random_state)
    values, owners, vectors = [], [], []
    for c in range(n_components):
        nodes = order[bounds[c] : bounds[c + 1]]
        if len(nodes) == 1:
            value, vector = np.zeros(1), np.ones((1, 1))
        else:
            value, vector = _component_spectrum(graph[nodes][:, nodes], min(wanted, len(nodes)), rng)
        values.append(value)
        owners.extend((c, j) for j in range(len(value)))
        vectors.append((nodes, vector))
    all_values = np.concatenate(values)
    pick = np.argsort(all_values, kind="stable")[:wanted]
    embedding = np.zeros((n, wanted))
    for column, index in enumerate(pick):
        c, j = owners[index]
        nodes, vector = vectors[c]
        embedding[nodes, column] = vector[:, j]
    norms = np.linalg.norm(embedding, axis=1, keepdims=True)
    np.divide(embedding, norms, out=embedding, where=norms > 0)
    return np.clip(all_values[pick], 0.0, 2.0), embedding


def _component_spectrum(graph, wanted: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The ``wanted`` smallest eigenpairs of one connected component's L, as the largest of M = D^-½ A D^-½.

    Largest-algebraic on M converges where smallest-algebraic on L (same spectrum, shifted) stalls.
    """
    size = graph.shape[0]
    scale = scipy.sparse.diags(1.0 / np.sqrt(np.asarray(graph.sum(axis=1)).ravel()))
    normalized = scale @ graph @ scale
    if size <= DENSE_EIGH_MAX:
        value, vector = scipy.linalg.eigh(normalized.toarray(), subset_by_index=[size - wanted, size - 1])
    else:
        value, vector = eigsh(normalized, k=min(wanted, size - 1), which="LA", v0=rng.standard_normal(size))
    return 1.0 - value[::-1], vector[:, ::-1]


def fisher_separability(embedding, labels) -> float:
    """Fisher's τ = tr(S_B) / tr(S_W): spread between cluster means over spread within clusters.

    Large when the clusters are compact and far apart. 0 for a single cluster; inf when every cluster is a point.
    """
    x = np.asarray(embedding, dtype=np.float64)
    x = x.reshape(len(x), -1)
    labels = np.asarray(labels)
    if len(labels) != len(x):
        raise InputError("labels", f"has {len(labels)} entries for {len(x)} embedded points", "pass one label per point")
    mean = x.mean(axis=0)
    between = within = 0.0
    for label in np.unique(labels):
        members = x[labels == label]
        centre = members.mean(axis=0)
        between += len(members) * float(((centre - mean) ** 2).sum())
        within += float(((members - centre) ** 2).sum())
    if within == 0.0:
        return math.inf if between > 0.0 else 0.0
    return between / within


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


class SpRAy(BaseEstimator, ClusterMixin):
    """Spectral Relevance Analysis of one class's relevance maps.

    Parameters
    ----------
    n_neighbors : neighbours per map in the kNN graph (CoRelAy's default 10).
    n_eigenvalues : how many of L's smallest eigenvalues (and eigenvectors) to compute.
    n_clusters : ``"eigengap"`` (the largest gap among the first ``max_clusters`` eigenvalues, at least 2) or an int.
    max_clusters : the most clusters the eigengap may choose.
    pooling : sum-pool (N, C, H, W) or (N, H, W) maps by ``pooling`` x ``pooling`` after summing channels; (N, D)
        input is flat features and not pooled.
    normalization : ``"abs_sum"``, ``"max_abs"`` or None, per map.
    n_components : None, or project onto this many principal components before the kNN search.
    embedding_2d : None, ``"tsne"`` (t-SNE of the spectral embedding, for plots) or ``"spectral"`` (eigenvectors 2-3).
    knn : ``"auto"`` (exact up to ``EXACT_KNN_MAX`` maps, then the approximate cell search), ``"exact"`` or
        ``"approximate"``.
    random_state : seeds the cell search, the eigen-solver start vector, k-means and t-SNE.

    Attributes
    ----------
    eigenvalues_ : ascending eigenvalues of L.   eigenvectors_ : (n, n_eigenvalues), rows normalised to length 1.
    lambda2_ : eigenvalues_[1], the graph's connectivity (small: the class splits).
    n_clusters_, eigengap_ : the number of clusters and the gap eigenvalues_[n_clusters_] - eigenvalues_[n_clusters_ - 1].
    labels_ : k-means on the first n_clusters_ eigenvectors (as many as clusters: more dilutes the split).
    fisher_tau_ : Fisher separability of labels_ in eigenvectors 2-3, the first two non-trivial ones.
    affinity_ : the sparse symmetric kNN graph.   embedding_2d_ : (n, 2) or None.
    """

    def __init__(
        self,
        n_neighbors=10,
        n_eigenvalues=32,
        n_clusters="eigengap",
        max_clusters=8,
        pooling=2,
        normalization="abs_sum",
        n_components=None,
        embedding_2d=None,
        knn="auto",
        random_state=0,
    ):
        self.n_neighbors = n_neighbors
        self.n_eigenvalues = n_eigenvalues
        self.n_clusters = n_clusters
        self.max_clusters = max_clusters
        self.pooling = pooling
        self.normalization = normalization
        self.n_components = n_components
        self.embedding_2d = embedding_2d
        self.knn = knn
        self.random_state = random_state

    def _check_params(self) -> None:
        def integer(name, value, low):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise InputError(name, f"is {value!r}", f"use an integer >= {low}")

        integer("n_neighbors", self.n_neighbors, 1)
        integer("n_eigenvalues", self.n_eigenvalues, 3)
        integer("max_clusters", self.max_clusters, 2)
        integer("pooling", self.pooling, 1)
        if self.n_clusters != "eigengap":
            integer("n_clusters", self.n_clusters, 2)
        if self.n_components is not None:
            integer("n_components", self.n_components, 1)
        for name, value, allowed in (
            ("normalization", self.normalization, NORMALIZATIONS),
            ("embedding_2d", self.embedding_2d, EMBEDDINGS_2D),
            ("knn", self.knn, KNN_METHODS),
        ):
            if value not in allowed:
                raise InputError(name, f"{value!r} is unknown", f"use one of {allowed}")

    @property
    def min_samples(self) -> int:
        """Fewest maps a fit accepts: every map needs ``n_neighbors`` others, and the 2-D embedding needs 3 points."""
        return max(self.n_neighbors + 1, 3)

    def fit(self, X, y=None):
        """Build the graph of ``X``'s maps, its spectrum and clusters; ``y`` is ignored (scikit-learn convention)."""
        self._check_params()
        features = preprocess(X, self.pooling, self.normalization)
        n = len(features)
        if n < self.min_samples:
            raise InputError(
                "relevance", f"has {n} maps but n_neighbors={self.n_neighbors} needs at least {self.min_samples}",
                "pass more maps or lower n_neighbors",
            )
        if self.n_components is not None and self.n_components < min(features.shape):
            from sklearn.decomposition import PCA

            features = PCA(self.n_components, svd_solver="covariance_eigh").fit_transform(features).astype(np.float32)
        self.affinity_ = knn_affinity(features, self.n_neighbors, self.knn, self.random_state)
        self.eigenvalues_, self.eigenvectors_ = spectral_embedding(self.affinity_, self.n_eigenvalues, self.random_state)
        values = self.eigenvalues_
        self.lambda2_ = float(values[1])
        if self.n_clusters == "eigengap":
            top = max(2, min(self.max_clusters, len(values) - 1))
            gaps = values[2 : top + 1] - values[1:top]
            self.n_clusters_ = 2 + int(np.argmax(gaps))
        else:
            if self.n_clusters > len(values):
                raise InputError("n_clusters", f"is {self.n_clusters} but only {len(values)} eigenvectors exist", "ask for fewer clusters")
            self.n_clusters_ = int(self.n_clusters)
        self.eigengap_ = float(values[self.n_clusters_] - values[self.n_clusters_ - 1]) if self.n_clusters_ < len(values) else 0.0
        spectral = _normalize_rows(self.eigenvectors_[:, : self.n_clusters_])
        self.labels_ = KMeans(self.n_clusters_, n_init=KMEANS_INITS, random_state=self.random_state).fit_predict(spectral)
        self.fisher_tau_ = fisher_separability(self.eigenvectors_[:, 1:3], self.labels_)
        if self.embedding_2d == "spectral":
            self.embedding_2d_ = self.eigenvectors_[:, 1:3].copy()
        elif self.embedding_2d == "tsne":
            from sklearn.manifold import TSNE

            perplexity = min(30.0, (n - 1) / 3.0)
            self.embedding_2d_ = TSNE(2, perplexity=perplexity, random_state=self.random_state).fit_transform(self.eigenvectors_)
        else:
            self.embedding_2d_ = None
        return self
