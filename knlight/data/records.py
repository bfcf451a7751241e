"""The RML-LAMA record format: one JSON object per line, one record per (fact, language).

A record looks like::

    {"uuid": "P36:Q142:Q90", "relation": "P36", "language": "fr", "subject": "France", "object": "Paris",
     "queries": ["la capitale de France est [Y]", "[Y] est la capitale de France"],
     "wrong_objects": ["Berlin", "Rome", "Madrid"]}

``uuid`` is the same for a fact in every language. Each query has the subject filled in and the object slot
written exactly once as ``[Y]``. ``wrong_objects`` (optional) are objects of other facts of the same
relation, never the true object, chosen as the same facts in every language.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from knlight.errors import DataError
from knlight.io import iter_jsonl, read_json, require_file, write_text_atomically

logger = logging.getLogger(__name__)

SLOT = "[Y]"
"""Marks the object slot in a query."""

SUBJECT_SLOT = "[X]"
"""Marks the subject slot in a template (never left in a record's queries)."""

REQUIRED_KEYS: tuple[str, ...] = ("uuid", "relation", "language", "subject", "object", "queries")
OPTIONAL_KEYS: tuple[str, ...] = ("wrong_objects",)


@dataclass
class FactRecord:
    """One fact in one language, with its cloze queries.

    Attributes:
        uuid: Identifier of the fact, the same in every language.
        relation: Wikidata relation id, e.g. "P36".
        language: Language code, e.g. "fr" or "zh-hans".
        subject: Subject label in this language ("" when a source does not give it).
        object: Object label in this language (the answer).
        queries: Cloze queries with the subject filled in and the object slot written once as ``[Y]``.
        wrong_objects: Objects of other facts of the same relation in this language (never the true
            object); the same wrong facts in every language.
    """

    uuid: str
    relation: str
    language: str
    subject: str
    object: str
    queries: list[str]
    wrong_objects: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Returns the record as a JSON-ready dict with the keys in the documented order."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> FactRecord:
        """Validates a decoded JSON object and turns it into a record.

        Args:
            data: The decoded object.
            where: Location for error messages, e.g. ``"facts.jsonl:12"``.

        Returns:
            The record.

        Raises:
            DataError: If a key is missing or unknown, a value has the wrong type, or a query does not
                contain ``[Y]`` exactly once (or still contains ``[X]``).
        """
        missing = [key for key in REQUIRED_KEYS if key not in data]
        if missing:
            raise DataError(
                f"{where}: missing key(s) {', '.join(missing)}; every record needs "
                f"{', '.join(REQUIRED_KEYS)} (and optionally wrong_objects)."
            )
        unknown = sorted(set(data) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
        if unknown:
            raise DataError(
                f"{where}: unknown key(s) {', '.join(unknown)}; allowed keys are "
                f"{', '.join(REQUIRED_KEYS + OPTIONAL_KEYS)}. Remove or rename them."
            )
        for key in ("uuid", "relation", "language", "subject", "object"):
            if not isinstance(data[key], str):
                raise DataError(f"{where}: '{key}' must be a string, got {type(data[key]).__name__}.")
        for key in ("uuid", "relation", "language", "object"):
            if not data[key].strip():
                raise DataError(f"{where}: '{key}' is empty; give a non-empty string.")
        queries = data["queries"]
        if not isinstance(queries, list) or not queries:
            raise DataError(f"{where}: 'queries' must be a non-empty list of strings.")
        for index, query in enumerate(queries):
            problem = query_problem(query)
            if problem:
                raise DataError(f"{where}: queries[{index}] {problem}.")
        wrong_objects = data.get("wrong_objects")
        if wrong_objects is None:
            wrong_objects = []
        if not isinstance(wrong_objects, list) or not all(isinstance(w, str) and w for w in wrong_objects):
            raise DataError(f"{where}: 'wrong_objects' must be a list of non-empty strings.")
        if data["object"] in wrong_objects:
            raise DataError(
                f"{where}: 'wrong_objects' contains the true object {data['object']!r}; remove it."
            )
        return cls(
            uuid=data["uuid"],
            relation=data["relation"],
            language=data["language"],
            subject=data["subject"],
            object=data["object"],
            queries=list(queries),
            wrong_objects=list(wrong_objects),
        )


def query_problem(query: Any) -> str | None:
    """Says what is wrong with a query, or returns None when it is well formed.

    Args:
        query: A candidate query.

    Returns:
        A short description of the problem (to follow a location in a message), or None.
    """
    if not isinstance(query, str):
        return f"must be a string, got {type(query).__name__}"
    slots = query.count(SLOT)
    if slots != 1:
        return f"must contain the object slot {SLOT} exactly once, found {slots} in {query!r}"
    if SUBJECT_SLOT in query:
        return f"still contains the subject slot {SUBJECT_SLOT} (fill in the subject): {query!r}"
    return None


def manifest_path_for(records_path: str | Path) -> Path:
    """Returns where the manifest of a records file lives: ``<stem>.manifest.json`` beside it.

    Args:
        records_path: The records JSONL file.

    Returns:
        The manifest path.
    """
    path = Path(records_path)
    return path.with_name(f"{path.stem}.manifest.json")


def validate_records_file(path: str | Path) -> list[FactRecord]:
    """Reads and validates a records file line by line, without the ``datasets`` library.

    Args:
        path: The records JSONL file.

    Returns:
        The records in file order.

    Raises:
        DataError: If the file is missing or empty, a line is malformed, a (uuid, language) pair repeats,
            or one uuid has different relations.
    """
    path = Path(path)
    require_file(
        path,
        "records file",
        "RML-LAMA records (one JSON object per line); build one with `python -m knlight.data.build`",
    )
    records: list[FactRecord] = []
    first_line_of: dict[tuple[str, str], int] = {}
    relation_of: dict[str, tuple[str, int]] = {}
    for line_number, data in iter_jsonl(path):
        where = f"{path}:{line_number}"
        record = FactRecord.from_dict(data, where)
        key = (record.uuid, record.language)
        if key in first_line_of:
            raise DataError(
                f"{where}: duplicate record for uuid {record.uuid!r} in language {record.language!r} "
                f"(first at line {first_line_of[key]}); keep one record per (fact, language)."
            )
        first_line_of[key] = line_number
        known = relation_of.setdefault(record.uuid, (record.relation, line_number))
        if known[0] != record.relation:
            raise DataError(
                f"{where}: uuid {record.uuid!r} has relation {record.relation!r} but {known[0]!r} at line "
                f"{known[1]}; a fact has one relation in every language."
            )
        records.append(record)
    if not records:
        raise DataError(f"{path}: no records (the file is empty); build it again or pass another file.")
    return records


def load_records_dataset(path: str | Path) -> Any:
    """Validates a records file, then loads it with the ``datasets`` library.

    Args:
        path: The records JSONL file.

    Returns:
        A ``datasets.Dataset`` with one row per record (in memory; no cache is left behind).

    Raises:
        DataError: As :func:`validate_records_file`.
    """
    import datasets  # heavy import, only when reading

    validate_records_file(path)
    progress_bars_were_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        # A throw-away cache: the file may be rewritten in place, and nothing should pile up in $HOME.
        with tempfile.TemporaryDirectory(prefix="knlight-records-") as cache_dir:
            return datasets.Dataset.from_json(str(path), cache_dir=cache_dir, keep_in_memory=True)
    finally:
        if progress_bars_were_enabled:
            datasets.enable_progress_bars()


def read_records(path: str | Path) -> list[FactRecord]:
    """Reads a records file (validated line by line first, then loaded with ``datasets``).

    Args:
        path: The records JSONL file.

    Returns:
        The records in file order.

    Raises:
        DataError: If the file is missing or any line is malformed (the message names file and line).
    """
    dataset = load_records_dataset(path)
    return [
        FactRecord(
            uuid=row["uuid"],
            relation=row["relation"],
            language=row["language"],
            subject=row["subject"],
            object=row["object"],
            queries=list(row["queries"]),
            wrong_objects=list(row.get("wrong_objects") or []),
        )
        for row in dataset.to_list()
    ]


def record_counts(records: Sequence[FactRecord]) -> dict[str, Any]:
    """Counts facts, records and queries overall, per language and per relation.

    Args:
        records: The records.

    Returns:
        A JSON-ready dict: ``facts``, ``records``, ``queries``, ``languages``, ``relations``,
        ``per_language`` and ``per_relation`` (each ``{"facts", "queries"}``).
    """
    per_language: dict[str, Counter[str]] = defaultdict(Counter)
    relation_uuids: dict[str, set[str]] = defaultdict(set)
    relation_queries: Counter[str] = Counter()
    for record in records:
        per_language[record.language]["facts"] += 1
        per_language[record.language]["queries"] += len(record.queries)
        relation_uuids[record.relation].add(record.uuid)
        relation_queries[record.relation] += len(record.queries)
    return {
        "facts": len({record.uuid for record in records}),
        "records": len(records),
        "queries": sum(len(record.queries) for record in records),
        "languages": sorted(per_language),
        "relations": sorted(relation_uuids, key=relation_sort_key),
        "per_language": {
            language: {"facts": counts["facts"], "queries": counts["queries"]}
            for language, counts in sorted(per_language.items())
        },
        "per_relation": {
            relation: {"facts": len(relation_uuids[relation]), "queries": relation_queries[relation]}
            for relation in sorted(relation_uuids, key=relation_sort_key)
        },
    }


def relation_sort_key(relation: str) -> tuple[int, str]:
    """Sorts Wikidata relation ids numerically (P17 before P101), other names after them."""
    digits = relation[1:]
    return (int(digits), relation) if relation[:1] == "P" and digits.isdigit() else (1 << 62, relation)


def write_records(path: str | Path, records: Iterable[FactRecord], manifest: Mapping[str, Any]) -> Path:
    """Writes records as JSONL and a manifest beside them, both atomically.

    Args:
        path: The records JSONL file to write.
        records: The records; each is validated first.
        manifest: What produced them (source, options, filters, warnings); counts per language and per
            relation are added under ``"counts"``.

    Returns:
        The manifest path (``<stem>.manifest.json`` beside ``path``).

    Raises:
        DataError: If a record is malformed or a (uuid, language) pair repeats.
    """
    path = Path(path)
    records = list(records)
    seen: set[tuple[str, str]] = set()
    lines = []
    for index, record in enumerate(records):
        data = record.to_dict()
        FactRecord.from_dict(data, f"record #{index} ({record.uuid}, {record.language})")
        key = (record.uuid, record.language)
        if key in seen:
            raise DataError(f"record #{index}: duplicate (uuid, language) {key}; write one record per pair.")
        seen.add(key)
        lines.append(json.dumps(data, ensure_ascii=False))
    full_manifest = {**manifest, "records_file": path.name, "counts": record_counts(records)}
    write_text_atomically(path, "".join(line + "\n" for line in lines))
    manifest_path = manifest_path_for(path)
    write_text_atomically(manifest_path, json.dumps(full_manifest, ensure_ascii=False, indent=2) + "\n")
    logger.info("wrote %d records to %s and the manifest to %s", len(records), path, manifest_path)
    return manifest_path


def read_manifest(records_path: str | Path) -> dict[str, Any]:
    """Reads the manifest written beside a records file.

    Args:
        records_path: The records JSONL file (not the manifest).

    Returns:
        The manifest.

    Raises:
        DataError: If the manifest is missing or malformed.
    """
    manifest_path = require_file(
        manifest_path_for(records_path),
        "manifest",
        "the manifest written by write_records beside the records",
    )
    return read_json(manifest_path)
