"""The KServe predictor: a real ``kserve.ModelServer`` process serving an archive from ``unhans archive``, called
through tritonclient (the Open Inference Protocol client) and plain HTTP, answering as the TorchServe handler does."""

import json
import urllib.request
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from unhans.handlers.requests import decode_relevance

REPO = Path(__file__).resolve().parents[1]


def _unknown_fields(data, type_name: str, path: str = "") -> list[str]:
    """Fields of ``data`` that the SDK model ``type_name`` (KServe's or Kubernetes') does not have, recursively."""
    import re

    import kserve.models
    from kubernetes.client import models as kubernetes_models

    if match := re.fullmatch(r"(?:list|List)\[(.+)\]", type_name):
        return [bad for k, item in enumerate(data) for bad in _unknown_fields(item, match[1], f"{path}[{k}]")]
    if match := re.fullmatch(r"(?:dict|Dict)[\[(]str, ?(.+)[\])]", type_name):
        return [bad for key, value in data.items() for bad in _unknown_fields(value, match[1], f"{path}.{key}")]
    model = getattr(kserve.models, type_name, None) or getattr(kubernetes_models, type_name, None)
    if model is None:  # str, int, bool, object, ...
        return []
    attributes = {name: attribute for attribute, name in model.attribute_map.items()}
    return [bad for key, value in data.items()
            for bad in ([f"{path}.{key}"] if key not in attributes else _unknown_fields(value, model.openapi_types[attributes[key]], f"{path}.{key}"))]


def test_the_shipped_manifest_is_the_sdks_and_valid_for_the_crd():
    """deploy/kserve/inferenceservice.yaml is what 'unhans kserve-manifest' prints, and every field of it is one of
    KServe's SDK models (which mirror the CRD's schema)."""
    import yaml
    from click.testing import CliRunner

    from unhans.cli import main

    args = ["--name", "vgg", "--storage-uri", "s3://models/unhans/vgg.mar", "--image", "ghcr.io/you/unhans-kserve:0.1.0"]
    printed = CliRunner().invoke(main, ["kserve-manifest", *args])
    assert printed.exit_code == 0, printed.output
    manifest = yaml.safe_load(printed.output)
    assert manifest == yaml.safe_load((REPO / "deploy" / "kserve" / "inferenceservice.yaml").read_text())
    assert _unknown_fields(manifest, "V1beta1InferenceService") == []
    assert _unknown_fields({**manifest, "spec": {"predictor": {"replicas": 2}}}, "V1beta1InferenceService") == [".spec.predictor.replicas"]
    container = manifest["spec"]["predictor"]["containers"][0]
    assert container["args"][:2] == ["--archive", "/mnt/models"] and container["readinessProbe"]["httpGet"]["path"] == "/v2/models/vgg/ready"


def test_a_folder_holding_one_archive_is_served_as_it(served_archive, tmp_path):
    """KServe's storage initializer puts the .mar into /mnt/models: that folder is the archive."""
    import shutil

    from unhans.core.serving import manifest, unpacked

    root, _ = served_archive
    mounted = tmp_path / "mnt-models"
    mounted.mkdir()
    shutil.copy(root / "store" / "vgg.mar", mounted)
    with unpacked(mounted) as folder:
        assert manifest(folder)["modelName"] == "vgg"
    shutil.copy(root / "store" / "vgg.mar", mounted / "other.mar")
    with pytest.raises(ValueError, match="holds 2 .mar files"):
        with unpacked(mounted):
            pass


@pytest.fixture(scope="module")
def kserve_server(served_archive, tmp_path_factory):
    from unhans.kserve_server import LocalKServe

    root, corrected = served_archive
    with LocalKServe(root / "store" / "vgg.mar", tmp_path_factory.mktemp("kserve"), keep_alive=True) as server:
        yield server, corrected


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
def test_grpc_v2(kserve_server, backdoored_vgg):
    """The Open Inference Protocol over gRPC, through KServe's own client: predictions and relevance tensors."""
    import asyncio

    from kserve import InferenceGRPCClient, InferInput, InferRequest

    server, corrected = kserve_server
    images = backdoored_vgg["test"].images[:3]

    async def infer(explain: bool):
        client = InferenceGRPCClient(server.grpc_address)
        tensor = InferInput("x", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)
        try:
            return await client.infer(InferRequest("vgg", [tensor], parameters={"explain": explain} if explain else None))
        finally:
            await client.close()

    plain, explained = asyncio.run(infer(False)), asyncio.run(infer(True))
    outputs = {o.name: o.as_numpy() for o in plain.outputs}
    assert outputs["label"].tolist() == corrected(torch.from_numpy(images)).argmax(1).tolist()
    assert {o.name: o.as_numpy() for o in explained.outputs}["relevance"].shape == (3, 28, 28)
