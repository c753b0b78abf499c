"""Benchmark: the unhans KServe predictor against our TorchServe handler, on the same archive, on this machine.

    python bench/kserve.py [--json PATH] [--run DIR] [--quick]

For two archives built as 'unhans archive' builds them: the VGG-style MNIST model of bench/serving.py (its ONNX
explain graph packed) and EfficientNet-Lite0 at 224 px (ImageNet weights, a watermark correction fitted on paired real
photos, explained by its PyTorch twin through zennit). Both servers run the archive with one intra-op thread and batch
size 8; they are measured in turns, rounds interleaved, 16 keep-alive clients, the same KServe v1 JSON bodies (MNIST
pixels; the 224-px photos as {"b64": JPEG} instances) to `/v1/models/NAME:predict|:explain` of each. Keys, per archive
(suffix `_vgg`, `_lite0`):

- v2_concurrent_errors: 200 concurrent v2 infer requests to the predictor, half JSON tensors, half binary tensors
  (tritonclient's encoding), each checked for its label count and labels; target 0;
- v1_explain_concurrent_errors: 200 concurrent v1 :explain requests, each checked for its relevance map; target 0;
- predict_throughput_vs_torchserve, explain_throughput_vs_torchserve: requests per second of the predictor over
  TorchServe's, median over interleaved rounds; target >= 1.0;
- relevance_max_rel_l2_vs_torchserve: the largest relative L2 distance between the two servers' relevance maps
  (format list) of the same instances; target <= 1e-6;
- sampling_cost_pct: throughput the predictor loses with 10% of instances sampled to a sink (paired rounds against
  the unsampled predictor, median); target <= 3.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from common import report, throughput, vgg_archives

from unhans.handlers.requests import decode_relevance
from unhans.kserve_server import LocalKServe
from unhans.torchserve import LocalTorchServe

TARGETS = {"v2_concurrent_errors": "0", "v1_explain_concurrent_errors": "0", "predict_throughput_vs_torchserve": ">= 1.0",
           "explain_throughput_vs_torchserve": ">= 1.0", "relevance_max_rel_l2_vs_torchserve": "<= 1e-6", "sampling_cost_pct": "<= 3"}
CLIENTS, CONCURRENT = 16, 200


def lite0_archives(scratch: Path, store: Path) -> list[bytes]:
    """``lite0`` and ``lite0_sampled``: EfficientNet-Lite0 patched against a watermark; returns the photos as JPEG."""
    from imagenet import CONTRACT, photo_files, watermark

    from unhans.core.artifacts import Watermark
    from unhans.core.clarc import fit_cav
    from unhans.core.models.zoo import efficientnet_lite0, write_efficientnet_lite0
    from unhans.export.archive import build_archive
    from unhans.export.correction import Correction
    from unhans.export.onnx import export_torch

    model, layer = efficientnet_lite0(), "_blocks.10"
    files = photo_files(scratch)
    pixels = CONTRACT.load(files)
    marked, _ = Watermark(path=str(watermark(scratch / "watermark.png")), position="center", size=200).apply(pixels)
    clean, dirty = CONTRACT.normalise(pixels), CONTRACT.normalise(marked)
    correction = Correction.from_cav(fit_cav(model, layer, dirty, clean, paired=True))
    graph = export_torch(model, layer, correction, np.concatenate([dirty[:8], clean[:8]]), scratch / "lite0.onnx").path
    model_file, weights = write_efficientnet_lite0(scratch / "lite0")
    for name, sampled in (("lite0", 0.0), ("lite0_sampled", 0.1)):
        build_archive(graph, None, name, store, batch_size=8, max_batch_delay_ms=5, model_file=model_file, weights=weights,
                      contract=CONTRACT, sample_fraction=sampled, sink=str(scratch / "sink"))
    return [path.read_bytes() for path in files]


def v1(instances: list, **options) -> bytes:
    return json.dumps({"instances": instances, **options}).encode()


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def concurrent_errors(call, jobs: int) -> int:
    with ThreadPoolExecutor(64) as pool:
        return sum(not ok for ok in pool.map(call, range(jobs)))


def compare(name: str, kserve: LocalKServe, kserve_sampled: LocalKServe, torchserve: LocalTorchServe, instances: list,
            images: np.ndarray, rounds: int) -> dict:
    """The figures for one archive; ``instances`` are v1 instances, ``images`` the same as (N, C, H, W) pixels."""
    import tritonclient.http as triton

    figures = {}
    explain_body = v1(instances[:8], format="list")
    _, ours = kserve.post(f"/v1/models/{name}:explain", explain_body, "application/json")
    _, theirs = torchserve.post(f"/v1/models/{name}:explain", explain_body, "application/json")
    figures["relevance_max_rel_l2_vs_torchserve"] = max(rel_l2(decode_relevance(a["relevance"]), decode_relevance(b["relevance"]))
                                                        for a, b in zip(ours["predictions"], theirs["predictions"]))
    labels = [p["label"] for p in theirs["predictions"]]

    def v2_call(k: int) -> bool:
        image = images[k % 8: k % 8 + 1]
        if k % 2:
            binary_input = triton.InferInput("x", list(image.shape), "FP32")
            binary_input.set_data_from_numpy(image, binary_data=True)
            asked = [triton.InferRequestedOutput(output, binary_data=False) for output in ("label", "probabilities")]
            body, header = triton.InferenceServerClient.generate_request_body([binary_input], outputs=asked)
            status, answer = kserve.post(f"/v2/models/{name}/infer", body, "application/octet-stream",
                                         {"Inference-Header-Content-Length": str(header)})
        else:
            tensor = {"name": "x", "shape": list(image.shape), "datatype": "FP32", "data": image.ravel().tolist()}
            status, answer = kserve.post(f"/v2/models/{name}/infer", json.dumps({"inputs": [tensor]}).encode(), "application/json")
        if status != 200:
            return False
        outputs = {o["name"]: o for o in answer["outputs"]}
        return outputs["label"]["data"] == [labels[k % 8]] and outputs["probabilities"]["shape"][0] == 1

    def explain_call(k: int) -> bool:
        status, answer = kserve.post(f"/v1/models/{name}:explain", v1(instances[k % 8: k % 8 + 1]), "application/json")
        return status == 200 and len(answer["predictions"]) == 1 and decode_relevance(answer["predictions"][0]["relevance"]).size > 0

    figures["v2_concurrent_errors"] = concurrent_errors(v2_call, CONCURRENT)
    figures["v1_explain_concurrent_errors"] = concurrent_errors(explain_call, CONCURRENT)

    bodies = [v1([instance]) for instance in instances]
    rates = {(verb, server): [] for verb in ("predict", "explain") for server in ("kserve", "torchserve")}
    servers = {"kserve": kserve, "torchserve": torchserve}
    for r in range(rounds):
        for (verb, server), runs in (rates.items() if r % 2 else reversed(rates.items())):
            count = 4 * len(bodies) if verb == "predict" else min(len(bodies), 16)
            runs.append(throughput(servers[server], name, (bodies * 4)[:count], content_type="application/json", clients=CLIENTS,
                                   path=f"/v1/models/{name}:{verb}"))
    for (verb, server), runs in rates.items():
        figures[f"{verb}_per_s_{server}"] = statistics.median(runs)
    figures["predict_throughput_vs_torchserve"] = figures["predict_per_s_kserve"] / figures["predict_per_s_torchserve"]
    figures["explain_throughput_vs_torchserve"] = figures["explain_per_s_kserve"] / figures["explain_per_s_torchserve"]
    lost = []
    for r in range(2 * rounds):
        pair = {}
        for label, server in (("plain", kserve), ("sampled", kserve_sampled)) if r % 2 else (("sampled", kserve_sampled), ("plain", kserve)):
            pair[label] = throughput(server, name, bodies * 4, content_type="application/json", clients=CLIENTS, path=f"/v1/models/{name}:predict")
        lost.append(100 * (1 - pair["sampled"] / pair["plain"]))
    figures["sampling_cost_pct"] = statistics.median(lost)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the figures as one JSON object here")
    parser.add_argument("--run", type=Path, help="run folder of the backdoored VGG (trained here if missing)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds, the VGG archive only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    figures, rounds = {}, 2 if args.quick else 4
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        store = scratch / "store"
        store.mkdir()
        images = vgg_archives(args.run or scratch / "vgg", scratch, store, {
            "vgg": {}, "vgg_sampled": {"sample_fraction": 0.1, "sink": str(scratch / "sink")}})[:64]
        archives = {"vgg": ([x.tolist() for x in images], images)}
        if not args.quick:
            photos = lite0_archives(scratch, store)
            import io

            from imagenet import CONTRACT
            from PIL import Image

            pixels = np.stack([CONTRACT.pixels(Image.open(io.BytesIO(p))) for p in photos])
            archives["lite0"] = ([{"b64": base64.b64encode(p).decode()} for p in photos], pixels)
        (scratch / "ts").mkdir()
        with LocalTorchServe(store, list(archives), scratch / "ts", ready_timeout=300, keep_alive=True) as torchserve:
            for name, (instances, pixels) in archives.items():
                work = {n: scratch / f"ks-{n}" for n in (name, f"{name}_sampled")}
                for folder in work.values():
                    folder.mkdir()
                with LocalKServe(store / f"{name}.mar", work[name], keep_alive=True) as kserve, \
                        LocalKServe(store / f"{name}_sampled.mar", work[f"{name}_sampled"], keep_alive=True,
                                    extra_args=("--model_name", name)) as sampled:
                    result = compare(name, kserve, sampled, torchserve, instances, pixels, rounds)
                figures.update({f"{key}_{name}": value for key, value in result.items()})
    for key in TARGETS:  # the worst over the archives, against the target
        values = [v for k, v in figures.items() if k.startswith(key + "_")]
        figures[key] = (min if key.endswith("_vs_torchserve") and "throughput" in key else max)(values)
    report("kserve: the unhans KServe predictor vs our TorchServe handler, same archive", figures,
           {**TARGETS, **{f"{k}_{n}": t for k, t in TARGETS.items() for n in ("vgg", "lite0")}}, args.json)


if __name__ == "__main__":
    main()
