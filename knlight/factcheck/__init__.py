"""Fact-checking with degenerate knowledge neurons. Pure Python and torch: no Lightning.

* :mod:`~knlight.factcheck.claims`: claims built from RML-LAMA records; the positive class ("the claim is
  false", :data:`FALSE_CLAIM`) is defined there, once;
* :mod:`~knlight.factcheck.relation_sets`: each relation's neuron set from the DKN of its training claims
  (AMIG), searched without a Trainer (:func:`search_relation_sets`);
* :mod:`~knlight.factcheck.readouts`: the one-forward readout (log P, rank, gradient × activation) and the AMIG
  attribution of a claim;
* :mod:`~knlight.factcheck.detectors`: per-claim features, falseness scores, logistic regressions;
* :mod:`~knlight.factcheck.results`: the files written for an evaluated split.

The Lightning loop is :class:`knlight.tasks.factcheck.FactCheckModule` (with
:class:`knlight.tasks.factcheck.FactCheckDataModule`); the metrics are in :mod:`knlight.metrics.factcheck`.
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
    claim_features,
    falseness,
    flagged,
)
from knlight.factcheck.readouts import Readout, amig_attribution, encode_claim, readout
from knlight.factcheck.relation_sets import DKNSearch, RelationSet, search_relation_sets

# ``relation_sets`` (the counting rule) is not re-exported: the name is its module's.
__all__ = [
    "DETECTORS",
    "FALSE_CLAIM",
    "FEATURES",
    "POSITIVE_CLASS",
    "TRUE_CLAIM",
    "Claim",
    "DKNSearch",
    "LogisticDetector",
    "Readout",
    "RelationSet",
    "amig_attribution",
    "build_claims",
    "claim_counts",
    "claim_features",
    "encode_claim",
    "falseness",
    "flagged",
    "label_of",
    "readout",
    "search_relation_sets",
    "split_claims",
]
