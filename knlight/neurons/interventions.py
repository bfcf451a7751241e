"""Scale neurons at the target positions and measure P(answer): suppress (×0), enhance (×2), batched."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import torch

from knlight.neurons.hooks import edit_activations
from knlight.neurons.prompts import EncodedQuery

Neuron = tuple[int, int]


def check_neurons(neurons: Sequence[Neuron], num_layers: int, d_ff: int, source: str = "neuron set") -> None:
    """Raise a clear error for neurons outside the model (e.g. a neuron file from another model)."""
    for layer, index in neurons:
        if not (0 <= layer < num_layers and 0 <= index < d_ff):
            raise ValueError(
                f"{source}: neuron (layer={layer}, index={index}) is outside this model ({num_layers} layers × "
                f"{d_ff} neurons); was it selected on another model?"
            )


def answer_log_probs(
    lm: Any,
    items: Sequence[EncodedQuery],
    neuron_sets: Sequence[Sequence[Neuron]] | None = None,
    factor: float = 0.0,
    batch_rows: int = 256,
) -> torch.Tensor:
    """log P(answer) of every item under every neuron-set intervention, in batched forwards.

    Args:
        lm: A :class:`knlight.LanguageModel`.
        items: Encoded queries.
        neuron_sets: S sets of (layer, index); each is applied alone (default: one empty set = clean model).
        factor: Multiplier at the target positions (0 suppresses, 2 enhances, 1 leaves unchanged).
        batch_rows: Rows (item × set) per forward.

    Returns:
        ``[len(items), S]`` log-probabilities (sum over answer tokens, gold prefix teacher-forced).
    """
    sets = [list(s) for s in (neuron_sets if neuron_sets is not None else [[]])]
    for s in sets:
        check_neurons(s, lm.num_layers, lm.d_ff)
    pairs = [(i, s) for i in range(len(items)) for s in range(len(sets))]
    out = torch.empty(len(items), len(sets))
    for start in range(0, len(pairs), batch_rows):
        chunk = pairs[start : start + batch_rows]
        values = _forward_rows(lm, [items[i] for i, _ in chunk], [sets[s] for _, s in chunk], factor)
        for (i, s), v in zip(chunk, values):
            out[i, s] = v
    return out


@torch.no_grad()
def _forward_rows(lm: Any, rows: list[EncodedQuery], sets: list[list[Neuron]], factor: float) -> torch.Tensor:
    device = lm.device
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), lm.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, item in enumerate(rows):
        ids[r, : len(item.input_ids)] = torch.tensor(item.input_ids)
        mask[r, : len(item.input_ids)] = 1
    # Per layer: the (row, position, neuron) triples to scale.
    per_layer: dict[int, list[tuple[int, int, int]]] = {}
    for r, (item, neuron_set) in enumerate(zip(rows, sets)):
        for layer, index in neuron_set:
            for pos, _ in item.targets:
                per_layer.setdefault(layer, []).append((r, pos, index))
    with ExitStack() as stack:
        for layer, triples in per_layer.items():
            idx = torch.tensor(triples, device=device)

            def scale(h: torch.Tensor, idx: torch.Tensor = idx) -> torch.Tensor:
                scaled = torch.ones_like(h)
                scaled[idx[:, 0], idx[:, 1], idx[:, 2]] = factor
                return h * scaled

            stack.enter_context(edit_activations(lm.sites.out_projs[layer], scale))
        logits = lm.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    values = []
    for r, item in enumerate(rows):
        pos = torch.tensor([p for p, _ in item.targets], device=device)
        tok = torch.tensor([t for _, t in item.targets], device=device)
        values.append(log_probs[r, pos, tok].sum())
    return torch.stack(values).cpu()


def relative_change(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """ΔP = (P_after - P_before) / P_before; NaN where P_before is 0 (ΔP undefined)."""
    return torch.where(before > 0, (after - before) / before.clamp_min(torch.finfo(before.dtype).tiny), torch.nan)
