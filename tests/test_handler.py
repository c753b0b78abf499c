"""handlers/: request parsing and encoding (unit), and the handler inside a real TorchServe (integration)."""

import base64
import io
import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
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
    assert error.value.reason in ("body", "format", "target", "instances", "unknown_option")


def test_sampler_stays_within_its_cpu_budget(tmp_path):
    """Relevance costing more than the sampler's CPU budget makes it fall behind and drop (counted), not take more."""
    from unhans.handlers.relevance import Sampler
    from unhans.handlers.sink import ShardWriter

    def costly_relevance(images, targets):  # 20 ms of CPU per batch, like a slow model's LRP
        end = time.thread_time() + 0.02
        while time.thread_time() < end:
            pass
        return None, np.ones((len(images), 1, 28, 28), np.float32), None

    sampler = Sampler(ShardWriter(str(tmp_path), "m", "1", "w"), costly_relevance, 1.0, "m", "1", queue_size=64, batch=4, cpu_budget=0.1)
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
def test_kserve_v1_envelope(served_archive, backdoored_vgg, torchserve, tmp_path):
    root, corrected = served_archive
    images = backdoored_vgg["test"].images[:2]
    with torchserve(root / "store", "vgg", tmp_path, extra_config="service_envelope=kserve") as server:
        status, answer = server.post("/predictions/vgg", json.dumps({"instances": images.tolist()}).encode(), "application/json")
        assert status == 200, answer
        labels = corrected(torch.from_numpy(images)).argmax(1).tolist()
        assert [p["label"] for p in answer["predictions"]] == labels
        status, explained = server.post("/explanations/vgg", json.dumps({"instances": images[:1].tolist()}).encode(), "application/json")
        assert status == 200 and "relevance" in explained["explanations"][0]
        status, rejected = server.post("/predictions/vgg", json.dumps({"instances": [np.full((1, 28, 28), 2.0).tolist()]}).encode(),
                                       "application/json")
        assert status == 422 and rejected["predictions"][0]["error"]["field"] == "body"


@pytest.mark.integration
def test_kserve_v2_envelope(served_archive, backdoored_vgg, torchserve, tmp_path):
    root, corrected = served_archive
    images = backdoored_vgg["test"].images[:3]
    with torchserve(root / "store", "vgg", tmp_path, extra_config="service_envelope=kservev2", keep_alive=True) as server:
        body = {"id": "r1", "inputs": [{"name": "input-0", "shape": list(images.shape), "datatype": "FP32", "data": images.ravel().tolist()}]}
        status, answer = server.post("/predictions/vgg", json.dumps(body).encode(), "application/json")
        assert status == 200, answer
        # keep_alive: the next call reuses this thread's connection
        connection = server._connections.__dict__[server.url]
        socket_before = connection.sock
        assert socket_before is not None and server.post("/predictions/vgg", json.dumps(body).encode(), "application/json") == (status, answer)
        assert connection.sock is socket_before
        assert answer["id"] == "r1" and answer["outputs"][0]["name"] == "input-0"
        probabilities = np.asarray(answer["outputs"][0]["data"]).reshape(3, 10)
        expected = torch.softmax(corrected(torch.from_numpy(images)), 1).detach().numpy()
        assert np.allclose(probabilities, expected, atol=1e-4)


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
    expected = LRP(corrected).explain(images).relevance.sum(axis=1)
    assert np.allclose(records[0].relevance, expected[0], atol=2e-3 * max(1.0, np.abs(expected[0]).max()))
    assert records[0].thumbnail.shape[:2] == (16, 16) and records[0].score is not None and records[0].version == "1.0"
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
    with pytest.raises(RequestError, match="larger than the 28x28 map"):
        parse({"data": json.dumps({"instances": images[:1], "explain": True, "downsample": 10**6}).encode()}, small)
