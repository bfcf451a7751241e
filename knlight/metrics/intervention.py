"""Intervention metrics: item-level rows gathered across processes (de-duplicated), then ΔP / SR tables.

Each evaluated row is one (query, neuron set, operation): integer keys ``[item, method, kind, op, role,
other]`` and values ``[log P before, log P after, top-1 before, top-1 after, number of neurons]``.
:class:`InterventionRows` is a torchmetrics ``Metric`` whose states are concatenated across DDP processes; its
``compute`` drops the duplicate rows that ``DistributedSampler`` padding creates (same key, same values), so
the tables are the same whatever the world size. :func:`summarise` turns the rows into tables.

Definitions (per method, neuron kind ``selected``/``random`` and operation):

* ``ΔP = P_after / P_before − 1`` per row (from log-probabilities); NaN when ``P_before = 0`` or a value
  is NaN: such rows are **excluded and counted** (``nan_related`` / ``nan_unrelated``).
* A *unit* is a fact in one language ``(uuid, language)``. Its ``ΔP_related`` is the mean over its own
  queries, its ``ΔP_unrelated`` the mean over the unrelated queries sampled for them (other facts, same
  language).
* A group (all units, one language, one relation) reports the mean over its units of both (and the median:
  a few queries with a tiny P before can dominate the mean of an enhancement), the success rate
  ``SR = mean ΔP_related / mean ΔP_unrelated`` (AMIG), and the top-1 accuracy of its related queries before
  and after the operation. ``SR_total = |SR_enhance| + |SR_suppress|``.
* Units whose neuron set is empty are not evaluated; they are counted (``units_without_neurons``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from knlight.neurons.intervention_plan import (
    CLEAN,
    CROSS,
    KINDS,
    LIKN_SOURCE,
    OPERATIONS,
    RELATED,
    SKIPPED,
    UNRELATED,
)
from knlight.neurons.neuron_file import NeuronFile

# Columns of the index and value tensors.
ITEM, METHOD, KIND, OP, ROLE, OTHER = range(6)
LP_BEFORE, LP_AFTER, TOP1_BEFORE, TOP1_AFTER, NEURONS = range(5)
INDEX_COLUMNS, VALUE_COLUMNS = 6, 5


class InterventionRows(Metric):
    """Item-level intervention rows, concatenated across processes and de-duplicated by key on ``compute``."""

    full_state_update = False
    index: list[torch.Tensor] | torch.Tensor  # a list while updating; one tensor after a DDP sync
    value: list[torch.Tensor] | torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("index", default=[], dist_reduce_fx="cat")
        self.add_state("value", default=[], dist_reduce_fx="cat")

    def update(self, index: torch.Tensor, value: torch.Tensor) -> None:
        """Add rows: ``index`` ``[n, 6]`` integers, ``value`` ``[n, 5]`` floats (see the module "
        "documentation)."""
        if (
            index.shape[0] != value.shape[0]
            or index.shape[1:] != (INDEX_COLUMNS,)
            or value.shape[1:] != (VALUE_COLUMNS,)
        ):
            raise ValueError(
                f"rows must be [n, {INDEX_COLUMNS}] and [n, {VALUE_COLUMNS}], got {index.shape}, "
                f"{value.shape}"
            )
        assert isinstance(self.index, list) and isinstance(self.value, list)
        self.index.append(index.long())
        self.value.append(value.double())

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of every process, one per key (the first), sorted by key."""
        # After a DDP sync the states are already concatenated tensors; before, lists of tensors.
        index = _cat(self.index, torch.zeros(0, INDEX_COLUMNS, dtype=torch.long))
        value = _cat(self.value, torch.zeros(0, VALUE_COLUMNS, dtype=torch.float64))
        return deduplicate(index.reshape(-1, INDEX_COLUMNS), value.reshape(-1, VALUE_COLUMNS))


def _cat(state: list[torch.Tensor] | torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    if isinstance(state, list):
        return dim_zero_cat(state) if state else empty
    return state


def deduplicate(index: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep one row per distinct key (the first occurrence), sorted by key."""
    if index.shape[0] == 0:
        return index.cpu(), value.cpu()
    index, value = index.cpu(), value.cpu()
    unique, inverse = torch.unique(index, dim=0, return_inverse=True)  # sorted lexicographically
    first = torch.full((unique.shape[0],), index.shape[0], dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(index.shape[0]), reduce="amin")
    return unique, value[first]


@dataclass
class Vocabulary:
    """What the integer keys of the rows mean (identical on every process).

    Attributes:
        items: Item keys ``(uuid, language, query_id)``; a row's ``item`` indexes this list.
        relations: Relation of each item.
        methods: Method names; a row's ``method`` indexes this list.
        languages: Languages; a cross-lingual row's ``other`` indexes this list (or is :data:`LIKN_SOURCE`).
    """

    items: list[tuple[str, str, int]]
    relations: list[str | None]
    methods: list[str]
    languages: list[str]


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return math.fsum(values) / len(values) if values else math.nan


def _median(values: Iterable[float]) -> float:
    """The median (mean of the two middle values for an even count); NaN for none."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 and not math.isnan(a) and not math.isnan(b) else math.nan


def delta_p(value: torch.Tensor) -> torch.Tensor:
    """ΔP of rows (float64; NaN where undefined)."""
    from knlight.neurons.interventions import relative_change_from_log

    return relative_change_from_log(value[:, LP_BEFORE], value[:, LP_AFTER])


def summarise(index: torch.Tensor, value: torch.Tensor, vocab: Vocabulary) -> dict[str, list[dict[str, Any]]]:
    """Tables from de-duplicated rows.

    Returns:
        ``{"intervention": [...], "success_rate": [...], "cross_lingual": [...], "facts": [...], "counts":
        [...]}``; each a list of flat dicts (CSV rows). See the module documentation for the definitions.
    """
    dp = delta_p(value).tolist()
    idx = index.tolist()
    val = value.tolist()
    tested: dict[int, tuple[float, float]] = {}
    skipped = 0
    # (method, kind, op) -> unit -> lists
    related: dict[tuple[int, int, int], dict[tuple[str, str], list[int]]] = defaultdict(
        lambda: defaultdict(list)
    )
    unrelated: dict[tuple[int, int, int], dict[tuple[str, str], list[int]]] = defaultdict(
        lambda: defaultdict(list)
    )
    cross: dict[tuple[int, int], dict[tuple[str, str], list[int]]] = defaultdict(lambda: defaultdict(list))
    for r, (item, method, kind, op, role, other) in enumerate(idx):
        uuid, language, _ = vocab.items[item]
        unit = (uuid, language)
        if role == CLEAN:
            tested[item] = (val[r][TOP1_BEFORE], val[r][NEURONS])
        elif role == SKIPPED:
            skipped += 1
        elif role == RELATED:
            related[(method, kind, op)][unit].append(r)
        elif role == UNRELATED:
            unrelated[(method, kind, op)][unit].append(r)
        elif role == CROSS:
            cross[(method, other)][unit].append(r)
    units = sorted({(vocab.items[i][0], vocab.items[i][1]) for i in tested})
    relation_of = {(vocab.items[i][0], vocab.items[i][1]): vocab.relations[i] for i in tested}

    def groups(unit_list: Sequence[tuple[str, str]]) -> list[tuple[str, str, list[tuple[str, str]]]]:
        out = [("all", "all", list(unit_list))]
        for lang in sorted({u[1] for u in unit_list}):
            out.append(("language", lang, [u for u in unit_list if u[1] == lang]))
        for rel in sorted({str(relation_of[u]) for u in unit_list}):
            out.append(("relation", rel, [u for u in unit_list if str(relation_of[u]) == rel]))
        return out

    def unit_mean(rows: list[int]) -> tuple[float, int]:
        finite = [dp[r] for r in rows if not math.isnan(dp[r])]
        return _mean(finite), len(rows) - len(finite)

    intervention: list[dict[str, Any]] = []
    facts: list[dict[str, Any]] = []
    sr_parts: dict[tuple[int, int, str, str], dict[str, float]] = defaultdict(dict)
    for method, kind, op in sorted(related):
        rel_units, unrel_units = related[(method, kind, op)], unrelated[(method, kind, op)]
        per_unit: dict[tuple[str, str], tuple[float, float]] = {}
        for unit in sorted(rel_units):
            d_rel, nan_rel = unit_mean(rel_units[unit])
            d_unrel, nan_unrel = unit_mean(unrel_units.get(unit, []))
            per_unit[unit] = (d_rel, d_unrel)
            facts.append({
                "method": vocab.methods[method], "neurons": KINDS[kind], "operation": OPERATIONS[op],
                "uuid": unit[0], "language": unit[1], "relation": relation_of.get(unit),
                "num_neurons": int(val[rel_units[unit][0]][NEURONS]), "queries": len(rel_units[unit]),
                "dp_related": d_rel, "dp_unrelated": d_unrel,
                "nan_related": nan_rel, "nan_unrelated": nan_unrel,
            })  # fmt: skip
        for group_by, group, members in groups(units):
            have = [u for u in members if u in per_unit]
            rows_rel = [r for u in have for r in rel_units[u]]
            rows_unrel = [r for u in have for r in unrel_units.get(u, [])]
            unit_rel = [per_unit[u][0] for u in have if not math.isnan(per_unit[u][0])]
            unit_unrel = [per_unit[u][1] for u in have if not math.isnan(per_unit[u][1])]
            d_rel, d_unrel = _mean(unit_rel), _mean(unit_unrel)
            sr = _ratio(d_rel, d_unrel)
            sr_parts[(method, kind, group_by, group)][OPERATIONS[op]] = sr
            intervention.append({
                "method": vocab.methods[method], "neurons": KINDS[kind], "operation": OPERATIONS[op],
                "group_by": group_by, "group": group, "units": len(have),
                "units_without_neurons": len(members) - len(have),
                "related": len(rows_rel), "unrelated": len(rows_unrel),
                "nan_related": sum(math.isnan(dp[r]) for r in rows_rel),
                "nan_unrelated": sum(math.isnan(dp[r]) for r in rows_unrel),
                "dp_related": d_rel, "dp_unrelated": d_unrel, "sr": sr,
                "dp_related_median": _median(unit_rel), "dp_unrelated_median": _median(unit_unrel),
                "acc_before": _mean(val[r][TOP1_BEFORE] for r in rows_rel),
                "acc_after": _mean(val[r][TOP1_AFTER] for r in rows_rel),
                "acc_unrelated_before": _mean(val[r][TOP1_BEFORE] for r in rows_unrel),
                "acc_unrelated_after": _mean(val[r][TOP1_AFTER] for r in rows_unrel),
            })  # fmt: skip
    success_rate = []
    for (method, kind, group_by, group), parts in sorted(sr_parts.items()):
        total = abs(parts.get("enhance", math.nan)) + abs(parts.get("suppress", math.nan))
        success_rate.append({
            "method": vocab.methods[method], "neurons": KINDS[kind], "group_by": group_by, "group": group,
            "sr_suppress": parts.get("suppress", math.nan), "sr_enhance": parts.get("enhance", math.nan),
            "sr_erase": parts.get("erase", math.nan), "sr": total,
        })  # fmt: skip
    cross_lingual = []
    for (method, source), units_rows in sorted(cross.items()):
        for target in sorted({u[1] for u in units_rows}):
            means = [unit_mean(units_rows[u]) for u in sorted(units_rows) if u[1] == target]
            cross_lingual.append({
                "method": vocab.methods[method],
                "source": "LIKN" if source == LIKN_SOURCE else vocab.languages[source], "target": target,
                "units": len(means), "dp": _mean(m for m, _ in means if not math.isnan(m)),
                "nan": sum(n for _, n in means),
            })  # fmt: skip
    # The diagonal (a language's own neurons on its own queries) is the related suppression.
    cross_methods = {method for method, _ in cross}
    for (method, kind, op), rel_units in sorted(related.items()):
        if kind != 0 or OPERATIONS[op] != "suppress" or method not in cross_methods:
            continue
        for target in sorted({u[1] for u in rel_units}):
            means = [unit_mean(rel_units[u]) for u in sorted(rel_units) if u[1] == target]
            cross_lingual.append({
                "method": vocab.methods[method], "source": target, "target": target, "units": len(means),
                "dp": _mean(m for m, _ in means if not math.isnan(m)), "nan": sum(n for _, n in means),
            })  # fmt: skip
    cross_lingual.sort(key=lambda r: (r["method"], r["source"] == "LIKN", r["source"], r["target"]))
    counts = [{
        "items": len(tested), "units": len(units), "items_skipped_no_neurons": skipped,
        "acc_before": _mean(t for t, _ in tested.values()),
    }]  # fmt: skip
    return {
        "intervention": intervention,
        "success_rate": success_rate,
        "cross_lingual": cross_lingual,
        "facts": facts,
        "counts": counts,
    }


def jaccard_table(name: str, neurons: NeuronFile, facts: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Mean Jaccard overlap of the per-language neuron sets between each pair of languages.

    For languages A, B the mean over facts having a non-empty set in both of ``|N_A ∩ N_B| / |N_A ∪ N_B|``.
    """
    wanted = sorted(neurons.facts) if facts is None else sorted(set(facts) & set(neurons.facts))
    languages = neurons.languages()
    rows = []
    for a in languages:
        for b in languages:
            values = []
            for uuid in wanted:
                sets = neurons.facts[uuid].languages
                if sets.get(a) and sets.get(b):
                    sa, sb = set(sets[a]), set(sets[b])
                    values.append(len(sa & sb) / len(sa | sb))
            rows.append({"method": name, "language_a": a, "language_b": b, "facts": len(values),
                         "jaccard": _mean(values)})  # fmt: skip
    return rows


def layer_distribution(neurons: NeuronFile) -> dict[str, list[int]]:
    """Neurons per layer of each kind of set.

    ``KN``: per-language sets (every (fact, language) counted); ``LIKN``; ``uncertainty``; ``DKN``: each
    fact's distinct DKN members.
    """
    counts = {kind: [0] * neurons.num_layers for kind in ("KN", "LIKN", "uncertainty", "DKN")}
    for fact in neurons.facts.values():
        for ns in fact.languages.values():
            for layer, _ in ns:
                counts["KN"][layer] += 1
        for layer, _ in fact.language_independent:
            counts["LIKN"][layer] += 1
        for layer, _ in fact.uncertainty:
            counts["uncertainty"][layer] += 1
        for layer, _ in fact.degenerate():
            counts["DKN"][layer] += 1
    return counts
