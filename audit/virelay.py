"""Write an audit as a ViRelAy project, so users can explore clusters and embeddings interactively.

Layout (what ``virelay.model.Project`` reads): ``project.yaml``, ``label-map.json``, ``dataset.h5`` (``data``,
``label``), ``attribution.h5`` (``attribution``, ``prediction``, ``label``) and ``analysis.h5`` with one group per
class: ``index`` (dataset rows), ``cluster/<name>`` (labels) and ``embedding/<name>`` (with an ``eigenvalue``
attribute on the spectral embedding). Open it with ``python -m virelay OUT/virelay/project.yaml``.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import yaml


def write_virelay_project(out_dir: str | Path, name: str, model_name: str, images: np.ndarray, labels: np.ndarray,
                          classes: list[str], relevance: np.ndarray, logits: np.ndarray, composite: str,
                          analyses: list[dict]) -> Path:
    """``analyses``: per class a dict with ``class_index``, ``index`` (rows), ``labels``, ``eigenvalues``,
    ``eigenvectors`` and optionally ``embedding_2d``. Returns the path of ``project.yaml``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "label-map.json").write_text(json.dumps(
        [{"index": i, "word_net_id": str(i), "name": c} for i, c in enumerate(classes)], indent=1))
    height, width = images.shape[-2:]
    with h5py.File(out / "dataset.h5", "w") as f:
        f["data"] = images.astype(np.float32)
        f["label"] = labels.astype(np.int64)
    with h5py.File(out / "attribution.h5", "w") as f:
        f["attribution"] = relevance.astype(np.float32)
        f["prediction"] = logits.astype(np.float32)
        f["label"] = labels.astype(np.int64)
    with h5py.File(out / "analysis.h5", "w") as f:
        for analysis in analyses:
            group = f.create_group(str(analysis["class_index"]))
            group["index"] = np.asarray(analysis["index"], np.int64)
            group[f"cluster/kmeans-{len(np.unique(analysis['labels']))}"] = np.asarray(analysis["labels"], np.int64)
            spectral = group.create_dataset("embedding/spectral", data=np.asarray(analysis["eigenvectors"], np.float32))
            spectral.attrs["eigenvalue"] = np.asarray(analysis["eigenvalues"], np.float32)
            if analysis.get("embedding_2d") is not None:
                group["embedding/tsne"] = np.asarray(analysis["embedding_2d"], np.float32)
    project = {"project": {
        "name": name, "model": model_name, "label_map": "label-map.json",
        "dataset": {
            "name": name, "type": "hdf5", "path": "dataset.h5", "input_width": int(width), "input_height": int(height),
            "up_sampling_method": "none", "down_sampling_method": "none",
            "label_index_regex": None, "label_word_net_id_regex": None,
        },
        "attributions": {"attribution_method": composite, "attribution_strategy": "true_label", "sources": ["attribution.h5"]},
        "analyses": [{"analysis_method": "spectral", "sources": ["analysis.h5"]}],
    }}
    path = out / "project.yaml"
    path.write_text(yaml.safe_dump(project, sort_keys=False))
    return path
