import numpy as np
import pytest
import scipy.sparse
import torch
from sklearn.base import clone
from sklearn.metrics import adjusted_rand_score

from unhans.core import spray as spray_module
from unhans.core.artifacts import Patch
from unhans.core.errors import InputError
from unhans.core.spray import (
    SpRAy,
    _cell_knn,
    _exact_knn,
    fisher_separability,
    knn_affinity,
    preprocess,
    rank_classes,
    spectral_embedding,
)


@pytest.fixture(scope="module")
def patched_zeros(mnist):
    """250 real zeros and 250 other zeros with a solid 5x5 patch: two groups of 'explanations' in one class."""
    zeros = mnist.images[mnist.labels == 0]
    patched, _ = Patch(pattern="solid").apply(zeros[250:])
    return np.concatenate([zeros[:250], patched]), np.r_[np.zeros(250, int), np.ones(250, int)]


def test_eigenvalues_and_graph_match_corelay(mnist):
    from corelay.pipeline.spectral import SpectralClustering
    from corelay.processor.affinity import SparseKNN
    from corelay.processor.distance import SciPyPDist

    flat = mnist.images[mnist.labels == 3].reshape(-1, 28 * 28).astype(np.float64)
    (theirs, _), _ = SpectralClustering()(flat)
    ours = SpRAy(pooling=1, normalization=None).fit(flat)
    # CoRelAy reports 1 - eig(D^-1/2 A D^-1/2) in descending order; ours ascending
    assert np.abs(np.sort(theirs) - ours.eigenvalues_).max() <= 1e-4
    their_graph = SparseKNN(n_neighbors=10, symmetric=True)(SciPyPDist(metric="euclidean")(flat))
    assert abs(their_graph - ours.affinity_).max() == 0


def test_patched_class_splits_into_two_clusters(patched_zeros):
    maps, truth = patched_zeros
    # pixel maps all peak at 1, so max_abs keeps the patch's weight fixed; abs_sum (the default, right for LRP maps)
    # would shrink it by each digit's amount of ink
    fitted = SpRAy(normalization="max_abs").fit(maps)
    assert fitted.n_clusters_ == 2
    assert adjusted_rand_score(truth, fitted.labels_) >= 0.9
    assert fitted.eigenvalues_[0] == pytest.approx(0, abs=1e-10) and np.all(np.diff(fitted.eigenvalues_) >= -1e-10)
    assert fitted.eigengap_ == pytest.approx(np.sqrt(fitted.eigenvalues_[2]) - np.sqrt(fitted.eigenvalues_[1]))
    assert np.allclose(np.linalg.norm(fitted.eigenvectors_, axis=1), 1.0)


def test_rank_classes_puts_the_split_class_first(mnist):
    images, labels = mnist.images.copy(), mnist.labels.copy()
    poisoned = np.flatnonzero(labels == 7)[250:]
    images[poisoned], _ = Patch(pattern="solid").apply(images[poisoned])
    labels[:5] = 10  # a class too small to analyse
    results = rank_classes(images, labels, normalization="max_abs")
    assert results[0].class_index == 7 and results[0].rank == 1 and results[0].suspicion > results[1].suspicion
    assert [r.rank for r in results[:-1]] == list(range(1, 11))
    assert all(a.suspicion >= b.suspicion for a, b in zip(results[:-2], results[1:-1]))
    skipped = results[-1]
    assert skipped.class_index == 10 and skipped.rank is None and "needs at least 11" in skipped.skipped
    top = results[0]
    assert top.lambda2 == top.eigenvalues[1] and len(top.labels) == top.n_samples == len(top.indices) == 500
    assert top.spray.labels_ is top.labels and skipped.spray is None
    assert set(labels[top.indices]) == {7}


def test_three_disconnected_groups_give_three_zero_eigenvalues(mnist, monkeypatch):
    # three digit classes pushed far apart in an extra dimension: the kNN graph has exactly three components
    flat = np.concatenate([mnist.images[mnist.labels == d][:150].reshape(150, -1) for d in (0, 1, 7)])
    offset = np.repeat(np.eye(3) * 1e3, 150, axis=0)
    features = np.hstack([flat, offset])
    dense = SpRAy(pooling=1, n_clusters=3).fit(features)
    assert np.allclose(dense.eigenvalues_[:3], 0, atol=1e-10) and dense.eigenvalues_[3] > 1e-3
    assert adjusted_rand_score(np.repeat([0, 1, 2], 150), dense.labels_) == 1.0
    assert SpRAy(pooling=1).fit(features).n_clusters_ == 3  # the eigengap finds them too
    monkeypatch.setattr(spray_module, "DENSE_EIGH_MAX", 50)  # force ARPACK on every component
    sparse = SpRAy(pooling=1, n_clusters=3).fit(features)
    assert np.abs(sparse.eigenvalues_ - dense.eigenvalues_).max() < 1e-8


def test_isolated_nodes_give_no_nan():
    ring = scipy.sparse.diags([np.ones(19), np.ones(19)], [1, -1], shape=(20, 20)).tolil()
    ring[0, 19] = ring[19, 0] = 1
    graph = scipy.sparse.block_diag([ring, scipy.sparse.csr_matrix((3, 3))]).tocsr()  # 3 isolated nodes
    values, vectors = spectral_embedding(graph, n_eigenvalues=6)
    assert np.isfinite(values).all() and np.isfinite(vectors).all()
    assert np.allclose(values[:4], 0)  # the ring and the 3 isolated nodes, each a component
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1)
    few, few_vectors = spectral_embedding(graph, n_eigenvalues=2)  # more components than eigenvectors
    assert np.isfinite(few_vectors).all() and np.isfinite(few).all()
    assert set(np.linalg.norm(few_vectors, axis=1).round(6)) <= {0.0, 1.0}


def test_approximate_knn_agrees_with_exact(mnist):
    features = preprocess(mnist.images, pooling=2)
    exact = _exact_knn(features, 10)
    approximate = _cell_knn(features, 10, random_state=0, cell_size=256)  # 19 cells, 6 probed per map
    recall = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(exact, approximate)])
    assert recall >= 0.95
    assert (approximate != np.arange(len(features))[:, None]).all()
    graph = knn_affinity(features[:40], n_neighbors=5, method="approximate")
    assert set(np.unique(graph.data)) <= {0.5, 1.0} and abs(graph - graph.T).max() == 0 and graph.diagonal().max() == 0


def test_preprocess_sums_channels_pools_and_normalises():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(4, 3, 27, 27)).astype(np.float32)
    flat = preprocess(maps, pooling=2, normalization="abs_sum")
    assert flat.shape == (4, 14 * 14)  # 27 is zero-padded to 28
    assert np.allclose(np.abs(flat).sum(axis=1), 1, atol=1e-5)
    summed = maps.sum(axis=1)
    assert np.allclose(preprocess(maps, 2, None)[:, 0], summed[:, :2, :2].sum(axis=(1, 2)), atol=1e-5)
    assert np.allclose(preprocess(summed, 3, "max_abs"), preprocess(maps, 3, "max_abs"), atol=1e-6)
    assert np.abs(preprocess(maps, 1, "max_abs")).max(axis=1) == pytest.approx(1.0)
    features = rng.normal(size=(5, 7))
    assert preprocess(features, pooling=4, normalization=None).shape == (5, 7)  # flat input is not pooled


def test_bad_input_names_the_cause():
    maps = np.random.default_rng(0).random((30, 1, 8, 8)).astype(np.float32)
    with pytest.raises(InputError, match="has shape"):
        SpRAy().fit(maps[0, 0, 0])
    with pytest.raises(InputError, match="has shape"):
        SpRAy().fit(maps[None])
    broken = maps.copy()
    broken[[3, 17], 0, 2, 2] = [np.nan, np.inf]
    with pytest.raises(InputError, match=r"rows \[3, 17\] \(2 in all\) contain NaN or Inf"):
        SpRAy().fit(broken)
    blank = maps.copy()
    blank[5] = 0
    with pytest.raises(InputError, match=r"rows \[5\] \(1 in all\) are constant") as error:
        SpRAy().fit(blank)
    assert "drop those samples" in error.value.fix
    with pytest.raises(InputError, match="needs at least 11"):
        SpRAy().fit(maps[:10])
    for params in ({"normalization": "l2"}, {"n_clusters": 1}, {"pooling": 0}, {"embedding_2d": "umap"}, {"knn": "hnsw"}):
        with pytest.raises(InputError, match=next(iter(params))):
            SpRAy(**params).fit(maps)
    with pytest.raises(InputError, match="labels"):
        rank_classes(maps, np.zeros(29))
    with pytest.raises(InputError, match="spray_params"):
        rank_classes(maps, np.zeros(30), n_neighbours=5)


def test_fisher_separability():
    points = np.array([[0.0, 0], [0, 1], [10, 0], [10, 1]])
    # between: 4 * 25 = 100; within: 4 * 0.25 = 1
    assert fisher_separability(points, [0, 0, 1, 1]) == pytest.approx(100.0)
    assert fisher_separability(points, [0, 0, 0, 0]) == 0.0
    assert fisher_separability(points[[0, 0, 2, 2]], [0, 0, 1, 1]) == np.inf


def test_estimator_api_and_2d_embeddings(patched_zeros):
    maps, truth = patched_zeros
    estimator = SpRAy(n_neighbors=8, normalization="max_abs", embedding_2d="spectral", random_state=3)
    copy = clone(estimator)
    assert copy.get_params() == estimator.get_params() and not hasattr(copy, "labels_")
    assert copy.set_params(n_clusters=2) is copy and copy.n_clusters == 2
    assert estimator.fit(maps) is estimator
    assert estimator.embedding_2d_.shape == (500, 2) and estimator.affinity_.shape == (500, 500)
    assert np.array_equal(clone(estimator).fit_predict(maps), estimator.labels_)  # seeded: reproducible
    assert SpRAy(n_eigenvalues=8).fit(maps).eigenvectors_.shape == (500, 8)
    threads = torch.get_num_threads()
    projected = SpRAy(normalization="max_abs", n_components=20, n_clusters=2).fit(maps)  # PCA before the kNN search
    assert adjusted_rand_score(truth, projected.labels_) >= 0.9 and torch.get_num_threads() == threads
    small = maps[::5]
    tsne = SpRAy(normalization="max_abs", embedding_2d="tsne").fit(small)
    assert tsne.embedding_2d_.shape == (100, 2) and np.isfinite(tsne.embedding_2d_).all()
    assert SpRAy().fit(small).embedding_2d_ is None
