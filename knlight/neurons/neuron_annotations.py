"""The optional keys of a neuron file's fact entry beyond the neuron sets: the knowledge filter's status,
LIKN's languages, carriers / upstream neurons and their effects, specificity labels and consistency.

Part of the ``knlight-neurons/1`` format (:mod:`knlight.neurons.neuron_file`): each key is written only when
it was computed and read as empty when absent, so files written before a key existed stay readable. Pure Python.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Neuron = tuple[int, int]
NeuronList = Callable[[Any, str], list[Neuron]]
"""Reads and validates a list of neurons (value, where) against the file's model shape."""
LABELS: tuple[str, ...] = ("fact", "relation", "generic")
"""Specificity labels, most specific first (the order in which the lists report them)."""
DROP_KEYS: tuple[str, ...] = ("own", "same_relation", "other_relations")
ANNOTATION_KEYS: tuple[str, ...] = (
    "known", "language_independent_over", "carriers", "upstream", "effects", "specificity", "consistency",
)  # fmt: skip


@dataclass
class KnownStatus:
    """The knowledge filter's verdict on one (fact, language).

    Attributes:
        known: The model knows the fact in the language (enough queries passed).
        query_ids: The queries that passed (gold rank or P within the filter's bounds).
        of: How many queries the language had.
    """

    known: bool
    query_ids: list[int]
    of: int

    def to_json(self) -> dict[str, Any]:
        return {
            "known": self.known,
            "passed": len(self.query_ids),
            "of": self.of,
            "query_ids": self.query_ids,
        }


@dataclass
class NeuronSpecificity:
    """How shared one selected neuron is (see :mod:`knlight.selection.specificity`).

    Attributes:
        label: ``fact``, ``relation`` or ``generic``.
        facts: Facts of the file that select it (any set).
        relations: Their relations.
        languages: Languages in which it is selected for this fact.
        drops: Mean relative drop of P(answer) when it is suppressed, on ``own`` (this fact's known queries),
            ``same_relation`` and ``other_relations`` queries (only when measured).
    """

    label: str
    facts: int
    relations: int
    languages: int
    drops: dict[str, float] = field(default_factory=dict)


def _per_fact(per_language: dict[str, list[Neuron]], fact: list[Neuron]) -> dict[str, Any]:
    return {"languages": {g: [list(n) for n in ns] for g, ns in sorted(per_language.items())},
            "fact": [list(n) for n in fact]}  # fmt: skip


def annotations_json(fact: Any) -> dict[str, Any]:
    """The optional keys of a fact's entry beyond the neuron sets (only those that were computed)."""
    out: dict[str, Any] = {}
    if fact.known:
        out["known"] = {lang: status.to_json() for lang, status in sorted(fact.known.items())}
    if fact.likn_languages is not None:
        out["language_independent_over"] = list(fact.likn_languages)
    if fact.carriers is not None:
        out["carriers"] = _per_fact(fact.carriers, fact.carriers_fact)
        out["upstream"] = _per_fact(fact.upstream, fact.upstream_fact)
        out["effects"] = {
            lang: [
                [a, b, round(t, 6), round(d, 6), None if u is None else round(u, 6)] for a, b, t, d, u in rows
            ]
            for lang, rows in sorted(fact.effects.items())
        }
    if fact.specificity:
        out["specificity"] = [
            {"neuron": list(n), "label": s.label, "facts": s.facts, "relations": s.relations,
             "languages": s.languages, **{k: round(v, 6) for k, v in s.drops.items()}}
            for n, s in fact.specificity.items()
        ]  # fmt: skip
    if fact.consistency:
        out["consistency"] = {lang: dict(v) for lang, v in sorted(fact.consistency.items())}
    return out


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _per_language_sets(
    value: Any, at: str, neurons: NeuronList, fail: Callable[[str], Exception]
) -> tuple[dict[str, list[Neuron]], list[Neuron]]:
    if not isinstance(value, dict) or set(value) - {"languages", "fact"}:
        raise fail(f"{at}: expected an object with 'languages' and 'fact'")
    languages = value.get("languages", {})
    if not isinstance(languages, dict):
        raise fail(f"{at}.languages: must map languages to neuron lists")
    per_language = {g: neurons(ns, f"{at}.languages.{g}") for g, ns in languages.items()}
    return per_language, neurons(value.get("fact", []), f"{at}.fact")


def parse_annotations(
    entry: dict[str, Any], at: str, fact: Any, neurons: NeuronList, fail: Callable[[str], Exception]
) -> None:
    """Read the optional keys of one fact's entry into ``fact`` (a FactNeurons), validating them.

    Raises:
        The exception ``fail`` builds, naming the fact and the key.
    """
    for lang, status in (entry.get("known") or {}).items():
        where = f"{at}, known.{lang}"
        if (
            not isinstance(status, dict)
            or not isinstance(status.get("known"), bool)
            or not _count(status.get("of"))
            or not isinstance(status.get("query_ids", []), list)
            or not all(_count(q) for q in status.get("query_ids", []))
        ):
            raise fail(f'{where}: expected {{"known": bool, "passed": n, "of": n, "query_ids": [...]}}')
        fact.known[lang] = KnownStatus(status["known"], list(status.get("query_ids", [])), status["of"])
    over = entry.get("language_independent_over")
    if over is not None:
        if not isinstance(over, list) or not all(isinstance(g, str) for g in over):
            raise fail(f"{at}, language_independent_over: must be a list of language codes")
        fact.likn_languages = list(over)
    if "carriers" in entry:
        fact.carriers, fact.carriers_fact = _per_language_sets(
            entry["carriers"], f"{at}, carriers", neurons, fail
        )
    if "upstream" in entry:
        fact.upstream, fact.upstream_fact = _per_language_sets(
            entry["upstream"], f"{at}, upstream", neurons, fail
        )
    effects = entry.get("effects", {})
    if not isinstance(effects, dict):
        raise fail(f"{at}, effects: must map languages to [[layer, index, total, direct, sufficiency], ...]")
    for lang, rows in effects.items():
        parsed = []
        for row in rows if isinstance(rows, list) else [rows]:  # not a list: reported as its row
            if not _effect_row(row):
                raise fail(
                    f"{at}, effects.{lang}: each row is [layer, index, total, direct, sufficiency or null], "
                    f"got {row!r}"
                )
            ((layer, index),) = neurons([row[:2]], f"{at}, effects.{lang}")
            sufficiency = float(row[4]) if len(row) == 5 and row[4] is not None else None
            parsed.append((layer, index, float(row[2]), float(row[3]), sufficiency))
        fact.effects[lang] = parsed
    for k, item in enumerate(entry.get("specificity") or []):
        where = f"{at}, specificity[{k}]"
        if not isinstance(item, dict) or item.get("label") not in LABELS:
            raise fail(f"{where}: expected an object with a label in {', '.join(LABELS)}")
        counts = [item.get(key) for key in ("facts", "relations", "languages")]
        if not all(_count(c) for c in counts) or not all(_number(item[d]) for d in DROP_KEYS if d in item):
            raise fail(f"{where}: facts, relations, languages must be counts and the drops numbers")
        (neuron,) = neurons([item.get("neuron")], where)
        drops = {d: float(item[d]) for d in DROP_KEYS if d in item}
        facts, relations, languages = (int(c) for c in counts)  # type: ignore[arg-type]  # checked by _count
        fact.specificity[neuron] = NeuronSpecificity(item["label"], facts, relations, languages, drops)
    consistency = entry.get("consistency", {})
    if not isinstance(consistency, dict) or not all(isinstance(v, dict) for v in consistency.values()):
        raise fail(f'{at}, consistency: must map languages to {{"jaccard", "queries", "consistent"}}')
    fact.consistency = {lang: dict(v) for lang, v in consistency.items()}


def _effect_row(row: Any) -> bool:
    """A row of ``effects``: ``[layer, index, total, direct, sufficiency or null]`` (four numbers: a file from
    before the sufficiency was measured)."""
    if not isinstance(row, list) or len(row) not in (4, 5) or not all(_number(v) for v in row[2:4]):
        return False
    return len(row) == 4 or row[4] is None or _number(row[4])
