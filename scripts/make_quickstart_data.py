"""Regenerate the quickstart's bundled facts: ``knlight/resources/quickstart.jsonl``.

Capitals (mParaRel P36) of well-known countries (the list below, matched on the English subject label) in
English, Spanish and Japanese, built by knlight's own builder, then kept only where Gemma 3 270M knows the fact:
a query is kept when the answer's first token is among the model's top-20 next tokens; a fact is kept when it
keeps at least one query in every language. The first 5 such facts (by uuid) with at most 2 queries per
language are written. Needs the ``gemma`` extra and ``../shared/data``.

    python scripts/make_quickstart_data.py
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from knlight import load_lm
from knlight.data.build import build_mpararel
from knlight.data.pipeline import BuildOptions
from knlight.data.records import write_records

# Gemma 3 270M is small: it ranks English capitals first, but Spanish and Japanese ones often only within its
# top 20 (and German ones lower still), so "knows" means "the answer's first token is within the top 20".
TOP_K = 20
COUNTRIES = {
    "France",
    "Germany",
    "Japan",
    "Italy",
    "Spain",
    "Russia",
    "China",
    "Egypt",
    "Canada",
    "Australia",
    "Greece",
    "Poland",
    "Portugal",
    "Austria",
    "Sweden",
    "Norway",
    "Finland",
    "Ireland",
    "Hungary",
    "Turkey",
    "India",
    "Mexico",
    "Argentina",
    "Brazil",
    "Peru",
    "Chile",
    "Kenya",
    "Thailand",
    "Vietnam",
    "Iran",
    "Iraq",
    "Cuba",
}


def knows(lm, query: str, answer: str) -> bool:
    encoded = lm.encode(query, answer)
    pos, token = encoded.targets[0]
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([encoded.input_ids[: pos + 1]])).logits[0, -1]
    return token in logits.topk(TOP_K).indices.tolist()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default="../shared/data/mpararel")
    parser.add_argument("--languages", default="en,es,ja")
    parser.add_argument("--facts", type=int, default=5)
    parser.add_argument("--queries", type=int, default=2)
    parser.add_argument("--output", default="knlight/resources/quickstart.jsonl")
    args = parser.parse_args()
    languages = args.languages.split(",")
    options = BuildOptions(languages=languages, relations=["P36"], model_kind="causal", seed=0)
    records, manifest = build_mpararel(args.root, options)
    lm = load_lm("gemma3-270m")
    english = {r.uuid: r.subject for r in records if r.language == "en"}
    records = [r for r in records if english.get(r.uuid) in COUNTRIES]
    by_fact: dict[str, dict[str, object]] = {}
    for record in sorted(records, key=lambda r: (r.uuid, r.language)):
        kept = [q for q in record.queries if knows(lm, q, record.object)][: args.queries]
        if kept:
            by_fact.setdefault(record.uuid, {})[record.language] = replace(record, queries=kept)
        if sum(len(v) == len(languages) for v in by_fact.values()) >= args.facts:
            break
    chosen = [v for v in by_fact.values() if len(v) == len(languages)][: args.facts]
    out = [rec for fact in chosen for rec in fact.values()]
    manifest["quickstart_filter"] = (
        f"kept queries where the answer's first token is among gemma3-270m's top-20 next tokens; facts known in all of "
        f"{languages}; first {args.facts} facts by uuid; at most {args.queries} queries per record"
    )
    write_records(args.output, out, manifest)
    for rec in out:
        print(rec.language, rec.subject, "->", rec.object, rec.queries)


if __name__ == "__main__":
    main()
