"""Write and read a planted model: model folder, RML-LAMA records, ground-truth file.

Layout of a saved plant (written atomically: into a temporary sibling folder, then renamed into place)::

    <dir>/model/          save_pretrained() of the model and its tokenizer (load with knlight.load_lm)
    <dir>/records.jsonl   RML-LAMA records, one per (fact, language)
    <dir>/truth.json      list of {"uuid", "language", "layer", "index", "kind"} (+ "pair" for degenerate)
    <dir>/plant.json      the PlantConfig and the verification report
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from knlight.errors import KnlightError
from knlight.planted.planter import KINDS, PlantConfig, PlantedModel, PlantedNeuron, config_to_dict

TRUTH_KEYS = ("uuid", "language", "layer", "index", "kind")
RECORD_KEYS = ("uuid", "relation", "language", "subject", "object", "queries", "wrong_objects")


class PlantedFileError(KnlightError, ValueError):
    """A saved plant is missing a file or holds a malformed entry."""


def write_records(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write RML-LAMA records as JSONL (UTF-8, one record per line, keys in the documented order)."""
    path = Path(path)
    lines = [json.dumps({k: rec[k] for k in RECORD_KEYS if k in rec}, ensure_ascii=False) for rec in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
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
    """
    path = Path(path)
    if not path.is_file():
        raise PlantedFileError(f"{path} does not exist; save the plant with PlantedModel.save(dir) first")
    truth = json.loads(path.read_text(encoding="utf-8"))
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


def neurons_from_truth(truth: list[dict[str, Any]]) -> list[PlantedNeuron]:
    """Group truth entries (one per language) back into planted neurons (first-seen order)."""
    grouped: dict[tuple[Any, ...], list[str]] = {}
    for entry in truth:
        key = (entry["uuid"], entry["kind"], entry["layer"], entry["index"], entry.get("pair"))
        grouped.setdefault(key, []).append(entry["language"])
    return [
        PlantedNeuron(u, kind, tuple(langs), layer, index, pair)
        for (u, kind, layer, index, pair), langs in grouped.items()
    ]


def save_planted(planted: PlantedModel, directory: str | Path) -> Path:
    """Write a planted model (see the module doc); an existing ``directory`` is replaced atomically."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        planted.lm.model.save_pretrained(tmp / "model")
        planted.lm.tokenizer.save_pretrained(tmp / "model")
        write_records(tmp / "records.jsonl", planted.records)
        (tmp / "truth.json").write_text(json.dumps(planted.truth, indent=1) + "\n", encoding="utf-8")
        meta = {"config": config_to_dict(planted.config), "report": planted.report}
        (tmp / "plant.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_planted(directory: str | Path) -> PlantedModel:
    """Load a plant written by :func:`save_planted` (model, records, truth, config and report)."""
    from knlight.lm import load_lm

    root = Path(directory)
    if not (root / "model").is_dir():
        raise PlantedFileError(
            f"{root} holds no model/ folder; is it a folder written by PlantedModel.save()?"
        )
    lm = load_lm(root / "model")
    records = read_records(root / "records.jsonl")
    truth = read_truth(root / "truth.json", lm.num_layers, lm.d_ff)
    meta_path = root / "plant.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    config = PlantConfig(**meta.get("config", {"model_type": lm.model.config.model_type}))
    return PlantedModel(lm, records, neurons_from_truth(truth), config, meta.get("report", {}))
