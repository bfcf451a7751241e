"""The output folder of an attribution run: one run at a time, its settings, what is done, whether it is whole.

* **Lock.** A run holds an exclusive OS lock (``flock``) on ``<folder>/.lock`` from set-up to the end, so two
  runs never write into one folder at once; the file names the holder (pid, host, start, command). The kernel
  releases the lock when the process ends, however it ends (a SIGKILLed run does not block the next one).
* **Settings.** ``run.json`` records what produced the results (task, hyperparameters, writer settings, the
  model's identity). Results are only resumed under the same settings, and never without a ``run.json``.
* **Inputs.** Each result line records ``input_hash`` (query and answer) and ``model_hash``; an item counts as
  done only when both equal the current ones, and a folder whose stored inputs differ is refused.
* **Completeness.** When the merge ends, ``run.json`` gets a ``results`` record (item count and SHA-256 of
  ``attributions.jsonl`` and ``summary.json``), which readers check (:func:`check_complete`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from knlight.errors import DataError
from knlight.io import file_sha256, read_json
from knlight.runfolder.format import (
    MERGED,
    RUN,
    START_OVER,
    SUMMARY,
    Key,
    RunFolderError,
    has_results,
    shard_files,
)

log = logging.getLogger(__name__)


# -- settings (run.json) ----------------------------------------------------------------------------------------


def read_run_file(folder: Path) -> dict[str, Any] | None:
    """The folder's ``run.json`` (None when there is none).

    Raises:
        RunFolderError: When it is not a JSON object (named by file and line).
    """
    path = folder / RUN
    if not path.is_file():
        return None
    try:
        value = read_json(path)
    except DataError as error:
        raise RunFolderError(
            f"{error} It records the settings of the results in {folder}: restore it, or {START_OVER}"
        ) from None
    if not isinstance(value, dict):
        raise RunFolderError(f"{path}: expected a JSON object of settings; restore it, or {START_OVER}")
    return value


SETTINGS_ADDED_LATER: dict[str, Any] = {"hparams.method": "ig", "hparams.max_memory_gb": None}
"""Settings a newer knlight records, with the value that reproduces what a run from before they existed did: a
``run.json`` without the key resumes only when this run has that value (exact IG before ``ig.method``; fixed
row chunks before the other tasks' ``max_memory_gb``)."""


def changed_settings(previous: dict[str, Any], current: dict[str, Any], groups: Sequence[str]) -> list[str]:
    """The settings (``group.key``) of ``groups`` that differ between two ``run.json`` contents (a key a newer
    knlight added counts as unchanged when this run has its old behaviour, see :data:`SETTINGS_ADDED_LATER`)."""
    changed = []
    for group in groups:
        before, now = previous.get(group), current.get(group)
        if before == now:
            continue
        if before is None:
            changed.append(f"{group} (not recorded in run.json)")
        elif isinstance(before, dict) and isinstance(now, dict):
            for key in sorted(set(before) | set(now)):
                name = f"{group}.{key}"
                if key not in before and name in SETTINGS_ADDED_LATER:
                    if now.get(key) != SETTINGS_ADDED_LATER[name]:
                        changed.append(name)
                elif before.get(key) != now.get(key):
                    changed.append(name)
        else:
            changed.append(group)
    return changed


def check_settings(folder: Path, current: dict[str, Any], groups: Sequence[str], resume: bool) -> None:
    """Refuses a folder whose results would be mixed with this run's.

    Args:
        folder: The output folder.
        current: This run's ``run.json`` content.
        groups: The groups of ``current`` to compare (e.g. ``task``, ``hparams``, ``writer``; ``model``).
        resume: False refuses any folder that holds results.

    Raises:
        RunFolderError: When the folder holds results and resume is false, has no ``run.json``, or its
            ``run.json`` records other settings.
    """
    if not has_results(folder):
        return
    if not resume:
        raise RunFolderError(
            f"{folder} already holds attribution results and resume is false; remove the folder, choose "
            "another output_dir, or set resume: true to skip the items already done"
        )
    previous = read_run_file(folder)
    if previous is None:
        raise RunFolderError(
            f"{folder} holds attribution results ({MERGED} or shards) but no {RUN}, so the settings that "
            "produced them are unknown and this run cannot tell whether resuming would mix results of other "
            f"settings. Restore that {RUN}, or {START_OVER}"
        )
    changed = changed_settings(previous, current, groups)
    if changed:
        raise RunFolderError(
            f"{folder} holds results of a run with different settings ({', '.join(changed)}; see "
            f"{folder / RUN}); resuming would mix them. Choose another output_dir or remove the folder."
        )


def run_file_text(current: dict[str, Any], previous: dict[str, Any] | None) -> str:
    """``run.json`` for this run: its settings, plus the previous ``results`` record (still describing the
    merged file until this run's merge replaces it)."""
    content = dict(current)
    if previous is not None and "results" in previous:
        content["results"] = previous["results"]
    return json.dumps(content, indent=2, sort_keys=True) + "\n"


def results_record(folder: Path, items: int) -> dict[str, Any]:
    """The ``results`` record of ``run.json`` after a merge: what a complete ``attributions.jsonl`` is."""
    return {
        "items": items,
        "attributions_sha256": file_sha256(folder / MERGED),
        "summary_sha256": file_sha256(folder / SUMMARY),
    }


# -- what is done (resume) ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DoneItem:
    """An item an earlier run wrote, with what it was computed from."""

    input_hash: str | None
    model_hash: str | None
    query: Any
    answer: Any


def _numbered_lines(path: Path) -> Iterable[tuple[int, str]]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as handle:
        return [(n, line) for n, line in enumerate(handle, start=1) if line.strip()]


def read_done(folder: Path) -> dict[Key, DoneItem]:
    """The items already written to ``folder`` (merged file and shards), by ``(uuid, language, query_id)``.

    Raises:
        RunFolderError: For a line that is not valid JSON or not an attribution line (file and line named).
    """
    done: dict[Key, DoneItem] = {}
    for path in (folder / MERGED, *shard_files(folder)):
        remedy = (
            "delete that shard and its .safetensors beside it (its items are computed again)"
            if path.parent.name == "shards"
            else "delete that line (its item is computed again)"
        )
        for number, line in _numbered_lines(path):
            try:
                record = json.loads(line)
                key = (record["uuid"], record["language"], record["query_id"])
            except json.JSONDecodeError as error:
                raise RunFolderError(
                    f"cannot resume from {folder}: JSONDecodeError in {path}:{number} "
                    f"({error.msg.removesuffix(' at')} at column {error.colno}): the file is damaged (a full "
                    f"disk, or edited by hand); {remedy}, or {START_OVER}"
                ) from None
            except (KeyError, TypeError):
                raise RunFolderError(
                    f"cannot resume from {folder}: {path}:{number} is not an attribution line (it needs uuid, "
                    f"language and query_id); {remedy}, or {START_OVER}"
                ) from None
            get = record.get
            done.setdefault(key, DoneItem(get("input_hash"), get("model_hash"), get("query"), get("answer")))
    return done


def check_inputs(
    folder: Path,
    done: dict[Key, DoneItem],
    items: Iterable[dict[str, Any]],
    item_key: Callable[[dict[str, Any]], Key],
    input_hash: Callable[[dict[str, Any]], str],
    model_hash: str | None,
) -> None:
    """Refuses a folder holding results of this run's items that were computed from other inputs.

    Args:
        folder: The output folder.
        done: What it holds (:func:`read_done`).
        items: This run's data items.
        item_key: An item's ``(uuid, language, query_id)``.
        input_hash: An item's input hash (query and answer).
        model_hash: The current model's hash.

    Raises:
        RunFolderError: Naming the folder, how many items changed and one of them (stored vs current query).
    """
    if not done:
        return
    changed: list[tuple[Key, DoneItem, dict[str, Any]]] = []
    for item in items:
        stored = done.get(item_key(item))
        if stored is not None and (stored.input_hash, stored.model_hash) != (input_hash(item), model_hash):
            changed.append((item_key(item), stored, item))
    if not changed:
        return
    key, stored, item = changed[0]
    if stored.input_hash is None:
        why = "it records no input hash (written by an older knlight)"
    elif stored.input_hash == input_hash(item):
        why = f"computed by model {stored.model_hash}, now {model_hash}"
    else:
        why = (
            f"stored query {stored.query!r} -> {stored.answer!r}, now {item['query']!r} -> {item['answer']!r}"
        )
    raise RunFolderError(
        f"{folder} holds results of {len(changed)} item(s) of this run's data that were computed from other "
        f"inputs (the same uuid, language and query_id, but another query, answer or model); e.g. "
        f"{list(key)}: {why}. Resuming would mix results of the old and new inputs: {START_OVER} and "
        "recompute everything"
    )


# -- completeness (readers) -----------------------------------------------------------------------------------


def check_complete(jsonl: Path, items: int) -> None:
    """Checks that a merged ``attributions.jsonl`` is whole and that its ``summary.json`` and ``run.json``
    belong to it (hand-made folders without either are accepted with a warning).

    Args:
        jsonl: The merged file.
        items: The number of items (lines) read from it.

    Raises:
        RunFolderError: Naming the file, the counts or the mismatch, and what to do.
    """
    folder = jsonl.parent
    again = (
        "Re-run `knlight predict` with the same config and output folder: it resumes from what is there and "
        "rewrites the merged files"
    )
    summary = folder / SUMMARY
    summary_items = None
    if summary.is_file():
        try:
            summary_items = read_json(summary).get("items")
        except (DataError, AttributeError) as error:
            raise RunFolderError(f"{summary}: not a knlight summary ({error}). {again}.") from None
        if summary_items != items:
            raise RunFolderError(
                f"{jsonl} holds {items} items but {summary} records {summary_items}: the file is incomplete "
                f"(truncated) or was changed after knlight predict wrote it. {again}."
            )
    run = read_run_file(folder)
    record = (run or {}).get("results")
    if not isinstance(record, dict):
        log.warning(
            "%s: no results record in %s; cannot check that the file is complete", jsonl, folder / RUN
        )
        return
    if record.get("items") != items:
        raise RunFolderError(
            f"{jsonl} holds {items} items but {folder / RUN} records {record.get('items')}: the file is "
            f"incomplete (truncated) or was changed after knlight predict wrote it. {again}."
        )
    if not summary.is_file() or file_sha256(summary) != record.get("summary_sha256"):
        raise RunFolderError(
            f"{summary} does not belong to the results {folder / RUN} describes (missing, or another run's). "
            f"{again}."
        )
    if file_sha256(jsonl) != record.get("attributions_sha256"):
        raise RunFolderError(
            f"{jsonl} was changed after knlight predict wrote it (its SHA-256 differs from the one in "
            f"{folder / RUN}). {again}, or {START_OVER}."
        )
    if shard_files(folder):
        log.warning("%s has shards of an unfinished run; re-run knlight predict to merge them", folder)
