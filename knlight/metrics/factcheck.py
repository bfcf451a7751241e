"""Fact-checking metrics: claim scores gathered across processes (de-duplicated), thresholds, tables, curves.

The positive class is :data:`knlight.factcheck.claims.FALSE_CLAIM` ("the claim is false"), everywhere:

* a detector's *falseness score* ``s`` is higher for claims it thinks false; the claim is **flagged**
  (predicted positive) when ``s > threshold``;
* TP = false claim flagged, FP = true claim flagged, FN = false claim not flagged, TN = true claim not
  flagged;
  precision = TP / (TP + FP), recall = TP / (TP + FN) (0 when the denominator is 0), F1 their harmonic mean;
  a group without any false claim has no recall or F1 (NaN, with the reason in the ``undefined`` column);
* AUROC is computed on the rank of ``s`` (ties kept), so torchmetrics never squashes large scores together;
  it is NaN for a group with only one class.

:class:`ClaimScores` holds ``(claim_id, label, features)`` rows; under DDP its states are concatenated across
processes and ``compute`` keeps one row per claim id, so the padding duplicates of ``DistributedSampler``
never count twice and the totals equal a single-process run. Thresholds are chosen by :func:`choose_threshold`
(maximum F1) on the validation split only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchmetrics import Metric
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryConfusionMatrix,
    BinaryF1Score,
    BinaryPrecision,
    BinaryPrecisionRecallCurve,
    BinaryRecall,
    BinaryROC,
)
from torchmetrics.utilities import dim_zero_cat

from knlight.factcheck.claims import FALSE_CLAIM, POSITIVE_CLASS
from knlight.factcheck.detectors import flagged

METRICS: tuple[str, ...] = ("precision", "recall", "f1", "accuracy", "auroc")


class ClaimScores(Metric):
    """Per-claim rows ``(claim_id, label, features)``, concatenated across processes, de-duplicated by id.

    Args:
        num_features: Width of a feature row.
        kwargs: Passed to ``torchmetrics.Metric``.
    """

    full_state_update = False
    # Lists of tensors before a DDP sync, one concatenated tensor after it.
    ids: list[torch.Tensor] | torch.Tensor
    labels: list[torch.Tensor] | torch.Tensor
    features: list[torch.Tensor] | torch.Tensor

    def __init__(self, num_features: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_features = num_features
        self.add_state("ids", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("features", default=[], dist_reduce_fx="cat")

    def update(self, ids: torch.Tensor, labels: torch.Tensor, features: torch.Tensor) -> None:
        """Add rows: ``ids`` ``[n]``, ``labels`` ``[n]`` and ``features`` ``[n, num_features]``."""
        if not (ids.shape[0] == labels.shape[0] == features.shape[0]) or features.shape[1:] != (
            self.num_features,
        ):
            raise ValueError(
                f"rows must be [n], [n], [n, {self.num_features}]; got {tuple(ids.shape)}, "
                f"{tuple(labels.shape)}, {tuple(features.shape)}"
            )
        assert isinstance(self.ids, list) and isinstance(self.labels, list)
        assert isinstance(self.features, list)
        self.ids.append(ids.long())
        self.labels.append(labels.long())
        self.features.append(features.double())

    def add(self, ids: Sequence[int], labels: Sequence[int], rows: Sequence[torch.Tensor]) -> None:
        """Add claims: their ids, labels and ``[num_features]`` feature rows (on the metric's device)."""
        device = self.device
        self.update(
            torch.tensor(list(ids), dtype=torch.long, device=device),
            torch.tensor(list(labels), dtype=torch.long, device=device),
            (torch.stack(list(rows)) if rows else torch.zeros(0, self.num_features, dtype=torch.float64)).to(
                device
            ),
        )

    def collect(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`compute`, then :meth:`reset`. Under DDP every process must call it (it synchronises)."""
        # An empty update keeps the list states non-empty on a process that scored nothing.
        self.add([], [], [])
        out = self.compute()
        self.reset()
        return out

    def compute(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids, labels, features)`` of every process, one row per claim id (sorted by id).

        Raises:
            RuntimeError: When two rows of one claim disagree (a claim must be scored identically wherever it
                is scored).
        """
        ids = _cat(self.ids, torch.zeros(0, dtype=torch.long))
        labels = _cat(self.labels, torch.zeros(0, dtype=torch.long))
        features = _cat(self.features, torch.zeros(0, self.num_features, dtype=torch.float64))
        features = features.reshape(-1, self.num_features)
        return deduplicate(ids, labels, features)


def _cat(state: list[torch.Tensor] | torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    if isinstance(state, torch.Tensor):
        return state.cpu()
    return dim_zero_cat(state).cpu() if state else empty


def deduplicate(
    ids: torch.Tensor, labels: torch.Tensor, features: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row per id (sorted); duplicates must agree (NaNs equal) or a RuntimeError names the claim."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    first = torch.full((unique.shape[0],), ids.shape[0], dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(ids.shape[0]), reduce="amin")
    same_label = labels == labels[first][inverse]
    same_features = (features == features[first][inverse]) | (
        features.isnan() & features[first][inverse].isnan()
    )
    bad = ~(same_label & same_features.all(1))
    if bad.any():
        raise RuntimeError(
            f"claim {int(ids[bad][0])} was scored twice with different results; every claim must be scored "
            "alone (independent of its batch-mates) for DDP totals to be exact"
        )
    return unique, labels[first], features[first]


def as_unit_interval(scores: torch.Tensor) -> torch.Tensor:
    """Monotone map of scores onto [0, 1] by rank (ties kept), for torchmetrics' probability inputs."""
    if scores.numel() == 0:
        return scores.float()
    _, inverse = torch.unique(scores, sorted=True, return_inverse=True)
    top = max(int(inverse.max()), 1)
    return inverse.double() / top


def confusion(predicted: torch.Tensor, labels: torch.Tensor) -> dict[str, int]:
    """TP, FP, FN, TN with the positive class :data:`FALSE_CLAIM` (torchmetrics' binary confusion matrix)."""
    matrix = BinaryConfusionMatrix()(_positive(predicted), _positive(labels))
    # torchmetrics: rows = target (0, 1), columns = prediction (0, 1); 1 = positive = false claim.
    return {
        "tp": int(matrix[1, 1]),
        "fp": int(matrix[0, 1]),
        "fn": int(matrix[1, 0]),
        "tn": int(matrix[0, 0]),
    }


def _positive(labels: torch.Tensor) -> torch.Tensor:
    """1 for the positive class (false claim), 0 otherwise: what torchmetrics' binary metrics count."""
    return (labels == FALSE_CLAIM).long()


def binary_metrics(scores: torch.Tensor, labels: torch.Tensor, threshold: float) -> dict[str, Any]:
    """Precision, recall, F1, accuracy (flag when ``score > threshold``) and AUROC, plus the counts.

    Args:
        scores: ``[n]`` falseness scores.
        labels: ``[n]`` claim labels (:data:`FALSE_CLAIM` is the positive class).
        threshold: Decision threshold.

    Returns:
        ``n``, ``false_claims``, ``tp``, ``fp``, ``fn``, ``tn``, ``precision``, ``recall``, ``f1``,
        ``accuracy``, ``auroc`` (NaN everywhere when there is no claim; AUROC NaN with one class; recall and
        F1 NaN without a false claim) and ``undefined`` (why a metric is NaN, empty otherwise).
    """
    n = int(labels.numel())
    target = _positive(labels)
    out: dict[str, Any] = {"n": n, "false_claims": int(target.sum())}
    if n == 0:
        return {**out, "tp": 0, "fp": 0, "fn": 0, "tn": 0, **{m: math.nan for m in METRICS},
                "undefined": "no claims"}  # fmt: skip
    predicted = _positive(flagged(scores, threshold))
    out.update(confusion(flagged(scores, threshold), labels))
    out["precision"] = float(BinaryPrecision()(predicted, target))
    out["recall"] = float(BinaryRecall()(predicted, target))
    out["f1"] = float(BinaryF1Score()(predicted, target))
    out["accuracy"] = float(BinaryAccuracy()(predicted, target))
    one_class = int(target.sum()) in (0, n)
    out["auroc"] = math.nan if one_class else float(BinaryAUROC()(as_unit_interval(scores), target))
    out["undefined"] = ""
    if out["false_claims"] == 0:
        # Without a positive (false) claim, recall and F1 have no meaning: report them as undefined, not 0.
        out["recall"] = out["f1"] = math.nan
        if out["tp"] + out["fp"] == 0:
            out["precision"] = math.nan
        out["undefined"] = "no false claims: recall, F1 and AUROC are undefined"
    elif out["false_claims"] == n:
        out["undefined"] = "no true claims: AUROC is undefined"
    return out


def choose_threshold(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """The threshold that maximises F1 (positive class: false claim) of ``score > threshold``.

    Candidates are the midpoints between consecutive distinct scores, one below the lowest (flag all) and the
    highest score (flag none). Ties in F1 go to the higher accuracy, then to the lower threshold. Call it on
    the validation split only.

    Raises:
        ValueError: When there is no finite score to choose from.
    """
    keep = torch.isfinite(scores)
    s, y = scores[keep].double(), _positive(labels[keep])
    if s.numel() == 0:
        raise ValueError("no finite score to choose a threshold from (empty validation split?)")
    values = torch.unique(s)
    candidates = torch.cat([values[:1] - 1.0, (values[1:] + values[:-1]) / 2, values[-1:]])
    flag = s[None, :] > candidates[:, None]  # [C, n]
    tp = (flag & (y[None] == 1)).sum(1).double()
    fp = (flag & (y[None] == 0)).sum(1).double()
    fn = (~flag & (y[None] == 1)).sum(1).double()
    f1 = torch.where(tp > 0, 2 * tp / (2 * tp + fp + fn), torch.zeros_like(tp))
    accuracy = (flag == (y[None] == 1)).double().mean(1)
    best = max(
        range(len(candidates)), key=lambda c: (float(f1[c]), float(accuracy[c]), -float(candidates[c]))
    )
    return float(candidates[best])


def complete_thresholds(
    thresholds: Mapping[str, float],
    sources: Mapping[str, str],
    scores: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    source: str,
) -> tuple[dict[str, float], dict[str, str]]:
    """The thresholds with one for every detector of ``scores`` that has none, chosen on these claims.

    Args:
        thresholds: Detector → threshold already fixed (given, or chosen earlier); kept as they are.
        sources: Detector → where its threshold came from.
        scores: Detector → ``[n]`` falseness scores of the claims to choose on.
        labels: ``[n]`` labels of those claims.
        source: Recorded as the source of the chosen thresholds (e.g. ``val``).

    Returns:
        ``(thresholds, sources)``: new dicts, the chosen detectors added in the order of ``scores``
        (:func:`choose_threshold`: maximum F1).
    """
    chosen, where = dict(thresholds), dict(sources)
    for detector, s in scores.items():
        if detector not in chosen:
            chosen[detector] = choose_threshold(s, labels)
            where[detector] = source
    return chosen, where


def results_table(
    split: str,
    scores: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    thresholds: Mapping[str, float],
    groups: Mapping[str, Sequence[str]],
) -> list[dict[str, Any]]:
    """One row per (detector, group): ``all``, then each value of each grouping (e.g. language, relation).

    Args:
        split: Name of the evaluated split (``val``/``test``), copied into each row.
        scores: Detector → ``[n]`` falseness scores of the claims.
        labels: ``[n]`` claim labels.
        thresholds: Detector → threshold.
        groups: Grouping name (``language``, ``relation``) → the ``[n]`` group value of each claim.
    """
    rows = []
    for detector, s in scores.items():
        selections: list[tuple[str, str, torch.Tensor]] = [
            ("all", "all", torch.ones_like(labels, dtype=torch.bool))
        ]
        for name, values in groups.items():
            for value in sorted(set(values)):
                selections.append((name, value, torch.tensor([v == value for v in values], dtype=torch.bool)))
        for group_by, group, mask in selections:
            metrics = binary_metrics(s[mask], labels[mask], thresholds[detector])
            rows.append(
                {"split": split, "detector": detector, "group_by": group_by, "group": group,
                 "threshold": thresholds[detector], "positive": POSITIVE_CLASS, **metrics}
            )  # fmt: skip
    return rows


def curves(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """ROC (``fpr``, ``tpr``) and precision-recall (``precision``, ``recall``) curves (positive: false
    claim)."""
    target = _positive(labels)
    unit = as_unit_interval(scores).float()
    fpr, tpr, _ = BinaryROC()(unit, target)
    precision, recall, _ = BinaryPrecisionRecallCurve()(unit, target)
    return {"fpr": fpr, "tpr": tpr, "precision": precision, "recall": recall}


def curve_figures(scores: Mapping[str, torch.Tensor], labels: torch.Tensor, title: str) -> dict[str, Any]:
    """Matplotlib (Agg) figures ``{"pr": ..., "roc": ...}`` with one curve per detector."""
    import matplotlib

    matplotlib.use("Agg")  # headless nodes
    import matplotlib.pyplot as plt

    prevalence = float(_positive(labels).double().mean()) if labels.numel() else math.nan
    pr, pr_ax = plt.subplots(figsize=(5.5, 4.5))
    roc, roc_ax = plt.subplots(figsize=(5.5, 4.5))
    for detector, s in scores.items():
        keep = torch.isfinite(s)
        if keep.sum() == 0 or _positive(labels[keep]).unique().numel() < 2:
            continue
        c = curves(s[keep], labels[keep])
        auroc = binary_metrics(s[keep], labels[keep], math.inf)["auroc"]
        pr_ax.plot(c["recall"].numpy(), c["precision"].numpy(), label=detector)
        roc_ax.plot(c["fpr"].numpy(), c["tpr"].numpy(), label=f"{detector} (AUROC {auroc:.2f})")
    pr_ax.axhline(prevalence, color="grey", linestyle=":", label=f"chance ({prevalence:.2f})")
    roc_ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    pr_ax.set(
        xlabel="recall", ylabel="precision", title=f"{title}: precision-recall ({POSITIVE_CLASS} = positive)"
    )
    roc_ax.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        title=f"{title}: ROC ({POSITIVE_CLASS} = positive)",
    )
    for fig, ax in ((pr, pr_ax), (roc, roc_ax)):
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=8, loc="lower left" if fig is pr else "lower right")
        ax.title.set_fontsize(9)
        fig.tight_layout()
    return {"pr": pr, "roc": roc}
