"""A short text summary of an attribution run: top neurons per fact and language, and the language-independent
ones, selected by the same code as ``knlight select`` (the knowledge filter, prompt sharing per language, then
shared by every known language). A language in which the model does not know the fact is marked ``NOT KNOWN``
and lists no neurons; the language-independent neurons are taken over the known languages (their count is
stated)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from knlight.neurons.selection import language_independent, mask_to_neurons, refine_by_sharing
from knlight.selection.known import describe, filter_known
from knlight.selection.options import KnownOptions
from knlight.selection.reader import QueryAttribution, read_attributions


def summarize(path: str | Path, p: float = 0.5, top: int = 3, known: KnownOptions = KnownOptions()) -> str:
    """Text summary of a predict run's output.

    Args:
        path: The predict output folder or its ``attributions.jsonl``.
        p: Prompt-sharing fraction: a neuron is a fact's neuron in a language when it is selected (coarse) for
            at least this fraction of the fact's queries in that language.
        top: Neurons shown per fact and language (by mean score over the queries).
        known: The knowledge filter (as ``knlight select``'s; ``enabled=False`` lists every language).
    """
    run = read_attributions(path)
    facts: dict[str, dict[str, list[QueryAttribution]]] = defaultdict(lambda: defaultdict(list))
    for item in run.items:
        facts[item.uuid][item.language].append(item)
    dims = (
        1 + max((layer for i in run.items for layer, _, _ in i.neurons), default=0),
        1 + max((index for i in run.items for _, index, _ in i.neurons), default=0),
    )
    method = str(run.hparams.get("method", "ig"))
    lines = [f"method: {method}" + ("" if method == "ig" else " (an approximation of IG, not exact)")]
    rule = describe(known)
    for uuid in sorted(facts):
        per_language = facts[uuid]
        kept, status = filter_known(per_language, known)
        lines.append(f"{uuid}  ({next(iter(per_language.values()))[0].relation})")
        masks: dict[str, torch.Tensor] = {}
        for language in sorted(per_language):
            everything = sorted(per_language[language], key=lambda i: i.query_id)
            prob = sum(i.prob or 0.0 for i in everything) / len(everything)
            head = f"  {language:8} P(answer)={prob:.3f} over {len(everything)} queries: {everything[0].answer!r:14}"
            if language not in kept:
                passed = len(status[language].query_ids)
                lines.append(
                    f"{head} NOT KNOWN ({passed} of {len(everything)} queries pass {rule}): no neurons"
                )
                continue
            items = sorted(kept[language], key=lambda i: i.query_id)
            coarse = torch.zeros(len(items), *dims, dtype=torch.bool)
            score = torch.zeros(dims, dtype=torch.float64)
            for q, item in enumerate(items):
                for layer, index, value in item.neurons:
                    coarse[q, layer, index] = True
                    score[layer, index] += value / len(items)
            masks[language] = refine_by_sharing(coarse, p)
            best = mask_to_neurons(masks[language], score)[:top]
            shown = ", ".join(f"L{n[0]}.{n[1]} ({float(score[n]):.3g})" for n in best) or "none"
            note = f" ({len(items)} known)" if known.enabled and len(items) < len(everything) else ""
            lines.append(f"{head}{note} top: {shown}")
        shared = mask_to_neurons(language_independent(masks)) if len(masks) > 1 else []
        over = f"over {len(masks)} of {len(per_language)} languages"
        if known.enabled and len(masks) < len(per_language):
            over += f"; known in: {', '.join(sorted(masks)) or 'none'}"
        listed = ", ".join(f"L{a}.{b}" for a, b in shared) or "none"
        if len(masks) < 2 <= len(per_language):
            over += "; needs the fact known in at least two languages"
        lines.append(f"  language-independent: {listed}  ({over})")
    return "\n".join(lines)
