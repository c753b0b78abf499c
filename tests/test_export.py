"""export/: P-ClArC baked into ONNX graphs (PyTorch and ONNX-only routes), folded exactly, verified, served by TorchServe."""

import hashlib
import io
import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from unhans.audit.samples import data_fingerprint
from unhans.core.clarc import fit_cav, pclarc
from unhans.core.cost import MAX_COST_PT, MIN_CLASS_SAMPLES, HeldOut
from unhans.core.errors import InputError
from unhans.core.layers import activations, insert_after
from unhans.core.training import predict
from unhans.export import onnx as onnx_export
from unhans.export.archive import build_archive
from unhans.export.cli import export_command, inspect_command
from unhans.export.correction import Correction, load_correction
from unhans.export.graph import scope_output, shapes
from unhans.export.runtime import run_batched, session

LAYERS = {"vgg": "features.pool2", "resnet": "features.layer3"}
FOLDABLE = {("vgg", "flat"): True, ("vgg", "channel"): True, ("resnet", "flat"): False, ("resnet", "channel"): True}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Backdoored 8x8-digits VGG and ResNet run folders, with pattern CAVs in both modes and their uncorrected graphs."""
    from unhans.core.artifacts import Patch
    from unhans.core.training import TrainSpec, load_run, train_run

    root = tmp_path_factory.mktemp("export_runs")
    out = {}
    for arch in LAYERS:
        train_run(TrainSpec(data="digits", architecture=arch, epochs=4, seed=0), Patch(size=3), root / arch, show_progress=False)
        model, train, test, attack, _ = load_run(root / arch)
        artifact, clean = train.images[train.has_artifact], train.images[~train.has_artifact]
        out[arch] = {
            "dir": root / arch, "model": model, "train": train, "test": test, "attack": attack,
            "probe": np.concatenate([artifact[:16], clean[:16]]),
            "cav": {mode: fit_cav(model, LAYERS[arch], artifact, clean, mode=mode) for mode in ("flat", "channel")},
        }
        out[arch]["plain"] = root / f"{arch}_plain.onnx"
        onnx.save(onnx_export.torch_to_onnx(model, out[arch]["probe"]), str(out[arch]["plain"]))
    return out


def _logits(path_or_model, images):
    model = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else path_or_model
    return run_batched(session(model), images)[0]


def _torch_logits(model, images):
    with torch.no_grad():
        return model(torch.from_numpy(images)).numpy()


@pytest.mark.parametrize("arch,mode", sorted(FOLDABLE))
def test_pytorch_route_matches_pclarc(runs, arch, mode, tmp_path):
    run, cav = runs[arch], runs[arch]["cav"][mode]
    out = tmp_path / "corrected.onnx"
    report = onnx_export.export_torch(run["model"], LAYERS[arch], Correction.from_cav(cav, detector=False), run["probe"], out)
    assert report.folded == FOLDABLE[(arch, mode)]
    # unfolded: Flatten, 2 Gemms, Reshape (flat); 1x1 Conv + Add (channel)
    assert report.nodes_after - report.nodes_before == (0 if report.folded else (4 if mode == "flat" else 2))
    reference = pclarc(run["model"], LAYERS[arch], cav)
    images = np.concatenate([run["test"].images, run["attack"].images])
    got, expected = _logits(out, images), _torch_logits(reference, images)
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    assert (got.argmax(1) == predict(reference, images)).mean() >= 0.999
    assert np.allclose(_logits(out, images[:1]), expected[:1], atol=1e-4 * np.abs(expected).max())  # batch axis is dynamic
    model = onnx.load(str(out))
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["logits"]
    assert model.ir_version <= onnx_export.MAX_IR_VERSION and model.opset_import[0].version >= 18
    assert all(i.data_location != onnx.TensorProto.EXTERNAL for i in model.graph.initializer) and len(list(tmp_path.iterdir())) == 2
    assert report.spec_path.is_file() and load_correction(report.spec_path)[1] == LAYERS[arch]


@pytest.mark.parametrize("arch,mode", sorted(FOLDABLE))
def test_folding_is_exact_and_adds_no_node(runs, arch, mode, tmp_path):
    run = runs[arch]
    correction = Correction.from_cav(run["cav"][mode], detector=False)
    folded = onnx_export.export_onnx(run["plain"], correction, run["probe"], tmp_path / "folded.onnx", layer=LAYERS[arch])
    inserted = onnx_export.export_onnx(run["plain"], correction, run["probe"], tmp_path / "inserted.onnx", layer=LAYERS[arch], fold=False)
    assert folded.folded == FOLDABLE[(arch, mode)] and not inserted.folded
    if folded.folded:
        assert folded.nodes_after == folded.nodes_before
    else:
        assert folded.nodes_after == inserted.nodes_after > inserted.nodes_before
    # never a dense DxD matrix: new weights are vectors of one activation's size, or the CxC channel projection
    sizes = [i.dims for i in onnx.load(str(tmp_path / "inserted.onnx")).graph.initializer if i.name.startswith("unhans.pclarc")]
    shape = run["cav"][mode].clean_mean_.shape
    assert max(int(np.prod(d)) for d in sizes) == (int(np.prod(shape)) if mode == "flat" else shape[0] ** 2)
    images = np.concatenate([run["test"].images, run["attack"].images])
    a, b = _logits(tmp_path / "folded.onnx", images), _logits(tmp_path / "inserted.onnx", images)
    expected = _torch_logits(pclarc(run["model"], LAYERS[arch], run["cav"][mode]), images)
    scale = np.abs(expected).max()
    assert np.abs(a - b).max() <= 1e-4 * scale and np.abs(a - expected).max() <= 1e-4 * scale


def test_channel_insertion_forms_are_exact(runs, tmp_path, monkeypatch):
    """Wide layers get 3 rank-1 nodes instead of the CxC Conv; a z that is the same at every position makes one Conv."""
    from unhans.export import graph

    run = runs["resnet"]
    cav = run["cav"]["channel"]
    uniform = np.broadcast_to(cav.clean_mean_.mean(axis=(1, 2), keepdims=True), cav.clean_mean_.shape)
    images = np.concatenate([run["test"].images[:64], run["attack"].images[:64]])
    for correction, dense_max, added in ((Correction(cav.direction_, uniform, "channel"), 256, 1),
                                         (Correction.from_cav(cav, detector=False), 0, 3)):
        monkeypatch.setattr(graph, "DENSE_CHANNELS_MAX", dense_max)
        report = onnx_export.export_onnx(run["plain"], correction, run["probe"], tmp_path / "c.onnx", layer=LAYERS["resnet"], fold=False)
        assert report.nodes_after - report.nodes_before == added
        reference = insert_after(run["model"], LAYERS["resnet"], correction.module())
        expected = _torch_logits(reference, images)
        assert np.abs(_logits(tmp_path / "c.onnx", images) - expected).max() <= 1e-4 * np.abs(expected).max()


def test_onnx_route_without_pytorch_source(runs, tmp_path):
    """A foreign graph (no name scopes, IR version 14): fit the CAV on onnxruntime activations, correct by tensor name."""
    run = runs["vgg"]
    foreign = onnx.load(str(run["plain"]))
    tensor = scope_output(foreign, LAYERS["vgg"])
    for node in foreign.graph.node:
        del node.metadata_props[:]
    foreign.ir_version = 14
    source = tmp_path / "foreign.onnx"
    onnx.save(foreign, str(source))
    model = onnx_export.load_onnx(source)
    with pytest.raises(InputError, match="did you mean"):
        onnx_export.fit_cav_onnx(model, run["probe"], run["probe"], tensor=tensor[:-1])
    train = run["train"]
    cav = onnx_export.fit_cav_onnx(model, train.images[train.has_artifact], train.images[~train.has_artifact], tensor=tensor)
    assert float(cav.direction_ @ run["cav"]["flat"].direction_) > 0.9999  # the same CAV as from PyTorch activations
    report = onnx_export.export_onnx(source, Correction.from_cav(cav), run["probe"], tmp_path / "out.onnx", tensor=tensor)
    assert report.folded and report.tensor == tensor
    images = run["attack"].images
    got = run_batched(session(str(tmp_path / "out.onnx")), images)
    expected = _torch_logits(pclarc(run["model"], LAYERS["vgg"], cav), images)
    assert np.abs(got[0] - expected).max() <= 1e-4 * np.abs(expected).max()
    assert np.allclose(got[1], cav.decision_function(activations(run["model"], images, LAYERS["vgg"])), atol=1e-3)
    assert onnx.load(str(tmp_path / "out.onnx")).ir_version == onnx_export.MAX_IR_VERSION
    assert onnx_export.read_metadata(tmp_path / "out.onnx")["unhans.source.sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()


def test_reactive_gate_lives_in_the_graph(runs, tmp_path):
    run, mode = runs["vgg"], "flat"
    cav = run["cav"][mode]
    report = onnx_export.export_torch(run["model"], LAYERS["vgg"], Correction.from_cav(cav, reactive=True), run["probe"], tmp_path / "r.onnx", fold=True)
    assert not report.folded  # a per-sample gate is not affine: it cannot fold
    images = np.concatenate([run["test"].images, run["attack"].images])
    logits, scores = run_batched(session(str(tmp_path / "r.onnx")), images)
    plain = _logits(run["plain"], images)
    quiet = scores <= 0
    assert quiet[: len(run["test"])].mean() > 0.9 and (~quiet[len(run["test"]):]).mean() > 0.9
    assert np.array_equal(logits[quiet], plain[quiet])  # clean rows pass through the uncorrected path untouched
    corrected = _torch_logits(pclarc(run["model"], LAYERS["vgg"], cav), images)
    assert np.abs(logits[~quiet] - corrected[~quiet]).max() <= 1e-4 * np.abs(corrected).max()
    assert np.allclose(scores, cav.decision_function(activations(run["model"], images, LAYERS["vgg"])), atol=1e-3)


def test_export_falls_back_to_the_reactive_gate_where_the_plain_projection_costs_too_much(runs, tmp_path):
    """By default a plain projection over the cost bound is fitted again against the clean rows of the artifact rows'
    own classes, and where that is over the bound too replaced by the reactive one, judged on the same test set."""
    from unhans.cli import main

    run = runs["vgg"]
    train = run["train"]
    samples = tmp_path / "samples.npz"
    np.savez(samples, artifact=train.has_artifact, clean=~train.has_artifact)
    args = ["export", "--run", str(run["dir"]), "--layer", LAYERS["vgg"], "--samples", str(samples), "--max-cost", "0", "--max-class-cost", "0"]
    plain = CliRunner().invoke(main, [*args, "--plain", "--out", str(tmp_path / "plain.onnx")])
    assert plain.exit_code == 2 and "--max-" in plain.output and not (tmp_path / "plain.onnx").exists()  # a plain projection moves some clean image
    fallback = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "gated.onnx")])
    assert fallback.exit_code == 0 and "the plain projection is refused" in fallback.output, fallback.output
    assert "of the artifact samples' own classes" in " ".join(fallback.output.split())  # tried, and refused too, before the gate
    metadata = onnx_export.read_metadata(tmp_path / "gated.onnx")
    assert metadata["unhans.correction.reactive"] == "true" and float(metadata["unhans.cost.pt"]) <= 0


def test_refuses_mismatch_and_bad_input_leaving_no_file(runs, tmp_path, monkeypatch):
    run = runs["vgg"]
    out = tmp_path / "out" / "x.onnx"
    correction = Correction.from_cav(run["cav"]["flat"])
    real = onnx_export.apply_correction

    def corrupted(model, tensor, correction, fold):
        graph, folded = real(model, tensor, correction, fold)
        weight = next(i for i in graph.graph.initializer if i.name == "classifier.fc1.weight")
        array = onnx.numpy_helper.to_array(weight).copy()
        array[0, :] += 0.05
        weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
        return graph, folded

    monkeypatch.setattr(onnx_export, "apply_correction", corrupted)
    with pytest.raises(InputError, match="differs from PyTorch"):
        onnx_export.export_onnx(run["plain"], correction, run["probe"], out, layer=LAYERS["vgg"])
    monkeypatch.undo()
    pool1 = fit_cav(run["model"], "features.pool1", run["probe"][:16], run["probe"][16:])
    with pytest.raises(InputError, match="fit the CAV on the layer"):
        onnx_export.export_onnx(run["plain"], Correction.from_cav(pool1), run["probe"], out, layer=LAYERS["vgg"])
    with pytest.raises(InputError, match="did you mean.*features.pool2"):
        onnx_export.export_onnx(run["plain"], correction, run["probe"], out, layer="features.pool")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a graph")
    with pytest.raises(InputError, match="not an ONNX model"):
        onnx_export.load_onnx(garbage)
    broken = onnx.load(str(run["plain"]))
    broken.graph.node[0].input[0] = "nowhere"
    onnx.save(broken, str(tmp_path / "broken.onnx"))
    with pytest.raises(InputError, match="checker"):
        onnx_export.load_onnx(tmp_path / "broken.onnx")
    future = onnx.load(str(run["plain"]))
    future.opset_import[0].version = 99
    onnx.save(future, str(tmp_path / "future.onnx"))
    with pytest.raises(InputError, match="checker|onnxruntime"):
        onnx_export.load_onnx(tmp_path / "future.onnx")
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_metadata_inspect_and_cli(runs, tmp_path):
    run = runs["vgg"]
    train = run["train"]
    samples = tmp_path / "samples.npz"
    np.savez(samples, artifact=train.has_artifact, clean=np.flatnonzero(~train.has_artifact))
    out = tmp_path / "cli.onnx"
    runner = CliRunner()
    result = runner.invoke(export_command, ["--run", str(run["dir"]), "--layer", LAYERS["vgg"], "--samples", str(samples), "--out", str(out)])
    assert result.exit_code == 0, result.output
    metadata = onnx_export.read_metadata(out)
    cav = run["cav"]["flat"]
    assert metadata["unhans.cav.fingerprint"] == cav.fingerprint() == Correction.from_cav(cav).fingerprint()
    assert metadata["unhans.correction.layer"] == LAYERS["vgg"] and metadata["unhans.correction.mode"] == "flat"
    # plain and folded into the next dense layer, or (where that costs too much) the reactive projection, never folded
    assert metadata["unhans.folded"] == ("false" if metadata["unhans.correction.reactive"] == "true" else "true")
    assert metadata["unhans.source.kind"] == "pytorch state_dict"
    assert float(metadata["unhans.verify.max_abs_diff"]) <= 1e-4 * float(metadata["unhans.verify.logit_scale"])
    # what the correction costs, measured on the run's clean test set, beside the CAV's quality
    assert metadata["unhans.cost.data"] == "the run's clean test set" and metadata["unhans.cost.metric"] == "clean accuracy"
    assert int(metadata["unhans.cost.samples"]) == len(run["test"]) and float(metadata["unhans.cost.pt"]) <= MAX_COST_PT
    assert [c[0] for c in json.loads(metadata["unhans.cost.per_class"])] == run["test"].classes
    shown = runner.invoke(inspect_command, [str(out), "--json"])
    assert json.loads(shown.output)["unhans.version"] == metadata["unhans.version"]
    assert "artifact_score" in runner.invoke(inspect_command, [str(out)]).output
    assert "unhans.cost.per_class" in runner.invoke(inspect_command, [str(out)]).output
    # a samples file from an audit of other data of the same size (here: the rows reversed) is refused, nothing written
    other = tmp_path / "other-samples.npz"
    np.savez(other, artifact=train.has_artifact, clean=np.flatnonzero(~train.has_artifact),
             data=data_fingerprint(train.images[::-1], train.labels[::-1]))
    refused = runner.invoke(export_command, ["--run", str(run["dir"]), "--layer", LAYERS["vgg"], "--samples", str(other), "--out", str(tmp_path / "other.onnx")])
    assert isinstance(refused.exception, InputError) and "selected from an audit of other data" in str(refused.exception)
    assert not list(tmp_path.glob("other.*"))
    bad = runner.invoke(export_command, ["--run", str(run["dir"]), "--layer", "features.pool3", "--out", str(tmp_path / "bad.onnx")])
    assert isinstance(bad.exception, InputError) and "features.pool2" in str(bad.exception)
    assert not (tmp_path / "bad.onnx").exists() and not (tmp_path / "bad.correction.npz").exists()


def test_a_correction_fitted_on_the_wrong_cluster_is_refused(runs, tmp_path):
    """A CAV fitted on clean images of the target class (the mistake of marking the clean half of a class) projects the
    class out: refused in both routes, nothing written; a raised bound accepts it, loudly and on the record."""
    from unhans.cli import main

    run = runs["vgg"]
    train = run["train"]
    wrong = ~train.has_artifact & (train.labels == train.target)
    samples = tmp_path / "wrong.npz"
    np.savez(samples, artifact=wrong, clean=np.flatnonzero(~train.has_artifact & ~wrong))
    args = ["export", "--run", str(run["dir"]), "--layer", LAYERS["vgg"], "--samples", str(samples)]
    refused = CliRunner().invoke(main, [*args, "--plain", "--out", str(tmp_path / "refused.onnx")])
    assert refused.exit_code == 2 and "--max-cost: the correction costs" in refused.output and "pass --max-cost" in refused.output
    assert "on the run's clean test set" in refused.output and not list(tmp_path.glob("refused*"))
    # by default the reactive gate is tried next: it flags the clean target class it was fitted on, and is refused too
    refused = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "refused.onnx")])
    assert refused.exit_code == 2 and "the plain projection is refused" in refused.output, refused.output
    assert "the correction costs" in refused.output and not list(tmp_path.glob("refused*"))
    # with the overall bound lifted, the bound per class still refuses it: the target class loses most of its images
    refused = CliRunner().invoke(main, [*args, "--plain", "--max-cost", "100", "--out", str(tmp_path / "refused.onnx")])
    assert refused.exit_code == 2 and f"--max-class-cost: the correction costs class {train.target} " in refused.output
    assert not list(tmp_path.glob("refused*"))
    accepted = CliRunner().invoke(main, [*args, "--plain", "--out", str(tmp_path / "accepted.onnx"), "--max-cost", "100", "--max-class-cost", "100"])
    assert accepted.exit_code == 0, accepted.output
    assert "accepted with --max-cost 100" in accepted.output
    metadata = onnx_export.read_metadata(tmp_path / "accepted.onnx")
    assert float(metadata["unhans.cost.pt"]) > 5 and metadata["unhans.cost.bound_pt"] == "100"
    assert metadata["unhans.cost.worst_class"].startswith(f"{train.target}: ")
    # without a run, the cost is top-1 agreement with the uncorrected model on the clean images
    np.save(tmp_path / "a.npy", train.images[wrong])
    np.save(tmp_path / "c.npy", train.images[~train.has_artifact & ~wrong])
    unlabelled = CliRunner().invoke(main, ["export", "--model", str(run["dir"] / "model.py"), "--weights", str(run["dir"] / "weights.pt"),
                                           "--layer", LAYERS["vgg"], "--artifact-samples", str(tmp_path / "a.npy"),
                                           "--clean-samples", str(tmp_path / "c.npy"), "--out", str(tmp_path / "u.onnx")])
    assert unlabelled.exit_code == 2 and "top-1 agreement with the uncorrected model" in unlabelled.output
    assert "change their top-1 class" in unlabelled.output and not (tmp_path / "u.onnx").exists()
    # the ONNX-only route is judged the same way, on the graph it would write
    cav = onnx_export.fit_cav_onnx(onnx_export.load_onnx(run["plain"]), train.images[wrong], train.images[~wrong], layer=LAYERS["vgg"])
    held_out = HeldOut(run["test"].images, run["test"].labels, "the test set")
    with pytest.raises(InputError, match="--max-cost: the correction costs"):
        onnx_export.export_onnx(run["plain"], Correction.from_cav(cav), run["probe"], tmp_path / "o.onnx", layer=LAYERS["vgg"], held_out=held_out)
    assert not (tmp_path / "o.onnx").exists()


def test_cost_is_judged_overall_and_per_class_from_counts():
    """10 of 1,000 images is exactly 1 point (no float drift); a class that loses more than its bound is refused even
    when the overall figure passes; a class with too few images is reported, not judged."""
    labels = np.repeat(np.arange(10), 100)
    before, images = np.eye(10)[labels], np.zeros((1000, 1, 2, 2))
    after = before.copy()
    after[:10] = np.eye(10)[1]  # 10 images of class 0 now predicted 1
    cost = HeldOut(images, labels, "test", max_pt=1.0, max_class_pt=10.0).cost(before, after)
    assert cost.overall.pt == 1.0 and cost.worst_class.name == "0" and cost.worst_class.pt == 10.0 and cost.agreement == 0.99
    cost.check()
    after[10] = np.eye(10)[1]  # one more
    with pytest.raises(InputError, match=r"--max-cost: .*1\.1 points .*pass --max-cost 2 "):
        HeldOut(images, labels, "test", max_pt=1.0, max_class_pt=10.0).cost(before, after).check()
    with pytest.raises(InputError, match=r"--max-class-cost: .*class 0 11\.0 points.*pass --max-class-cost 11 "):
        HeldOut(images, labels, "test", max_pt=2.0, max_class_pt=10.0).cost(before, after).check()
    # without labels: agreement, per class of the uncorrected prediction
    first = np.eye(3)[np.r_[np.zeros(MIN_CLASS_SAMPLES - 1, int), np.ones(100, int)]]
    changed = first.copy()
    changed[:2] = np.eye(3)[2]
    cost = HeldOut(np.zeros((len(first), 1, 2, 2)), None, "photos", max_pt=2.0, max_class_pt=10.0).cost(first, changed)
    assert not cost.labelled and cost.overall.before == 1.0 and cost.overall.correct_after == len(first) - 2
    assert cost.classes[0].pt > 10.0 and cost.worst_class.name == "1"  # class 0 is reported, not judged
    cost.check()


@pytest.mark.integration
def test_integration_torchserve_serves_the_archive(runs, tmp_path, torchserve):
    """Integration: build the .mar, start a real TorchServe (token auth on), ask it for predictions, stop it."""
    run = runs["vgg"]
    graph = tmp_path / "vgg.onnx"
    onnx_export.export_torch(run["model"], LAYERS["vgg"], Correction.from_cav(run["cav"]["flat"]), run["probe"], graph)
    store, work = tmp_path / "store", tmp_path / "work"
    store.mkdir()
    work.mkdir()
    with pytest.raises(InputError, match="--name"):
        build_archive(graph, run["dir"], "bad name", store)
    mar = build_archive(graph, run["dir"], "vgg", store)
    assert mar == store / "vgg.mar" and sorted(p.name for p in store.iterdir()) == ["config.properties", "vgg.mar"]
    assert "disable_token_authorization=false" in (store / "config.properties").read_text()  # the shipped template
    image = run["attack"].images[0]
    expected_logits, expected_score = run_batched(session(str(graph)), image[None])
    with torchserve(store, "vgg", work) as server:
        npy = io.BytesIO()
        np.save(npy, image)
        status, answer = server.post("/predictions/vgg", npy.getvalue(), "application/octet-stream")
        assert status == 200, answer
        assert answer["label"] == int(expected_logits.argmax()) and len(answer["probabilities"]) == 3
        assert abs(answer["artifact_score"] - float(expected_score[0])) < 1e-4 * max(1.0, abs(float(expected_score[0])))
        status, as_json = server.post("/predictions/vgg", json.dumps(image.tolist()).encode(), "application/json")
        assert status == 200 and as_json["label"] == answer["label"]
        status, _ = server.post("/predictions/vgg", npy.getvalue(), "application/octet-stream", authorize=False)
        assert status in (400, 401)  # token authorization is on

def test_onnx_route_resolves_symbolic_shapes_and_names_the_fix_for_missing_scopes(tmp_path):
    """A graph exported with dynamic height and width: shape inference leaves the activation's size symbolic, the shape
    onnxruntime computed for the fitting activations fills it in, and the corrected graph is verified on a probe."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)).eval()
    x = torch.rand(2, 3, 16, 16)
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("h", min=4, max=64), 3: torch.export.Dim("w", min=4, max=64)}
    program = torch.onnx.export(model, (x,), dynamo=True, input_names=["input"], output_names=["logits"],
                                dynamic_shapes=(dims,), external_data=False, opset_version=onnx_export.OPSET)
    source = tmp_path / "dynamic.onnx"
    source.write_bytes(onnx_export._with_ir_version(program.model_proto).SerializeToString())
    graph = onnx.load(str(source))
    relu = next(n.output[0] for n in graph.graph.node if n.op_type == "Relu")
    assert not all(isinstance(d, int) for d in shapes(graph)[relu][1:])  # inference leaves them symbolic
    rng = np.random.default_rng(0)
    clean = rng.random((20, 3, 16, 16), dtype=np.float32)
    marked = clean.copy()
    marked[:, :, :4, :4] = 1.0
    cav = onnx_export.fit_cav_onnx(graph, marked, clean, tensor=relu, paired=True)
    report = onnx_export.export_onnx(source, Correction.from_cav(cav), np.concatenate([marked[:4], clean[:4]]), tmp_path / "out.onnx", tensor=relu)
    assert report.max_abs_diff <= 1e-4 * max(1.0, report.logit_scale)
    # a graph without module names (not written by the dynamo exporter): the message says so, and what to pass instead
    for node in graph.graph.node:
        del node.metadata_props[:]
    (tmp_path / "plain.onnx").write_bytes(graph.SerializeToString())
    with pytest.raises(InputError, match=r"records no module names.*dynamo=True.*--tensor NAME"):
        onnx_export.fit_cav_onnx(onnx.load(str(tmp_path / "plain.onnx")), marked, clean, layer="0")


def test_rank_k_correction_through_the_onnx_route_and_the_cli(runs, tmp_path):
    """A rank-3 correction fitted on onnxruntime's activations of a foreign graph, folded and inserted, equals PyTorch's
    P-ClArC; the CLI refuses several directions without pairs, and a bad count, writing nothing."""
    from unhans.core.artifacts import Patch

    run = runs["vgg"]
    clean = run["train"].images[~run["train"].has_artifact][:200]
    with_artifact, _ = Patch(size=3).apply(clean)
    cav = onnx_export.fit_cav_onnx(onnx.load(str(run["plain"])), with_artifact, clean, layer=LAYERS["vgg"], paired=True, n_directions=3)
    assert cav.directions_.shape[0] == 3 and cav.quality_["directions"] == 3 and "heldout_energy_share" in cav.quality_
    correction = Correction.from_cav(cav)
    images = np.concatenate([run["test"].images[:200], run["attack"].images[:200]])
    expected = _torch_logits(pclarc(run["model"], LAYERS["vgg"], cav), images)
    for fold in (True, False):
        out = tmp_path / f"k{fold}.onnx"
        report = onnx_export.export_onnx(run["plain"], correction, run["probe"], out, layer=LAYERS["vgg"], fold=fold)
        assert report.folded == fold
        assert np.abs(_logits(out, images) - expected).max() <= 1e-4 * np.abs(expected).max()
        metadata = onnx_export.read_metadata(out)
        assert metadata["unhans.correction.directions"] == "3" and metadata["unhans.cav.fingerprint"] == cav.fingerprint()
    assert not np.allclose(expected, _torch_logits(pclarc(run["model"], LAYERS["vgg"], fit_cav(
        run["model"], LAYERS["vgg"], with_artifact, clean, paired=True)), images), atol=1e-4 * np.abs(expected).max())  # k matters
    runner = CliRunner()
    for directions, message in (("2", "need paired samples"), ("two", "not a number of directions")):
        result = runner.invoke(export_command, ["--run", str(run["dir"]), "--layer", LAYERS["vgg"], "--directions", directions,
                                                "--out", str(tmp_path / "cli.onnx")])
        assert isinstance(result.exception, InputError) and message in str(result.exception), result.output
        assert not (tmp_path / "cli.onnx").exists()


def test_the_effect_on_the_artifact_is_judged_where_a_set_shows_one():
    """export/effect.py's arithmetic on the figures of the issue's stripes backdoor (paired correction from a corner of
    the stripes: 93.6% of the rows still the class, the rows' own projection 2.4%) and of a co-occurrence (its rows stay
    the class whatever the correction: only the pairs judge)."""
    from unhans.export.effect import EFFECT, Effect

    partial = Effect(8, "8", 360, (1.0, 0.936), (6.1, 5.2), 0.024, "rows", 500, (0.40, 0.05), "pairs")
    assert partial.removed_rows == pytest.approx(0.064 / 0.976) and partial.removed_pairs == pytest.approx(0.875)
    assert partial.removed == partial.removed_rows  # the smaller of the two that show an effect
    with pytest.raises(InputError, match="removes only 7% of the artifact.s effect") as refused:
        partial.check("unhans export --samples S")
    assert refused.value.argument == "--min-removed" and "nothing was written" in refused.value.problem
    assert "unhans export --samples S" in refused.value.fix and "--min-removed 0" in refused.value.fix
    cooccurrence = Effect(0, "0", 180, (1.0, 1.0), (9.0, 7.5), 1.0, "rows", 500, (0.22, 0.01), "pairs")
    assert cooccurrence.removed_rows is None and cooccurrence.removed == pytest.approx(0.21 / 0.22)
    cooccurrence.check("never named")
    unjudged = Effect(0, "0", 10, (0.1, 0.1), (0.0, 0.0), None, "rows", 0, None, "")
    assert unjudged.removed is None and unjudged.metadata()[EFFECT.removed] == "not judged"
    unjudged.check("never named")
