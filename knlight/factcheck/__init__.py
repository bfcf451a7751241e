"""Fact-checking with degenerate knowledge neurons: claims (pure Python) and detectors (pure torch).

The positive class of every metric is "the claim is false" (:data:`FALSE_CLAIM`). The Lightning loop is
:class:`knlight.tasks.factcheck.FactCheckModule` (with :class:`knlight.tasks.factcheck.FactCheckDataModule`);
the metrics are in :mod:`knlight.metrics.factcheck`.
"""

from knlight.factcheck.claims import (
    FALSE_CLAIM,
    POSITIVE_CLASS,
    TRUE_CLAIM,
    Claim,
    build_claims,
    claim_counts,
    label_of,
    split_claims,
)
from knlight.factcheck.detectors import (
    DETECTORS,
    FEATURES,
    LogisticDetector,
    Readout,
    RelationSet,
    amig_attribution,
    claim_features,
    falseness,
    readout,
    relation_sets,
)

__all__ = [
    "DETECTORS",
    "FALSE_CLAIM",
    "FEATURES",
    "POSITIVE_CLASS",
    "TRUE_CLAIM",
    "Claim",
    "LogisticDetector",
    "Readout",
    "RelationSet",
    "amig_attribution",
    "build_claims",
    "claim_counts",
    "claim_features",
    "falseness",
    "label_of",
    "readout",
    "relation_sets",
    "split_claims",
]
