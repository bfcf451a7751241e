"""Print a short summary of an attribution run: top neurons per fact and language, and the
language-independent ones (refined per language by prompt sharing, then intersected across languages).

    python -m knlight.summary runs/quickstart/attributions/attributions.jsonl [--p 0.5] [--top 3]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any


def summarize(path: str | Path, p: float = 0.5, top: int = 3) -> str:
    """Text summary of an ``attributions.jsonl`` written by ``knlight predict``.

    Args:
        path: The merged attribution file.
        p: Prompt-sharing fraction: a neuron is a fact's neuron in a language when it is selected for at least
            this fraction of the fact's queries in that language.
        top: Neurons shown per fact and language (by mean score over the queries).
    """
    facts: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            item = json.loads(line)
            facts[item["uuid"]][item["language"]].append(item)
    lines = []
    for uuid in sorted(facts):
        per_language = facts[uuid]
        refined: dict[str, set[tuple[int, int]]] = {}
        head = next(iter(per_language.values()))[0]
        lines.append(f"{uuid}  ({head['relation']})")
        for language in sorted(per_language):
            items = per_language[language]
            counts: dict[tuple[int, int], int] = defaultdict(int)
            score: dict[tuple[int, int], float] = defaultdict(float)
            for item in items:
                for layer, index, value in item["neurons"]:
                    counts[(layer, index)] += 1
                    score[(layer, index)] += value / len(items)
            refined[language] = {n for n, c in counts.items() if c >= p * len(items)}
            best = sorted(refined[language], key=lambda n: -score[n])[:top]
            prob = sum(i["prob"] for i in items) / len(items)
            shown = ", ".join(f"L{n[0]}.{n[1]} ({score[n]:.3g})" for n in best) or "none"
            lines.append(
                f"  {language:8} P(answer)={prob:.3f} over {len(items)} queries: {items[0]['answer']!r:14} "
                f"top: {shown}"
            )
        shared = set.intersection(*refined.values()) if len(refined) > 1 else set()
        lines.append(f"  language-independent: {', '.join(f'L{a}.{b}' for a, b in sorted(shared)) or 'none'}")
    return "\n".join(lines)


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("path")
    parser.add_argument("--p", type=float, default=0.5, help="prompt-sharing fraction per language")
    parser.add_argument("--top", type=int, default=3, help="neurons shown per fact and language")
    ns = parser.parse_args(args)
    print(summarize(ns.path, ns.p, ns.top))


if __name__ == "__main__":
    main()
