"""Specificity labels on plants whose relation-level and generic neurons are known by construction.

For each architecture and seed, :func:`knlight.planted.shared.plant_shared` builds the standard plant (3
relations x 4 facts, 3 languages, 4 templates; 2 language-independent + 1 language-specific carrier per fact and
language, a third of the facts on a degenerate pair, 1 distractor per fact) plus one *relation* neuron per
relation (fires on every query of the relation's facts, writes along the mean of the relation's objects, a
necessary carrier of each) and one *generic* neuron (the same over every fact). Then, with knlight's own code:
zero-baseline IG of every query (``attribute_batch``), Dai's selection per fact (``select_fact``: τ = 0.2,
p = 0.7), and the labels (:func:`knlight.selection.specificity.label_specificity`, the counting rule, and with
the suppression rule measured by :func:`~knlight.selection.specificity.suppression_drops`).

Scored against the truth: every *selected planted carrier* of a fact has a true label (``relation`` /
``generic`` for the shared neurons, ``fact`` for the others); accuracy per true label and overall, and how
many of the shared neurons' (fact, neuron) pairs the selection found at all (coverage). Non-planted selected
neurons (upstream credit) have no true label and are counted separately.

    python benchmarks/specificity_planted.py                                # gpt2 llama bert, seeds 0-4
    python benchmarks/specificity_planted.py --archs gpt2 --seeds 0 --out /tmp/s.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from knlight import attribute_batch
from knlight.io import write_text_atomically
from knlight.neurons.neuron_file import FactNeurons
from knlight.planted import PlantedModel
from knlight.planted.shared import plant_shared, truth_labels
from knlight.selection import (
    DknOptions,
    KnOptions,
    LiknOptions,
    QueryAttribution,
    UncertaintyOptions,
    select_fact,
)
from knlight.selection.options import SpecificityOptions
from knlight.selection.specificity import label_specificity, suppression_drops

log = logging.getLogger("benchmarks.specificity_planted")
REPO = Path(__file__).resolve().parents[1]
LABELS = ("fact", "relation", "generic")
NONE, NO_DKN = UncertaintyOptions(), DknOptions()


def select_all(planted: PlantedModel, steps: int) -> tuple[dict[str, FactNeurons], dict[str, list[Any]]]:
    """IG of every query, then ``select_fact`` per fact; also each fact's encoded queries."""
    lm = planted.lm
    rows = [(rec, q, query) for rec in planted.records for q, query in enumerate(rec["queries"])]
    encoded = [lm.encode(query, rec["object"]) for rec, _, query in rows]
    scores = attribute_batch(lm, encoded, steps=steps, baseline="zero", completeness=False).scores
    by_fact: dict[str, dict[str, list[QueryAttribution]]] = {}
    queries: dict[str, list[Any]] = {}
    for (rec, q, query), score, e in zip(rows, scores, encoded):
        positive = [(a, b, float(score[a, b])) for a, b in (score > 0).nonzero().tolist()]
        item = QueryAttribution(rec["uuid"], rec["language"], rec["relation"], q, query, rec["object"], None,
                                positive)  # fmt: skip
        by_fact.setdefault(rec["uuid"], {}).setdefault(rec["language"], []).append(item)
        queries.setdefault(rec["uuid"], []).append(e)
    kn = KnOptions(threshold=0.2, p=0.7, adaptive=False)
    dims = (lm.num_layers, lm.d_ff)
    facts = {
        uuid: select_fact(per_language, dims, sorted(per_language), {}, kn, LiknOptions(), NONE, NO_DKN)
        for uuid, per_language in by_fact.items()
    }
    return facts, queries


def score(facts: dict[str, FactNeurons], truth: dict[tuple[str, tuple[int, int]], str]) -> dict[str, Any]:
    """Accuracy per true label over the selected planted carriers; coverage; unlabelled selections."""
    hits: dict[str, list[int]] = {label: [0, 0] for label in LABELS}
    confusion: dict[str, dict[str, int]] = {t: dict.fromkeys(LABELS, 0) for t in LABELS}
    unlabelled = 0
    for uuid, fact in facts.items():
        for neuron, s in fact.specificity.items():
            label = truth.get((uuid, neuron))
            if label is None:
                unlabelled += 1
                continue
            hits[label][0] += s.label == label
            hits[label][1] += 1
            confusion[label][s.label] += 1
    shared = [k for k, v in truth.items() if v != "fact"]
    found = sum(k[1] in facts[k[0]].specificity for k in shared)
    total = sum(n for _, n in hits.values())
    return {
        "accuracy": sum(h for h, _ in hits.values()) / total if total else float("nan"),
        "per_label": {k: (h / n if n else float("nan")) for k, (h, n) in hits.items()},
        "n": {k: n for k, (_, n) in hits.items()},
        "confusion": confusion,
        "shared_coverage": found / len(shared) if shared else float("nan"),
        "unlabelled_selected": unlabelled,
    }


def run_one(arch: str, seed: int, steps: int) -> dict[str, Any]:
    started = time.perf_counter()
    planted = plant_shared(arch, seed, relation_neurons=1, generic_neurons=1)
    t_plant = time.perf_counter() - started
    facts, queries = select_all(planted, steps)
    truth = truth_labels(planted)
    label_specificity(facts, SpecificityOptions())
    counting = score(facts, truth)
    options = SpecificityOptions(suppression=True)
    drops = suppression_drops(planted.lm, facts, queries, options)
    label_specificity(facts, options, drops)
    both = score(facts, truth)
    return {
        "arch": arch, "seed": seed, "p_clean": planted.report["p_clean"],
        "counting": counting, "counting+suppression": both,
        "seconds": {"plant": round(t_plant, 1), "select": round(time.perf_counter() - started - t_plant, 1)},
    }  # fmt: skip


def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    return f"{statistics.fmean(values):.2f}±{statistics.pstdev(values) if len(values) > 1 else 0.0:.2f}"


def report(runs: list[dict[str, Any]], seconds: float) -> str:
    lines = [f"{'arch':<6} {'rule':<22} {'accuracy':>10} {'fact':>10} {'relation':>10} {'generic':>10} "
             f"{'coverage':>10}  n(fact/relation/generic) per seed"]  # fmt: skip
    for arch in dict.fromkeys(r["arch"] for r in runs):
        mine = [r for r in runs if r["arch"] == arch]
        for rule in ("counting", "counting+suppression"):
            rows = [r[rule] for r in mine]
            lines.append(
                f"{arch:<6} {rule:<22} {_mean_sd([x['accuracy'] for x in rows]):>10} "
                + " ".join(f"{_mean_sd([x['per_label'][k] for x in rows]):>10}" for k in LABELS)
                + f" {_mean_sd([x['shared_coverage'] for x in rows]):>10}  "
                + f"{statistics.fmean(sum(x['n'].values()) for x in rows):.0f} labelled "
                + "("
                + "/".join(f"{statistics.fmean(x['n'][k] for x in rows):.1f}" for k in LABELS)
                + ")"
            )
    seeds = sorted({r["seed"] for r in runs})
    lines.append(f"seeds {seeds}; wall time {seconds:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=["gpt2", "llama", "bert"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=20, help="IG steps")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "benchmarks" / "specificity_planted.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    started = time.perf_counter()
    runs = []
    for arch in args.archs:
        for seed in args.seeds:
            runs.append(run_one(arch, seed, args.steps))
            log.info("%s seed %d: %s", arch, seed, json.dumps(runs[-1]["counting"]))
    text = report(runs, time.perf_counter() - started)
    write_text_atomically(args.out, json.dumps({"runs": runs, "report": text}, indent=1) + "\n")
    sys.stdout.write(text + f"\n\nwritten: {args.out}\n")


if __name__ == "__main__":
    main()
