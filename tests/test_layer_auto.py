"""`unhans export --layer auto` on a real model and real photos, and the cost check that judges it: EfficientNet-Lite0
with its ImageNet weights, the 20 ImageNet validation JPEGs in foolbox's wheel named by their class index (labelled
through --classes, as ImageNet-style folders are), and ImageNet-W's real watermark as an RGBA PNG at its place."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from unhans.cli import main
from unhans.core.cost import HeldOut, allowed_changes
from unhans.core.errors import InputError
from unhans.core.models.zoo import IMAGENET_MEAN, IMAGENET_STD, write_efficientnet_lite0
from unhans.export.cli import _photo_files
from unhans.export.onnx import read_metadata

CONTRACT = ["--size", "224", "--resize", "256", "--mean", ",".join(map(str, IMAGENET_MEAN)), "--std", ",".join(map(str, IMAGENET_STD))]


def _watermark(path: Path) -> str:
    """ImageNet-W's overlay (捷径捷径捷径, white at 50%) as an RGBA PNG cut to its box; returns its ROW,COL on a 224-px view."""
    from imagenet_w import AddWatermark
    from PIL import Image, ImageDraw

    mark = AddWatermark(224)
    canvas = Image.new("RGBA", (224, 224), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((mark.x_pos * 224, mark.y_pos * 224), mark.text, fill=(*mark.color, round(mark.opacity * 255)), font=mark.font)
    left, top, right, bottom = canvas.getbbox()
    canvas.crop((left, top, right, bottom)).save(path)
    return f"{top},{left}"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("layer_auto")
    spec = importlib.util.find_spec("foolbox")
    (root / "photos").mkdir()
    for file in sorted(Path(spec.submodule_search_locations[0], "data").glob("imagenet_*.jpg")):
        _, number, label = file.stem.split("_")
        (root / "photos" / f"{label}_foolbox_{number}.jpg").symlink_to(file)  # named by class index, as ImageNet-style folders
    (root / "classes.txt").write_text("\n".join(f"imagenet-{i}" for i in range(1000)))
    model_file, weights = write_efficientnet_lite0(root / "lite0")
    position = _watermark(root / "watermark.png")
    result = CliRunner().invoke(main, ["export", "--model", str(model_file), "--weights", str(weights),
                                       "--images", str(root / "photos"), "--classes", str(root / "classes.txt"),
                                       "--artifact-image", str(root / "watermark.png"), "--position", position, *CONTRACT,
                                       "--out", str(root / "lite0.onnx")])
    assert result.exit_code == 0, result.output
    return root, result.output


def test_layer_auto_chooses_a_block_on_held_out_pairs_and_records_it(exported):
    """No --layer with --images: the block is chosen on held-out pairs, the table printed and recorded."""
    root, output = exported
    metadata = read_metadata(root / "lite0.onnx")
    trials = json.loads(metadata["unhans.layer.trials"])
    layers = [t["layer"] for t in trials]
    assert metadata["unhans.layer.chosen_by"] == "auto" and metadata["unhans.layer.split"] == "10 photos fitted, 10 judged"
    assert 3 <= len(trials) <= 5 and all(layer.startswith("_blocks.") for layer in layers)
    chosen = metadata["unhans.correction.layer"]
    assert chosen in layers and f"chose {chosen}" in output
    # the chosen block removes the most of the watermark's effect among those within the cost bound
    removed = {t["layer"]: float(t["removed"].rstrip("%")) for t in trials}
    within = [t["layer"] for t in trials if "over the bound" not in t["held-out cost"]]
    assert removed[chosen] == max(removed[layer] for layer in (within or layers))
    # the watermark changes some held-out photos' top-1 class, and the chosen correction changes fewer
    before, after = (float(v.rstrip("%")) for v in next(t for t in trials if t["layer"] == chosen)["top-1 changed by the artifact"].split(" -> "))
    assert before > 0 and after < before
    shown = CliRunner().invoke(main, ["inspect", str(root / "lite0.onnx")])
    assert shown.exit_code == 0 and f"--layer auto chose {chosen}" in shown.output


def test_labelled_photos_judge_the_cost_on_accuracy(exported):
    root, output = exported
    metadata = read_metadata(root / "lite0.onnx")
    assert metadata["unhans.cost.metric"] == "clean accuracy" and metadata["unhans.cost.samples"] == "20"
    assert metadata["unhans.cost.data"].startswith("your labelled photos") and "cost.allowed_changes" not in str(metadata)
    assert float(metadata["unhans.cost.before"]) >= 0.75  # Lite0 gets 16 of the 20 right: the labels were read
    assert float(metadata["unhans.cost.pt"]) <= 1.0
    # the blocks were judged on the held-out half's accuracy too
    assert all(t["held-out cost"].split(",")[0].endswith("pt accuracy") for t in json.loads(metadata["unhans.layer.trials"]))


def test_agreement_cost_is_refused_only_beyond_the_bounds_noise():
    """Unlabelled, 7 of 500 changed answers are within what a bound of 1 point can tell; 10 are not."""
    assert allowed_changes(500, 1.0) == 9 and allowed_changes(20, 1.0) == 1 and allowed_changes(500, 0.0) == 0
    first = np.eye(5)[np.arange(500) % 5]

    def cost(changed: int):
        after = first.copy()
        after[:changed] = np.roll(after[:changed], 1, axis=1)
        return HeldOut(np.zeros((500, 1, 1, 1)), None, "photos").cost(first, after)

    cost(7).check()
    assert cost(7).overall.pt == 1.4 and "up to 9 of 500 changes" in cost(7).noise()
    with pytest.raises(InputError, match=r"10 of 500 images change their top-1 class, bound 1 pt: up to 9 of 500 .*--reactive"):
        cost(10).check()
    labelled = HeldOut(np.zeros((500, 1, 1, 1)), np.arange(500) % 5, "photos").cost(first, first)
    assert labelled.labelled and labelled.allowed_changes is None


def test_photo_labels_come_from_class_folders_or_index_names(tmp_path):
    from PIL import Image

    names = ["cat", "dog", "carton"]
    for relative in ("folders/dog/a.png", "folders/2/b.png", "flat/2_x.png", "flat/0-y.png", "bad/photo.png"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / relative)
    files, labels = _photo_files(str(tmp_path / "folders"), names)
    assert [f.name for f in files] == ["b.png", "a.png"] and labels.tolist() == [2, 1]
    files, labels = _photo_files(str(tmp_path / "flat"), names)
    assert [f.name for f in files] == ["0-y.png", "2_x.png"] and labels.tolist() == [0, 2]
    assert _photo_files(str(tmp_path / "flat"), None)[1] is None  # no --classes: unlabelled
    with pytest.raises(InputError, match="begin with none"):
        _photo_files(str(tmp_path / "bad"), names)


def _small_cnn():
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers, channels = [], 3
    for width in (8, 8, 16, 16, 16, 32, 32):
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
        channels = width
    return nn.Sequential(nn.Sequential(*layers), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)).eval()


def test_a_bare_onnx_graph_is_searched_as_its_pytorch_model(tmp_path):
    """The same search over a graph's module scopes (onnxruntime's activations, the graph cut at each candidate's
    tensor) gives a shared block the figures the PyTorch hooks give, and the CLI records its choice for a bare graph."""
    from PIL import Image

    from unhans.export.layer_choice import OnnxLayers, TorchLayers, choose_layer
    from unhans.export.onnx import torch_to_onnx

    model = _small_cnn()
    rng = np.random.default_rng(0)
    clean = rng.random((16, 3, 16, 16), dtype=np.float32)
    marked = clean.copy()
    marked[:, :, :4, :4] = 1.0
    graph = torch_to_onnx(model, clean)
    hooks, scopes = (choose_layer(layers, marked, clean, None, None, 1.0, 10.0) for layers in (TorchLayers(model), OnnxLayers(graph)))
    shared = {t.layer for t in hooks.trials} & {t.layer for t in scopes.trials}
    assert len(shared) >= 3
    for layer in shared:
        ours, theirs = (next(t for t in choice.trials if t.layer == layer) for choice in (hooks, scopes))
        assert ours.row() == theirs.row()
    (tmp_path / "photos").mkdir()
    for i, image in enumerate(clean):
        Image.fromarray((image.transpose(1, 2, 0) * 255).astype(np.uint8)).save(tmp_path / "photos" / f"{i:02d}.png")
    Image.new("RGBA", (4, 4), (255, 255, 255, 255)).save(tmp_path / "square.png")
    (tmp_path / "plain.onnx").write_bytes(graph.SerializeToString())
    result = CliRunner().invoke(main, ["export", "--onnx", str(tmp_path / "plain.onnx"), "--images", str(tmp_path / "photos"),
                                       "--artifact-image", str(tmp_path / "square.png"), "--position", "0,0", "--size", "16",
                                       "--min-removed", "0", "--out", str(tmp_path / "bare.onnx")])
    assert result.exit_code == 0, result.output
    metadata = read_metadata(tmp_path / "bare.onnx")
    assert metadata["unhans.layer.chosen_by"] == "auto"
    assert metadata["unhans.correction.layer"] in [t["layer"] for t in json.loads(metadata["unhans.layer.trials"])]
