"""The KServe predictor: a real ``kserve.ModelServer`` process serving an archive from ``unhans archive``, called
through tritonclient (the Open Inference Protocol client) and plain HTTP, answering as the TorchServe handler does."""

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from unhans.handlers.requests import decode_relevance

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def kserve_server(served_archive, tmp_path_factory):
    from unhans.kserve_server import LocalKServe

    root, corrected = served_archive
    with LocalKServe(root / "store" / "vgg.mar", tmp_path_factory.mktemp("kserve"), keep_alive=True) as server:
        yield server, corrected


def test_open_inference_protocol_client(kserve_server, backdoored_vgg):
    """tritonclient: health, readiness, metadata, and infer with binary tensors both ways."""
    import tritonclient.http as triton

    server, corrected = kserve_server
    images = backdoored_vgg["test"].images[:5]
    client = triton.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("vgg")
    metadata = client.get_model_metadata("vgg")
    assert metadata["inputs"][0]["shape"] == [-1, 1, 28, 28]
    assert {o["name"] for o in metadata["outputs"]} == {"probabilities", "label", "artifact_score", "relevance"}
    tensor = triton.InferInput("x", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images, binary_data=True)
    result = client.infer("vgg", [tensor], outputs=[triton.InferRequestedOutput(name, binary_data=True) for name in ("probabilities", "label")])
    expected = torch.softmax(corrected(torch.from_numpy(images)), 1).detach().numpy()
    assert np.allclose(result.as_numpy("probabilities"), expected, atol=1e-5)
    assert result.as_numpy("label").dtype == np.int64 and result.as_numpy("label").tolist() == expected.argmax(1).tolist()
    explained = client.infer("vgg", [tensor], parameters={"explain": True, "target": 3})
    relevance = explained.as_numpy("relevance")
    assert relevance.shape == (5, 28, 28) and np.abs(relevance).sum() > 0


def test_answers_equal_the_torchserve_handlers(kserve_server, served_archive, backdoored_vgg, torchserve, tmp_path):
    """Same archive, same core: the same predictions and relevance maps through KServe v1/v2 and TorchServe."""
    server, _ = kserve_server
    root, _ = served_archive
    images = backdoored_vgg["test"].images[:4]
    body = json.dumps({"instances": images.tolist(), "format": "list"}).encode()
    v2 = json.dumps({"inputs": [{"name": "x", "shape": list(images.shape), "datatype": "FP32", "data": images.ravel().tolist()}],
                     "parameters": {"explain": True}}).encode()
    ours = {"v1": server.post("/v1/models/vgg:explain", body, "application/json"), "v2": server.post("/v2/models/vgg/infer", v2, "application/json")}
    with torchserve(root / "store", "vgg", tmp_path) as reference:
        theirs = {"v1": reference.post("/v1/models/vgg:explain", body, "application/json"),
                  "v2": reference.post("/v2/models/vgg/explain", v2, "application/json")}
    for protocol in ("v1", "v2"):
        assert ours[protocol][0] == theirs[protocol][0] == 200, (ours[protocol], theirs[protocol])
    kserve_maps = np.array([decode_relevance(p["relevance"]) for p in ours["v1"][1]["predictions"]])
    torchserve_maps = np.array([decode_relevance(p["relevance"]) for p in theirs["v1"][1]["predictions"]])
    assert np.linalg.norm(kserve_maps - torchserve_maps) <= 1e-6 * np.linalg.norm(torchserve_maps)
    assert [p["label"] for p in ours["v1"][1]["predictions"]] == [p["label"] for p in theirs["v1"][1]["predictions"]]
    outputs = [{o["name"]: o["data"] for o in answer[1]["outputs"]} for answer in (ours["v2"], theirs["v2"])]
    assert outputs[0]["label"] == outputs[1]["label"] and np.allclose(outputs[0]["relevance"], outputs[1]["relevance"], rtol=1e-6, atol=1e-12)


def test_concurrent_requests_and_errors(kserve_server, backdoored_vgg):
    """Concurrent v1 and v2 calls share batches and each gets its own answer; a bad one gets its own JSON 4xx."""
    server, corrected = kserve_server
    images = backdoored_vgg["test"].images[:8]
    labels = corrected(torch.from_numpy(images)).argmax(1).tolist()

    def call(k: int):
        image = images[k % 8: k % 8 + 1]
        if k % 3 == 0:
            status, answer = server.post("/v1/models/vgg:predict", json.dumps({"instances": image.tolist()}).encode(), "application/json")
            return status, answer["predictions"][0]["label"] if status == 200 else answer
        if k % 3 == 1:
            tensor = {"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": image.ravel().tolist()}
            status, answer = server.post("/v2/models/vgg/infer", json.dumps({"inputs": [tensor]}).encode(), "application/json")
            return status, {o["name"]: o["data"] for o in answer["outputs"]}["label"][0] if status == 200 else answer
        status, answer = server.post("/v1/models/vgg:predict", json.dumps({"instances": [(image[0] * 3).tolist()]}).encode(), "application/json")
        return status, answer

    with ThreadPoolExecutor(24) as pool:
        replies = list(pool.map(call, range(72)))
    for k, (status, answer) in enumerate(replies):
        if k % 3 == 2:
            assert status == 422 and answer["error"]["field"] == "instances[0]", answer
        else:
            assert status == 200 and answer == labels[k % 8], (k, status, answer)
    exposed = urllib.request.urlopen(server.url + "/metrics", timeout=30).read().decode()
    assert 'unhans_rejected_requests_total{model_name="vgg",reason="instances"} 24.0' in exposed
