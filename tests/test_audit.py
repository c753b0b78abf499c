import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.metrics import adjusted_rand_score

from unhans.audit.run import run_audit, select_samples
from unhans.audit.spec import AuditSpec
from unhans.core.artifacts import Patch
from unhans.core.data import load_npz
from unhans.core.errors import InputError
from unhans.core.training import TrainSpec, train_run
from unhans.export.onnx import read_metadata


@pytest.fixture(scope="module")
def audited(backdoored_vgg, tmp_path_factory):
    run = backdoored_vgg["run"]
    out = tmp_path_factory.mktemp("audit")
    spec = AuditSpec(model_file=str(run / "model.py"), weights=str(run / "weights.pt"), data=str(run / "dataset.npz"), out_dir=str(out))
    return spec, run_audit(spec), backdoored_vgg["train"]


def test_audit_flags_the_poisoned_class_and_its_artifact_cluster(audited):
    spec, ranked, train = audited
    assert ranked[0].class_index == train.target
    labels = ranked[0].labels
    members = train.labels == train.target
    assert adjusted_rand_score(train.has_artifact[members], labels) >= 0.9
    summary = json.loads((Path(spec.out_dir) / "audit.json").read_text())
    assert summary["classes"][0]["class_index"] == train.target and summary["classes"][0]["rank"] == 1
    assert len(summary["classes"]) == 10
    # the intervention marks the tagged cluster, and no cluster of a clean class
    marked = summary["classes"][0]["artifact_clusters"]
    assert train.has_artifact[members][np.isin(labels, marked)].mean() > 0.95
    assert all(summary["classes"][0]["cluster_evidence"][m]["transplant_rate"] > 0.9 for m in marked)
    assert all(not c["artifact_clusters"] for c in summary["classes"][1:])


def test_select_writes_the_artifact_sample_sets(audited):
    spec, ranked, train = audited
    members = np.flatnonzero(train.labels == train.target)
    tagged = int(np.bincount(ranked[0].labels, weights=train.has_artifact[members]).argmax())
    path = select_samples(spec.out_dir, f"{train.target}:{tagged}")
    with np.load(path) as samples:
        artifact, clean = samples["artifact"], samples["clean"]
        regions = samples["regions"]
        audited_data = str(samples["data"])
    assert len(artifact) + len(clean) == len(train) and not set(artifact) & set(clean)
    assert audited_data == json.loads((Path(spec.out_dir) / "audit.json").read_text())["inputs"]["data"]
    assert train.has_artifact[artifact].mean() > 0.95 and train.has_artifact[clean].mean() < 0.01
    # each artifact row's region (what unhans aclarc pastes) is where its own patch lies, give or take LRP's 1-px blur
    assert regions.shape == (len(artifact), *train.image_shape[1:]) and regions.any(axis=(1, 2)).all()
    near_patch = ndimage.binary_dilation(train.masks[artifact], structure=np.ones((1, 3, 3), bool))
    assert (regions & near_patch).sum() / regions.sum() > 0.9
    with pytest.raises(InputError, match="cluster '7'"):
        select_samples(spec.out_dir, f"{train.target}:7")
    # two clusters of one class together: every row of the class
    both = ",".join(f"{train.target}:{c}" for c in sorted(set(ranked[0].labels.tolist())))
    assert sorted(np.load(select_samples(spec.out_dir, both))["artifact"].tolist()) == members.tolist()
    ids_path = select_samples(spec.out_dir, ids=np.array([3, 1, 3]))
    assert np.load(ids_path)["artifact"].tolist() == [1, 3]
    mask = np.zeros(len(train), bool)
    mask[[0, 5]] = True
    assert np.load(select_samples(spec.out_dir, ids=mask))["artifact"].tolist() == [0, 5]
    with pytest.raises(InputError, match="one boolean per dataset row"):
        select_samples(spec.out_dir, ids=mask[:-1])


def test_select_on_the_command_line_reuses_the_finished_audit_and_checks_first(audited, tmp_path):
    """Picking a cluster from an audit OUT already holds takes no second audit (the report is not rewritten); a bad
    cluster is refused at once, a malformed choice before any work."""
    from click.testing import CliRunner

    from unhans.cli import main

    spec, ranked, train = audited
    out = Path(spec.out_dir)
    args = ["audit", "--model", spec.model_file, "--weights", spec.weights, "--data", spec.data, "--out", str(out)]
    report = (out / "report.html").stat().st_mtime_ns
    repeated = [arg for c in sorted(set(ranked[0].labels.tolist())) for arg in ("--select", f"{train.target}:{c}")]
    picked = CliRunner().invoke(main, [*args, *repeated])
    assert picked.exit_code == 0, picked.output
    assert "reusing the finished audit" in picked.output and (out / "report.html").stat().st_mtime_ns == report
    assert len(np.load(out / "samples.npz")["artifact"]) == ranked[0].n_samples
    bad = CliRunner().invoke(main, [*args, "--select", f"{train.target}:7"])
    assert bad.exit_code == 2 and "cluster '7'" in bad.output and (out / "report.html").stat().st_mtime_ns == report
    auto = CliRunner().invoke(main, [*args, "--select", "auto"])
    marked = json.loads((out / "audit.json").read_text())["classes"][0]["artifact_clusters"]
    assert auto.exit_code == 0 and f"--select {','.join(f'{train.target}:{m}' for m in marked)}" in auto.output
    assert train.has_artifact[np.load(out / "samples.npz")["artifact"]].mean() > 0.95
    fresh = tmp_path / "fresh"
    malformed = CliRunner().invoke(main, [*args[:-1], str(fresh), "--select", "0"])
    assert malformed.exit_code == 2 and "'0' is not CLASS:CLUSTER" in malformed.output and not fresh.exists()


def test_report_renders_in_headless_chromium(audited, tmp_path):
    spec, ranked, train = audited
    report = Path(spec.out_dir) / "report.html"
    page = report.read_text()
    assert "id=\"ranking\"" in page and f"class-{train.target}-cluster-0.png" in page
    for image in Path(spec.out_dir, "report").glob("*.png"):
        Image.open(image).verify()
    shot = tmp_path / "shot.png"
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is installed by scripts/bootstrap.sh"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1400", f"--screenshot={shot}", report.as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (1400, 1200)
    # the ranking table's highlighted first row (#fff3e0) and the warm colours of the heatmaps are on screen
    assert ((pixels == [255, 243, 224]).all(axis=2)).sum() > 1000
    warm = (pixels[..., 0] > 180) & (pixels[..., 2] < 110) & (pixels[..., 0] - pixels[..., 2] > 100)
    assert warm.sum() > 1000


def test_virelay_loads_the_project(audited):
    from virelay.model import Project

    spec, ranked, train = audited
    project = Project(str(Path(spec.out_dir) / "virelay" / "project.yaml"))
    try:
        assert len(project.dataset.get_sample(0).data) > 0
        database = project.analyses["spectral"][0]
        categories = {c.name for c in database.get_categories()}
        assert str(train.target) in categories and len(categories) == 10
        clustering = database.get_clustering_names()[0]
        analysis = database.get_analysis(str(train.target), clustering, "spectral")
        assert len(analysis.attribution_indices) == (train.labels == train.target).sum()
        assert analysis.eigenvalues is not None and analysis.eigenvalues[0] < 1e-6
        assert project.attributions[0].get_attribution(int(analysis.attribution_indices[0])).data.size == 28 * 28
    finally:
        project.close()


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("digits_run")
    train_run(TrainSpec(data="digits", epochs=3), Patch(size=3), run, show_progress=False)
    return run


def _spec(run, out, **extra):
    return AuditSpec(model_file=str(run / "model.py"), weights=str(run / "weights.pt"), data=str(run / "dataset.npz"),
                     out_dir=str(out), embedding_2d=None, **extra)


def test_an_audit_of_a_clean_model_finds_no_artifact_and_says_so(tmp_path):
    """No cluster is marked when nothing is spurious, and --select auto refuses instead of picking one."""
    from click.testing import CliRunner

    from unhans.cli import main

    run = tmp_path / "clean"
    train_run(TrainSpec(data="digits", epochs=4, fraction=0.0), Patch(size=3), run, show_progress=False)
    out = tmp_path / "audit"
    result = CliRunner().invoke(main, ["audit", "--run", str(run), "--out", str(out), "--select", "auto"])
    assert result.exit_code == 2 and "found no artifact" in result.output, result.output
    audit = json.loads((out / "audit.json").read_text())
    assert all(not c.get("artifact_clusters") for c in audit["classes"])
    assert "no artifact found" in (out / "report.html").read_text()
    assert not (out / "samples.npz").exists()


def test_killed_audit_resumes_without_redoing_work(digits_run, tmp_path):
    out = tmp_path / "audit"
    command = [sys.executable, "-m", "unhans.cli", "audit", "--run", str(digits_run), "--out", str(out), "--batch-size", "16"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list((out / "relevance").glob("batch-*.h5"))) < 20 and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = {p.name for p in (out / "relevance").glob("batch-*.h5")}
    total = -(-int(json.loads((out / "relevance" / "meta.json").read_text())["n"]) // 16)
    assert 20 <= len(done_before) < total
    resumed = run_audit(_spec(digits_run, out, batch_size=16))
    summary = json.loads((out / "audit.json").read_text())
    assert summary["computed_fraction_this_run"] == pytest.approx((total - len(done_before)) / total)
    fresh = run_audit(_spec(digits_run, tmp_path / "fresh", batch_size=16))
    assert [r.class_index for r in resumed] == [r.class_index for r in fresh]
    assert all(np.array_equal(a.labels, b.labels) for a, b in zip(resumed, fresh))


def test_a_layers_relevance_is_pooled_by_its_peak_where_the_model_pools_globally(digits_run, tmp_path):
    """``over_positions='auto'``: the peak over positions on a ResNet (global pooling: a moving artifact is a strong
    response anywhere), the sum on the VGG (a Flatten head); stored relevance pooled one way is not reused for the other."""
    import h5py
    import torch

    from unhans.core.attribution import LRP
    from unhans.core.models import load_model

    resnet = tmp_path / "resnet"
    train_run(TrainSpec(data="digits", architecture="resnet", epochs=2, seed=0), Patch(size=3), resnet, show_progress=False)
    spec = _spec(resnet, tmp_path / "a")
    run_audit(spec)
    audit = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert audit["over_positions"] == "max" and audit["spec"]["over_positions"] == "auto"
    model, train = load_model(spec.model_file, spec.weights), load_npz(spec.data)
    with LRP(model, layers=(audit["analysed_layer"],), check=False) as lrp:
        latent = lrp(torch.from_numpy(train.images[:4]), train.labels[:4]).layer_relevance[audit["analysed_layer"]]
    with h5py.File(tmp_path / "a" / "relevance" / "batch-00000.h5") as f:
        np.testing.assert_allclose(f["analysed"][:4], latent.max(axis=(2, 3)), rtol=1e-4, atol=1e-6)
    with pytest.raises(InputError, match="another audit"):
        run_audit(_spec(resnet, tmp_path / "a", over_positions="sum"))
    run_audit(_spec(digits_run, tmp_path / "b"))
    assert json.loads((tmp_path / "b" / "audit.json").read_text())["over_positions"] == "sum"
    with pytest.raises(InputError, match="'mean' is unknown"):
        run_audit(_spec(digits_run, tmp_path / "c", over_positions="mean"))


def test_resume_refuses_another_model(digits_run, tmp_path):
    run_audit(_spec(digits_run, tmp_path))
    other = tmp_path / "other"
    shutil.copytree(digits_run, other)
    train_run(TrainSpec(data="digits", epochs=1, seed=5), Patch(size=3), other, show_progress=False)
    with pytest.raises(InputError, match="another audit"):
        run_audit(_spec(other, tmp_path))
    run_audit(_spec(other, tmp_path), restart=True)


def test_bad_images_are_listed_and_skipped_and_mismatches_stop(digits_run, tmp_path):
    folder = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for c in range(10):
        (folder / str(c)).mkdir(parents=True)
        for i in range(12 if c != 4 else 0):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / str(c) / f"{i}.png")
    (folder / "3" / "broken.png").write_bytes(b"nope")
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(folder / "3" / "odd.png")
    spec = _spec(digits_run, tmp_path / "a", n_neighbors=5)
    spec.data = str(folder)
    ranked = run_audit(spec)
    skipped = (tmp_path / "a" / "skipped.txt").read_text().splitlines()
    assert len(skipped) == 2 and any("broken.png" in s for s in skipped) and any("odd.png" in s for s in skipped)
    empty = next(r for r in ranked if r.class_index == 4)
    assert empty.spray is None and "0 samples" in empty.skipped
    summary = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert summary["skipped_images"] == 2
    three = tmp_path / "three.npz"
    np.savez(three, images=rng.random((30, 8, 8)), labels=np.arange(30) % 3)
    spec.data, spec.out_dir = str(three), str(tmp_path / "b")
    with pytest.raises(InputError, match="has 3 classes but the model predicts 10"):
        run_audit(spec)
    spec.data, spec.layer = str(digits_run / "dataset.npz"), "features.pool9"
    with pytest.raises(InputError, match="features.pool"):
        run_audit(spec)


def test_audit_on_a_local_dask_cluster(digits_run, tmp_path):
    from distributed import LocalCluster

    local = run_audit(_spec(digits_run, tmp_path / "local"))
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None, host="127.0.0.1") as cluster:
        remote = run_audit(_spec(digits_run, tmp_path / "dask", scheduler=cluster.scheduler_address))
    assert [r.class_index for r in remote] == [r.class_index for r in local]
    assert all(np.array_equal(a.labels, b.labels) for a, b in zip(remote, local))
    with pytest.raises(InputError, match="cannot reach the Dask scheduler"):
        run_audit(_spec(digits_run, tmp_path / "none", scheduler="tcp://127.0.0.1:9"))


def test_select_writes_the_artifact_region_that_sets_the_backdoor_off_and_fits_the_paired_correction(audited, backdoored_vgg, tmp_path):
    """--select CLASS:CLUSTER also cuts the cluster's artifact region (RGBA PNG + position) and prints the export command
    that pastes it into clean images: the region pasted into other classes' images turns them to the target class, a
    region of the same shape elsewhere in the same images does not, and the correction fitted from it stops the backdoor."""
    import shlex

    import torch
    from click.testing import CliRunner

    from unhans.audit.region import cut_region
    from unhans.cli import main
    from unhans.core.artifacts import Watermark
    from unhans.export.runtime import session

    spec, ranked, train = audited
    model, test, attack = backdoored_vgg["model"], backdoored_vgg["test"], backdoored_vgg["attack"]
    members = np.flatnonzero(train.labels == train.target)
    tagged = int(np.bincount(ranked[0].labels, weights=train.has_artifact[members]).argmax())
    out = Path(spec.out_dir)
    picked = CliRunner().invoke(main, ["audit", "--model", spec.model_file, "--weights", spec.weights, "--data", spec.data,
                                       "--out", str(out), "--select", f"{train.target}:{tagged}"])
    assert picked.exit_code == 0, picked.output
    assert str(out / "artifact-region.png") in picked.output.replace("\n", "")
    info = json.loads((out / "artifact-region.json").read_text())
    row, col = info["position"]
    alpha = np.asarray(Image.open(out / "artifact-region.png"))[..., 3] > 0
    mask = np.zeros(train.image_shape[1:], bool)
    mask[row:row + alpha.shape[0], col:col + alpha.shape[1]] = alpha
    trigger = backdoored_vgg["artifact"].stamp(train.image_shape)[0] > 0
    assert (mask & trigger).sum() == trigger.sum() and mask.sum() <= 2 * trigger.sum()  # the whole trigger, little else

    others = test.images[test.labels != train.target]

    def to_target(png, position) -> float:
        pasted, _ = Watermark(path=str(png), position=tuple(position)).apply(others)
        with torch.no_grad():
            return float((model(torch.from_numpy(pasted)).argmax(1).numpy() == train.target).mean())

    assert to_target(out / "artifact-region.png", (row, col)) > 0.9
    height, width = alpha.shape  # the same shape cut from the same members' images, at the centre
    elsewhere = np.roll(mask, ((train.image_shape[1] - height) // 2 - row, (train.image_shape[2] - width) // 2 - col), axis=(0, 1))
    control = cut_region(train.images[members[ranked[0].labels == tagged]], elsewhere)
    assert to_target(control.save(tmp_path / "elsewhere.png"), control.position) < 0.1

    command = next(line for line in picked.output.splitlines() if line.strip().startswith("unhans export"))
    args = [a.replace("LAYER", "features.pool2").replace("corrected.onnx", str(tmp_path / "region.onnx")) for a in shlex.split(command)[1:]]
    exported = CliRunner().invoke(main, args)
    assert exported.exit_code == 0, exported.output
    logits = session(str(tmp_path / "region.onnx"), cuda=False).run(["logits"], {"input": attack.images})[0]
    assert backdoored_vgg["metrics"]["attack_success"] > 0.9 and (logits.argmax(1) == train.target).mean() <= 0.05


def test_photos_of_any_size_are_audited_through_the_input_contract(digits_run, tmp_path):
    """--size/--resize/--mean/--std bring an image folder to the model's input as the served handler does: photos of
    several sizes are resized, cropped and normalised for the model, and the pictures people look at are pixels."""
    import h5py
    import torch
    from click.testing import CliRunner

    from unhans.cli import main
    from unhans.core.contract import InputContract
    from unhans.core.models import load_model

    folder, rng = tmp_path / "photos", np.random.default_rng(0)
    for c in range(10):
        (folder / str(c)).mkdir(parents=True)
        for i in range(8):
            side = (14 + 3 * i, 12 + 2 * c)
            Image.fromarray(rng.integers(0, 256, side, dtype=np.uint8)).save(folder / str(c) / f"{i}.png")
    out = tmp_path / "audit"
    options = ["--size", "8", "--channels", "1", "--resize", "10", "--mean", "0.5", "--std", "0.25"]
    result = CliRunner().invoke(main, ["audit", "--model", str(digits_run / "model.py"), "--weights", str(digits_run / "weights.pt"),
                                       "--data", str(folder), "--out", str(out), "--neighbors", "5", *options])
    assert result.exit_code == 0, result.output
    audit = json.loads((out / "audit.json").read_text())
    assert audit["skipped_images"] == 0 and audit["spec"]["contract"]["resize"] == 10
    contract = InputContract(**audit["spec"]["contract"])
    with Image.open(folder / "0" / "0.png") as first:
        pixels = contract.pixels(first)
    with h5py.File(out / "virelay" / "attribution.h5") as f, h5py.File(out / "virelay" / "dataset.h5") as d:
        logits, shown = f["prediction"][0], d["data"][0]
    model = load_model(str(digits_run / "model.py"), str(digits_run / "weights.pt"))
    with torch.no_grad():
        expected = model(torch.from_numpy(contract.normalise(pixels[None]))).numpy()[0]
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)  # the model saw the normalised crop
    np.testing.assert_allclose(shown, pixels, atol=1e-6)  # people see its pixels
    refused = CliRunner().invoke(main, ["audit", "--run", str(digits_run), "--out", str(tmp_path / "b"), *options])
    assert refused.exit_code == 2 and "applies to image folders" in refused.output and not (tmp_path / "b" / "audit.json").exists()

    # the selected rows of a folder audit fit a correction without a run: export reads the audited images from the audit
    model_args = ["--model", str(digits_run / "model.py"), "--weights", str(digits_run / "weights.pt")]
    picked = CliRunner().invoke(main, ["audit", *model_args, "--data", str(folder), "--out", str(out), "--neighbors", "5", *options,
                                       "--select", "0:0"])
    assert picked.exit_code == 0, picked.output
    with np.load(out / "samples.npz") as samples:
        selected, regions = len(samples["artifact"]), samples["regions"]
    assert regions.shape == (selected, 8, 8)
    graph = tmp_path / "folder.onnx"
    export = ["export", *model_args, "--layer", "features", "--samples", str(out / "samples.npz"), "--out", str(graph)]
    exported = CliRunner().invoke(main, [*export, "--max-cost", "100", "--max-class-cost", "100"])
    assert exported.exit_code == 0, exported.output
    metadata = read_metadata(graph)
    assert metadata["unhans.cost.samples"] == str(80 - selected) and "the audited images" in metadata["unhans.cost.data"]
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(folder / "3" / "0.png")  # the data changed since
    stale = CliRunner().invoke(main, [*export, "--out", str(tmp_path / "stale.onnx")])
    assert stale.exit_code == 2 and "changed since the audit" in stale.output and not (tmp_path / "stale.onnx").exists()


def test_some_of_a_models_classes_are_audited_by_their_names(digits_run, tmp_path):
    """--classes: class folders are matched to the model's class names (or indices), so a folder with a few of the
    model's classes is audited towards the right outputs; a folder the names do not hold is named."""
    from click.testing import CliRunner

    from unhans.cli import main

    names = tmp_path / "index_to_name.json"
    names.write_text(json.dumps({str(i): n for i, n in enumerate("zero one two three four five six seven eight nine".split())}))
    folder, rng = tmp_path / "some", np.random.default_rng(1)
    for sub in ("three", "seven", "1"):
        (folder / sub).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / sub / f"{i}.png")
    args = ["audit", "--model", str(digits_run / "model.py"), "--weights", str(digits_run / "weights.pt"), "--neighbors", "5", "--classes", str(names)]
    result = CliRunner().invoke(main, [*args, "--data", str(folder), "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    audited = json.loads((tmp_path / "a" / "audit.json").read_text())["classes"]
    assert sorted((c["class_index"], c["class"]) for c in audited) == [(1, "one"), (3, "three"), (7, "seven")]
    (folder / "eleven").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "eleven" / "0.png")
    refused = CliRunner().invoke(main, [*args, "--data", str(folder), "--out", str(tmp_path / "b")])
    assert refused.exit_code == 2 and "eleven" in refused.output and not (tmp_path / "b" / "audit.json").exists()
