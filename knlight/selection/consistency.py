"""Consistency of a fact's neurons across its queries (Chen et al., ICLR 2025, "Knowledge Localization: Mission
Not Accomplished? Enter Query Localization!").

Per (fact, language): the mean pairwise Jaccard similarity of its queries' coarse neuron sets (one set per
rephrasing). Facts whose neurons are the same in every rephrasing score 1; facts localised differently by each
query score near 0. The split into *consistent* and *inconsistent* facts uses a data-driven threshold: Otsu's
method on the (fact, language) scores (the split of the sorted scores that maximises the between-class
variance; the threshold is the midpoint of the two scores it falls between). Reported per language and
relation in the neuron file's ``analysis.consistency``. Pure torch, no Lightning.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from knlight.neurons.neuron import Neuron
from knlight.neurons.neuron_file import FactNeurons
from knlight.neurons.selection import mask_to_neurons
from knlight.selection.reader import QueryAttribution


def jaccard(a: set[Neuron], b: set[Neuron]) -> float:
    """|a ∩ b| / |a ∪ b| (1 for two empty sets: they agree)."""
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def mean_pairwise_jaccard(sets: Sequence[set[Neuron]]) -> float | None:
    """Mean Jaccard similarity over every pair of sets; None with fewer than two sets (nothing to compare)."""
    pairs = list(itertools.combinations(sets, 2))
    if not pairs:
        return None
    return sum(jaccard(a, b) for a, b in pairs) / len(pairs)


def otsu_threshold(values: Sequence[float]) -> float | None:
    """Otsu's threshold of ``values``: the cut of the sorted values maximising the between-class variance
    ``w0 · w1 · (μ0 − μ1)²``, returned as the midpoint between the two values it separates.

    Exact on the values themselves (no histogram bins). Ties between cuts keep the first (lowest). Returns None
    with fewer than two distinct values (no split exists).
    """
    ordered = sorted(float(v) for v in values)
    n = len(ordered)
    best: tuple[float, float] | None = None
    for k in range(1, n):
        if ordered[k] == ordered[k - 1]:
            continue  # a cut between equal values is not a threshold
        low, high = ordered[:k], ordered[k:]
        w0, w1 = k / n, (n - k) / n
        between = w0 * w1 * (sum(low) / k - sum(high) / (n - k)) ** 2
        if best is None or between > best[0] + 1e-15:
            best = (between, (ordered[k - 1] + ordered[k]) / 2)
    return None if best is None else best[1]


def query_sets(
    items: Sequence[QueryAttribution], coarse: Callable[[QueryAttribution], torch.Tensor]
) -> list[set[Neuron]]:
    """Each query's coarse neuron set (``coarse`` returns its ``[L, d]`` mask)."""
    return [set(mask_to_neurons(coarse(q))) for q in items]


def fact_consistency(
    per_language: Mapping[str, Sequence[QueryAttribution]],
    coarse: Callable[[QueryAttribution], torch.Tensor],
    fact: FactNeurons,
    known_only: bool = True,
) -> dict[str, dict[str, Any]]:
    """Per language, ``{"jaccard": mean pairwise Jaccard, "queries": n}`` of one fact.

    Args:
        per_language: The fact's items per language.
        coarse: A query's coarse mask (the selection's own, so the sets are the ones the neurons came from).
        fact: The fact's selection; with ``known_only`` and a recorded knowledge-filter status, only the
            queries that passed count, and unknown languages are left out.
        known_only: Respect the knowledge filter's status.

    Languages with fewer than two (passing) queries are left out: one query has no pair to compare.
    """
    out: dict[str, dict[str, Any]] = {}
    for language in sorted(per_language):
        items = sorted(per_language[language], key=lambda q: q.query_id)
        status = fact.known.get(language)
        if known_only and status is not None:
            if not status.known:
                continue
            items = [q for q in items if q.query_id in status.query_ids]
        score = mean_pairwise_jaccard(query_sets(items, coarse))
        if score is not None:
            out[language] = {"jaccard": round(score, 6), "queries": len(items)}
    return out


def _table(rows: list[tuple[str, float, bool]]) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[tuple[float, bool]]] = defaultdict(list)
    for key, score, consistent in rows:
        groups[key].append((score, consistent))
    return {
        key: {"facts": len(v), "consistent": sum(c for _, c in v),
              "mean_jaccard": round(sum(s for s, _ in v) / len(v), 6)}
        for key, v in sorted(groups.items())
    }  # fmt: skip


def split_consistency(facts: Mapping[str, FactNeurons]) -> dict[str, Any]:
    """Otsu's split over every (fact, language) score: marks each ``consistency[language]["consistent"]`` in
    place and returns the file's ``analysis.consistency`` (threshold, counts, per-language and per-relation
    tables). With fewer than two distinct scores there is no split and every fact counts as consistent."""
    scores = [v["jaccard"] for fact in facts.values() for v in fact.consistency.values()]
    threshold = otsu_threshold(scores)
    rows: list[tuple[str, str, float, bool]] = []
    for fact in facts.values():
        for language, value in fact.consistency.items():
            value["consistent"] = threshold is None or value["jaccard"] >= threshold
            rows.append((language, fact.relation or "", value["jaccard"], value["consistent"]))
    return {
        "method": "mean pairwise Jaccard of per-query coarse sets; Otsu threshold (Chen et al., ICLR 2025)",
        "threshold": None if threshold is None else round(threshold, 6),
        "pairs": len(rows),
        "consistent": sum(r[3] for r in rows),
        "by_language": _table([(lang, s, c) for lang, _, s, c in rows]),
        "by_relation": _table([(rel, s, c) for _, rel, s, c in rows]),
    }
