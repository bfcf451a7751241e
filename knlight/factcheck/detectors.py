"""Fact-checking detectors over a relation's degenerate knowledge neurons (DKN). Pure torch, no Lightning.

**Relation sets (AMIG).** For each training fact, the DKN pairs of its top-K neurons (AMIG Algorithm 1,
:func:`knlight.neurons.selection.degenerate_neurons`) are counted per relation; the relation's set is every
neuron whose count is more than ``t · max count`` (t = 0.7). When a relation has training facts but no DKN
pair (e.g. a random model), the ``top`` fallback applies the same rule to the counts of the facts' top-K
neurons instead; a relation without any training fact uses the pooled counts of all relations. The source of
each set (``dkn``, ``top``, ``pooled-dkn``, ``pooled-top``) is recorded, never hidden.

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
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from knlight.lm.hooks import edit_activations
from knlight.lm.prompts import EncodedQuery
from knlight.lm.upstream import last_hidden_state
from knlight.neurons.attribution import attribute_batch
from knlight.neurons.interventions import Neuron

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
SetSource = Literal["dkn", "top", "pooled-dkn", "pooled-top"]


# -- relation sets
# -----------------------------------------------------------------------------------------------------


@dataclass
class RelationSet:
    """The neuron set of one relation.

    Attributes:
        relation: Relation id.
        neurons: The set, by decreasing count then (layer, index).
        source: ``dkn`` (DKN pair counts), ``top`` (top-K counts: no DKN pair among the relation's training
            facts), ``pooled-dkn`` / ``pooled-top`` (the relation has no training fact: counts of all
            relations).
        train_claims: Training (true) claims of the relation that contributed.
        pairs: DKN groups (pairs, and larger sets when counted) that were counted.
        counts: Count of each neuron of the set.
    """

    relation: str
    neurons: list[Neuron]
    source: SetSource
    train_claims: int
    pairs: int
    counts: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (neurons as ``[layer, index]``)."""
        return {
            "relation": self.relation,
            "source": self.source,
            "train_claims": self.train_claims,
            "pairs": self.pairs,
            "neurons": [list(n) for n in self.neurons],
            "counts": self.counts,
        }


def frequent(counts: Mapping[Neuron, int], t: float) -> list[Neuron]:
    """Neurons whose count is more than ``t · max count`` (AMIG's rule), by decreasing count then position."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1] (a fraction of the largest count), got {t}")
    if not counts:
        return []
    top = max(counts.values())
    return sorted((n for n, c in counts.items() if c > t * top), key=lambda n: (-counts[n], n))


def relation_sets(
    relations: Iterable[str],
    groups: Mapping[str, Sequence[Sequence[Sequence[Neuron]]]],
    tops: Mapping[str, Sequence[Sequence[Neuron]]],
    t: float = 0.7,
    fallback: Literal["top", "none"] = "top",
) -> dict[str, RelationSet]:
    """Each relation's neuron set from its training facts' DKN pairs (see the module documentation).

    Args:
        relations: Every relation to be checked (validation and test relations included).
        groups: Per relation, one list per training claim of its degenerate groups (DKN pairs, and larger
            sets when wanted); each member of a group counts once.
        tops: Per relation, the top-K neurons of each training claim (for the ``top`` fallback).
        t: Keep neurons counted more than ``t · max``.
        fallback: ``top``: a relation without DKN pairs uses its top-K counts; ``none``: that is an error.

    Returns:
        ``{relation: RelationSet}``.

    Raises:
        ValueError: When a relation ends up with no neuron (no training data at all, or ``fallback: none``
            and no DKN pair).
    """

    def group_counts(lists: Iterable[Sequence[Sequence[Neuron]]]) -> tuple[Counter[Neuron], int]:
        counts: Counter[Neuron] = Counter()
        n = 0
        for claim_groups in lists:
            for group in claim_groups:
                counts.update(dict.fromkeys(group, 1))
                n += 1
        return counts, n

    def top_counts(lists: Iterable[Sequence[Neuron]]) -> Counter[Neuron]:
        return Counter(n for top in lists for n in dict.fromkeys(top))

    out: dict[str, RelationSet] = {}
    pooled_groups, pooled_n = group_counts(g for r in groups for g in groups[r])
    pooled_top = top_counts(x for r in tops for x in tops[r])
    for relation in sorted(set(relations)):
        n_claims = len(groups.get(relation, ()))
        counts, n_pairs = group_counts(groups.get(relation, ()))
        source: SetSource = "dkn"
        if not n_claims:
            counts, n_pairs, source = pooled_groups, pooled_n, "pooled-dkn"
        if not counts and fallback == "top":
            counts = top_counts(tops.get(relation, ())) if n_claims else pooled_top
            source = "top" if n_claims else "pooled-top"
        neurons = frequent(counts, t)
        if not neurons:
            why = (
                "no DKN pair among its training facts (use fallback: top)" if n_claims
                else "no training fact and no pooled neuron"
            )  # fmt: skip
            raise ValueError(f"relation {relation}: no neuron set ({why})")
        out[relation] = RelationSet(
            relation, neurons, source, n_claims, n_pairs, [counts[n] for n in neurons]
        )
    return out


# -- per-claim features
# ------------------------------------------------------------------------------------------------


@dataclass
class Readout:
    """What one forward and one backward say about a claim.

    Attributes:
        log_prob: log P(candidate) (sum over its tokens, gold prefix teacher-forced).
        rank: Rank of the candidate's first token among the vocabulary at its target (1 = top prediction;
            ties count in the candidate's favour).
        activation: ``[n]`` activation of each neuron at the target positions (mean over positions).
        grad_x_act: ``[n]`` activation × ∂ log P(answer token)/∂ activation at that token's target position,
            summed over the candidate's tokens.
    """

    log_prob: float
    rank: int
    activation: torch.Tensor
    grad_x_act: torch.Tensor


def readout(lm: Any, encoded: EncodedQuery, neurons: Sequence[Neuron]) -> Readout:
    """log P, rank, activations and gradient × activation of one encoded claim (one forward, no IG path).

    Gradient × activation follows the IG definition of DESIGN.md at α = 1 (it equals one-step right-Riemann IG
    from a zero baseline with ``objective="log_prob"``): answer token k is credited through its own target
    position only, ``Σ_k a_{p_k} · ∂ log P(y_k) / ∂ a_{p_k}`` (one backward per answer token through the
    same graph). Gradients are taken with respect to zero-valued offsets added to each selected layer's
    activation, so every path from that layer to the output counts (also through selected layers above it).

    Args:
        lm: A :class:`knlight.LanguageModel`.
        encoded: The query encoded with the candidate as its answer.
        neurons: The neurons to read (may be empty: only log P and rank).
    """
    layers = sorted({layer for layer, _ in neurons})
    device = lm.device
    ids = torch.tensor([encoded.input_ids], device=device)
    positions = torch.tensor([p for p, _ in encoded.targets], device=device)
    tokens = torch.tensor([t for _, t in encoded.targets], device=device)
    rows = torch.tensor([layers.index(layer) for layer, _ in neurons], dtype=torch.long)
    cols = torch.tensor([index for _, index in neurons], dtype=torch.long)
    acts: dict[int, torch.Tensor] = {}
    offsets: dict[int, torch.Tensor] = {}

    def hook(layer: int) -> Any:
        def edit(h: torch.Tensor) -> torch.Tensor:
            acts[layer] = h.detach()
            offsets[layer] = torch.zeros_like(h, requires_grad=True)
            return h + offsets[layer]

        return edit

    gxa = torch.zeros(len(neurons), dtype=torch.float64)
    with ExitStack() as stack, torch.enable_grad():
        for layer in layers:
            stack.enter_context(edit_activations(lm.sites.out_projs[layer], hook(layer)))
        hidden = last_hidden_state(lm.model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids)))
        logits = lm.head(hidden[0, positions]).float()
        log_p = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0]
        for k, position in enumerate(positions.tolist()):
            if not neurons:
                break
            retain = k + 1 < len(positions)
            grads = torch.autograd.grad(log_p[k], [offsets[layer] for layer in layers], retain_graph=retain)
            at = torch.stack([g[0, position] for g in grads]).double().cpu()  # [layers, d_ff]
            here = torch.stack([acts[layer][0, position] for layer in layers]).double().cpu()
            gxa += (here * at)[rows, cols]
    rank = 1 + int((logits[0] > logits[0, tokens[0]]).sum())
    if neurons:
        at_targets = torch.stack([acts[layer][0, positions] for layer in layers]).float().cpu()  # [L, K, d]
        activation = at_targets[rows, :, cols].mean(1)
    else:
        activation = torch.zeros(0)
    return Readout(
        log_prob=float(log_p.sum().detach()), rank=rank, activation=activation, grad_x_act=gxa.float()
    )


def amig_attribution(lm: Any, encoded: EncodedQuery, neurons: Sequence[Neuron], **ig_options: Any) -> float:
    """Mean IG attribution of the claim's candidate over ``neurons`` (IG of the neurons' layers only).

    Args:
        lm: A :class:`knlight.LanguageModel`.
        encoded: The query encoded with the candidate as its answer.
        neurons: The relation's set (non-empty).
        ig_options: Passed to :func:`knlight.neurons.attribution.attribute_batch` (steps, baseline, ...).
    """
    if not neurons:
        raise ValueError("the AMIG detector needs a non-empty neuron set")
    layers = sorted({layer for layer, _ in neurons})
    slot = {layer: i for i, layer in enumerate(layers)}
    with torch.enable_grad():
        result = attribute_batch(lm, [encoded], layers=layers, completeness=False, **ig_options)
    rows = torch.tensor([slot[layer] for layer, _ in neurons])
    cols = torch.tensor([index for _, index in neurons])
    return float(result.scores[0][rows, cols].double().mean())


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
