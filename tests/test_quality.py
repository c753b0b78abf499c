"""Issue 18's scenario grid in small form: one cell of bench/quality.py, run through the real CLI as a user would.

The grid itself (24 cells, about 30-45 minutes on 2 cores) is ``python bench/quality.py``; here the corner patch
backdoor at 5%, trained briefly, must come out right end to end: audit, the audit's own choice of cluster
(``--select auto``), export, and the corrected ONNX graph scored with onnxruntime.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _quality():
    """bench/quality.py as a module (it imports bench/common.py as ``common``, as when run from bench/)."""
    if "bench_quality" in sys.modules:
        return sys.modules["bench_quality"]
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_quality", BENCH / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look the module up while it is executed
    spec.loader.exec_module(module)
    return module


def test_grid_is_the_issues_42_cells():
    quality = _quality()
    cells = quality.grid()
    assert len(cells) == len({c.name for c in cells}) == 42  # 7 artifacts (issues 18 and 33) x 2 modes x 3 rates
    by_name = {c.name: c for c in cells}
    assert by_name["patch_backdoor_05"].fraction == 0.05
    assert by_name["cast_cooccurrence_10"].train_args(Path("r"), 5)[4] == "mnist-rgb"  # a colour cast needs colour data
    assert by_name["text_cooccurrence_02"].fraction == pytest.approx(0.18)  # as many poisoned rows as backdoor at 2%
    assert [c.name for c in quality.grid(["frame_backdoor_02"], seeds=[0, 1])] == ["frame_backdoor_02", "frame_backdoor_02_s1"]
    assert {c.name for c in quality.grid(quick=True)} == set(quality.QUICK_CELLS)


@pytest.mark.integration
def test_corner_patch_backdoor_survives_the_whole_pipeline(tmp_path):
    quality = _quality()
    cell = quality.Cell("patch", "backdoor", 0.05)
    result = quality.run_cell(cell, tmp_path / cell.name, epochs=3)

    assert result["attack_success_before"] >= 0.9, result  # the model learned the artifact, else nothing below means anything
    assert result["rank"] == 1, result
    assert result["artifact_found"] and result["chosen_class"] == 0, result
    assert result["cluster_precision"] >= 0.9 and result["cluster_recall"] >= 0.9, result
    assert not result["export_refused"], result
    assert result["attack_success_cut"] >= 0.9, result
    assert result["clean_drop_pt"] <= 1.0, result
    assert result["meets_all_targets"]

    summary = quality.summarise({cell.name: result})
    assert summary["scenarios"] == summary["scenarios_meeting_all_targets"] == 1
    assert summary["worst_rank"] == 1 and summary["scenarios_failed"] == 0


@pytest.mark.integration
def test_a_tag_at_a_random_position_is_found_and_removed(tmp_path):
    """The "©" at a random position in each poisoned image: the clean 0s' rings carry class 0 as well as the tags do,
    so the transplant alone cannot choose; the other-class test (audit/clusters.py) must find the tag cluster. No
    projection removes a tag that moves on this VGG (no global pooling), so the audit prints A-ClArC from the selected
    samples' own regions, then the export; the cell runs exactly those commands."""
    quality = _quality()
    cell = quality.Cell("textrandom", "backdoor", 0.10)
    result = quality.run_cell(cell, tmp_path / cell.name)

    assert result["attack_success_before"] >= 0.5, result
    assert result["rank"] == 1 and result["artifact_found"] and result["chosen_class"] == 0, result
    assert result["cluster_precision"] >= 0.9 and result["cluster_recall"] >= 0.9, result
    audit_log = " ".join((tmp_path / cell.name / "audit.log").read_text().split())
    assert "no projection removes an artifact that moves" in audit_log and "unhans aclarc --run" in audit_log
    audit = tmp_path / cell.name / "audit"
    pattern = json.loads((audit / "artifact-region.json").read_text())["pattern"]  # the rows are the tag pattern's, not the cluster's
    assert pattern["separation"] >= 0.8 and pattern["rows"] == result["chosen_rows"] and (audit / pattern["image"]).is_file()
    assert result["correction_route"] == "audit" and not result["export_refused"], result
    assert result["attack_success_cut"] >= 0.9 and result["clean_drop_pt"] <= 1.0, result


@pytest.mark.integration
def test_a_tag_at_a_random_position_on_a_globally_pooled_resnet_is_found_and_removed(tmp_path):
    """The same tag on SmallResNet: SpRAy on each channel's peak relevance splits it off (summed, it did not), the
    small-region transplant marks it (no other class shows: the model is sure of the tagged images), and the audit's
    printed correction after the global pooling removes it."""
    quality = _quality()
    cell = quality.Cell("textrandom", "backdoor", 0.10, architecture="resnet")
    result = quality.run_cell(cell, tmp_path / cell.name)

    assert result["attack_success_before"] >= 0.5, result
    assert result["rank"] == 1 and result["artifact_found"] and result["chosen_class"] == 0, result
    assert result["cluster_precision"] >= 0.9 and result["cluster_recall"] >= 0.9, result
    audit = json.loads((tmp_path / cell.name / "audit" / "audit.json").read_text())
    assert audit["over_positions"] == "max" and audit["classes"][0]["artifact_evidence"] == "small regions"
    assert result["correction_route"] == "audit" and not result["export_refused"], result
    assert result["attack_success_cut"] >= 0.9 and result["clean_drop_pt"] <= 1.0, result


@pytest.mark.integration
def test_a_corner_patch_on_the_small_vit_is_found_at_its_patch_embedding_and_removed(tmp_path):
    """The small ViT (`unhans train --model vit`) with the corner patch: the audit analyses its patch embedding (at the
    end of the encoder, attention has blurred the patch over every token), grows the region from the token the model
    leans on to the patch's own pixels, and the printed paired correction at the patch embedding removes it."""
    quality = _quality()
    cell = quality.Cell("patch", "backdoor", 0.10, architecture="vit")
    result = quality.run_cell(cell, tmp_path / cell.name, epochs=VIT_EPOCHS)

    assert result["attack_success_before"] >= 0.9, result
    assert result["rank"] == 1 and result["artifact_found"] and result["chosen_class"] == 0, result
    assert result["cluster_precision"] >= 0.9 and result["cluster_recall"] >= 0.9, result
    audit = tmp_path / cell.name / "audit"
    assert json.loads((audit / "audit.json").read_text())["analysed_layer"] == "patches"
    region = json.loads((audit / "artifact-region.json").read_text())
    assert region["route"] == "paired" and region["size"][0] > 4 and "--layer patches" in region["commands"][0]
    assert result["correction_route"] == "audit" and not result["export_refused"], result
    assert result["attack_success_cut"] >= 0.9 and result["clean_drop_pt"] <= 1.0, result


VIT_EPOCHS = 6  # the small ViT learns the patch at 10% in 6 epochs (about 25 s)
