"""handlers/: request parsing and encoding (unit), and the handler inside a real TorchServe (integration)."""

import base64
import io
import json
import re
import struct
import time
import zlib
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
from PIL import Image

from unhans.core.attribution import LRP
from unhans.export.archive import build_archive
from unhans.core.contract import InputContract
from unhans.handlers.requests import RequestError, decode_relevance, encode_relevance, parse

PRE = InputContract(channels=1, height=28, width=28, max_payload_bytes=100_000)


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, np.float32))
    return buffer.getvalue()


def _metric_total(server, name: str) -> float:
    """The sum over labels of a metric TorchServe exposes (0 before its first sample)."""
    exposed = urllib.request.urlopen(server.metrics_url, timeout=30).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in exposed.splitlines() if line.startswith(name + "{") or line.startswith(name + " "))


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_parse_accepts_every_documented_form():
    image = np.random.default_rng(0).random((1, 28, 28), dtype=np.float32)
    many = parse({"body": {"instances": [image.tolist(), image[0].tolist()], "explain": True, "target": [3, "predicted"],
                           "format": "png", "downsample": 2}}, PRE)
    assert many.many and many.inputs.shape == (2, 1, 28, 28) and many.explain and many.targets == [3, None]
    assert many.format == "png" and many.downsample == 2
    single = parse({"data": _npy(image)}, PRE, explain_header=True)
    assert not single.many and single.explain and np.array_equal(single.inputs[0], image)
    pixels = (image[0] * 255).astype(np.uint8)
    picture = parse({"body": bytearray(_png(pixels))}, PRE)
    assert np.allclose(picture.inputs[0, 0], pixels / 255.0)
    rgb = parse({"body": _png(np.dstack([pixels] * 3))}, PRE)  # colour images become grey for a grey model
    assert rgb.inputs.shape == (1, 1, 28, 28)
    assert parse({"body": json.dumps(image.tolist()).encode()}, PRE).inputs.shape == (1, 1, 28, 28)


@pytest.mark.parametrize("row, field, status", [
    ({"body": b"\x89PNG broken"}, "body", 400),
    ({"body": b"\x93NUMPY garbage"}, "body", 400),
    ({"body": np.zeros((3, 28, 28)).tolist()}, "body", 422),
    ({"body": np.zeros((1, 14, 14)).tolist()}, "body", 422),
    ({"body": np.full((1, 28, 28), np.nan).tolist()}, "body", 422),
    ({"body": np.full((1, 28, 28), 7.0).tolist()}, "body", 422),
    ({"body": b"x" * 100_001}, "body", 413),
    ({"body": {"instances": [np.zeros((1, 28, 28)).tolist()], "colour": "red"}}, "colour", 400),
    ({"body": {"instances": [np.zeros((1, 28, 28)).tolist()], "format": "jpeg"}}, "format", 400),
    ({"body": {"instances": [np.zeros((1, 28, 28)).tolist()] * 2, "target": [1]}}, "target", 400),
    ({"body": {"instances": [np.zeros((1, 28, 28)).tolist(), "a"]}}, "instances[1]", 400),
    ({"body": {"instances": []}}, "instances", 400),
    ({"body": None}, "body", 400),
])
def test_parse_names_the_field_and_the_problem(row, field, status):
    with pytest.raises(RequestError) as error:
        parse(row, PRE)
    assert error.value.field == field and error.value.status == status
    assert error.value.body()["error"]["field"] == field and error.value.problem
    assert re.fullmatch(r"[a-z_]+", error.value.reason)  # a bounded metric label, never the client's text


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height``: a decompression bomb unless the size is read first."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _npy_claiming(shape, descr: str = "<f4") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + b"\0" * 64


ZEROS = np.zeros((1, 28, 28)).tolist()


@pytest.mark.parametrize("body, field, status", [
    (_png_claiming(20000, 20000), "body", 413),  # PIL's DecompressionBombError
    (_png_claiming(6100, 6000), "body", 413),  # under PIL's bound, over the contract's max_image_pixels
    (json.dumps({"instances": [[[10**400] + [0] * 27] * 28]}).encode(), "instances[0]", 400),  # OverflowError
    (b"[" * 5000, "body", 400),  # RecursionError
    (b"[" * 100 + b"0" + b"]" * 100, "body", 400),  # parses, too deep to be an image
    (_npy_claiming((10**12,)), "body", 413),  # MemoryError
    (_npy_claiming((3,), "|O"), "body", 422),  # a pickle
    (_npy_claiming((1, 28, 28)), "body", 400),  # data cut short
    (json.dumps({"instances": [ZEROS], "downsample": 10**6}).encode(), "downsample", 422),
    (json.dumps({"instances": [ZEROS], "downsample": 10**30}).encode(), "downsample", 422),
    (json.dumps({"instances": [ZEROS], "downsample": 1.5}).encode(), "downsample", 400),
    (json.dumps([[0.0] * 28, [0.0] * 3]).encode(), "body", 400),  # ragged
    (json.dumps([[[[0.0]]], [[0.0]]]).encode(), "body", 400),  # ragged, 4-d at first sight
    (json.dumps({"instances": [0] * 257}).encode(), "instances", 413),
    (json.dumps({"instances": [ZEROS], "target": 10}).encode(), "target", 422),
    (json.dumps({"instances": [{"b64": "not base64!"}]}).encode(), "instances[0]", 400),
    (b"\xff\xfe{", "body", 400),
])
def test_hostile_bodies_are_refused_before_the_work(body, field, status):
    with pytest.raises(RequestError) as error:
        parse({"body": body}, PRE, classes=10)
    assert (error.value.field, error.value.status) == (field, status), error.value


def _v2(array: np.ndarray, **fields) -> dict:
    return {"inputs": [{"name": "x", "shape": list(array.shape), "datatype": "FP32", "data": array.ravel().tolist()}], **fields}


def test_kserve_v2_requests_json_and_binary():
    images = np.random.default_rng(1).random((2, 1, 28, 28), dtype=np.float32)
    request = parse({"body": _v2(images, id="r", parameters={"explain": True, "target": 3}, outputs=[{"name": "label"}])}, PRE, classes=10)
    assert request.protocol == "v2" and request.id == "r" and request.explain and request.targets == [3, 3]
    assert request.outputs == ["label"] and request.format == "list" and np.array_equal(request.inputs, images)
    head = json.dumps({"inputs": [{"name": "x", "shape": [2, 28, 28, 1], "datatype": "UINT8",
                                   "parameters": {"binary_data_size": 2 * 784}}]}).encode()
    pixels = (images * 255).astype(np.uint8)
    binary = parse({"body": head + pixels.transpose(0, 2, 3, 1).tobytes()}, PRE, binary_header_length=str(len(head)))
    assert np.allclose(binary.inputs, pixels / 255.0)
    png = base64.b64encode(_png(pixels[0, 0])).decode()
    encoded = parse({"body": {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [png]}]}}, PRE)
    assert np.allclose(encoded.inputs[0], pixels[0] / 255.0)
    for element in (_png(pixels[0, 0]), png.encode()):  # BYTES through the binary extension: raw bytes, or base64 of them
        tensor = struct.pack("<I", len(element)) + element
        head = json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(tensor)}}],
                           "outputs": [{"name": "label", "parameters": {"binary_data": True}}, {"name": "probabilities"}]}).encode()
        request = parse({"body": head + tensor}, PRE, binary_header_length=str(len(head)))
        assert np.allclose(request.inputs[0], pixels[0] / 255.0) and request.binary_outputs == ("label",)
    assert parse({"body": _v2(images, parameters={"binary_data_output": True})}, PRE).binary_outputs == ("probabilities", "label", "artifact_score", "relevance")
    for body, header, field in [(_v2(images[:, :, :14]), None, "inputs[0][0]"),
                                ({"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0]}]}, None, "inputs[0]"),
                                ({"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": []}]}, None, "inputs[0]"),
                                ({"inputs": [{"name": "x", "shape": [1], "datatype": "COMPLEX", "data": [0]}]}, None, "inputs[0]"),
                                (_v2(images, outputs=[{"name": "secrets"}]), None, "outputs"),
                                (head + b"short", str(len(head)), "inputs[0]"),
                                (head, "999999", "Inference-Header-Content-Length"),
                                ({"inputs": [{"name": "x", "shape": [1] * 65, "datatype": "FP32", "data": [0.5]}]}, None, "inputs[0]"),
                                ({"inputs": [{"name": "x", "shape": [0, 1, 28, 28], "datatype": "FP32", "data": []}]}, None, "inputs[0]"),
                                (_v2(images, parameters={"binary_data_output": "yes"}), None, "parameters.binary_data_output"),
                                (_v2(images, outputs=[{"name": "label", "parameters": {"binary_data": 1}}]), None, "outputs[0].parameters.binary_data")]:
        with pytest.raises(RequestError) as error:
            parse({"body": body}, PRE, binary_header_length=header)
        assert error.value.field == field and 400 <= error.value.status < 500, error.value


def _valid_or_refused(row: dict, header: str | None = None) -> None:
    """The property every request must have: a well-formed model input, or a 4xx naming a field (nothing else)."""
    try:
        request = parse(row, PRE, classes=10, binary_header_length=header)
    except RequestError as error:
        assert 400 <= error.status < 500 and error.field is not None and json.dumps(error.body())
        return
    assert request.inputs.dtype == np.float32 and request.inputs.shape[1:] == (1, 28, 28)
    assert 1 <= len(request.inputs) <= PRE.max_instances and np.isfinite(request.inputs).all()
    assert request.inputs.min() >= 0 and request.inputs.max() <= 1 and 1 <= request.downsample <= 28


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=40)
OPTION_VALUES = st.fixed_dictionaries({}, optional={name: JSON_VALUES for name in ("explain", "target", "format", "downsample", "topk")})


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=2048) | st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\x93NUMPY", b"{", b"["]).flatmap(
    lambda prefix: st.binary(max_size=512).map(lambda rest: prefix + rest)))
def test_any_bytes_are_parsed_or_refused(body):
    _valid_or_refused({"body": body})
    _valid_or_refused({"body": body}, header=str(len(body) // 2))


@settings(max_examples=300, deadline=None)
@given(value=JSON_VALUES, options=OPTION_VALUES, instance=st.sampled_from([ZEROS, np.full((28, 28), 0.5).tolist(), "x", [], None]))
def test_any_json_is_parsed_or_refused(value, options, instance):
    _valid_or_refused({"body": value})
    _valid_or_refused({"body": json.dumps({"instances": [instance], **options}).encode()})
    _valid_or_refused({"body": {"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                            "data": instance if isinstance(instance, list) else value}], "parameters": options}})


def test_sampler_stays_within_its_cpu_budget(tmp_path):
    """Relevance costing more than the sampler's CPU budget makes it fall behind and drop (counted), not take more."""
    from unhans.handlers.relevance import Sampler
    from unhans.handlers.sink import ShardWriter

    class CostlyRelevance:  # the explainer's interface the sampler uses; 20 ms of CPU per batch, like a slow model's LRP
        def with_latent(self, images, targets):
            end = time.thread_time() + 0.02
            while time.thread_time() < end:
                pass
            return None, np.ones((len(images), 1, 28, 28), np.float32), None, None

    sampler = Sampler(ShardWriter(str(tmp_path), "m", "1", "w"), CostlyRelevance(), 1.0, "m", "1", queue_size=64, batch=4, cpu_budget=0.1)
    assert len(sampler.pick(8)) == 8
    sampler.fraction = 0.1
    assert 850 <= len(sampler.pick(10_000)) <= 1150  # binomial(10000, 0.1): sd 30
    images = np.random.default_rng(0).random((8, 1, 28, 28), dtype=np.float32)
    started = time.monotonic()
    while time.monotonic() - started < 2.0:
        sampler.offer(images, np.zeros(8, int), np.full((8, 10), 0.1), None, ["r"] * 8)
        time.sleep(0.01)
    counts = sampler.take_counts()
    # a 10% budget allows about 2 s x 0.1 / 20 ms = 10 batches of 4; uncapped it would take ~100 batches
    assert 8 <= counts["sampled"] <= 80 and counts["dropped"] > 500, counts


def test_relevance_encodings():
    relevance = np.random.default_rng(1).normal(size=(1, 28, 28)).astype(np.float32)
    packed = encode_relevance(relevance, "float16-base64", 1)
    decoded = decode_relevance(packed)
    assert np.allclose(decoded, relevance[0], atol=2e-3 * np.abs(relevance).max())
    tiny = decode_relevance(encode_relevance(relevance * 1e-9, "float16-base64", 1))  # below float16's smallest number
    assert np.allclose(tiny, relevance[0] * 1e-9, atol=2e-3 * 1e-9 * np.abs(relevance).max())
    pooled = np.asarray(encode_relevance(relevance, "list", 4))
    assert pooled.shape == (7, 7) and np.isclose(pooled.sum(), relevance.sum(), atol=1e-4)
    picture = Image.open(io.BytesIO(base64.b64decode(encode_relevance(relevance, "png", 1)["png"])))
    assert picture.size == (28, 28)
    assert encode_relevance(relevance, "none", 1) is None


@pytest.mark.integration
def test_handler_in_torchserve(served_archive, backdoored_vgg, torchserve, tmp_path):
    root, corrected = served_archive
    attack, test = backdoored_vgg["attack"], backdoored_vgg["test"]
    images = np.concatenate([attack.images[:3], test.images[:3]])
    expected = LRP(corrected).explain(images)
    with torchserve(root / "store", "vgg", tmp_path) as server:
        pids = {w["pid"] for w in server.workers()}
        body = json.dumps({"instances": images.tolist(), "explain": True, "format": "float16-base64"}).encode()
        status, answer = server.post("/predictions/vgg", body, "application/json")
        assert status == 200, answer
        for k, prediction in enumerate(answer["predictions"]):
            assert prediction["label"] == expected.targets[k] and prediction["target"] == expected.targets[k]
            packed = prediction["relevance"]
            relevance = decode_relevance(packed)
            # the relevance of the corrected model that predicted, as zennit computes it (float16 on the wire)
            assert np.abs(relevance - expected.relevance[k, 0]).max() <= 2e-3 * max(1.0, np.abs(expected.relevance[k]).max())
        # TorchServe's explanations endpoint reaches the same handler; a target per instance is honoured
        status, explained = server.post("/explanations/vgg", _npy(images[0]), "application/octet-stream")
        assert status == 200 and "relevance" in explained
        status, targeted = server.post("/predictions/vgg", json.dumps({"instances": images[:2].tolist(), "explain": True,
                                                                        "target": [5, 7], "format": "list"}).encode(), "application/json")
        assert status == 200 and [p["target"] for p in targeted["predictions"]] == [5, 7]
        assert np.allclose(targeted["predictions"][1]["relevance"], LRP(corrected).explain(images[1:2], target=7).relevance[0, 0], atol=1e-5)
        status, plain = server.post("/predictions/vgg", _npy(images[0]), "application/octet-stream")
        assert status == 200 and "relevance" not in plain and plain["artifact_score"] is not None

        # one batch, good and bad requests together: the bad ones get their own 4xx, the rest are served
        bad = {"nan": (json.dumps(np.full((1, 28, 28), np.nan).tolist()).encode(), "application/json", 422),
               "garbage": (b"\x89PNG not really", "application/octet-stream", 400),
               "option": (json.dumps({"instances": [images[0].tolist()], "colour": 1}).encode(), "application/json", 400)}
        jobs = [(_npy(images[k]), "application/octet-stream", 200) for k in range(5)] + list(bad.values())
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda job: server.post("/predictions/vgg", job[0], job[1]), jobs))
        for (body, _, want), (status, reply) in zip(jobs, answers):
            assert status == want, reply
            if want != 200:
                assert reply["error"]["field"] and reply["error"]["problem"]
        assert {w["pid"] for w in server.workers()} == pids  # no worker died or restarted

        # one batch mixing /explanations and /predictions: relevance for exactly the explanation requests, from one
        # explainer call for the whole batch (the 300 ms batch delay gathers the concurrent requests)
        batches_before = _metric_total(server, "unhans_relevance_seconds_count")
        jobs = [("explanations" if k % 2 else "predictions", k) for k in range(6)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda job: server.post(f"/{job[0]}/vgg", _npy(images[job[1]]), "application/octet-stream"), jobs))
        for (endpoint, k), (status, reply) in zip(jobs, answers):
            assert status == 200, reply
            assert ("relevance" in reply) == (endpoint == "explanations")
            if endpoint == "explanations":
                relevance = decode_relevance(reply["relevance"])
                assert np.abs(relevance - expected.relevance[k, 0]).max() <= 2e-3 * max(1.0, np.abs(expected.relevance[k]).max())
        assert 1 <= _metric_total(server, "unhans_relevance_seconds_count") - batches_before < 3

        exposed = urllib.request.urlopen(server.metrics_url, timeout=30).read().decode()
        for name in ("unhans_relevance_requests_total", "unhans_artifact_score_bucket", "unhans_relevance_seconds_bucket"):
            assert name in exposed, (name, exposed[-2000:])
        rejected = {line.split('reason="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
                    for line in exposed.splitlines() if line.startswith("unhans_rejected_requests_total{")}
        assert rejected == {"body": 2.0, "unknown_option": 1.0}

        # sizes, set together (unhans.core.contract.torchserve_limits): a body above TorchServe's default limit (6.5 MB)
        # reaches the handler and is answered; one above the handler's limit gets the handler's JSON 413, since
        # TorchServe's own limit sits above it; an answer too large is refused before the work; no worker dies
        padded = json.dumps({"instances": images[:1].tolist()}).encode() + b" " * 8_000_000
        status, reply = server.post("/predictions/vgg", padded, "application/octet-stream")
        assert status == 200 and "label" in reply["predictions"][0], reply
        status, reply = server.post("/predictions/vgg", b"\0" * (33 * 2**20), "application/octet-stream")
        assert status == 413 and "more than the limit" in reply["error"]["problem"], reply
        many = json.dumps({"instances": [images[0].tolist()] * 300, "explain": True, "format": "list"}).encode()
        status, reply = server.post("/predictions/vgg", many, "application/octet-stream")
        assert status == 413 and reply["error"]["field"] == "instances", reply
        assert {w["pid"] for w in server.workers()} == pids


@pytest.mark.integration
def test_explain_graph_answers_explanations_alone(served_explain_archive, backdoored_vgg, torchserve, tmp_path):
    """An archive whose explain graph also scores the artifact answers explanation requests from that graph alone (no
    prediction graph run): label, score and relevance agree with the prediction graph's answers and with zennit."""
    root, corrected = served_explain_archive
    images = np.concatenate([backdoored_vgg["attack"].images[:3], backdoored_vgg["test"].images[:3]])
    expected = LRP(corrected).explain(images)
    with torchserve(root / "store", "vgg", tmp_path) as server:
        jobs = [(endpoint, k) for k in range(len(images)) for endpoint in ("explanations", "predictions")]
        with ThreadPoolExecutor(len(jobs)) as pool:  # batches of both endpoints together
            replies = dict(zip(jobs, pool.map(lambda job: server.post(f"/{job[0]}/vgg", _npy(images[job[1]]), "application/octet-stream"), jobs)))
        for k in range(len(images)):
            (status, explained), (plain_status, plain) = replies[("explanations", k)], replies[("predictions", k)]
            assert status == plain_status == 200, (explained, plain)
            assert explained["label"] == plain["label"] == explained["target"] == expected.targets[k]
            assert abs(explained["artifact_score"] - plain["artifact_score"]) <= 1e-4 * max(1.0, abs(plain["artifact_score"]))
            relevance = decode_relevance(explained["relevance"])
            assert np.abs(relevance - expected.relevance[k, 0]).max() <= 2e-3 * max(1.0, np.abs(expected.relevance[k]).max())
        body = {"instances": images[:2].tolist(), "explain": True, "target": [5, 7], "format": "list"}
        status, targeted = server.post("/predictions/vgg", json.dumps(body).encode(), "application/json")
        assert status == 200 and [p["target"] for p in targeted["predictions"]] == [5, 7]
        assert np.allclose(targeted["predictions"][1]["relevance"], LRP(corrected).explain(images[1:2], target=7).relevance[0, 0], atol=1e-5)
        for target in (10, -1):  # a class the model lacks; a negative index, which the graph would read as 'predicted'
            body = {"instances": images[:1].tolist(), "explain": True, "target": target}
            status, refused = server.post("/predictions/vgg", json.dumps(body).encode(), "application/json")
            assert status == 422 and refused["error"]["field"] == "target", refused


@pytest.mark.integration
def test_kserve_protocols_under_batching(served_archive, backdoored_vgg, torchserve, tmp_path):
    """KServe v1 (``:predict``, ``:explain``) and v2 (``/infer``, JSON and binary tensors) spoken by the handler itself,
    no service_envelope: concurrent calls share TorchServe batches of 8 and each gets its own, right answer."""
    root, corrected = served_archive
    images = backdoored_vgg["test"].images[:6]
    labels = corrected(torch.from_numpy(images)).argmax(1).tolist()
    probabilities = torch.softmax(corrected(torch.from_numpy(images)), 1).detach().numpy()
    head = json.dumps({"inputs": [{"name": "x", "shape": [2, 1, 28, 28], "datatype": "FP32",
                                   "parameters": {"binary_data_size": images[4:].nbytes}}]}).encode()
    calls = {  # name: (path, body, content type, extra headers)
        "v1": ("/v1/models/vgg:predict", json.dumps({"instances": images[:2].tolist()}).encode(), "application/json", {}),
        "v1_explain": ("/v1/models/vgg:explain", json.dumps({"instances": images[2:3].tolist()}).encode(), "application/json", {}),
        "v2": ("/v2/models/vgg/infer", json.dumps(_v2(images[:3], id="json")).encode(), "application/json", {}),
        "v2_explain": ("/v2/models/vgg/explain", json.dumps(_v2(images[3:4], id="why")).encode(), "application/json", {}),
        "v2_binary": ("/v2/models/vgg/infer", head + images[4:].tobytes(), "application/octet-stream",
                      {"Inference-Header-Content-Length": str(len(head))}),
        "v1_bad": ("/v1/models/vgg:predict", json.dumps({"instances": [np.full((1, 28, 28), 2.0).tolist()]}).encode(), "application/json", {}),
    }
    jobs = list(calls) * 8
    with torchserve(root / "store", "vgg", tmp_path) as server:
        with ThreadPoolExecutor(len(jobs)) as pool:
            replies = list(pool.map(lambda name: (name, server.post(*calls[name][:3], headers=calls[name][3])), jobs))
    for name, (status, answer) in replies:
        if name == "v1_bad":
            assert status == 422 and answer["error"]["field"] == "instances[0]", answer
        elif name.startswith("v1"):
            assert status == 200, (name, answer)
            rows = slice(0, 2) if name == "v1" else slice(2, 3)
            assert [p["label"] for p in answer["predictions"]] == labels[rows]
            assert ("relevance" in answer["predictions"][0]) == (name == "v1_explain")
        else:
            assert status == 200, (name, answer)
            rows = {"v2": slice(0, 3), "v2_explain": slice(3, 4), "v2_binary": slice(4, 6)}[name]
            outputs = {o["name"]: o for o in answer["outputs"]}
            assert answer["model_name"] == "vgg" and (name == "v2_binary" or answer["id"] == {"v2": "json", "v2_explain": "why"}[name])
            assert outputs["label"]["data"] == labels[rows] and outputs["label"]["datatype"] == "INT64"
            assert np.allclose(np.reshape(outputs["probabilities"]["data"], outputs["probabilities"]["shape"]), probabilities[rows], atol=1e-4)
            assert ("relevance" in outputs) == (name == "v2_explain")
            if name == "v2_explain":
                assert outputs["relevance"]["shape"] == [1, 28, 28]


@pytest.mark.integration
def test_worker_refuses_to_start_when_runtimes_disagree(served_archive, torchserve, tmp_path):
    """An archive whose PyTorch twin no longer matches its graph must not serve: the worker logs why and stays down."""
    import zipfile

    root, _ = served_archive
    store = tmp_path / "store"
    store.mkdir()
    with zipfile.ZipFile(root / "store" / "vgg.mar") as source, zipfile.ZipFile(store / "vgg.mar", "w") as tampered:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "weights.pt":
                state = torch.load(io.BytesIO(data), weights_only=True)
                state["classifier.fc2.bias"] += 1.0
                buffer = io.BytesIO()
                torch.save(state, buffer)
                data = buffer.getvalue()
            tampered.writestr(item, data)
    (tmp_path / "work").mkdir()
    with pytest.raises(RuntimeError, match="refusing to start"):
        with torchserve(store, "vgg", tmp_path / "work", ready_timeout=60):
            pass


@pytest.mark.integration
def test_sampled_requests_reach_the_sink(backdoored_vgg, served_archive, torchserve, tmp_path):
    """With sampling on, every served instance (fraction 1) is recorded with its relevance, even unasked."""
    from unhans.handlers.sink import ShardReader

    root, corrected = served_archive
    store, sink = tmp_path / "store", tmp_path / "sink"
    store.mkdir()
    build_archive(root / "vgg.onnx", backdoored_vgg["run"], "vgg", store, sample_fraction=1.0, sink=str(sink))
    images = backdoored_vgg["attack"].images[:4]
    with torchserve(store, "vgg", tmp_path) as server:
        for image in images:
            assert server.post("/predictions/vgg", _npy(image), "application/octet-stream")[0] == 200
        status, _ = server.post("/predictions/vgg", json.dumps({"instances": images[:2].tolist()}).encode(), "application/json")
        assert status == 200
        # the sampler works off the request path: wait until it has flushed all six
        deadline, records = time.monotonic() + 30, []
        while len(records) < 6 and time.monotonic() < deadline:
            time.sleep(0.2)
            records = [record for _, record in ShardReader(str(sink), "vgg", include_open=True).read()]
    assert len(records) == 6
    from unhans.core.layers import middle_spatial_layer

    layer = middle_spatial_layer(corrected, torch.from_numpy(images[:2]))  # the archive's monitor layer
    explained = LRP(corrected, layers=(layer,)).explain(images)
    expected = explained.relevance.sum(axis=1)
    assert np.allclose(records[0].relevance, expected[0], atol=2e-3 * max(1.0, np.abs(expected[0]).max()))
    assert records[0].thumbnail.shape[:2] == (28, 28) and records[0].score is not None and records[0].version == "1.0"
    latent = explained.layer_relevance[layer][0].sum(axis=(1, 2))  # the relevance per channel at the monitor layer
    assert np.allclose(records[0].latent, latent, atol=2e-3 * np.abs(latent).max())
    assert len({record.request_id for record in records}) == 5  # each HTTP request keeps its own id


def test_answers_larger_than_the_limit_are_refused_before_the_work():
    from unhans.handlers.requests import answer_bytes

    images = np.zeros((40, 1, 28, 28), np.float32).tolist()
    small = InputContract(channels=1, height=28, width=28, max_response_bytes=200_000, max_instances=50)
    listed = {"data": json.dumps({"instances": images, "explain": True, "format": "list"}).encode()}
    with pytest.raises(RequestError, match="answer of about .* MiB, more than the limit") as refused:
        parse(listed, small)
    assert refused.value.status == 413
    # the same instances fit as float16-base64, or pooled: the estimate follows the format and the downsampling
    assert parse({"data": json.dumps({"instances": images, "explain": True}).encode()}, small).format == "float16-base64"
    pooled = parse({"data": json.dumps({"instances": images, "explain": True, "format": "list", "downsample": 4}).encode()}, small)
    assert answer_bytes(pooled, small) < 200_000
    with pytest.raises(RequestError, match="51 instances, more than the limit of 50") as many:
        parse({"data": json.dumps({"instances": images + images[:11]}).encode()}, small)
    assert many.value.status == 413
    with pytest.raises(RequestError, match="larger than 28"):
        parse({"data": json.dumps({"instances": images[:1], "explain": True, "downsample": 10**6}).encode()}, small)


@pytest.mark.integration
def test_a_server_that_dies_at_start_is_reported_at_once_with_its_reason(served_archive, torchserve, tmp_path):
    """Another server holds a port the config names: TorchServe exits, and we say so with its own line, not after the
    ready timeout with an empty log."""
    import socket

    root, _ = served_archive
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="exited during start-up: .*(Address already in use|BindException)"):
            with torchserve(root / "store", "vgg", tmp_path, extra_config=f"grpc_inference_port={busy.getsockname()[1]}", ready_timeout=120):
                pass
    assert time.monotonic() - started < 60


@pytest.mark.integration
def test_http_fuzz_against_a_real_torchserve(served_archive, backdoored_vgg, torchserve, tmp_path):
    """Every kind of hostile request (unhans.hostile), both endpoints and both KServe protocols, concurrently with valid
    ones: each hostile one gets a JSON 4xx, each valid one its 200, and the worker never dies."""
    from unhans.hostile import KINDS, MAY_SUCCEED, TORCHSERVE_FRONTEND, hostile_requests, path

    root, corrected = served_archive
    images = backdoored_vgg["test"].images[:1]
    labels = corrected(torch.from_numpy(images)).argmax(1).tolist()
    hostile = list(hostile_requests(InputContract(1, 28, 28), 3 * len(KINDS) - 2, seed=3))
    with torchserve(root / "store", "vgg", tmp_path, keep_alive=True) as server:
        pid = server.workers()[0]["pid"]

        jobs = [job for k, request in enumerate(hostile) for job in ([request, None] if k % 3 == 2 else [request])]  # None: valid

        def send(job):
            if job is None:
                return "valid", *server.post("/predictions/vgg", _npy(images[0]), "application/octet-stream")
            return job.kind, *server.post(path(job.endpoint, "vgg"), job.body, job.content_type, job.headers)

        with ThreadPoolExecutor(12) as pool:
            replies = list(pool.map(send, jobs))
        assert server.workers()[0]["pid"] == pid and server.workers()[0]["status"] == "READY"
    assert {kind for kind, *_ in replies} >= set(KINDS)
    for kind, status, answer in replies:
        if kind == "valid":
            assert status == 200 and answer["label"] == labels[0], answer
        elif kind in TORCHSERVE_FRONTEND:  # the frontend's own answer (a 500 for a malformed form); the worker lives on
            assert status in (400, 500), (kind, status, answer)
        elif kind not in MAY_SUCCEED:  # valid requests at a limit may be answered
            assert 400 <= status < 500 and isinstance(answer, dict) and answer["error"]["problem"], (kind, status, answer)


@pytest.fixture(scope="module")
def service(served_archive):
    """The serving core on the served archive, in-process (what both adapters run)."""
    from unhans.core.serving import unpacked
    from unhans.handlers.service import Service

    root, _ = served_archive
    with unpacked(root / "store" / "vgg.mar") as folder:
        yield Service(folder)


@settings(max_examples=60, deadline=None)
@given(bodies=st.lists(st.binary(max_size=512) | JSON_VALUES | st.builds(lambda o: {"instances": [ZEROS], **o}, OPTION_VALUES),
                       min_size=1, max_size=6), explain=st.booleans())
def test_any_batch_is_answered_row_by_row(service, bodies, explain):
    """The handler in-process: a batch of arbitrary rows, one valid among them, gets one JSON answer per row, the
    valid one its prediction, and nothing raises."""
    from unhans.handlers.service import Row

    rows = [Row(body, f"r{k}", explain=explain) for k, body in enumerate(bodies)] + [Row(_npy(np.zeros((1, 28, 28))), "valid")]
    answers = service.answer(rows)
    assert len(answers) == len(rows) and all(json.dumps(a.body) for a in answers)
    assert all(a.status == 200 or 400 <= a.status < 500 for a in answers), [a.body for a in answers if a.status >= 500]
    assert answers[-1].status == 200 and "label" in answers[-1].body
