"""TorchServe handler for graphs written by ``unhans export``: onnxruntime inference, top-k, and the artifact score.

Minimal by design (the explanation-serving handler comes later). It opens the archive's ONNX graph with unhans's
session helper (CPU unless a GPU is really there, explicit threads, no spinning; TorchServe's own ONNX loader would
take every core per worker) and answers per row {"label", "probabilities" (top-k by class name), "artifact_score"
(null when the graph has no detector)}. A row is a JSON array shaped like one input (C, H, W) in [0, 1], ``.npy``
bytes, or an image file. Rows whose score exceeds the exported threshold are counted in the ``ArtifactDetected``
metric.
"""

import io
import json
import os

import numpy as np
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler

from unhans.export.graph import SCORE_OUTPUT
from unhans.export.runtime import session


class OnnxHandler(BaseHandler):
    def initialize(self, context):
        model_dir = context.system_properties["model_dir"]
        self.manifest = context.manifest
        config = (getattr(context, "model_yaml_config", None) or {}).get("unhans", {})
        self.session = session(os.path.join(model_dir, self.manifest["model"]["serializedFile"]), threads=int(config.get("intra_op_threads", 1)))
        first = self.session.get_inputs()[0]
        self.input_name, self.input_shape = first.name, tuple(first.shape[1:])
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.topk = int(config.get("topk", 3))
        self.threshold = float(self.session.get_modelmeta().custom_metadata_map.get("unhans.correction.threshold", 0.0))
        names = os.path.join(model_dir, "index_to_name.json")
        self.classes = json.loads(open(names).read()) if os.path.isfile(names) else {}
        self.initialized = True

    def preprocess(self, data):
        return np.stack([self._row(row.get("data") if row.get("data") is not None else row.get("body")) for row in data])

    def _row(self, body) -> np.ndarray:
        if isinstance(body, (bytes, bytearray)):
            body = bytes(body)
            if body.startswith(b"\x93NUMPY"):
                body = np.load(io.BytesIO(body), allow_pickle=False)
            else:
                channels, height, width = self.input_shape
                image = Image.open(io.BytesIO(body)).convert("L" if channels == 1 else "RGB").resize((width, height))
                body = np.asarray(image, np.float32).reshape(height, width, channels).transpose(2, 0, 1) / 255.0
        row = np.asarray(body, np.float32)
        if row.size != int(np.prod(self.input_shape)):
            raise ValueError(f"an input has {row.size} values, the model takes {self.input_shape}")
        return row.reshape(self.input_shape)

    def inference(self, data, *args, **kwargs):
        return dict(zip(self.outputs, self.session.run(None, {self.input_name: data})))

    def postprocess(self, data):
        logits = data[self.outputs[0]]
        scores = data.get(SCORE_OUTPUT)
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        rows = []
        for i, p in enumerate(probabilities):
            top = np.argsort(-p)[: self.topk]
            rows.append({
                "label": int(top[0]),
                "probabilities": {self.classes.get(str(k), str(k)): float(p[k]) for k in top},
                "artifact_score": None if scores is None else float(scores[i]),
            })
        if scores is not None and (scores > self.threshold).any():
            self.context.metrics.add_counter("ArtifactDetected", int((scores > self.threshold).sum()), None, [])
        return rows
