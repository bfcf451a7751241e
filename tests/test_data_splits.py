"""Splitting by fact: deterministic, order-independent, no uuid in two splits."""

from __future__ import annotations

import random

import pytest

from knlight.data import DataError, FactRecord, split_by_uuid
from knlight.data.splits import first_by_hash


def records_for(count: int, languages: tuple[str, ...] = ("en", "de")) -> list[FactRecord]:
    return [
        FactRecord(f"P36:Q{index}", "P36", language, f"s{index}", f"o{index}", [f"s{index} [Y]"])
        for index in range(count)
        for language in languages
    ]


def uuids_by_split(splits: dict[str, list[FactRecord]]) -> dict[str, set[str]]:
    return {name: {record.uuid for record in records} for name, records in splits.items()}


def test_no_uuid_lands_in_two_splits_and_languages_stay_together() -> None:
    records = records_for(500, ("en", "de", "ja"))
    splits = split_by_uuid(records, (0.8, 0.1, 0.1), seed=0)
    by_split = uuids_by_split(splits)
    assert not (
        by_split["train"] & by_split["val"]
        or by_split["train"] & by_split["test"]
        or by_split["val"] & by_split["test"]
    )
    assert sum(len(split) for split in splits.values()) == len(records)
    for split in splits.values():
        languages_per_uuid: dict[str, set[str]] = {}
        for record in split:
            languages_per_uuid.setdefault(record.uuid, set()).add(record.language)
        assert all(languages == {"en", "de", "ja"} for languages in languages_per_uuid.values())
    # Roughly the asked fractions (500 facts: a hash split is within a few percent).
    assert 360 <= len(by_split["train"]) <= 440
    assert 25 <= len(by_split["val"]) <= 75


def test_split_is_independent_of_order_and_of_other_facts() -> None:
    records = records_for(200)
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    assert uuids_by_split(split_by_uuid(records, seed=3)) == uuids_by_split(split_by_uuid(shuffled, seed=3))
    # Dropping facts never moves the remaining ones to another split.
    subset = uuids_by_split(split_by_uuid(records[:100], seed=3))
    full = uuids_by_split(split_by_uuid(records, seed=3))
    assert all(subset[name] <= full[name] for name in subset)


def test_seed_changes_the_split() -> None:
    records = records_for(200)
    assert uuids_by_split(split_by_uuid(records, seed=0)) != uuids_by_split(split_by_uuid(records, seed=1))


def test_all_train_fraction_puts_everything_in_train() -> None:
    splits = split_by_uuid(records_for(30), (1.0, 0.0, 0.0))
    assert len(splits["train"]) == 60 and not splits["val"] and not splits["test"]


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.8, 0.1, 0.2), (1.2, -0.1, -0.1)])
def test_bad_fractions_are_rejected(fractions: tuple[float, ...]) -> None:
    with pytest.raises(DataError, match=r"split fractions .*three non-negative numbers"):
        split_by_uuid(records_for(3), fractions)


def test_first_by_hash_is_order_independent_and_nested() -> None:
    uuids = [f"u{index}" for index in range(50)]
    assert first_by_hash(uuids, 10, seed=0) == first_by_hash(reversed(uuids), 10, seed=0)
    assert first_by_hash(uuids, 5, seed=0) == first_by_hash(uuids, 10, seed=0)[:5]
    assert first_by_hash(uuids, 10, seed=0) != first_by_hash(uuids, 10, seed=1)
