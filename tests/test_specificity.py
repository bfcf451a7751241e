"""Specificity labels: the counting and suppression rules on hand-made selections, fact-specific neurons first,
the labels through a neuron file, and the labels on a plant whose relation-level and generic neurons are known
by construction (knlight/planted/shared.py): IG, knlight's selection, then the labels, against the truth."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from knlight import attribute_batch
from knlight.neurons.neuron_file import FactNeurons, NeuronFile, read_neuron_file, write_neuron_file
from knlight.planted import PlantedModel
from knlight.planted.shared import plant_shared, truth_labels
from knlight.selection import (
    DknOptions,
    KnOptions,
    LiknOptions,
    QueryAttribution,
    UncertaintyOptions,
    select_fact,
)
from knlight.selection.options import SpecificityOptions
from knlight.selection.specificity import drop_label, label_specificity, suppression_drops

A, B, C, D = (0, 1), (0, 2), (1, 3), (1, 4)


def _hand_made() -> dict[str, FactNeurons]:
    # A: only f1 -> fact. B: f1 and f2 (both R0) -> relation. C: f1, f2, f3 (R0 and R1) -> generic. D: f3 only.
    return {
        "f1": FactNeurons("R0", {"en": [C, B, A], "de": [A]}, language_independent=[A]),
        "f2": FactNeurons("R0", {"en": [B, C]}),
        "f3": FactNeurons("R1", {"en": [C, D]}, uncertainty=[D]),
    }


def test_counting_rule_and_fact_specific_first() -> None:
    facts = _hand_made()
    analysis = label_specificity(facts, SpecificityOptions())
    labels = {u: {n: s.label for n, s in f.specificity.items()} for u, f in facts.items()}
    assert labels == {
        "f1": {C: "generic", B: "relation", A: "fact"},
        "f2": {B: "relation", C: "generic"},
        "f3": {C: "generic", D: "fact"},
    }
    s = facts["f1"].specificity
    assert (s[C].facts, s[C].relations, s[B].facts, s[B].relations, s[A].facts) == (3, 2, 2, 1, 1)
    assert (s[A].languages, s[C].languages) == (2, 1)
    # Fact-specific first, then relation, then generic (each part keeps its score order).
    assert facts["f1"].languages["en"] == [A, B, C]
    assert facts["f3"].languages["en"] == [D, C]
    assert analysis["labels"] == {"fact": 2, "relation": 2, "generic": 3} and analysis["neurons"] == 4
    # The fact-specific selection (an intervention / editing kind): a language's neurons labelled `fact`.
    assert (
        facts["f1"].neurons("fact_specific", "en") == [A] and facts["f2"].neurons("fact_specific", "en") == []
    )
    assert facts["f3"].neurons("fact_specific") == [D] and facts["f1"].neurons("fact_specific", "fr") == []
    # A stricter rule: shared only from 3 facts on -> B is fact-specific now.
    facts = _hand_made()
    label_specificity(facts, SpecificityOptions(min_facts=3))
    assert facts["f1"].specificity[B].label == "fact" and facts["f1"].specificity[C].label == "generic"


def test_suppression_rule_and_the_stronger_label_wins() -> None:
    options = SpecificityOptions(spill=0.5, min_drop=0.1)
    assert drop_label({"own": 0.8, "same_relation": 0.5, "other_relations": 0.05}, options) == "relation"
    assert drop_label({"own": 0.8, "same_relation": 0.5, "other_relations": 0.45}, options) == "generic"
    assert drop_label({"own": 0.8, "same_relation": 0.3, "other_relations": 0.0}, options) == "fact"
    assert (
        drop_label({"own": 0.1, "same_relation": 0.09, "other_relations": 0.0}, options) == "fact"
    )  # < min_drop
    facts = _hand_made()
    drops = {("f3", D): {"own": 0.9, "same_relation": 0.0, "other_relations": 0.8}}
    label_specificity(facts, options, drops)
    assert facts["f3"].specificity[D].label == "generic"  # counted as fact, measured as generic
    assert facts["f3"].specificity[D].drops == drops[("f3", D)]
    assert facts["f1"].specificity[A].drops == {}


def test_labels_survive_the_neuron_file(tmp_path: Path) -> None:
    facts = _hand_made()
    label_specificity(facts, SpecificityOptions(), {("f1", A): {"own": 0.5, "same_relation": 0.0}})
    path = write_neuron_file(tmp_path / "n.json", NeuronFile("toy", 2, 8, {}, facts))
    again = read_neuron_file(path, num_layers=2, d_ff=8)
    for uuid, fact in facts.items():
        assert again.facts[uuid].specificity == fact.specificity
        assert again.facts[uuid].languages == fact.languages


# -- a plant with relation-level and generic neurons by construction --------------------------------------------

SMALL = dict(
    n_relations=2, facts_per_relation=3, templates_per_relation=3, layers=2, hidden=64, ff=64, steps=150,
    n_background=16, degenerate_fraction=0.0, plant_layers=[1], n_specific=1, n_independent=1,
)  # fmt: skip


@pytest.fixture(scope="module")
def planted() -> Iterator[PlantedModel]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield plant_shared("gpt2", seed=0, relation_neurons=1, generic_neurons=1, **SMALL)
    torch.set_num_threads(before)


def _select(planted: PlantedModel) -> tuple[dict[str, FactNeurons], dict[str, list]]:
    """Zero-baseline IG of every query, then knlight's selection (Dai: τ = 0.2, p = 0.7) per fact."""
    lm = planted.lm
    rows = [(rec, q, query) for rec in planted.records for q, query in enumerate(rec["queries"])]
    encoded = [lm.encode(query, rec["object"]) for rec, _, query in rows]
    scores = attribute_batch(lm, encoded, steps=8, completeness=False).scores
    by_fact: dict[str, dict[str, list[QueryAttribution]]] = {}
    queries: dict[str, list] = {}
    for (rec, q, query), score, e in zip(rows, scores, encoded):
        positive = [(a, b, float(score[a, b])) for a, b in (score > 0).nonzero().tolist()]
        item = QueryAttribution(
            rec["uuid"], rec["language"], rec["relation"], q, query, rec["object"], None, positive
        )
        by_fact.setdefault(rec["uuid"], {}).setdefault(rec["language"], []).append(item)
        queries.setdefault(rec["uuid"], []).append(e)
    kn = KnOptions(threshold=0.2, adaptive=False)
    dims = (lm.num_layers, lm.d_ff)
    facts = {
        uuid: select_fact(
            per_language,
            dims,
            sorted(per_language),
            {},
            kn,
            LiknOptions(),
            UncertaintyOptions(),
            DknOptions(),
        )
        for uuid, per_language in by_fact.items()
    }
    return facts, queries


def _scored(facts: dict[str, FactNeurons], truth: dict) -> dict[str, list[bool]]:
    """Per truth label, whether each selected planted neuron got it."""
    out: dict[str, list[bool]] = {"fact": [], "relation": [], "generic": []}
    for uuid, fact in facts.items():
        for neuron, s in fact.specificity.items():
            label = truth.get((uuid, neuron))
            if label is not None:
                out[label].append(s.label == label)
    return out


def test_plant_has_its_shared_neurons(planted: PlantedModel) -> None:
    shared = planted.report["shared_neurons"]
    assert sorted(s["label"] for s in shared) == ["generic", "relation", "relation"]
    assert planted.report["p_clean"] > 0.5
    # Each shared neuron is a necessary carrier of its facts: suppressing it lowers their P(object).
    from knlight.planted.verify import answer_probs

    for s in shared:
        rec = next(r for r in planted.records if r["uuid"] == s["facts"][0])
        items = [planted.lm.encode(q, rec["object"]) for q in rec["queries"]]
        p = answer_probs(planted.lm, items, [[], [(s["layer"], s["index"])]])
        assert float((p[:, 1] / p[:, 0]).mean()) < 0.8


def test_labels_on_the_plant_match_the_construction(planted: PlantedModel) -> None:
    facts, queries = _select(planted)
    truth = truth_labels(planted)
    label_specificity(facts, SpecificityOptions())
    scored = _scored(facts, truth)
    # The selection finds shared neurons of every kind, and every selected planted neuron gets its label.
    assert all(len(v) >= 2 for v in scored.values()), {k: len(v) for k, v in scored.items()}
    assert all(all(v) for v in scored.values()), scored
    for fact in facts.values():  # fact-specific first in every list
        for neurons in fact.languages.values():
            ranks = [("fact", "relation", "generic").index(fact.specificity[n].label) for n in neurons]
            assert ranks == sorted(ranks)
    # With the suppression measured: a relation neuron moves its relation's other facts, not the other relation's.
    drops = suppression_drops(planted.lm, facts, queries, SpecificityOptions(suppression=True))
    label_specificity(facts, SpecificityOptions(suppression=True), drops)
    assert all(all(v) for v in _scored(facts, truth).values())
    shared = {(s["layer"], s["index"]): s for s in planted.report["shared_neurons"]}
    for fact in facts.values():
        for neuron, s in fact.specificity.items():
            if neuron in shared and shared[neuron]["label"] == "relation":
                assert s.drops["same_relation"] > s.drops["other_relations"] + 0.1
