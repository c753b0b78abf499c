"""A user's own 224-px model, patched and served without a training run: EfficientNet-Lite0 with its real ImageNet
weights, real photos, a watermark image with alpha, through `unhans export` and `unhans archive` into a real
TorchServe answering JPEG bodies (the PyTorch model-file route with its twin, and the bare-ONNX route without a twin
and with one)."""

import io
import json

import numpy as np
import pytest
import skimage.data
import torch
from click.testing import CliRunner
from PIL import Image, ImageDraw, ImageFont

from unhans.cli import main
from unhans.core.attribution import LRP
from unhans.core.contract import InputContract
from unhans.core.layers import insert_after
from unhans.core.models import load_model
from unhans.core.models.zoo import IMAGENET_MEAN, IMAGENET_STD, write_efficientnet_lite0
from unhans.export.correction import load_correction
from unhans.export.onnx import read_metadata, torch_to_onnx
from unhans.export.runtime import session
from unhans.handlers.requests import decode_relevance

FIT_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field")
HELD_OUT = "immunohistochemistry"
CONTRACT = ["--size", "224", "--resize", "256", "--mean", ",".join(map(str, IMAGENET_MEAN)), "--std", ",".join(map(str, IMAGENET_STD))]
LAYER = "_blocks.10"  # called as block(x, drop_connect_rate=...)


def _jpeg(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.convert("RGB").save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def _watermark(path) -> None:
    canvas = Image.new("RGBA", (420, 70), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((5, 5), "© STOCK", font=ImageFont.load_default(size=48), fill=(255, 255, 255, 230),
                                stroke_width=3, stroke_fill=(0, 0, 0, 230))
    canvas.save(path)


def _serves_the_graph_with_relevance(server, name: str, clean: bytes, marked: bytes, expected: np.ndarray, reference: np.ndarray) -> dict:
    """Archive ``name`` answers the clean JPEG with the graph's label, scores the watermarked one higher, and explains
    the clean one with ``reference`` (float16 on the wire); returns its prediction of the clean photo."""
    status, answer = server.post(f"/predictions/{name}", clean, "image/jpeg")
    assert status == 200, answer
    assert answer["label"] == int(expected.argmax()) and answer["class"] == f"imagenet-{int(expected.argmax())}"
    status, watermarked = server.post(f"/predictions/{name}", marked, "image/jpeg")
    assert status == 200 and watermarked["artifact_score"] > answer["artifact_score"]
    status, explained = server.post(f"/explanations/{name}", clean, "image/jpeg")
    assert status == 200, explained
    relevance = decode_relevance(explained["relevance"])
    assert relevance.shape == reference.shape == (224, 224)
    assert np.linalg.norm(relevance - reference) <= 1e-2 * np.linalg.norm(reference)
    return answer


@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    """What a user brings (model file, weights, photos, a watermark PNG) and the two archives built from them."""
    root = tmp_path_factory.mktemp("user_model")
    model_file, weights = write_efficientnet_lite0(root / "lite0")
    (root / "photos").mkdir()
    for name in FIT_PHOTOS:
        photo = Image.fromarray(getattr(skimage.data, name)()[..., :3])
        photo.save(root / "photos" / f"{name}.jpg", quality=92)
        photo.transpose(Image.FLIP_LEFT_RIGHT).save(root / "photos" / f"{name}_flip.jpg", quality=92)
    _watermark(root / "watermark.png")
    (root / "classes.txt").write_text("\n".join(f"imagenet-{i}" for i in range(1000)))
    (root / "store").mkdir()
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(main, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result.output

    paste = ["--images", root / "photos", "--artifact-image", root / "watermark.png", "--position", "center",
             "--artifact-option", "size=180"]
    exported = run("export", "--model", model_file, "--weights", weights, "--layer", LAYER, *paste, *CONTRACT, "--out", root / "lite0.onnx")
    run("archive", "--onnx", root / "lite0.onnx", "--model", model_file, "--weights", weights, "--classes", root / "classes.txt",
        *CONTRACT, "--name", "lite0", "--model-store", root / "store")
    # the bare-ONNX route: a graph exported elsewhere, corrected at a module scope, archived with no PyTorch twin
    model = load_model(model_file, weights)
    (root / "plain.onnx").write_bytes(torch_to_onnx(model, np.zeros((2, 3, 224, 224), np.float32)).SerializeToString())
    run("export", "--onnx", root / "plain.onnx", "--layer", LAYER, *paste, *CONTRACT, "--out", root / "bare.onnx")
    archived = run("archive", "--onnx", root / "bare.onnx", "--classes", root / "classes.txt", *CONTRACT, "--name", "bare",
                   "--model-store", root / "store")
    # the same bare graph with a PyTorch twin (the model file and weights, corrected with the graph's own spec)
    run("archive", "--onnx", root / "bare.onnx", "--model", model_file, "--weights", weights, "--classes", root / "classes.txt",
        *CONTRACT, "--name", "baretwin", "--model-store", root / "store")
    return {"root": root, "model": model, "exported": exported, "archived": archived}


def test_export_fits_the_paired_watermark_correction_and_reports_its_quality(user_model):
    root = user_model["root"]
    metadata = read_metadata(root / "lite0.onnx")
    assert metadata["unhans.cav.paired"] == "true" and float(metadata["unhans.cav.heldout_detection_acc"]) >= 0.9
    assert "samples for" in metadata["unhans.cav.warnings"]  # 20 photos for a 21,952-dimensional activation: said
    # without labels, the cost is judged by agreement with the uncorrected model on the photos without the watermark
    assert metadata["unhans.cost.data"].startswith("your photos") and float(metadata["unhans.cost.pt"]) <= 1.0
    assert "held-out detection accuracy" in user_model["exported"] and "conservation error" in user_model["exported"]
    assert "refuses relevance" in user_model["archived"]
    # the correction went after the keyword-called block, in both routes
    for graph in ("lite0", "bare"):
        assert load_correction(root / f"{graph}.correction.npz")[1] == LAYER


@pytest.mark.integration
def test_served_on_jpeg_bodies_with_relevance(user_model, torchserve, tmp_path):
    root, model = user_model["root"], user_model["model"]
    contract = InputContract(3, 224, 224, list(IMAGENET_MEAN), list(IMAGENET_STD), resize=256)
    photo = Image.fromarray(getattr(skimage.data, HELD_OUT)()[..., :3])  # not among the photos the CAV saw
    clean = _jpeg(photo)
    marked = photo.convert("RGBA")
    mark = Image.open(root / "watermark.png")
    mark = mark.resize((int(mark.width * 1.2 * photo.width / 256), int(mark.height * 1.2 * photo.width / 256)))
    marked.alpha_composite(mark, ((photo.width - mark.width) // 2, (photo.height - mark.height) // 2))
    marked = _jpeg(marked)
    x = contract.normalise(contract.pixels(Image.open(io.BytesIO(clean))))[None]
    correction, layer = load_correction(root / "lite0.correction.npz")
    corrected = insert_after(model, layer, correction.module())
    expected = session(str(root / "lite0.onnx"), cuda=False).run(["logits"], {"input": x})[0]
    with LRP(corrected) as lrp:
        explanation = lrp(torch.from_numpy(x))
    bare_correction, bare_layer = load_correction(root / "bare.correction.npz")  # fitted in onnxruntime, not lite0's
    bare_expected = session(str(root / "bare.onnx"), cuda=False).run(["logits"], {"input": x})[0]
    with LRP(insert_after(model, bare_layer, bare_correction.module())) as lrp:
        bare_explanation = lrp(torch.from_numpy(x))
    # three 224-px models (two with a twin to load and check) start in minutes on a shared two-core machine
    with torchserve(root / "store", ["lite0", "bare", "baretwin"], tmp_path, ready_timeout=420) as server:
        answer = _serves_the_graph_with_relevance(server, "lite0", clean, marked, expected, explanation.relevance[0].sum(0))
        # the bare graph: predictions and the artifact score, and a clear refusal of relevance
        status, bare = server.post("/predictions/bare", clean, "image/jpeg")
        assert status == 200 and bare["label"] == answer["label"] and bare["artifact_score"] is not None
        status, refused = server.post("/explanations/bare", clean, "image/jpeg")
        assert status == 422 and refused["error"]["field"] == "explain", refused
        assert json.loads(json.dumps(refused))["error"]["problem"].startswith("this archive serves no relevance")
        # the bare graph with its twin: the graph's predictions, the twin's relevance
        _serves_the_graph_with_relevance(server, "baretwin", clean, marked, bare_expected, bare_explanation.relevance[0].sum(0))
