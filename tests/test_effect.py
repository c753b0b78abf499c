"""Issue 33 end to end: an artifact with no place (stripes on every 3rd row of the whole image, backdoor to 0) gets the
samples route and a correction that works; a correction fitted on a piece of it is refused before anything is written.

One MNIST-5k model, trained briefly, serves both tests; everything runs through the real CLI and onnxruntime."""

import json
import shlex

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from unhans.audit.samples import data_fingerprint
from unhans.cli import main
from unhans.core.artifacts import Stripes
from unhans.core.training import TrainSpec, load_run, train_run
from unhans.export.effect import EFFECT
from unhans.export.onnx import META, read_metadata
from unhans.export.effect import MIN_REMOVED
from unhans.export.runtime import run_batched, session


@pytest.fixture(scope="module")
def striped(tmp_path_factory):
    run = tmp_path_factory.mktemp("striped")
    metrics = train_run(TrainSpec(data="mnist", architecture="vgg", epochs=4, seed=0), Stripes(), run, show_progress=False)
    assert metrics["attack_success"] > 0.9, metrics  # the model follows the stripes, else nothing below means anything
    return run, load_run(run)


def _attack_success(graph, attack) -> float:
    return float((run_batched(session(str(graph), cuda=False), attack.images, ["logits"])[0].argmax(1) == attack.target).mean())


def test_a_texture_with_no_place_gets_the_samples_route_and_a_working_correction(striped, tmp_path):
    run, (_, train, _, attack, _) = striped
    audit = tmp_path / "audit"
    done = CliRunner().invoke(main, ["audit", "--run", str(run), "--out", str(audit), "--select", "auto"])
    assert done.exit_code == 0, done.output
    said = " ".join(done.output.split())
    info = json.loads((audit / "artifact-region.json").read_text())
    assert info["everywhere"] and info["route"] == "samples" and "spread over the image" in said, said
    assert info["image"] is None and not (audit / "artifact-region.png").exists()  # no piece of it offered as the artifact
    with np.load(audit / "samples.npz") as samples:
        rows = samples["artifact"]
    assert train.has_artifact[rows].mean() >= 0.9 and train.has_artifact[rows].sum() >= 0.9 * train.has_artifact.sum()

    graph = tmp_path / "corrected.onnx"
    command = [str(graph) if word == "corrected.onnx" else word for word in shlex.split(info["commands"][0])[1:]]
    exported = CliRunner().invoke(main, command)
    assert exported.exit_code == 0, exported.output
    # judged on the rows, the correction passes the bar with room (0.71 of the effect removed at 4 epochs, seed 0: the
    # rows' margin shrinks, not every last logit), and it works: the attack succeeds on 3% of the test set (below)
    assert float(read_metadata(graph)[META + EFFECT.removed]) >= MIN_REMOVED + 0.1
    assert "it removes" in " ".join(CliRunner().invoke(main, ["inspect", str(graph)]).output.split())
    assert _attack_success(graph, attack) <= 0.1


def test_a_correction_fitted_on_a_piece_of_the_artifact_is_refused_naming_the_samples_route(striped, tmp_path):
    """The issue's case: the paired correction from a 13x9 corner of the stripes (what the region step cut before) was
    written with no word and left most of the backdoor; judged on the rows, it is refused and the samples route named."""
    run, (_, train, _, attack, artifact) = striped
    rows = np.flatnonzero(train.has_artifact)
    samples = tmp_path / "samples.npz"
    np.savez(samples, artifact=rows, clean=np.flatnonzero(~train.has_artifact), regions=train.masks[rows],
             data=data_fingerprint(train.images, train.labels))
    alpha, value = artifact.stamp(train.image_shape)
    corner = np.concatenate([np.repeat(value[:, :13, :9], 3, axis=0), alpha[None, :13, :9]]).transpose(1, 2, 0)
    Image.fromarray(np.round(corner * 255).astype(np.uint8), "RGBA").save(tmp_path / "corner.png")
    clean = tmp_path / "clean"
    clean.mkdir()
    for row in np.flatnonzero(train.labels != train.target)[::40]:
        Image.fromarray(np.round(train.images[row, 0] * 255).astype(np.uint8)).save(clean / f"{row}.png")
    out = tmp_path / "piece.onnx"
    refused = CliRunner().invoke(main, ["export", "--run", str(run), "--layer", "features.pool2", "--images", str(clean),
                                        "--artifact-image", str(tmp_path / "corner.png"), "--position", "0,0", "--size", "28,28",
                                        "--channels", "1", "--samples", str(samples), "--out", str(out)])
    said = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "--min-removed: the correction removes only" in said, said
    assert f"--samples {samples}" in said and "nothing was written" in said and not list(tmp_path.glob("piece*"))
