"""Deterministic, order-independent choices keyed on fact uuids: splits and subsets."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from typing import TypeVar

from knlight.data.records import FactRecord
from knlight.errors import DataError

SPLIT_NAMES: tuple[str, str, str] = ("train", "val", "test")

T = TypeVar("T")


def stable_fraction(uuid: str, seed: int, purpose: str = "") -> float:
    """Maps (uuid, seed, purpose) to a number in [0, 1) that never changes between runs or machines.

    Args:
        uuid: The fact identifier.
        seed: The seed.
        purpose: Separates independent uses (e.g. "split" vs "subset") so they are not correlated.

    Returns:
        A pseudo-random fraction in [0, 1).
    """
    digest = hashlib.sha256(f"{purpose}\x00{seed}\x00{uuid}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_uuid(
    records: Iterable[FactRecord],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> dict[str, list[FactRecord]]:
    """Splits records into train/val/test by fact, so a uuid never lands in two splits.

    A fact's split depends only on its uuid and the seed (a hash compared with the cumulative fractions),
    not on the input order nor on which other facts are present: filtering by language or relation, or
    rebuilding with more facts, never moves a fact from test to train. The sizes are therefore close to,
    not exactly, the fractions; a split can be empty when there are very few facts.

    Args:
        records: The records (all languages of a fact go to the same split).
        fractions: Train, val and test fractions; non-negative, summing to 1.
        seed: Changes the assignment.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``, each in input order.

    Raises:
        DataError: If the fractions are not three non-negative numbers summing to 1.
    """
    fractions = tuple(float(fraction) for fraction in fractions)
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0):
        raise DataError(
            f"split fractions {fractions}: give three non-negative numbers (train, val, test) summing to 1, "
            "e.g. (0.8, 0.1, 0.1)."
        )
    train_end = fractions[0]
    val_end = fractions[0] + fractions[1]
    splits: dict[str, list[FactRecord]] = {name: [] for name in SPLIT_NAMES}
    split_of_uuid: dict[str, str] = {}
    for record in records:
        name = split_of_uuid.get(record.uuid)
        if name is None:
            position = stable_fraction(record.uuid, seed, "split")
            name = "train" if position < train_end else "val" if position < val_end else "test"
            split_of_uuid[record.uuid] = name
        splits[name].append(record)
    return splits


def first_by_hash(uuids: Iterable[str], count: int | None, seed: int, purpose: str = "subset") -> list[str]:
    """Picks a deterministic pseudo-random subset of uuids, independent of their order.

    Args:
        uuids: Candidate uuids (duplicates are ignored).
        count: How many to keep; None keeps all.
        seed: Changes the subset.
        purpose: Separates independent uses of the hash.

    Returns:
        The kept uuids, ordered by their hash.
    """
    ordered = sorted(set(uuids), key=lambda uuid: (stable_fraction(uuid, seed, purpose), uuid))
    return ordered if count is None else ordered[:count]
