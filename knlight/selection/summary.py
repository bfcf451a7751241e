"""A short text summary of an attribution run: top neurons per fact and language, and the language-independent
ones, selected by the same code as ``knlight select`` (prompt sharing per language, then shared by every
language)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from knlight.neurons.selection import language_independent, mask_to_neurons, refine_by_sharing
from knlight.selection.reader import QueryAttribution, read_attributions


def summarize(path: str | Path, p: float = 0.5, top: int = 3) -> str:
    """Text summary of a predict run's output.

    Args:
        path: The predict output folder or its ``attributions.jsonl``.
        p: Prompt-sharing fraction: a neuron is a fact's neuron in a language when it is selected (coarse) for
            at least this fraction of the fact's queries in that language.
        top: Neurons shown per fact and language (by mean score over the queries).
    """
    run = read_attributions(path)
    facts: dict[str, dict[str, list[QueryAttribution]]] = defaultdict(lambda: defaultdict(list))
    for item in run.items:
        facts[item.uuid][item.language].append(item)
    dims = (
        1 + max((layer for i in run.items for layer, _, _ in i.neurons), default=0),
        1 + max((index for i in run.items for _, index, _ in i.neurons), default=0),
    )
    lines = []
    for uuid in sorted(facts):
        per_language = facts[uuid]
        lines.append(f"{uuid}  ({next(iter(per_language.values()))[0].relation})")
        masks: dict[str, torch.Tensor] = {}
        for language in sorted(per_language):
            items = sorted(per_language[language], key=lambda i: i.query_id)
            coarse = torch.zeros(len(items), *dims, dtype=torch.bool)
            score = torch.zeros(dims, dtype=torch.float64)
            for q, item in enumerate(items):
                for layer, index, value in item.neurons:
                    coarse[q, layer, index] = True
                    score[layer, index] += value / len(items)
            masks[language] = refine_by_sharing(coarse, p)
            best = mask_to_neurons(masks[language], score)[:top]
            prob = sum(i.prob or 0.0 for i in items) / len(items)
            shown = ", ".join(f"L{n[0]}.{n[1]} ({float(score[n]):.3g})" for n in best) or "none"
            lines.append(
                f"  {language:8} P(answer)={prob:.3f} over {len(items)} queries: {items[0].answer!r:14} "
                f"top: {shown}"
            )
        shared = mask_to_neurons(language_independent(masks)) if len(masks) > 1 else []
        lines.append(f"  language-independent: {', '.join(f'L{a}.{b}' for a, b in shared) or 'none'}")
    return "\n".join(lines)
