"""The artifact-cluster decision of audit/clusters.py on the figures its tests produce (measured ones, rounded).

The tests that run the transplant test on trained models are in test_audit.py and test_quality.py; these pin down
which cluster the figures mark, including the cases those models do not reach.
"""

import numpy as np

from unhans.audit.clusters import ClusterEvidence, artifact_clusters, nearest_miss, rank_by_evidence, shared_pixels, summary, verdict


def clusters(*figures: tuple[int, float, float, float]) -> list[ClusterEvidence]:
    """Evidence from (size, transplant rate, region share, other-class probability) per cluster."""
    return [ClusterEvidence(i, size, 48, rate, share, other) for i, (size, rate, share, other) in enumerate(figures)]


def test_a_cluster_that_carries_the_class_alone_is_marked_by_the_transplant():
    frame = clusters((380, 0.92, 0.13, 0.02), (400, 0.10, 0.09, 0.01))  # a 2-px frame backdoor to 7
    assert artifact_clusters(frame) == [0]
    assert summary(frame)["artifact_evidence"] == "transplant"


def test_where_the_clean_clusters_carry_the_class_too_the_backdoors_other_class_decides():
    # a "©" at random positions, 10% backdoor to 0: the clean 0s' rings carry 0 better than the tags do
    moving_tag = clusters((352, 0.61, 0.07, 0.13), (408, 0.73, 0.09, 0.02))
    assert artifact_clusters(moving_tag) == [0]
    assert summary(moving_tag)["artifact_evidence"] == "other class"
    assert "another class" in verdict(moving_tag) and not summary(moving_tag)["hijackable"]
    # the same class at 5%, whose tags SpRAy split into two clusters: both are taken
    split = clusters((103, 0.60, 0.08, 0.15), (98, 0.90, 0.10, 0.01), (106, 0.54, 0.08, 0.11), (143, 0.84, 0.10, 0.01))
    assert artifact_clusters(split) == [0, 2]


def test_other_class_evidence_alone_marks_nothing():
    # ambiguous members (a 0 written like a 6) in a class no small region carries: no artifact
    ambiguous = clusters((200, 0.10, 0.09, 0.30), (300, 0.05, 0.08, 0.01))
    assert artifact_clusters(ambiguous) == [] and verdict(ambiguous).startswith("no artifact found")
    # contested, but the members that show another class do not carry the class: the transplant decides alone
    contested = clusters((200, 0.80, 0.09, 0.01), (300, 0.70, 0.08, 0.01), (100, 0.05, 0.08, 0.40))
    assert artifact_clusters(contested) == [0, 1] and summary(contested)["artifact_evidence"] == "transplant"
    # contested, with no gap in the other class (co-occurrence: the artifact sits on the class's own images)
    no_gap = clusters((200, 0.80, 0.09, 0.03), (300, 0.60, 0.08, 0.02))
    assert artifact_clusters(no_gap) == [] and verdict(no_gap).startswith("hijackable")


def test_a_class_marked_by_either_test_ranks_before_a_hijackable_one():
    class Result:  # the fields rank_by_evidence reads of a SpRAy ClassResult
        def __init__(self, index, rank):
            self.class_index, self.rank, self.spray = index, rank, object()

    ranked = [Result(1, 1), Result(0, 2), Result(2, 3)]
    evidence = {1: clusters((200, 0.80, 0.09, 0.03), (300, 0.60, 0.08, 0.02)),  # hijackable
                0: clusters((352, 0.61, 0.07, 0.13), (408, 0.73, 0.09, 0.02)),  # the moving tag
                2: clusters((300, 0.05, 0.08, 0.01), (300, 0.04, 0.08, 0.01))}
    assert [r.class_index for r in rank_by_evidence(ranked, evidence)] == [0, 1, 2]


def test_where_no_other_class_shows_the_clusters_that_still_carry_the_class_when_small_decide():
    # the "©" at random positions on SmallResNet: the model is sure of the tagged images (no other class shows), both
    # clusters carry class 0; cut to the tags' size, the clean 0s' fragments carry it far less
    resnet = clusters((348, 0.96, 0.07, 0.03), (412, 0.86, 0.16, 0.06))
    assert artifact_clusters(resnet) == [] and summary(resnet)["hijackable"]  # without the small-region figures
    resnet[0].small_rate, resnet[1].small_rate = 0.97, 0.62
    assert artifact_clusters(resnet) == [0] and summary(resnet)["artifact_evidence"] == "small regions"
    assert "cut to 7% of the image" in verdict(resnet) and not summary(resnet)["hijackable"]
    assert summary(resnet)["cluster_evidence"][1]["small_region_transplant_rate"] == 0.62
    # the VGG's tag clusters at 10%: the other-class test decides before the small regions are asked
    vgg = clusters((369, 0.85, 0.07, 0.12), (391, 0.82, 0.09, 0.002))
    vgg[0].small_rate, vgg[1].small_rate = 0.90, 0.80
    assert artifact_clusters(vgg) == [0] and summary(vgg)["artifact_evidence"] == "other class"
    # small regions that do not set a cluster apart mark nothing
    close = clusters((200, 0.80, 0.09, 0.03), (300, 0.60, 0.08, 0.02))
    close[0].small_rate, close[1].small_rate = 0.70, 0.55
    assert artifact_clusters(close) == [] and verdict(close).startswith("hijackable")


def test_with_no_artifact_found_the_refusal_names_the_cluster_that_came_closest():
    """A line on 60% of the 5s, learned weakly, beside a class anyone's strokes can carry (hijackable, ranked first):
    the weak artifact leads its class by most, and is the one named, with why it was not marked."""
    hijackable = {"class": "0", **summary(clusters((200, 0.80, 0.09, 0.03), (300, 0.60, 0.08, 0.02)))}
    weak_line = {"class": "5", **summary(clusters((240, 0.31, 0.03, 0.02), (160, 0.02, 0.08, 0.01)))}
    said = nearest_miss([hijackable, weak_line])
    assert "class 5's cluster 0 (240 rows)" in said and "31%" in said and "under the 50%" in said, said
    assert "cluster 0 (200 rows)" in nearest_miss([hijackable]) and "less than 25% apart" in nearest_miss([hijackable])
    assert nearest_miss([{"class": "1", "cluster_evidence": []}]) == ""


def test_on_a_token_grid_the_pixels_a_cluster_shares_decide_where_the_regions_do_not():
    # the small ViT's 2-px frame backdoor to 0 at 5%: token regions turn 26% / 17%, shared pixels 100% / 3%
    frame = clusters((188, 0.26, 0.13, 0.005), (392, 0.17, 0.06, 0.006))
    assert artifact_clusters(frame) == []  # a CNN's audit (no shared-pixels figures) marks nothing
    frame[0].shared_rate, frame[1].shared_rate = 1.0, 0.03
    assert artifact_clusters(frame) == [0] and summary(frame)["artifact_evidence"] == "shared pixels"
    assert "share" in verdict(frame)
    frame[1].shared_rate = 0.9  # both clusters' shared pixels carry the class: nothing set apart
    assert artifact_clusters(frame) == []


def test_shared_pixels_are_where_every_member_shows_the_same_thing_the_rest_does_not():
    rng = np.random.default_rng(0)
    rest = rng.random((40, 1, 12, 12)) * 0.3
    members = rng.random((30, 1, 12, 12)) * 0.3
    members[:, :, :2, :] = 1.0  # a bar pasted into every member
    members[:15, :, 6:9, 6:9] = 1.0  # a stroke in half of them: not shared
    mask, median = shared_pixels(members, rest)
    assert mask[:2].all() and not mask[2:].any() and np.allclose(median[0, :2], 1.0)
