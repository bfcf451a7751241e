"""Fact-checking metrics: positive class "claim is false", thresholds, de-duplication, AUROC on ranks."""

from __future__ import annotations

import math

import pytest
import torch

from knlight.factcheck.claims import FALSE_CLAIM, TRUE_CLAIM
from knlight.metrics.factcheck import (
    ClaimScores,
    as_unit_interval,
    binary_metrics,
    choose_threshold,
    flagged,
    results_table,
)

F, T = FALSE_CLAIM, TRUE_CLAIM


def hand_made() -> tuple[torch.Tensor, torch.Tensor]:
    """3 TP (false claims flagged), 1 FP (true claim flagged), 2 FN (false claims missed), 2 TN."""
    labels = torch.tensor([F, F, F, T, F, F, T, T])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.2, 0.1, 0.3, 0.0])  # flagged when > 0.5
    return scores, labels


def test_precision_recall_with_false_claim_as_positive_class() -> None:
    scores, labels = hand_made()
    m = binary_metrics(scores, labels, threshold=0.5)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (3, 1, 2, 2)
    assert m["precision"] == pytest.approx(0.75)  # 3 / (3 + 1)
    assert m["recall"] == pytest.approx(0.6)  # 3 / (3 + 2); the AMIG code's swap would give P=0.6, R=0.75
    assert m["f1"] == pytest.approx(2 * 0.75 * 0.6 / (0.75 + 0.6))
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["n"] == 8 and m["false_claims"] == 5
    # AUROC: of the 5 x 3 (false, true) pairs, the false claim scores higher in 3 + 3 + 3 + 1 + 1 = 11.
    assert m["auroc"] == pytest.approx(11 / 15)


def test_flagging_is_strictly_above_the_threshold() -> None:
    assert flagged(torch.tensor([0.4, 0.5, 0.6]), 0.5).tolist() == [T, T, F]


def test_auroc_uses_ranks_so_large_scores_do_not_saturate() -> None:
    labels = torch.tensor([T, F, T, F])
    scores = torch.tensor([1000.0, 1001.0, 1002.0, 1003.0], dtype=torch.float64)  # sigmoid(x) == 1.0 for all
    assert binary_metrics(scores, labels, 0.0)["auroc"] == pytest.approx(0.75)
    unit = as_unit_interval(torch.tensor([3.0, 1.0, 3.0, 2.0]))
    assert unit.tolist() == [1.0, 0.0, 1.0, 0.5]  # ties kept


def test_auroc_is_nan_with_one_class_and_everything_nan_when_empty() -> None:
    assert math.isnan(binary_metrics(torch.tensor([0.1, 0.2]), torch.tensor([F, F]), 0.0)["auroc"])
    empty = binary_metrics(torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.0)
    assert empty["n"] == 0 and math.isnan(empty["f1"])


def test_choose_threshold_maximises_f1() -> None:
    labels = torch.tensor([T, T, F, F, F])
    scores = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    threshold = choose_threshold(scores, labels)
    assert 0.2 < threshold < 0.3  # separates perfectly
    assert binary_metrics(scores, labels, threshold)["f1"] == 1.0
    # Overlapping classes: the best F1 over every cut.
    labels = torch.tensor([T, F, T, F, F, T])
    scores = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    threshold = choose_threshold(scores, labels)
    best = max(binary_metrics(scores, labels, c)["f1"] for c in (-1.0, 0.15, 0.25, 0.35, 0.45, 0.55, 0.6))
    assert binary_metrics(scores, labels, threshold)["f1"] == pytest.approx(best)


def test_choose_threshold_ignores_non_finite_and_refuses_empty() -> None:
    labels = torch.tensor([T, F, F])
    assert 0.1 < choose_threshold(torch.tensor([0.1, 0.9, math.nan]), labels) < 0.9
    with pytest.raises(ValueError, match="no finite score"):
        choose_threshold(torch.zeros(0), torch.zeros(0, dtype=torch.long))


def test_claim_scores_deduplicates_padding_repeats_and_refuses_disagreements() -> None:
    metric = ClaimScores(2)
    metric.update(torch.tensor([3, 1]), torch.tensor([F, T]), torch.tensor([[1.0, math.nan], [2.0, 0.0]]))
    metric.update(torch.tensor([2, 3]), torch.tensor([T, F]), torch.tensor([[0.5, 0.5], [1.0, math.nan]]))
    ids, labels, features = metric.compute()
    assert ids.tolist() == [1, 2, 3] and labels.tolist() == [T, T, F]
    assert features[2, 0] == 1.0 and math.isnan(features[2, 1])
    metric.reset()
    metric.update(torch.tensor([1, 1]), torch.tensor([F, F]), torch.tensor([[1.0, 0.0], [1.5, 0.0]]))
    with pytest.raises(RuntimeError, match="claim 1 was scored twice"):
        metric.compute()


def test_results_table_groups() -> None:
    scores, labels = hand_made()
    languages = ["en", "de"] * 4
    rows = results_table("test", {"prob": scores}, labels, {"prob": 0.5}, {"language": languages})
    assert [(r["group_by"], r["group"]) for r in rows] == [
        ("all", "all"),
        ("language", "de"),
        ("language", "en"),
    ]
    assert sum(r["n"] for r in rows[1:]) == rows[0]["n"] == 8
    assert sum(r["tp"] for r in rows[1:]) == rows[0]["tp"] == 3
    assert all(r["positive"] == "false claim" for r in rows)
