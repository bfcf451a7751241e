"""The files of an attribution run's output folder and their line format (pure: no Lightning).

``attributions.jsonl`` (one line per item, see :func:`item_line`), per-rank shards while a run is going,
``scores.safetensors`` (an item's tensors are named by :func:`tensor_key`), ``summary.json`` and ``run.json``
(see :mod:`knlight.runfolder.records`). Written by :class:`knlight.callbacks.AttributionWriter`, read by
:mod:`knlight.selection`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from knlight.errors import KnlightError

MERGED = "attributions.jsonl"
SCORES = "scores.safetensors"
SUMMARY = "summary.json"
RUN = "run.json"
LOCK = ".lock"
SHARD = re.compile(r"^a(\d+)-r(\d+)-b(\d+)\.jsonl$")
OUTPUT_DIR = "the AttributionWriter's output_dir, e.g. --trainer.callbacks.init_args.output_dir DIR"
START_OVER = f"choose another output folder ({OUTPUT_DIR}), or delete the folder to start over"

Key = tuple[Any, ...]


class RunFolderError(KnlightError, RuntimeError):
    """An output folder that cannot be used as it is: busy, other settings or inputs, damaged, incomplete."""


def shard_files(folder: Path) -> list[Path]:
    """The JSONL shards of ``folder``, in name order."""
    shards = folder / "shards"
    if not shards.is_dir():
        return []
    return sorted(p for p in shards.iterdir() if SHARD.match(p.name))


def has_results(folder: Path) -> bool:
    """True when ``folder`` holds merged results or shards."""
    return (folder / MERGED).is_file() or bool(shard_files(folder))


def short_float(value: float) -> float | None:
    """The shortest decimal that round-trips ``value`` as float32 (None for NaN, so the JSON stays valid)."""
    value32 = np.float32(value)
    return None if np.isnan(value32) else float(str(value32))


def item_line(prediction: dict[str, Any]) -> str:
    """One JSONL line for one predicted item (dense scores are not part of it).

    ``rank`` (the gold first answer token's rank under the clean model, 1 = top) is written after ``prob`` when
    the prediction has it; lines written before knlight recorded it have none and stay readable. ``method`` (how
    the scores were computed: ``ig`` or a labelled approximation) is written when the prediction has it.
    """
    record = {
        "uuid": prediction["uuid"],
        "language": prediction["language"],
        "relation": prediction.get("relation"),
        "query_id": prediction["query_id"],
        "query": prediction["query"],
        "answer": prediction["answer"],
        "prob": short_float(prediction["prob"]),
        **({"rank": int(prediction["rank"])} if prediction.get("rank") is not None else {}),
        "neurons": [
            [int(layer), int(index), short_float(score)] for layer, index, score in prediction["neurons"]
        ],
        "residual": [None if r is None else short_float(r) for r in prediction["residual"]],
        "layer_mass": [short_float(m) for m in prediction["layer_mass"]],
    }
    for name in ("method", "input_hash", "model_hash"):
        if name in prediction:
            record[name] = prediction[name]
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def line_key(line: str) -> tuple[Any, ...]:
    """``(uuid, language, query_id)`` of a JSONL line."""
    record = json.loads(line)
    return (record["uuid"], record["language"], record["query_id"])


def tensor_key(key: Sequence[Any]) -> str:
    """Name of an item's tensors in the scores file: its key as a JSON list, e.g. ``["Q90","fr",0]``."""
    return json.dumps(list(key), ensure_ascii=False, separators=(",", ":"))
