"""Edit requests: which facts an editing run changes, into what, on which languages, in which group.

Requests are explicit (a list or a JSONL file: ``{"uuid", "new_object", "languages"}``) or derived: every fact of
the data's train split in a seeded order, the new object its first wrong object. In ``inject`` mode the new
object is the true one and a derived fact qualifies only when the model does not know it (a check the caller
supplies: it needs forwards). Pure Python.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from knlight.data.records import FactRecord
from knlight.data.splits import split_by_uuid, stable_fraction
from knlight.editing.options import EditRequests
from knlight.editing.rules import Neuron, NeuronRule

log = logging.getLogger(__name__)

FactsByUuid = Mapping[str, Mapping[str, FactRecord]]
"""``{uuid: {language: record}}``."""


@dataclass
class EditRequest:
    """One fact to edit.

    Attributes:
        uuid: The fact.
        languages: Edit languages (their first rephrasings are trained on).
        new: New object per language.
        old: The fact's current (true) object per language.
        competitors: Per language, the objects the new one must out-rank (``rank`` measure): the old object
            when editing, the wrong objects when injecting.
        neurons: The fact's neurons under the rule.
        group: Training group (sequential editing trains groups one after another).
    """

    uuid: str
    languages: list[str]
    new: dict[str, str]
    old: dict[str, str]
    competitors: dict[str, list[str]]
    neurons: list[Neuron] = field(default_factory=list)
    group: int = 0


def read_edit_requests(edits: str | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]] | None:
    """Explicit edit requests from a list or a JSONL file; None for ``"derive"``.

    Each request: ``{"uuid": ..., "new_object": str | {lang: str} (optional: default the first wrong object),
    "languages": [...] (optional: default the module's edit_languages)}``.

    Raises:
        ValueError: A file line that is not a JSON object with a uuid.
    """
    if isinstance(edits, str):
        if edits == "derive":
            return None
        path = Path(edits)
        if not path.is_file():
            raise FileNotFoundError(
                f"edits={edits!r}: neither 'derive' nor an existing JSONL file of edit requests"
            )
        out = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from error
                if not isinstance(out[-1], dict) or "uuid" not in out[-1]:
                    raise ValueError(f"{path}:{number}: an edit request is a JSON object with a 'uuid'")
        return out
    return [dict(e) for e in edits]


def derived_specs(
    records: Sequence[FactRecord], split_fractions: Sequence[float], split_seed: int, seed: int
) -> list[dict[str, Any]]:
    """``edits: derive``: every fact of the train split (``split_fractions``, ``split_seed``), in an order
    seeded by ``seed``; the request's new object is left to :func:`make_request`."""
    train = split_by_uuid(records, split_fractions, split_seed)["train"]
    uuids = sorted({r.uuid for r in train}, key=lambda u: (stable_fraction(u, seed, "edits"), u))
    return [{"uuid": u, "derived": True} for u in uuids]


def edit_specs(
    edits: str | Sequence[Mapping[str, Any]],
    records: Sequence[FactRecord],
    split_fractions: Sequence[float],
    split_seed: int,
    seed: int,
) -> list[dict[str, Any]]:
    """The request specs of ``requests.edits``: explicit (:func:`read_edit_requests`) or derived
    (:func:`derived_specs`)."""
    specs = read_edit_requests(edits)
    return derived_specs(records, split_fractions, split_seed, seed) if specs is None else specs


def make_request(
    spec: Mapping[str, Any],
    by_fact: FactsByUuid,
    mode: str,
    train_languages: Sequence[str],
    rule: NeuronRule,
) -> EditRequest | None:
    """The request of one spec; None (with a warning) when an edit language has no new object.

    Raises:
        ValueError: The fact is not in the data, or has no record in one of its edit languages.
    """
    uuid = str(spec["uuid"])
    per_language = by_fact.get(uuid)
    if per_language is None:
        raise ValueError(f"edit request for uuid {uuid!r}: no such fact in the data")
    languages = list(spec.get("languages") or train_languages)
    absent = [lang for lang in languages if lang not in per_language]
    if absent:
        raise ValueError(f"edit request {uuid}: the fact has no record in {absent}")
    new: dict[str, str] = {}
    for lang, record in per_language.items():
        given = spec.get("new_object")
        if mode == "inject":
            new[lang] = record.object
        elif isinstance(given, str):
            new[lang] = given
        elif isinstance(given, Mapping) and lang in given:
            new[lang] = str(given[lang])
        elif given is None and record.wrong_objects:
            new[lang] = record.wrong_objects[0]
    if any(lang not in new for lang in languages):
        log.warning("fact %s: no new object in %s (no wrong_objects?): skipped", uuid, languages)
        return None
    old = {lang: r.object for lang, r in per_language.items()}
    if mode == "inject":
        competitors = {lang: list(r.wrong_objects) for lang, r in per_language.items()}
    else:
        competitors = {lang: [old[lang]] for lang in new}
    return EditRequest(uuid, languages, new, old, competitors, rule.neurons(uuid))


def build_requests(
    specs: Sequence[Mapping[str, Any]],
    by_fact: FactsByUuid,
    *,
    mode: str,
    train_languages: Sequence[str],
    rule: NeuronRule,
    options: EditRequests,
    unknown: Callable[[str], bool],
) -> list[EditRequest]:
    """The requests of a run, numbered into groups of ``options.edits_per_group``.

    Facts without neurons under the rule are skipped (with a warning); in ``inject`` mode, so are derived facts
    the model knows (``unknown(uuid)`` is False), checked only until ``options.max_edits`` facts are found.

    Raises:
        ValueError: No fact is left to edit.
    """
    requests = []
    for spec in specs:
        request = make_request(spec, by_fact, mode, train_languages, rule)
        if request is None:
            continue
        if mode == "inject" and spec.get("derived") and not unknown(request.uuid):
            continue  # checked lazily: only until max_edits facts are found
        if not request.neurons:
            log.warning("fact %s has no neurons under rule %s: not edited", request.uuid, rule.rule)
            continue
        requests.append(request)
        if options.max_edits is not None and len(requests) == options.max_edits:
            break
    if not requests:
        raise ValueError(
            f"no fact to {mode}: check edits={options.edits!r}, the neuron file and neuron_rule="
            f"{rule.rule!r} (facts need neurons, and wrong_objects for a derived new object)"
        )
    size = options.edits_per_group or len(requests)
    for k, request in enumerate(requests):
        request.group = k // size
    return requests
