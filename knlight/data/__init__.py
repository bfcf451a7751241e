"""RML-LAMA data: the record format, builders from the real sources, splits and the Lightning datamodule.

The datamodule (which imports Lightning) is loaded on first use, so the builders stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from knlight.data.records import (
    SLOT,
    SUBJECT_SLOT,
    FactRecord,
    load_records_dataset,
    manifest_path_for,
    read_manifest,
    read_records,
    record_counts,
    write_records,
)
from knlight.data.splits import split_by_uuid
from knlight.errors import DataError

if TYPE_CHECKING:
    from knlight.data.datamodule import RMLLamaDataModule, collate_items

__all__ = [
    "SLOT",
    "SUBJECT_SLOT",
    "DataError",
    "FactRecord",
    "RMLLamaDataModule",
    "collate_items",
    "load_records_dataset",
    "manifest_path_for",
    "read_manifest",
    "read_records",
    "record_counts",
    "split_by_uuid",
    "write_records",
]


def __getattr__(name: str) -> Any:
    if name in ("RMLLamaDataModule", "collate_items"):
        from knlight.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
