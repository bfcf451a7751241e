"""A planted model and its folder: :class:`PlantedModel`, :func:`save_planted`, :func:`load_planted`.

Layout of a saved plant (written atomically: into a temporary sibling folder, then renamed into place)::

    <dir>/model/          save_pretrained() of the model and its tokenizer (load with knlight.load_lm)
    <dir>/records.jsonl   RML-LAMA records, one per (fact, language)
    <dir>/truth.json      list of {"uuid", "language", "layer", "index", "kind"} (+ "pair" for degenerate)
    <dir>/plant.json      the PlantConfig and the verification report

Pure torch + transformers, no Lightning.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from knlight.io import read_json
from knlight.lm import LanguageModel, load_lm
from knlight.planted.config import CARRIER_KINDS, PlantConfig, PlantedNeuron, config_to_dict
from knlight.planted.export import PlantedFileError, read_records, read_truth, write_records


@dataclass
class PlantedModel:
    """A model with planted knowledge and its ground truth."""

    lm: LanguageModel
    """The planted :class:`~knlight.LanguageModel`."""
    records: list[dict[str, Any]]
    """RML-LAMA records of the planted facts (one per fact and language)."""
    neurons: list[PlantedNeuron]
    """The planted neurons."""
    config: PlantConfig
    """The plant configuration."""
    report: dict[str, Any] = field(default_factory=dict)
    """Verification numbers (see :func:`~knlight.planted.verify.verify_plant`)."""

    @property
    def truth(self) -> list[dict[str, Any]]:
        """Ground truth, one entry per (fact, language, neuron): ``uuid, language, layer, index, kind``.

        Degenerate entries also carry ``pair`` (the same id for both members).
        """
        out = []
        for n in self.neurons:
            for language in n.languages:
                entry: dict[str, Any] = {
                    "uuid": n.uuid,
                    "language": language,
                    "layer": n.layer,
                    "index": n.index,
                    "kind": n.kind,
                }
                if n.pair is not None:
                    entry["pair"] = n.pair
                out.append(entry)
        return out

    def neurons_for(
        self, uuid: str, language: str, kinds: tuple[str, ...] = CARRIER_KINDS
    ) -> list[PlantedNeuron]:
        """Planted neurons of a fact that fire in one language, restricted to ``kinds``."""
        return [n for n in self.neurons if n.uuid == uuid and language in n.languages and n.kind in kinds]

    def save(self, directory: str | Path) -> Path:
        """Write the model folder, ``records.jsonl``, ``truth.json`` and ``plant.json`` (atomically)."""
        return save_planted(self, directory)

    @classmethod
    def load(cls, directory: str | Path) -> PlantedModel:
        """Load what :meth:`save` wrote."""
        return load_planted(directory)


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
        # mkdtemp creates the folder private (0700); give it the permissions of a normally created folder.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
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
    """Load a plant written by :func:`save_planted` (model, records, truth, config and report).

    Raises:
        PlantedFileError: The folder holds no ``model/`` or a malformed records or truth file.
    """
    root = Path(directory)
    if not (root / "model").is_dir():
        raise PlantedFileError(
            f"{root} holds no model/ folder; is it a folder written by PlantedModel.save()?"
        )
    lm = load_lm(root / "model")
    records = read_records(root / "records.jsonl")
    truth = read_truth(root / "truth.json", lm.num_layers, lm.d_ff)
    meta_path = root / "plant.json"
    meta = read_json(meta_path) if meta_path.is_file() else {}
    config = PlantConfig(**meta.get("config", {"model_type": lm.model.config.model_type}))
    return PlantedModel(lm, records, neurons_from_truth(truth), config, meta.get("report", {}))
