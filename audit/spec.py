"""What decides an audit (:class:`AuditSpec`, stored in audit.json) and the data it analysed.

Its own module so that the audit's run and the selection steps that read a finished audit (the region, the pattern)
both depend on it and not on each other: data flows one way, run -> selection.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unhans.core.contract import InputContract
from unhans.core.data import ImageDataset, load_dataset, read_class_names
from unhans.core.errors import InputError

from .samples import data_fingerprint

INPUT = "input"
LATENT = "auto"  # the end of the feature extractor (core.layers.last_spatial_layer); a transformer's patch embedding
SUM, MAX, AUTO_POOLING = "sum", "max", "auto"  # a layer's relevance over positions: summed, its peak, or by the model (_pooled)


@dataclass
class AuditSpec:
    """Everything that decides an audit (stored in audit.json)."""

    model_file: str
    weights: str
    data: str
    out_dir: str
    layer: str = LATENT  # INPUT, LATENT or a layer name: a layer's relevance is pooled over positions (see run_audit)
    over_positions: str = AUTO_POOLING  # how a layer's relevance is pooled over positions: SUM, MAX or AUTO_POOLING (_pooled)
    composite: str = "epsilon_plus_flat"
    batch_size: int = 128
    n_neighbors: int = 10
    pooling: int = 2
    embedding_2d: str = "tsne"
    scheduler: str | None = None
    n_jobs: int = 1
    contract: dict | None = None  # InputContract.to_dict() for an image folder of photos (resize, crop, mean, std)
    classes: str | None = None  # the model's class names (a file): the data's classes are matched to them by name

    def input_contract(self) -> InputContract | None:
        return InputContract(**self.contract) if self.contract else None

    def dataset(self) -> ImageDataset:
        """The audited data as the model takes it (through the input contract, when there is one), labelled by the
        model's class names when they are given."""
        dataset = load_dataset(self.data, skip_unreadable=True, contract=self.input_contract())
        # their count is checked against the model's outputs by run_audit
        return dataset if self.classes is None else dataset.onto(read_class_names(self.classes))

    def pictures(self, images: np.ndarray) -> np.ndarray:
        """Model inputs as [0, 1] pixels, for what people look at (report, ViRelAy, the artifact region)."""
        contract = self.input_contract()
        return images if contract is None else np.clip(contract.denormalise(images), 0, 1)


def audited_dataset(out_dir: str | Path, audit: dict | None = None) -> tuple[AuditSpec, ImageDataset]:
    """The spec of the audit in OUT and the images it analysed, row for row as its ``samples.npz`` counts them
    (``audit``: its audit.json, when already read); refused when the data no longer hash to what was audited."""
    audit_file = Path(out_dir) / "audit.json"
    if audit is None:
        if not audit_file.is_file():
            raise InputError(str(out_dir), "holds no finished audit (audit.json)", "run 'unhans audit' into it first")
        audit = json.loads(audit_file.read_text())
    try:
        spec = AuditSpec(**audit["spec"])
    except (KeyError, TypeError) as error:
        raise InputError(str(audit_file), f"is not an audit summary ({error})", "run 'unhans audit' into its folder again") from None
    dataset = spec.dataset()
    if data_fingerprint(dataset.images, dataset.labels) != audit.get("inputs", {}).get("data"):
        raise InputError(spec.data, f"changed since the audit in {out_dir}", "run the audit again with --restart")
    return spec, dataset
