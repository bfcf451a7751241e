"""Fact-specific vs shared neurons: label every selected neuron ``fact``, ``relation`` or ``generic``.

A neuron that the selection picks for many facts, or whose suppression moves other facts' answers, does not
store *this* fact: it serves its relation (e.g. "the answer is a city") or every answer. Two kinds of evidence,
the stronger label wins (``generic`` > ``relation`` > ``fact``):

* **counting** (always, no model): in how many facts of the file the neuron is selected (any set: per-language
  neurons, LIKN, uncertainty-aware, DKN members, carriers) and how many relations those facts span. Selected
  for at least ``min_facts`` facts: ``generic`` when they span at least ``min_relations`` relations, else
  ``relation``;
* **suppression** (``suppression: true``, needs the model): the mean relative drop of P(answer) when the neuron
  is suppressed at the target positions, on the fact's own (known) queries and on up to ``sample`` queries of
  other facts of its relation and of other relations. A drop on other relations of at least ``spill`` · the
  own drop (and ``min_drop``) makes it ``generic``; on its relation, ``relation``.

Each fact's neuron lists are then ordered fact-specific first, relation-level next, generic last (each part by
decreasing score, as before). Pure torch, no Lightning.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from knlight.lm.prompts import EncodedQuery
from knlight.neurons.interventions import intervene, relative_change_from_log
from knlight.neurons.neuron import Neuron
from knlight.neurons.neuron_annotations import LABELS, NeuronSpecificity
from knlight.neurons.neuron_file import FactNeurons
from knlight.selection.options import SpecificityOptions

RANK = {label: k for k, label in enumerate(LABELS)}


def selected_neurons(fact: FactNeurons) -> list[Neuron]:
    """Every neuron the selection picked for the fact (any set), once, in order of appearance."""
    seen: dict[Neuron, None] = {}
    for language in sorted(fact.languages):
        seen.update(dict.fromkeys(fact.languages[language]))
    for neurons in (fact.language_independent, fact.uncertainty, fact.degenerate(), fact.carriers_fact):
        seen.update(dict.fromkeys(neurons))
    for neurons in (fact.carriers or {}).values():
        seen.update(dict.fromkeys(neurons))
    return list(seen)


def count_label(facts: int, relations: int, options: SpecificityOptions) -> str:
    """The counting rule: ``generic`` / ``relation`` / ``fact`` from how many facts and relations select it."""
    if facts >= options.min_facts:
        return "generic" if relations >= options.min_relations else "relation"
    return "fact"


def drop_label(drops: Mapping[str, float], options: SpecificityOptions) -> str:
    """The suppression rule: other facts lose at least ``spill`` · the own drop (and ``min_drop``)."""
    bar = max(options.spill * drops.get("own", 0.0), options.min_drop)
    if drops.get("other_relations", 0.0) >= bar:
        return "generic"
    if drops.get("same_relation", 0.0) >= bar:
        return "relation"
    return "fact"


def _mean_drops(lm: Any, rows: list[tuple[EncodedQuery, Neuron]], chunk_rows: int) -> list[float]:
    """Relative drop of P(answer) of each row's query when its neuron is suppressed."""
    clean_of: dict[EncodedQuery, int] = {}
    plan: list[tuple[EncodedQuery, list[Neuron], float]] = []
    for query, _ in rows:
        if query not in clean_of:
            clean_of[query] = len(plan)
            plan.append((query, [], 0.0))
    plan += [(query, [neuron], 0.0) for query, neuron in rows]
    log_p = intervene(lm, plan, chunk_rows).log_prob
    clean = log_p[torch.tensor([clean_of[q] for q, _ in rows], dtype=torch.long)]
    drop = -relative_change_from_log(clean, log_p[len(clean_of) :])
    return [float(d) for d in drop]


def suppression_drops(
    lm: Any,
    facts: Mapping[str, FactNeurons],
    queries: Mapping[str, Sequence[EncodedQuery]],
    options: SpecificityOptions,
    chunk_rows: int = 256,
) -> dict[tuple[str, Neuron], dict[str, float]]:
    """Per (fact, neuron), the mean relative drop on ``own``, ``same_relation`` and ``other_relations`` queries.

    Args:
        lm: The model.
        facts: The selection.
        queries: Per fact, its encoded known queries (the ones the selection used).
        options: ``sample`` queries of other facts per group, drawn with ``seed``.
        chunk_rows: Rows per forward.
    """
    rng = random.Random(options.seed)
    plan: list[tuple[str, Neuron, str]] = []
    rows: list[tuple[EncodedQuery, Neuron]] = []
    for uuid in sorted(facts):
        fact = facts[uuid]
        same = [q for u in sorted(facts) if u != uuid and facts[u].relation == fact.relation
                for q in queries.get(u, [])]  # fmt: skip
        other = [q for u in sorted(facts) if facts[u].relation != fact.relation for q in queries.get(u, [])]
        groups = {
            "own": list(queries.get(uuid, [])),
            "same_relation": rng.sample(same, min(options.sample, len(same))),
            "other_relations": rng.sample(other, min(options.sample, len(other))),
        }
        for neuron in selected_neurons(fact):
            for group, members in groups.items():
                for query in members:
                    plan.append((uuid, neuron, group))
                    rows.append((query, neuron))
    drops = _mean_drops(lm, rows, chunk_rows) if rows else []
    sums: dict[tuple[str, Neuron], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (uuid, neuron, group), drop in zip(plan, drops):
        if drop == drop:  # a query with clean P = 0 has no relative drop
            sums[(uuid, neuron)][group].append(drop)
    return {key: {g: sum(v) / len(v) for g, v in groups.items() if v} for key, groups in sums.items()}


def _reorder(neurons: list[Neuron], labels: Mapping[Neuron, NeuronSpecificity]) -> list[Neuron]:
    """Fact-specific first (stable: each part keeps its decreasing-score order)."""
    return sorted(neurons, key=lambda n: RANK[labels[n].label] if n in labels else 0)


def label_specificity(
    facts: Mapping[str, FactNeurons],
    options: SpecificityOptions,
    drops: Mapping[tuple[str, Neuron], Mapping[str, float]] | None = None,
) -> dict[str, Any]:
    """Label every selected neuron of every fact (in place: ``fact.specificity``) and order each fact's lists
    fact-specific first. Returns the file's ``analysis.specificity`` (counts per label).

    Args:
        facts: The selection.
        options: The counting and suppression rules.
        drops: :func:`suppression_drops` when measured (None: counting only).
    """
    selected = {uuid: selected_neurons(fact) for uuid, fact in facts.items()}
    users: dict[Neuron, set[str]] = defaultdict(set)
    for uuid, neurons in selected.items():
        for neuron in neurons:
            users[neuron].add(uuid)
    counts: Counter[str] = Counter()
    for uuid, fact in facts.items():
        fact.specificity = {}
        for neuron in selected[uuid]:
            relations = {facts[u].relation for u in users[neuron]}
            languages = sum(neuron in ns for ns in fact.languages.values())
            label = count_label(len(users[neuron]), len(relations), options)
            measured = dict((drops or {}).get((uuid, neuron), {}))
            if measured:
                label = max(label, drop_label(measured, options), key=RANK.__getitem__)
            fact.specificity[neuron] = NeuronSpecificity(
                label, len(users[neuron]), len(relations), languages, measured
            )
            counts[label] += 1
        labels = fact.specificity
        fact.languages = {g: _reorder(ns, labels) for g, ns in fact.languages.items()}
        fact.language_independent = _reorder(fact.language_independent, labels)
        fact.uncertainty = _reorder(fact.uncertainty, labels)
        if fact.carriers is not None:
            fact.carriers = {g: _reorder(ns, labels) for g, ns in fact.carriers.items()}
            fact.carriers_fact = _reorder(fact.carriers_fact, labels)
    return {
        "labels": {label: counts[label] for label in LABELS},
        "neurons": len(users),
        "rule": {"min_facts": options.min_facts, "min_relations": options.min_relations,
                 "suppression": drops is not None},
    }  # fmt: skip
