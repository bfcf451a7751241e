"""Fact-checking detectors over a relation's degenerate knowledge neurons (DKN). Pure torch, no Lightning.

The relation's neuron set comes from :mod:`knlight.factcheck.relation_sets`; the forwards behind the features
from :mod:`knlight.factcheck.readouts`.

**Per-claim features** (:func:`claim_features`, one row of :data:`FEATURES` per claim):

* ``amig``: mean IG attribution of the candidate over the relation's set (IG on the set's layers only);
* ``log_prob``, ``rank``, ``n_tokens``: the model's own log P(candidate) (sum over its tokens, gold prefix
  teacher-forced), the rank of its first token among the whole vocabulary (1 = the model's top prediction) and
  the candidate's number of tokens;
* ``gxa_*``: one forward and one backward, no IG path: gradient × activation of log P(candidate) at each
  set neuron (summed over the candidate's target positions); mean, min and max over the set;
* ``act_*``: the set neurons' raw activations at the target positions (mean over positions); mean, min and
  max over the set. **Caveat**: for a single-token candidate the activation at the target position does not
  depend on the candidate at all (a causal LM has not seen it yet; a masked LM sees a [MASK]), so these
  features are identical for every candidate of a query and can only tell known from unknown facts, not true
  from false candidates. They are kept as the literal "activations at the DKN" detector, for comparison.

**Detectors** turn features into a *falseness score* (higher = more likely false, the positive class of
:mod:`knlight.factcheck.claims`); a claim is flagged false when its score exceeds the detector's threshold:

* ``amig``: ``−amig`` (flagged when the mean attribution is below λ = −threshold);
* ``prob``: ``−log_prob``; ``prob_mean``: ``−log_prob / n_tokens`` (per token: a summed log P favours short
  candidates, so wrong objects with more tokens look false even to a random model); ``rank``: ``rank``;
* ``fast``: ``−gxa_mean``;
* ``fast_lr`` / ``act_lr``: P(false) of a logistic regression on the ``gxa_*`` / ``act_*`` features, fit on
  the training split's claims (:class:`LogisticDetector`).

:func:`flagged` is the decision rule shared by every table and file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from knlight.errors import DataError
from knlight.factcheck.claims import FALSE_CLAIM, TRUE_CLAIM
from knlight.factcheck.readouts import amig_attribution, readout
from knlight.lm.prompts import EncodedQuery
from knlight.neurons.neuron import Neuron

FEATURES: tuple[str, ...] = (
    "amig", "log_prob", "rank", "gxa_mean", "gxa_min", "gxa_max", "act_mean", "act_min", "act_max", "n_tokens",
)  # fmt: skip
"""Columns of a claim's feature row (see the module documentation)."""
COLUMN = {name: i for i, name in enumerate(FEATURES)}
DETECTORS: tuple[str, ...] = ("amig", "prob", "prob_mean", "rank", "fast", "fast_lr", "act_lr")
"""Every detector, in table order."""
LR_FEATURES: dict[str, tuple[str, ...]] = {
    "fast_lr": ("gxa_mean", "gxa_min", "gxa_max"),
    "act_lr": ("act_mean", "act_min", "act_max"),
}
"""Feature columns of each logistic-regression detector."""
NEEDS_SETS: tuple[str, ...] = ("amig", "fast", "fast_lr", "act_lr")
"""The detectors that read a relation's neuron set (the others need none)."""


# -- per-claim features
# ------------------------------------------------------------------------------------------------


def claim_features(
    lm: Any,
    encoded: EncodedQuery,
    neurons: Sequence[Neuron],
    amig: bool = True,
    **ig_options: Any,
) -> torch.Tensor:
    """One row of :data:`FEATURES` (float64) for a claim; ``amig`` is NaN when not computed."""
    row = torch.full((len(FEATURES),), math.nan, dtype=torch.float64)
    read = readout(lm, encoded, neurons)
    row[COLUMN["log_prob"]] = read.log_prob
    row[COLUMN["rank"]] = read.rank
    row[COLUMN["n_tokens"]] = len(encoded.targets)
    for prefix, values in (("gxa", read.grad_x_act), ("act", read.activation)):
        if values.numel():
            row[COLUMN[f"{prefix}_mean"]] = float(values.double().mean())
            row[COLUMN[f"{prefix}_min"]] = float(values.min())
            row[COLUMN[f"{prefix}_max"]] = float(values.max())
    if amig:
        row[COLUMN["amig"]] = amig_attribution(lm, encoded, neurons, **ig_options)
    return row


# -- detectors
# ---------------------------------------------------------------------------------------------------------


@dataclass
class LogisticDetector:
    """Logistic regression P(false | features), fit in torch (L-BFGS, L2, standardised inputs).

    Attributes:
        columns: Feature names (columns of :data:`FEATURES`).
        mean: Per-feature mean of the training features.
        std: Per-feature standard deviation (1 where constant).
        weight: Coefficients on standardised features.
        bias: Intercept.
    """

    columns: tuple[str, ...]
    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def fit(
        cls, features: torch.Tensor, labels: torch.Tensor, columns: Sequence[str], l2: float = 1e-2
    ) -> LogisticDetector:
        """Fit on training claims.

        Args:
            features: ``[n, len(FEATURES)]`` feature rows.
            labels: ``[n]`` labels (:data:`~knlight.factcheck.claims.FALSE_CLAIM` = 1 is the positive class).
            columns: The feature names to use.
            l2: L2 penalty on the coefficients (the intercept is not penalised).
        """
        x = features[:, [COLUMN[c] for c in columns]].double()
        y = labels.double()
        keep = torch.isfinite(x).all(1)
        x, y = x[keep], y[keep]
        if x.shape[0] == 0:
            raise ValueError(f"no training claim has finite {', '.join(columns)} features to fit on")
        mean = x.mean(0)
        std = x.std(0, unbiased=False)
        std = torch.where(std > 1e-12, std, torch.ones_like(std))
        z = (x - mean) / std
        weight = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
        prior = y.mean().clamp(1e-3, 1 - 1e-3)
        bias = torch.log(prior / (1 - prior)).reshape(1).clone().requires_grad_(True)
        optimiser = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimiser.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ weight + bias, y)
            loss = loss + l2 * weight.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimiser.step(closure)
        return cls(tuple(columns), mean, std, weight.detach(), bias.detach()[0])

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """P(false) of each row of ``[n, len(FEATURES)]`` features (NaN where a feature is missing)."""
        x = features[:, [COLUMN[c] for c in self.columns]].double()
        return torch.sigmoid(((x - self.mean) / self.std) @ self.weight + self.bias)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready coefficients."""
        return {
            "columns": list(self.columns),
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "weight": self.weight.tolist(),
            "bias": float(self.bias),
        }


def fit_logistic_detectors(
    detectors: Sequence[str], features: torch.Tensor, labels: torch.Tensor, l2: float = 1e-2
) -> dict[str, LogisticDetector]:
    """The logistic-regression detectors among ``detectors`` (:data:`LR_FEATURES`), fit on training claims.

    Args:
        detectors: Detector names; those without logistic regression are skipped.
        features: ``[n, len(FEATURES)]`` feature rows of the training claims.
        labels: ``[n]`` labels of the training claims.
        l2: L2 penalty on the coefficients.

    Raises:
        DataError: When the training claims are all of one class.
    """
    wanted = [d for d in detectors if d in LR_FEATURES]
    if wanted and len(set(labels.tolist())) < 2:
        raise DataError("the train split's claims are all of one class; the logistic detectors need both")
    return {d: LogisticDetector.fit(features, labels, LR_FEATURES[d], l2) for d in wanted}


def falseness(
    detector: str, features: torch.Tensor, models: Mapping[str, LogisticDetector] | None = None
) -> torch.Tensor:
    """A detector's falseness score (higher = more likely false) for ``[n, len(FEATURES)]`` features."""
    f = features.double()
    if detector == "amig":
        return -f[:, COLUMN["amig"]]
    if detector == "prob":
        return -f[:, COLUMN["log_prob"]]
    if detector == "prob_mean":
        return -f[:, COLUMN["log_prob"]] / f[:, COLUMN["n_tokens"]]
    if detector == "rank":
        return f[:, COLUMN["rank"]]
    if detector == "fast":
        return -f[:, COLUMN["gxa_mean"]]
    if detector in LR_FEATURES:
        if models is None or detector not in models:
            raise ValueError(f"detector {detector!r} needs a fitted LogisticDetector")
        return models[detector].predict(f)
    raise ValueError(f"unknown detector {detector!r}; choose among {', '.join(DETECTORS)}")


def flagged(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Predicted labels: :data:`FALSE_CLAIM` where ``score > threshold``, else :data:`TRUE_CLAIM`."""
    return torch.where(scores > threshold, FALSE_CLAIM, TRUE_CLAIM).long()
