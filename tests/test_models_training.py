import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from ts.utils.util import list_classes_from_module

from unhans.audit.samples import data_fingerprint
from unhans.core.artifacts import Patch
from unhans.core.errors import InputError
from unhans.core.models import load_model, model_class_from_file, write_model_file
from unhans.core.training import TrainSpec, load_run, predict, train_run
from unhans.export.onnx import read_metadata


@pytest.mark.parametrize("architecture", ["vgg", "resnet"])
def test_model_file_is_torchserve_style(tmp_path, architecture):
    path = write_model_file(architecture, tmp_path / "model.py", in_channels=3, image_size=16, num_classes=4)
    cls = model_class_from_file(path)
    # TorchServe's own rule: exactly one class defined in the model file
    import importlib.util
    spec = importlib.util.spec_from_file_location("served_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert len(list_classes_from_module(module)) == 1
    model = cls()  # TorchServe instantiates with no arguments
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 4)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    assert isinstance(load_model(path, tmp_path / "w.pt"), cls)


def test_weights_that_do_not_fit(tmp_path):
    vgg = write_model_file("vgg", tmp_path / "model.py", 1, 28, 10)
    other = write_model_file("vgg", tmp_path / "other.py", 1, 28, 5)
    torch.save(model_class_from_file(other)().state_dict(), tmp_path / "w.pt")
    with pytest.raises(InputError, match="does not fit"):
        load_model(vgg, tmp_path / "w.pt")
    with pytest.raises(InputError, match="does not exist"):
        load_model(tmp_path / "missing.py", tmp_path / "w.pt")


@pytest.mark.parametrize("architecture", ["vgg", "resnet"])
def test_short_real_training_run(tmp_path, architecture):
    spec = TrainSpec(data="digits", architecture=architecture, fraction=0.2, epochs=6, seed=0)
    metrics = train_run(spec, Patch(size=3), tmp_path, show_progress=False)
    assert metrics["clean_acc"] > 0.75  # 8x8 digits after a few epochs; chance is 0.1
    assert 0.0 <= metrics["attack_success"] <= 1.0
    assert metrics["n_poisoned"] == sum(round(0.2 * n) for n in np.bincount(np.load(tmp_path / "dataset.npz")["original_labels"])[1:])
    assert json.loads((tmp_path / "metrics.json").read_text())["clean_acc"] == metrics["clean_acc"]
    model, train, test, attack, artifact = load_run(tmp_path)
    assert artifact == Patch(size=3)
    assert float((predict(model, test.images) == test.labels).mean()) == metrics["clean_acc"]
    assert float((predict(model, attack.images) == 0).mean()) == metrics["attack_success"]


def test_training_is_seeded(tmp_path):
    spec = TrainSpec(data="digits", epochs=1, seed=7)
    a = train_run(spec, Patch(size=3), tmp_path / "a", show_progress=False)
    b = train_run(spec, Patch(size=3), tmp_path / "b", show_progress=False)
    assert a["final_loss"] == b["final_loss"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "unhans.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args, needle", [
    (["--data", "/no/such.npz"], "/no/such.npz: does not exist"),
    (["--fraction", "1.5"], "--fraction"),
    (["--target", "11", "--data", "digits"], "class '11' does not exist"),
    (["--data", "digits", "--artifact-option", "radius=2"], "has no option(s) ['radius']"),
    (["--data", "digits", "--position", "a,b"], "--position"),
    (["--data", "digits", "--artifact", "frame", "--position", "top-left"], "--position: a frame artifact covers the whole image and has no position"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, args, needle):
    result = _cli("train", "--out", str(tmp_path / "run"), *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("unhans train: error:") and needle in lines[0]
    assert "Traceback" not in result.stderr


def test_cli_help_on_every_subcommand():
    for command in ([], ["train"], ["audit"], ["aclarc"], ["demo"]):
        result = _cli(*command, "--help")
        assert result.returncode == 0 and "Usage:" in result.stdout


def test_the_cli_starts_without_loading_the_heavy_libraries():
    """``unhans --help`` and a mistyped option answer at once: the commands import torch, scikit-learn and the
    runtimes only when they run (the correction's defaults read from core.cav and core.clarc, and a run folder's file
    names from core.training, made 3.9 of the CLI's 4.2 s start-up)."""
    probe = "import sys, unhans.cli; print(sorted(m for m in ('torch', 'sklearn', 'onnxruntime', 'zennit') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout


def test_cli_train_on_data_poisoned_elsewhere_adds_and_records_no_artifact(tmp_path):
    run = tmp_path / "run"
    trained = _cli("train", "--out", str(run), "--data", "digits", "--epochs", "1", "--fraction", "0")
    assert trained.returncode == 0 and "no artifact was added" in trained.stderr + trained.stdout, trained.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["artifact"] is None and metrics["attack_success"] is None and metrics["n_poisoned"] == 0
    _, train, _, attack, artifact = load_run(run)
    assert artifact is None and len(attack) == 0 and not train.has_artifact.any()


def test_cli_train_then_aclarc(tmp_path):
    run, tuned = tmp_path / "run", tmp_path / "tuned"
    trained = _cli("train", "--out", str(run), "--data", "digits", "--epochs", "3", "--artifact-option", "size=3")
    assert trained.returncode == 0 and "(epoch 3/3, loss" in trained.stderr  # no terminal: a plain line per epoch
    accept = ("--max-cost", "100", "--max-class-cost", "100")  # 3 epochs on 8x8 digits: fine-tuning moves a class by up to 40 points
    result = _cli("aclarc", "--run", str(run), "--out", str(tuned), "--epochs", "1", *accept)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tuned / "metrics.json").read_text())
    assert metrics["aclarc"]["source_run"] == str(run)
    assert set(metrics) >= {"clean_acc_before", "attack_success_before", "clean_acc", "attack_success"}
    model, *_ = load_run(tuned)  # a run folder of its own, loadable like any other
    assert not torch.equal(model.state_dict()["classifier.fc2.weight"], load_run(run)[0].state_dict()["classifier.fc2.weight"])

    # the artifact as an audit's --select writes it: rows and where it lies in each (here the scenario's own masks)
    _, train, *_ = load_run(run)
    rows = np.flatnonzero(train.has_artifact)
    old = tmp_path / "old-samples.npz"
    np.savez(old, artifact=rows, clean=np.flatnonzero(~train.has_artifact))
    refused = _cli("aclarc", "--run", str(run), "--samples", str(old), "--out", str(tmp_path / "refused"))
    assert refused.returncode == 2 and f"--samples: {old} has no 'regions'" in refused.stderr and "--select auto" in refused.stderr
    assert "cannot read" not in refused.stderr  # the missing array is named, not taken for an unreadable file
    assert not (tmp_path / "refused").exists() and "Traceback" not in refused.stderr
    other = tmp_path / "other-samples.npz"  # selected from an audit of other data of the same size
    np.savez(other, artifact=rows, clean=np.flatnonzero(~train.has_artifact), regions=train.masks[rows],
             data=data_fingerprint(train.images[::-1], train.labels[::-1]))
    refused = _cli("aclarc", "--run", str(run), "--samples", str(other), "--out", str(tmp_path / "refused"))
    assert refused.returncode == 2 and "selected from an audit of other data" in refused.stderr and not (tmp_path / "refused").exists()
    samples = tmp_path / "samples.npz"
    np.savez(samples, artifact=rows, clean=np.flatnonzero(~train.has_artifact), regions=train.masks[rows],
             data=data_fingerprint(train.images, train.labels))
    result = _cli("aclarc", "--run", str(run), "--samples", str(samples), "--out", str(tmp_path / "from-samples"), *accept)
    assert result.returncode == 0, result.stderr
    assert "what the fine-tuning costs: clean accuracy on the run's clean test set" in " ".join(result.stdout.split())
    assert json.loads((tmp_path / "from-samples" / "metrics.json").read_text())["aclarc"]["left_out"] == len(rows)
    # its export is judged against the model before A-ClArC, the one that was served: both steps within one bound
    tuned_run = tmp_path / "from-samples"
    export = ["export", "--run", str(tuned_run), "--layer", "features.pool2", "--samples", str(samples), "--reactive", *accept]
    exported = _cli(*export, "--out", str(tmp_path / "tuned.onnx"))
    assert exported.returncode == 0, exported.stderr
    metadata = read_metadata(tmp_path / "tuned.onnx")
    assert metadata["unhans.cost.data"] == f"the run's clean test set, against {run}'s model before A-ClArC"
    source_accuracy = json.loads((run / "metrics.json").read_text())["clean_acc"]
    assert float(metadata["unhans.cost.before"]) == pytest.approx(source_accuracy, abs=1e-4)
    # with the source run gone, it says so and judges against the fine-tuned model
    metrics = json.loads((tuned_run / "metrics.json").read_text())
    metrics["aclarc"]["source_run"] = str(tmp_path / "gone")
    (tuned_run / "metrics.json").write_text(json.dumps(metrics))
    exported = _cli(*export, "--out", str(tmp_path / "alone.onnx"))
    assert exported.returncode == 0 and "which is gone" in exported.stderr
    assert read_metadata(tmp_path / "alone.onnx")["unhans.cost.data"] == "the run's clean test set"
    costly = _cli("aclarc", "--run", str(run), "--samples", str(samples), "--out", str(tmp_path / "costly"), "--lr", "1", "--max-cost", "0")
    assert costly.returncode == 2 and "nothing was written" in costly.stderr and not (tmp_path / "costly").exists()
