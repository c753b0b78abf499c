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


@pytest.fixture(scope="session")
def served_archive(backdoored_vgg, tmp_path_factory):
    """The backdoored VGG with its P-ClArC correction, exported and archived (``ROOT/store/vgg.mar``) with server-side
    batching, explained by its PyTorch twin; returns ``(ROOT, the corrected PyTorch model)``."""
    return _archive(backdoored_vgg, tmp_path_factory.mktemp("served"), explain_graph=False)


@pytest.fixture(scope="session")
def served_explain_archive(backdoored_vgg, tmp_path_factory):
    """As :func:`served_archive`, with the explain graph (scoring the artifact too) archived beside the graph."""
    return _archive(backdoored_vgg, tmp_path_factory.mktemp("served_explain"), explain_graph=True)


def _archive(backdoored_vgg, root, explain_graph: bool):
    from unhans.core.clarc import fit_cav, pclarc
    from unhans.core.layers import insert_after
    from unhans.export.archive import build_archive
    from unhans.export.correction import Correction
    from unhans.export.explain import MONITOR_LAYER, explain_path, export_explain
    from unhans.export.onnx import export_torch

    model, train = backdoored_vgg["model"], backdoored_vgg["train"]
    cav = fit_cav(model, "features.pool2", train.images[train.has_artifact], train.images[~train.has_artifact])
    correction = Correction.from_cav(cav)
    graph = export_torch(model, "features.pool2", correction, train.images[:64], root / "vgg.onnx").path
    if explain_graph:
        export_explain(insert_after(model, "features.pool2", correction.module()), explain_path(graph), layer=MONITOR_LAYER,
                       probe=train.images[:64], detector=correction)
    (root / "store").mkdir()
    build_archive(graph, backdoored_vgg["run"], "vgg", root / "store", batch_size=8, max_batch_delay_ms=300)
    return root, pclarc(model, "features.pool2", cav)


@pytest.fixture
def torchserve():
    """``with torchserve(store, name, work) as server:`` a started TorchServe serving ``store/name.mar``, ready."""
    from unhans.torchserve import LocalTorchServe

    return LocalTorchServe
