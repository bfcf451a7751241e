"""The rows of an editing run: training rows, evaluation rows, KL rows, and the schedule of global batches.

* training (edit) rows: one per edit query (the first ``edit_queries`` rephrasings of the fact in each edit
  language), answer = the new object, per group of requests;
* evaluation rows (validate and test, identical): every query of every edited fact in every language (roles
  ``reliability``, ``generality_lang``, ``generality_cross``) and every query of the held-out unrelated facts
  (``locality``); in ``enhance`` mode every query of every fact that has neurons (role ``facts``);
* KL rows: the queries of the unrelated facts kept for the locality term of the loss.

Unrelated facts (not edited) are sorted by a hash of their uuid and alternately assigned to the KL pool and the
locality-evaluation pool, so the evaluation never measures queries the loss saw.

The schedule (:func:`schedule`): per group, ``steps`` global batches, each a seeded random subset of the
group's edit rows, each row paired with the next KL query, padded with weight-0 rows to the global batch. Row
weights make the loss the exact mean over each global batch, so a DDP run equals a single-process run with the
same global batch. Pure Python.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from knlight.data.records import FactRecord
from knlight.data.splits import stable_fraction
from knlight.editing.requests import EditRequest
from knlight.editing.rules import Neuron, NeuronRule

log = logging.getLogger(__name__)

Row = dict[str, Any]
ItemsOf = Callable[[FactRecord], list[Row]]
"""The queries (items: ``uuid``, ``language``, ``query_id``, ``query``, ...) of a record that the model can use."""

_ITEM_KEYS = ("uuid", "language", "query_id", "query")


@dataclass
class EditPlan:
    """What an editing run works on: the facts, the requests and their rows."""

    by_fact: dict[str, dict[str, FactRecord]]
    """The records, ``{uuid: {language: record}}``."""
    languages: list[str]
    """The data's languages, sorted."""
    train_languages: list[str]
    """The default edit languages (a request may name its own)."""
    requests: list[EditRequest] = field(default_factory=list)
    """The facts to edit (empty in ``enhance`` mode)."""
    eval_rows: list[Row] = field(default_factory=list)
    """The evaluation rows (validate and test)."""
    edit_rows: dict[int, list[Row]] = field(default_factory=dict)
    """The training rows of each group."""
    kl_rows: list[Row] = field(default_factory=list)
    """The unrelated queries of the locality term."""
    enhance_neurons: dict[str, list[Neuron]] = field(default_factory=dict)
    """``enhance`` mode: the neurons of each fact that has any."""


def plan_facts(records: Sequence[FactRecord], edit_languages: Sequence[str] | None) -> EditPlan:
    """A plan of the records with no rows yet.

    Args:
        records: The data.
        edit_languages: The default edit languages (None: ``en`` when the data has it, else its first language).

    Raises:
        ValueError: An edit language is not in the data.
    """
    by_fact: dict[str, dict[str, FactRecord]] = {}
    for record in records:
        by_fact.setdefault(record.uuid, {})[record.language] = record
    languages = sorted({r.language for r in records})
    train_languages = list(edit_languages or ["en" if "en" in languages else languages[0]])
    missing = [lang for lang in train_languages if lang not in languages]
    if missing:
        raise ValueError(f"edit_languages {missing} are not in the data (languages: {', '.join(languages)})")
    return EditPlan(by_fact, languages, train_languages)


def _base(item: Row) -> Row:
    return {key: item[key] for key in _ITEM_KEYS}


def plan_edits(
    plan: EditPlan, requests: list[EditRequest], items_of: ItemsOf, edit_queries: int | None, seed: int
) -> None:
    """Sets the plan's requests, evaluation rows, edit rows and KL rows.

    Args:
        plan: The plan (from :func:`plan_facts`).
        requests: The requests (see :func:`knlight.editing.requests.build_requests`).
        items_of: The usable queries of a record.
        edit_queries: Rephrasings per edit language trained on (the first ones); None: all.
        seed: Seeds the split of the unrelated facts into the KL and locality pools.

    Raises:
        ValueError: A request has no query to train on.
    """
    plan.requests = requests
    edited = {r.uuid for r in requests}
    plan.eval_rows, plan.edit_rows = [], {}
    for request in requests:
        for lang in sorted(request.new):
            items = items_of(plan.by_fact[request.uuid][lang])
            train_here = lang in request.languages
            cut = len(items) if edit_queries is None else edit_queries
            for k, item in enumerate(items):
                role = ("reliability" if k < cut else "generality_lang") if train_here else "generality_cross"
                plan.eval_rows.append({**_base(item), "role": role, "target": request.new[lang],
                                       "competitors": request.competitors[lang]})  # fmt: skip
                if role == "reliability":
                    row = {**_base(item), "answer": request.new[lang], "group": request.group}
                    plan.edit_rows.setdefault(request.group, []).append(row)
    unrelated = sorted(set(plan.by_fact) - edited, key=lambda u: (stable_fraction(u, seed, "locality"), u))
    plan.kl_rows = []
    for k, uuid in enumerate(unrelated):
        for lang in sorted(plan.by_fact[uuid]):
            record = plan.by_fact[uuid][lang]
            for item in items_of(record):
                if k % 2 == 0:
                    plan.kl_rows.append({**_base(item), "answer": record.object})
                else:
                    plan.eval_rows.append(
                        {**_base(item), "role": "locality", "target": record.object, "competitors": []}
                    )
    for request in requests:
        if not any(r["uuid"] == request.uuid for r in plan.edit_rows.get(request.group, [])):
            raise ValueError(
                f"edit request {request.uuid}: no query to train on in {request.languages} (a causal model "
                "cannot use queries that start with [Y]); choose other edit languages"
            )
    if not unrelated:
        log.warning("every fact is edited: no unrelated facts for the locality term and metric")
    elif len(unrelated) == 1:
        log.warning(
            "only one unrelated fact: it serves the locality term, none is left for the locality metric"
        )


def plan_enhancement(plan: EditPlan, rule: NeuronRule, items_of: ItemsOf) -> None:
    """``enhance`` mode: the facts' neurons and an evaluation row (role ``facts``) for each of their queries.

    Raises:
        ValueError: No fact of the data has neurons under the rule.
    """
    plan.eval_rows = []
    plan.enhance_neurons = {}
    for uuid in sorted(plan.by_fact):
        neurons = rule.neurons(uuid)
        if not neurons:
            continue
        plan.enhance_neurons[uuid] = neurons
        for lang in sorted(plan.by_fact[uuid]):
            record = plan.by_fact[uuid][lang]
            for item in items_of(record):
                plan.eval_rows.append({**_base(item), "role": "facts", "target": record.object,
                                       "competitors": list(record.wrong_objects)})  # fmt: skip
    if not plan.eval_rows:
        raise ValueError(f"enhance: no fact of the data has neurons under rule {rule.rule!r}")


def schedule(plan: EditPlan, steps: int, global_batch: int, seed: int) -> list[Row]:
    """The training rows in order: per group, ``steps`` global batches of ``global_batch`` rows.

    Each global batch holds a seeded random subset of the group's edit rows (all of them when they fit), each
    paired with the next unrelated query (``loc_query``, ``loc_answer``), padded with weight-0 rows;
    ``weight`` = 1 / real rows.
    """
    out: list[Row] = []
    cursor = 0
    for group in sorted(plan.edit_rows):
        rows = plan.edit_rows[group]
        rng = random.Random(f"{seed}:{group}:schedule")
        for _ in range(steps):
            chosen = rng.sample(rows, min(global_batch, len(rows)))
            batch = []
            for row in chosen:
                partner = plan.kl_rows[cursor % len(plan.kl_rows)] if plan.kl_rows else None
                cursor += 1
                batch.append({**row, "weight": 1.0 / len(chosen),
                              "loc_query": partner and partner["query"],
                              "loc_answer": partner and partner["answer"]})  # fmt: skip
            batch += [{**chosen[0], "weight": 0.0, "loc_query": None, "loc_answer": None}] * (
                global_batch - len(chosen)
            )
            out += batch
    return out
