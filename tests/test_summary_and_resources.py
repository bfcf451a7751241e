"""The bundled quickstart facts and the attribution summary."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import REPO

from knlight.data import read_records
from knlight.selection.summary import summarize

QUICKSTART = REPO / "knlight" / "resources" / "quickstart.jsonl"


def test_bundled_quickstart_facts_are_parallel_in_three_languages_incl_non_latin() -> None:
    records = read_records(QUICKSTART)
    languages = {r.language for r in records}
    assert len(languages) >= 3 and "ja" in languages
    by_fact: dict[str, set[str]] = {}
    for r in records:
        by_fact.setdefault(r.uuid, set()).add(r.language)
        assert r.queries and all(q.count("[Y]") == 1 for q in r.queries)
    assert len(by_fact) >= 2 and all(langs == languages for langs in by_fact.values())


def _item(uuid: str, language: str, query_id: int, neurons: list[list[float]]) -> dict:
    return {
        "uuid": uuid, "language": language, "relation": "P36", "query_id": query_id, "query": "q [Y]",
        "answer": "Paris", "prob": 0.5, "neurons": neurons, "residual": [], "layer_mass": [],
    }  # fmt: skip


def test_summary_refines_per_language_and_intersects_across_languages(tmp_path: Path) -> None:
    items = [
        _item("f1", "en", 0, [[3, 7, 0.9], [1, 2, 0.5]]),
        _item("f1", "en", 1, [[3, 7, 0.8]]),
        _item("f1", "de", 0, [[3, 7, 0.7], [1, 2, 0.6]]),
        _item("f1", "de", 1, [[1, 2, 0.9]]),
    ]
    path = tmp_path / "attributions.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    # p = 1.0: en keeps L3.7 only (both queries); de keeps L1.2 only; nothing is shared.
    assert "language-independent: none" in summarize(path, p=1.0)
    # p = 0.5: en {L3.7, L1.2}, de {L3.7, L1.2}: both are shared.
    text = summarize(path, p=0.5)
    assert "language-independent: L1.2, L3.7" in text
    assert "top: L3.7 (0.85)" in text  # en: mean score over its 2 queries
