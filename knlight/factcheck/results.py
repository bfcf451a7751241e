"""The files of one evaluated fact-checking split. Pure Python and torch, no Lightning.

:func:`write_split` writes, atomically, to ``<out>/``:

* ``results.csv``: the metrics table, one row per (detector, group) (:func:`knlight.metrics.factcheck.
  results_table`);
* ``results.json``: ``settings``, then :meth:`SplitResults.summary` (``split``, ``positive_class``, ``counts``,
  ``thresholds``, ``threshold_source``, ``lambda_amig``, ``reference``, ``table``), then ``relation_sets``
  and the ``logistic`` coefficients; NaN and infinities are written as null;
* ``claims.csv``: one row per claim: its identity and label, its :data:`~knlight.factcheck.detectors.FEATURES`
  and, per detector, ``score_<detector>`` (falseness) and ``flagged_<detector>`` (1 = flagged false).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from knlight.factcheck.claims import FALSE_CLAIM, POSITIVE_CLASS, Claim, claim_counts
from knlight.factcheck.detectors import COLUMN, FEATURES, LogisticDetector, flagged
from knlight.factcheck.relation_sets import RelationSet
from knlight.io import csv_text, json_safe, write_text_atomically


def reference_scores(labels: torch.Tensor) -> dict[str, float]:
    """What no-skill detectors score: flagging every claim (precision = share of false claims, recall 1) and
    chance AUROC. With mostly false claims, F1 alone says little: compare with ``f1_flag_all``."""
    share = float((labels == FALSE_CLAIM).double().mean()) if labels.numel() else math.nan
    return {"false_share": share, "f1_flag_all": 2 * share / (1 + share), "auroc_chance": 0.5}


@dataclass
class SplitResults:
    """The scored claims of one split, the thresholds applied to them and the metrics table.

    Attributes:
        split: ``val`` or ``test``.
        claims: The claims, one per claim id (sorted).
        labels: ``[n]`` labels of the claims.
        features: ``[n, len(FEATURES)]`` feature rows of the claims.
        scores: Detector → ``[n]`` falseness scores.
        thresholds: Detector → threshold (a claim is flagged false when its score is above it).
        threshold_source: Detector → where its threshold came from (``given``, ``val``, ``val (in-sample)``).
        table: The metrics table (:func:`knlight.metrics.factcheck.results_table`).
        rows_received: Rows scored over all processes, before removing the duplicates of distributed samplers.
        world_size: Number of processes.
    """

    split: str
    claims: list[Claim]
    labels: torch.Tensor
    features: torch.Tensor
    scores: dict[str, torch.Tensor]
    thresholds: dict[str, float]
    threshold_source: dict[str, str]
    table: list[dict[str, Any]]
    rows_received: int
    world_size: int

    def summary(self) -> dict[str, Any]:
        """The split's part of ``results.json`` (everything but settings, relation sets and coefficients)."""
        return {
            "split": self.split,
            "positive_class": POSITIVE_CLASS,
            "counts": {
                **claim_counts(self.claims),
                "rows_received": self.rows_received,
                "world_size": self.world_size,
            },
            "thresholds": self.thresholds,
            "threshold_source": self.threshold_source,
            "lambda_amig": -self.thresholds["amig"] if "amig" in self.thresholds else None,
            "reference": reference_scores(self.labels),
            "table": self.table,
        }

    def claim_rows(self) -> list[dict[str, Any]]:
        """The rows of ``claims.csv`` (see the module documentation)."""
        rows = []
        for k, claim in enumerate(self.claims):
            row: dict[str, Any] = {
                "claim_id": claim.claim_id, "uuid": claim.uuid, "relation": claim.relation,
                "language": claim.language, "query_id": claim.query_id, "candidate": claim.candidate,
                "label": int(self.labels[k]),
            }  # fmt: skip
            row.update({name: float(self.features[k, COLUMN[name]]) for name in FEATURES})
            for d, s in self.scores.items():
                row[f"score_{d}"] = float(s[k])
                row[f"flagged_{d}"] = int(flagged(s[k : k + 1], self.thresholds[d])[0])
            rows.append(row)
        return rows


def write_split(
    out: Path,
    results: SplitResults,
    settings: Mapping[str, Any],
    sets: Sequence[RelationSet],
    models: Mapping[str, LogisticDetector],
) -> None:
    """Writes ``results.csv``, ``results.json`` and ``claims.csv`` of a split to ``out`` (atomically).

    Args:
        out: The split's folder (created if needed).
        results: The split's claims, scores, thresholds and table.
        settings: The settings that determine the results (first entry of ``results.json``).
        sets: The relation sets the detectors used.
        models: The fitted logistic detectors.
    """
    write_text_atomically(out / "results.csv", csv_text(results.table))
    document = {
        "settings": dict(settings),
        **results.summary(),
        "relation_sets": [s.to_json() for s in sets],
        "logistic": {d: m.to_json() for d, m in models.items()},
    }
    write_text_atomically(
        out / "results.json", json.dumps(json_safe(document), indent=1, ensure_ascii=False) + "\n"
    )
    write_text_atomically(out / "claims.csv", csv_text(results.claim_rows()))
