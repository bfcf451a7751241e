"""What an intervention run evaluates for one item: its unrelated sample and its rows (pure: no Lightning).

For an item ``(uuid, language, query)`` and each method (a neuron file and which of its sets), the rows are:
suppress / enhance the fact's neurons at the target positions, erase (suppress the union over the fact's
languages), the same on random neurons (the control: as many per layer, seeded by the fact and scope only), on
the item's own query (*related*) and on a seeded sample of other facts' queries in the same language
(*unrelated*), plus the cross-lingual rows (another language's neurons, and the LIKN, suppressed on this
language's query). See :mod:`knlight.metrics.intervention` for what the tables make of them.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from knlight.neurons.interventions import Neuron, random_like
from knlight.neurons.neuron_file import NeuronFile

Item = dict[str, Any]
ItemKey = tuple[Hashable, ...]

KINDS: tuple[str, ...] = ("selected", "random")
OPERATIONS: tuple[str, ...] = ("suppress", "enhance", "erase")
CLEAN, RELATED, UNRELATED, CROSS, SKIPPED = range(5)
LIKN_SOURCE = -1
"""``other`` of a cross-lingual row whose neurons are the fact's LIKN rather than one language's neurons."""


def item_key(item: Item) -> ItemKey:
    """``(uuid, language, query_id)`` of an item."""
    return (item["uuid"], item["language"], item["query_id"])


@dataclass
class Row:
    """One evaluation: a query of the plan, with a neuron set scaled by a factor.

    Attributes:
        query: Index into the plan's queries (0 = the related item).
        method: Index of the method; -1 for the clean rows.
        kind: 0 for the selected neurons, 1 for the random control.
        op: Index into :data:`~knlight.metrics.intervention.OPERATIONS`.
        role: ``CLEAN``, ``RELATED``, ``UNRELATED`` or ``CROSS``.
        other: The unrelated item's id, the cross-lingual source language's id (or ``LIKN_SOURCE``), or -1.
        neurons: The neurons scaled.
        factor: Their multiplier.
    """

    query: int
    method: int
    kind: int
    op: int
    role: int
    other: int
    neurons: list[Neuron]
    factor: float


class ItemPool:
    """Every item of the data (the same on every process), indexed for the unrelated samples.

    Args:
        items: The items (sorted here by key: ids do not depend on the data order).
    """

    def __init__(self, items: Sequence[Item]) -> None:
        self.items = sorted(items, key=item_key)
        self.ids = {item_key(item): i for i, item in enumerate(self.items)}
        self.by_language: dict[str, list[Item]] = defaultdict(list)
        self.same_fact: dict[tuple[str, str], int] = defaultdict(int)
        self.by_relation: dict[tuple[str, str | None], list[Item]] = defaultdict(list)
        for item in self.items:
            self.by_language[item["language"]].append(item)
            self.same_fact[(item["uuid"], item["language"])] += 1
            self.by_relation[(item["language"], item.get("relation"))].append(item)

    def unrelated(self, item: Item, per_query: int, relations: str, seed: int) -> list[Item]:
        """The seeded sample of other facts' queries in the item's language (depends only on the item).

        Args:
            item: The related item.
            per_query: How many (fewer when fewer exist).
            relations: ``any`` other fact, the ``same`` relation only, or ``other`` relations only.
            seed: The run's seed.
        """
        language, relation = item["language"], item.get("relation")
        same_fact = self.same_fact[(item["uuid"], language)]
        same_relation = self.by_relation.get((language, relation), [])
        if relations == "same":
            candidates, available = same_relation, len(same_relation) - same_fact
        else:
            candidates = self.by_language.get(language, [])
            other = len(candidates) - len(same_relation)
            available = other if relations == "other" else len(candidates) - same_fact
        wanted = min(per_query, available)
        rng = random.Random(f"{seed}/unrelated/{item['uuid']}/{item['language']}/{item['query_id']}")
        chosen: list[Item] = []
        seen: set[int] = set()
        while len(chosen) < wanted:
            k = rng.randrange(len(candidates))
            if k in seen:
                continue
            seen.add(k)
            other_relation = candidates[k].get("relation") != relation
            if candidates[k]["uuid"] != item["uuid"] and (relations != "other" or other_relation):
                chosen.append(candidates[k])
        return sorted(chosen, key=item_key)


@dataclass(frozen=True)
class PlanOptions:
    """How an intervention run plans its rows (see :class:`knlight.tasks.InterventionModule`)."""

    operations: tuple[str, ...]
    enhance_factor: float
    unrelated_per_query: int
    unrelated_relations: str
    random_control: bool
    cross_lingual: bool
    seed: int


def random_control(uuid: str, scope: str, neurons: list[Neuron], d_ff: int, seed: int) -> list[Neuron]:
    """The random control of a set: seeded by the fact and scope only, so equal sets get equal controls."""
    return random_like(neurons, d_ff, f"{seed}/random/{uuid}/{scope}/{sorted(neurons)}")


def plan_item(
    item: Item,
    pool: ItemPool,
    methods: Mapping[str, tuple[NeuronFile, str]],
    options: PlanOptions,
    languages: Sequence[str],
    d_ff: int,
) -> tuple[list[Item], list[Row]]:
    """The queries (item first, then its unrelated sample) and the rows to evaluate for one item.

    Args:
        item: The related item.
        pool: Every item (for the unrelated sample and the item ids).
        methods: Method name -> (its neuron file, which set: ``language``, ``language_independent``, ...).
        options: The plan's options.
        languages: The run's language vocabulary (cross-lingual rows name their source by index).
        d_ff: Neurons per layer (for the random control).
    """
    uuid, language = item["uuid"], item["language"]
    unrelated = pool.unrelated(item, options.unrelated_per_query, options.unrelated_relations, options.seed)
    queries = [item, *unrelated]
    rows = [Row(q, -1, -1, -1, CLEAN, -1, [], 1.0) for q in range(len(queries))]
    factors = {"suppress": 0.0, "enhance": options.enhance_factor, "erase": 0.0}
    for m, (file, kind_name) in enumerate(methods.values()):
        fact = file.facts.get(uuid)
        # As the selection did: with its knowledge filter on, a (fact, language) it recorded as not known to
        # the model is not tested (with the filter off the status was only recorded, and every item is tested).
        filtered = bool((file.method.get("known") or {}).get("enabled"))
        if fact is None or (filtered and not fact.is_known(language)):
            continue
        own = fact.neurons(kind_name, language)
        if kind_name == "language":
            union = list(dict.fromkeys(n for lang in sorted(fact.languages) for n in fact.languages[lang]))
        else:
            union = own
        for op_name in options.operations:
            op = OPERATIONS.index(op_name)
            selected = union if op_name == "erase" else own
            if not selected:
                continue
            kinds = [selected]
            if options.random_control:
                scope = "all" if op_name == "erase" or kind_name != "language" else language
                kinds.append(random_control(uuid, scope, selected, d_ff, options.seed))
            for kind, neurons in enumerate(kinds):
                rows.append(Row(0, m, kind, op, RELATED, -1, neurons, factors[op_name]))
                for q, other in enumerate(unrelated, start=1):
                    oid = pool.ids[item_key(other)]
                    rows.append(Row(q, m, kind, op, UNRELATED, oid, neurons, factors[op_name]))
        if options.cross_lingual and kind_name == "language" and own:
            for source_language in sorted(fact.languages):
                if source_language != language and fact.languages[source_language]:
                    lid = list(languages).index(source_language)
                    rows.append(Row(0, m, 0, 0, CROSS, lid, list(fact.languages[source_language]), 0.0))
            if fact.language_independent:
                rows.append(Row(0, m, 0, 0, CROSS, LIKN_SOURCE, list(fact.language_independent), 0.0))
    return queries, rows
