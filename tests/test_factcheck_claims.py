"""Claims from RML-LAMA records: labels (positive = false claim), ids, causal filter, split by uuid."""

from __future__ import annotations

from pathlib import Path

import pytest

from knlight.data import DataError, read_records
from knlight.factcheck.claims import (
    FALSE_CLAIM,
    TRUE_CLAIM,
    Claim,
    build_claims,
    claim_counts,
    split_claims,
)

FIXTURE = Path(__file__).parent / "fixtures" / "rml_small.jsonl"


def test_true_object_is_a_true_claim_and_each_wrong_object_a_false_one() -> None:
    records = read_records(FIXTURE)
    claims = build_claims(records)
    assert len(claims) == 12 * 4  # 12 records, 1 query each, object + 3 wrong objects
    assert [c.claim_id for c in claims] == list(range(len(claims)))
    by_record = {(r.uuid, r.language): r for r in records}
    for c in claims:
        record = by_record[(c.uuid, c.language)]
        assert c.query == record.queries[c.query_id] and c.relation == record.relation
        if c.candidate_index == 0:
            assert c.candidate == record.object and c.label == TRUE_CLAIM and not c.is_false
        else:
            assert c.candidate == record.wrong_objects[c.candidate_index - 1]
            assert c.label == FALSE_CLAIM and c.is_false
    assert claim_counts(claims) == {"facts": 4, "claims": 48, "false_claims": 36, "true_claims": 12}
    keys = [(c.uuid, c.language, c.query_id, c.candidate_index) for c in claims]
    assert keys == sorted(keys)


def test_causal_models_skip_queries_that_start_with_the_slot() -> None:
    records = read_records(FIXTURE)
    causal = build_claims(records, model_kind="causal", queries_per_fact=None, max_wrong=1)
    masked = build_claims(records, model_kind="masked", queries_per_fact=None, max_wrong=1)
    assert all(not c.query.startswith("[Y]") for c in causal)
    assert any(c.query.startswith("[Y]") for c in masked) and len(masked) > len(causal)
    assert len(masked) == 2 * sum(len(r.queries) for r in records)


def test_item_round_trip_and_answer_is_the_candidate() -> None:
    claim = build_claims(read_records(FIXTURE), max_wrong=1)[1]
    item = claim.to_item()
    assert item["answer"] == claim.candidate and Claim.from_item(item) == claim


def test_split_by_uuid_keeps_every_claim_of_a_fact_together() -> None:
    records = read_records(FIXTURE)
    claims = build_claims(records)
    parts = split_claims(claims, records, (0.5, 0.25, 0.25), seed=5)
    assert sum(len(p) for p in parts.values()) == len(claims)
    uuids = {name: {c.uuid for c in part} for name, part in parts.items()}
    assert (
        uuids["train"] & uuids["val"]
        == uuids["train"] & uuids["test"]
        == uuids["val"] & uuids["test"]
        == set()
    )
    assert [len(uuids[n]) for n in ("train", "val", "test")] == [2, 1, 1]  # the tiny config's split


def test_bad_options_and_records_without_wrong_objects() -> None:
    records = read_records(FIXTURE)
    with pytest.raises(DataError, match="queries_per_fact"):
        build_claims(records, queries_per_fact=0)
    with pytest.raises(DataError, match="max_wrong"):
        build_claims(records, max_wrong=0)
    for r in records:
        r.wrong_objects = []
    with pytest.raises(DataError, match="no record has wrong_objects"):
        build_claims(records)
