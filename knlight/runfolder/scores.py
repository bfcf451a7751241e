"""The scores file of an attribution run (``scores.safetensors``): one entry per item, dense or top-k.

An item's tensors are named by :func:`~knlight.runfolder.format.tensor_key`: ``<key>/scores`` ``[layers,
d_ff]`` (dense), or ``<key>/index`` (rows of (layer, neuron)) and ``<key>/score`` (the item's top k).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from knlight.io import write_atomically
from knlight.runfolder.format import SCORES, START_OVER, RunFolderError, tensor_key


def score_format(scores_top_k: int | None) -> str:
    """The ``format`` metadata of a scores file: ``dense`` or ``top_<k>``."""
    return "dense" if scores_top_k is None else f"top_{scores_top_k}"


def item_tensors(prediction: dict[str, Any], scores_top_k: int | None) -> dict[str, torch.Tensor]:
    """The tensors of one predicted item (its dense scores, or its top k as index and score)."""
    key = tensor_key((prediction["uuid"], prediction["language"], prediction["query_id"]))
    scores = prediction["scores"].detach().float().cpu()
    if scores_top_k is None:
        return {f"{key}/scores": scores.contiguous()}
    k = min(scores_top_k, scores.numel())
    order = torch.argsort(scores.flatten(), descending=True, stable=True)[:k]
    layers = torch.tensor(prediction["layers"])[order // scores.shape[1]]
    index = torch.stack([layers, order % scores.shape[1]], dim=1)
    return {f"{key}/index": index.contiguous(), f"{key}/score": scores.flatten()[order].contiguous()}


def merge_scores(folder: Path, shard_files: list[Path], wanted: set[str]) -> None:
    """Writes ``<folder>/scores.safetensors`` from the folder's merged file and the shards' (atomically).

    Args:
        folder: The output folder.
        shard_files: The shards' scores files (missing ones are skipped).
        wanted: Tensor-key prefixes of the items to keep (the merged items).

    Raises:
        RunFolderError: When a scores file is damaged, saying which and what to do.
    """
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for source in [folder / SCORES, *shard_files]:
        if not source.is_file():
            continue
        try:
            with safe_open(str(source), framework="pt") as handle:
                metadata = metadata or dict(handle.metadata() or {})
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if name.rsplit("/", 1)[0] in wanted and name not in tensors:
                        tensors[name] = handle.get_tensor(name)
        except (SafetensorError, OSError) as error:
            remedy = (
                f"delete it and {source.with_suffix('.jsonl').name} beside it (their items are computed again) and "
                "re-run"
                if source.parent != folder
                else f"the scores of the items merged so far are lost: {START_OVER}"
            )
            raise RunFolderError(
                f"cannot merge the scores: {source} is damaged ({type(error).__name__}: {error}); {remedy}"
            ) from None
    write_atomically(folder / SCORES, lambda t: save_file(dict(sorted(tensors.items())), t, metadata))
