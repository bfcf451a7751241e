"""The files of a saved plant: RML-LAMA records (``records.jsonl``) and the ground truth (``truth.json``).

``records.jsonl`` holds one RML-LAMA record per (fact, language); ``truth.json`` a list of
``{"uuid", "language", "layer", "index", "kind"}`` (+ ``"pair"`` for degenerate neurons). The folder that holds
them is written and read by :mod:`knlight.planted.model`. Pure, no torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from knlight.errors import KnlightError
from knlight.io import read_json, write_text_atomically
from knlight.planted.config import KINDS

TRUTH_KEYS = ("uuid", "language", "layer", "index", "kind")
RECORD_KEYS = ("uuid", "relation", "language", "subject", "object", "queries", "wrong_objects")


class PlantedFileError(KnlightError, ValueError):
    """A saved plant is missing a file or holds a malformed entry."""


def write_records(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write RML-LAMA records as JSONL (UTF-8, one record per line, keys in the documented order; atomically)."""
    path = Path(path)
    lines = [json.dumps({k: rec[k] for k in RECORD_KEYS if k in rec}, ensure_ascii=False) for rec in records]
    write_text_atomically(path, "\n".join(lines) + "\n")
    return path


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read RML-LAMA records written by :func:`write_records` (checks keys and the ``[Y]`` slot).

    Raises:
        PlantedFileError: naming the file and line of a malformed record.
    """
    path = Path(path)
    if not path.is_file():
        raise PlantedFileError(f"{path} does not exist; save the plant with PlantedModel.save(dir) first")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise PlantedFileError(f"{path}:{number}: not valid JSON ({err.msg})") from err
        missing = [k for k in RECORD_KEYS[:6] if k not in rec]
        if missing:
            raise PlantedFileError(f"{path}:{number}: record lacks {missing}")
        bad = [q for q in rec["queries"] if q.count("[Y]") != 1]
        if bad:
            raise PlantedFileError(f"{path}:{number}: queries {bad} must contain the object slot [Y] once")
        out.append(rec)
    return out


def read_truth(
    path: str | Path, num_layers: int | None = None, d_ff: int | None = None
) -> list[dict[str, Any]]:
    """Read ``truth.json`` and check every entry (keys, kind, layer/index inside the model if sizes given).

    Raises:
        PlantedFileError: naming the file and the entry.
        DataError: The file is not valid JSON (naming the line).
    """
    path = Path(path)
    if not path.is_file():
        raise PlantedFileError(f"{path} does not exist; save the plant with PlantedModel.save(dir) first")
    truth = read_json(path)
    if not isinstance(truth, list):
        raise PlantedFileError(f"{path}: expected a JSON list of neuron entries")
    for k, entry in enumerate(truth):
        missing = [key for key in TRUTH_KEYS if key not in entry]
        if missing:
            raise PlantedFileError(f"{path}: entry {k} lacks {missing}")
        if entry["kind"] not in KINDS:
            raise PlantedFileError(f"{path}: entry {k} has kind {entry['kind']!r}; expected one of {KINDS}")
        layer, index = entry["layer"], entry["index"]
        if not (isinstance(layer, int) and isinstance(index, int) and layer >= 0 and index >= 0):
            raise PlantedFileError(
                f"{path}: entry {k} has layer/index {layer}/{index}; expected integers >= 0"
            )
        if (num_layers is not None and layer >= num_layers) or (d_ff is not None and index >= d_ff):
            raise PlantedFileError(
                f"{path}: entry {k} (layer {layer}, index {index}) is outside the model "
                f"({num_layers} layers x {d_ff} neurons)"
            )
    return truth
