"""Consistency across queries: Jaccard and Otsu against hand computations, the knowledge filter respected, the
per-language and per-relation tables."""

from __future__ import annotations

import pytest
import torch

from knlight.neurons.neuron_annotations import KnownStatus
from knlight.neurons.neuron_file import FactNeurons
from knlight.selection.consistency import (
    fact_consistency,
    jaccard,
    mean_pairwise_jaccard,
    otsu_threshold,
    split_consistency,
)
from knlight.selection.reader import QueryAttribution

DIMS = (2, 4)


def test_jaccard_by_hand() -> None:
    assert jaccard({(0, 1), (0, 2)}, {(0, 2), (1, 3)}) == pytest.approx(1 / 3)
    assert jaccard(set(), set()) == 1.0
    # Three sets: J(a,b) = 1/3, J(a,c) = 0, J(b,c) = 1/2 -> mean 5/18.
    a, b, c = {(0, 1), (0, 2)}, {(0, 2), (1, 3)}, {(1, 3)}
    assert mean_pairwise_jaccard([a, b, c]) == pytest.approx((1 / 3 + 0 + 1 / 2) / 3)
    assert mean_pairwise_jaccard([a]) is None


def test_otsu_equals_a_hand_computation() -> None:
    # [0, .2, .9, 1]: between-class variance w0·w1·(μ0-μ1)² of the three cuts:
    #   k=1: .25·.75·(0 - .7)² = .0919;  k=2: .5·.5·(.1 - .95)² = .1806;  k=3: .75·.25·(.3667 - 1)² = .0752
    # -> the cut after .2, threshold (.2 + .9) / 2.
    assert otsu_threshold([0.9, 0.0, 1.0, 0.2]) == pytest.approx(0.55)
    # [.1, .1, .1, .5, .6]: no cut between equal values; k=3: .6·.4·(.1 - .55)² = .0486,
    # k=4: .8·.2·(.2 - .6)² = .0256 -> threshold (.1 + .5) / 2.
    assert otsu_threshold([0.1, 0.5, 0.1, 0.6, 0.1]) == pytest.approx(0.3)
    assert otsu_threshold([0.4, 0.4]) is None
    assert otsu_threshold([]) is None


def _item(
    uuid: str, language: str, query_id: int, neurons: list[tuple[int, int]], relation: str = "R0"
) -> QueryAttribution:
    return QueryAttribution(uuid, language, relation, query_id, f"q{query_id} [Y]", "A", 0.5,
                            [(a, b, 1.0) for a, b in neurons])  # fmt: skip


def _coarse(item: QueryAttribution) -> torch.Tensor:
    mask = torch.zeros(DIMS, dtype=torch.bool)
    for layer, index, _ in item.neurons:
        mask[layer, index] = True
    return mask


def test_fact_consistency_uses_the_known_queries_only() -> None:
    per_language = {
        "en": [
            _item("f", "en", 0, [(0, 1), (1, 2)]),
            _item("f", "en", 1, [(0, 1)]),
            _item("f", "en", 2, [(1, 3)]),
        ],
        "de": [_item("f", "de", 0, [(0, 0)]), _item("f", "de", 1, [(0, 0)])],
        "fr": [_item("f", "fr", 0, [(0, 0)])],
    }
    fact = FactNeurons(relation="R0")
    everything = fact_consistency(per_language, _coarse, fact)
    # en: J(q0,q1) = 1/2, J(q0,q2) = 0, J(q1,q2) = 0; de: identical sets; fr: one query, left out.
    assert everything == {
        "de": {"jaccard": 1.0, "queries": 2},
        "en": {"jaccard": pytest.approx(1 / 6, abs=1e-6), "queries": 3},
    }
    fact.known = {"en": KnownStatus(True, [0, 1], 3), "de": KnownStatus(False, [], 2)}
    known = fact_consistency(per_language, _coarse, fact)
    assert known == {"en": {"jaccard": 0.5, "queries": 2}}  # q2 did not pass; de is not known
    assert set(fact_consistency(per_language, _coarse, fact, known_only=False)) == {"de", "en"}


def test_split_marks_facts_and_tables_languages_and_relations() -> None:
    facts = {}
    for uuid, relation, scores in [("a", "R0", {"en": 0.9, "de": 0.1}), ("b", "R0", {"en": 0.8}),
                                   ("c", "R1", {"en": 0.2, "de": 1.0})]:  # fmt: skip
        fact = FactNeurons(relation=relation)
        fact.consistency = {g: {"jaccard": s, "queries": 3} for g, s in scores.items()}
        facts[uuid] = fact
    analysis = split_consistency(facts)
    # Scores .1 .2 .8 .9 1.0: Otsu cuts after .2 (hand: k=2 gives .4·.6·(.15-.9)² = .135, the largest).
    assert analysis["threshold"] == pytest.approx(0.5)
    keys = [("a", "en"), ("a", "de"), ("b", "en"), ("c", "en"), ("c", "de")]
    assert [facts[u].consistency[g]["consistent"] for u, g in keys] == [True, False, True, False, True]
    assert analysis["pairs"] == 5 and analysis["consistent"] == 3
    assert analysis["by_language"]["en"] == {
        "facts": 3,
        "consistent": 2,
        "mean_jaccard": pytest.approx(19 / 30, abs=1e-6),
    }
    assert analysis["by_language"]["de"]["consistent"] == 1
    assert analysis["by_relation"] == {
        "R0": {"facts": 3, "consistent": 2, "mean_jaccard": pytest.approx(0.6)},
        "R1": {"facts": 2, "consistent": 1, "mean_jaccard": pytest.approx(0.6)},
    }
