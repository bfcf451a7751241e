"""Reading a predict run's output for selection: its items, settings and dense scores (pure: no Lightning)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from knlight.errors import DataError, KnlightError
from knlight.io import iter_jsonl, resolved_from
from knlight.runfolder.format import MERGED, SCORES, RunFolderError, tensor_key
from knlight.runfolder.records import check_complete, read_run_file

SCORES_HINT = (
    "re-run `knlight predict` with `--model.init_args.return_scores true "
    "--trainer.callbacks.init_args.save_scores true` (the AttributionWriter is the last callback of the "
    "shipped configs; leave scores_top_k unset for dense scores), or pass --scores PATH"
)


class SelectionError(KnlightError, ValueError):
    """Attribution output that cannot be turned into neurons (missing files, NaN scores, bad options)."""


@dataclass
class QueryAttribution:
    """One line of ``attributions.jsonl`` (the fields selection needs)."""

    uuid: str
    language: str
    relation: str | None
    query_id: int
    query: str
    answer: str
    prob: float | None
    neurons: list[tuple[int, int, float]]
    where: str = field(default="", repr=False)
    rank: int | None = None
    """Rank of the answer's first token under the clean model (1 = top); None in files written before knlight
    recorded it."""

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.uuid, self.language, self.query_id)


@dataclass
class AttributionRun:
    """A predict run's output: its items, its settings (``run.json``) and where the dense scores are."""

    path: Path
    items: list[QueryAttribution]
    hparams: dict[str, Any]
    scores: Path | None
    source: str = ""
    """The folder or file as the user named it (recorded in the neuron file)."""


def read_attributions(path: str | Path, scores: str | Path | None = None) -> AttributionRun:
    """Read a predict output folder (or its ``attributions.jsonl``).

    Raises:
        SelectionError: Missing file, a malformed line or a NaN attribution score (named by file and line).
    """
    source = str(path)
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    jsonl = path / MERGED if path.is_dir() else path
    if not jsonl.is_file():
        raise SelectionError(
            f"{jsonl} does not exist{resolved_from(jsonl)}; run `knlight predict --config ...` first (it writes "
            f"<save_dir>/<name>/attributions/{MERGED}) and pass that folder as --attributions"
        )
    items: list[QueryAttribution] = []
    try:
        for line, record in iter_jsonl(jsonl):
            where = f"{jsonl}:{line}"
            try:
                neurons = [(int(n[0]), int(n[1]), n[2]) for n in record["neurons"]]
                item = QueryAttribution(
                    uuid=str(record["uuid"]),
                    language=str(record["language"]),
                    relation=record.get("relation"),
                    query_id=int(record["query_id"]),
                    query=str(record["query"]),
                    answer=str(record["answer"]),
                    prob=record.get("prob"),
                    neurons=[],
                    where=where,
                    rank=None if record.get("rank") is None else int(record["rank"]),
                )
            except (KeyError, TypeError, ValueError, IndexError) as error:
                raise SelectionError(
                    f"{where}: not an attribution line ({type(error).__name__}: {error}); expected the keys "
                    "uuid, language, query_id, query, answer and neurons [[layer, index, score], ...]"
                ) from None
            for layer, index, score in neurons:
                if score is None or not isinstance(score, int | float) or score != score:
                    raise SelectionError(
                        f"{where}: item uuid={item.uuid!r} language={item.language!r} "
                        f"query_id={item.query_id} has a NaN attribution score for neuron [{layer}, "
                        f"{index}]; the attribution failed for this item (typically fp16/bf16 overflow or a "
                        "NaN in the model): re-run knlight predict with --model.init_args.dtype float32, or "
                        "drop the item"
                    )
            item.neurons = [(layer, index, float(score)) for layer, index, score in neurons]
            items.append(item)
    except DataError as error:
        raise SelectionError(str(error)) from None
    if not items:
        raise SelectionError(f"{jsonl} has no attribution lines; the predict run selected no items")
    try:
        check_complete(jsonl, len(items))
        hparams = (read_run_file(folder) or {}).get("hparams", {})
    except RunFolderError as error:
        raise SelectionError(str(error)) from None
    score_path = Path(scores) if scores is not None else folder / SCORES
    return AttributionRun(jsonl, items, hparams, score_path if score_path.is_file() else None, source)


class DenseScores:
    """Reads the dense (or top-k) scores of items from a predict run's ``scores.safetensors``."""

    def __init__(self, path: Path, num_layers: int, d_ff: int, allow_top_k: bool) -> None:

        self.path = path
        self.num_layers = num_layers
        self.d_ff = d_ff
        try:
            self._handle = safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as error:
            raise self._damaged(error) from None
        meta = self._handle.metadata() or {}
        self.format = meta.get("format", "dense")
        self.layers = json.loads(meta["layers"]) if "layers" in meta else list(range(num_layers))
        if self.format != "dense" and not allow_top_k:
            raise SelectionError(
                f"{path} holds only each item's {self.format.replace('_', ' ')} scores; the "
                "uncertainty-aware aggregation needs dense scores: "
                + SCORES_HINT.replace(
                    "or pass",
                    "or set --uncertainty.allow_top_k_scores true to treat the other scores as 0, or pass",
                )
            )
        self._names = set(self._handle.keys())

    def _damaged(self, error: Exception) -> SelectionError:
        return SelectionError(
            f"cannot read the scores file {self.path}{resolved_from(self.path)} ({type(error).__name__}: "
            f"{error}): it is damaged (e.g. truncated by a full disk or an interrupted copy). Re-run `knlight "
            "predict` with the same settings into a new output folder (or after deleting this one) to write it "
            "again, or pass the right file with --scores"
        )

    def _tensor(self, name: str) -> torch.Tensor:
        try:
            return self._handle.get_tensor(name)
        except (SafetensorError, OSError) as error:
            raise self._damaged(error) from None

    def get(self, item: QueryAttribution) -> torch.Tensor:
        """``[num_layers, d_ff]`` scores of one item (layers that were not attributed are 0)."""
        key = tensor_key(item.key)
        out = torch.zeros(self.num_layers, self.d_ff)
        if self.format == "dense":
            name = f"{key}/scores"
            if name not in self._names:
                raise SelectionError(
                    f"{self.path} has no scores for item {list(item.key)} ({item.where}); " + SCORES_HINT
                )
            dense = self._tensor(name).float()
            if dense.shape[1] != self.d_ff:
                raise SelectionError(
                    f"{self.path}: scores of item {list(item.key)} have {dense.shape[1]} neurons per layer, "
                    f"the model has d_ff={self.d_ff}; the scores come from another model"
                )
            out[self.layers] = dense
        else:
            if f"{key}/index" not in self._names:
                raise SelectionError(
                    f"{self.path} has no scores for item {list(item.key)} ({item.where}); " + SCORES_HINT
                )
            index = self._tensor(f"{key}/index").long()
            out[index[:, 0], index[:, 1]] = self._tensor(f"{key}/score").float()
        if torch.isnan(out).any():
            raise SelectionError(
                f"{self.path}: item {list(item.key)} ({item.where}) has NaN attribution scores; re-run "
                "knlight predict for it in float32"
            )
        return out
