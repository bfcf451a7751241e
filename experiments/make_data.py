"""Build a multi-relation experiment set from mParaRel for a packaged model, and measure what the model knows.

Step 1 (probe): for each candidate relation, up to ``--probe_facts`` facts present in every candidate language
(knlight's own mParaRel builder, causal prompts), score the first ``--probe_queries`` queries per record: the rank
of the answer's first token among the model's next-token predictions. Per relation × language it reports top-1
and top-10 accuracy next to the *majority baseline* (top-1 of always answering the relation's most frequent
first answer token in that language), and writes ``<output>.probe.json``.

Step 2 (select): keep the languages whose mean top-1 over the kept relations beats the mean majority baseline,
and the relations whose top-1 beats their majority baseline in most kept languages. A query is "known" when
the answer's first token is within the model's top ``--known_rank``; a fact is kept when it has a known query in
every kept language (at most ``--queries`` known queries per record, ``--facts`` facts per relation).

    python experiments/gemma/make_data.py --output experiments/gemma/data/gemma_multi.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import torch

from knlight import load_lm
from knlight.data.build import build_mpararel
from knlight.data.pipeline import BuildOptions
from knlight.data.records import FactRecord, write_records
from knlight.io import write_text_atomically

log = logging.getLogger("make_data")

CANDIDATE_RELATIONS = ["P36", "P1376", "P37", "P30", "P17", "P103", "P1412", "P364", "P27", "P495", "P140"]
CANDIDATE_LANGUAGES = ["en", "de", "es", "fr", "ru", "ja", "zh-hans"]


@torch.no_grad()
def answer_ranks(lm, pairs: list[tuple[str, str]], batch_size: int = 32) -> list[tuple[int, int]]:
    """(rank of the answer's first token, that token) for each (query, answer); rank 0 = the top prediction.

    One padded forward per batch with the LM head at the first target position only
    (:meth:`knlight.LanguageModel.target_log_probs`).
    """
    encoded = [lm.encode(q, a) for q, a in pairs]
    out: list[tuple[int, int]] = []
    for start in range(0, len(encoded), batch_size):
        chunk = [replace(e, targets=e.targets[:1]) for e in encoded[start : start + batch_size]]
        for e, log_probs in zip(chunk, lm.target_log_probs(chunk), strict=True):
            token = e.targets[0][1]
            out.append((int((log_probs[0] > log_probs[0, token]).sum()), token))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="gemma3-270m", help="packaged model name (knlight.lm.real)")
    parser.add_argument("--root", default="../shared/data/mpararel")
    parser.add_argument("--languages", default=",".join(CANDIDATE_LANGUAGES))
    parser.add_argument("--relations", default=",".join(CANDIDATE_RELATIONS))
    parser.add_argument("--probe_facts", type=int, default=60)
    parser.add_argument("--probe_queries", type=int, default=4)
    parser.add_argument("--known_rank", type=int, default=10)
    parser.add_argument("--facts", type=int, default=10)
    parser.add_argument("--queries", type=int, default=2)
    parser.add_argument("--max_relations", type=int, default=4)
    parser.add_argument("--keep_languages", help="override the automatic language choice (comma-separated)")
    parser.add_argument("--keep_relations", help="override the automatic relation choice (comma-separated)")
    parser.add_argument(
        "--min_known_languages",
        type=int,
        help="keep a fact known in at least this many kept languages (default: all)",
    )
    parser.add_argument(
        "--unknown_facts", type=int, default=0, help="also write up to N unknown facts per relation"
    )
    parser.add_argument("--ranks_cache", help="default: probe_ranks.json beside --output")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    languages, relations = args.languages.split(","), args.relations.split(",")
    options = BuildOptions(
        languages=languages,
        relations=relations,
        max_facts_per_relation=args.probe_facts,
        model_kind="causal",
        num_wrong_objects=3,
        seed=0,
    )
    records, manifest = build_mpararel(args.root, options)
    log.info("built %d records", len(records))
    # ranks are cached beside the output, so re-selecting with other options does not re-run the model
    cache_path = Path(args.ranks_cache or Path(args.output).parent / "probe_ranks.json")
    cache = read_ranks_cache(cache_path, args.model)
    pairs = [(q, r.object) for r in records for q in r.queries[: args.probe_queries]]
    missing = sorted({p for p in pairs if json.dumps(p) not in cache})
    if missing:
        lm = load_lm(args.model)
        lm.model.eval()
        log.info("probing %d queries (%d cached)", len(missing), len(pairs) - len(missing))
        step = 1024  # the cache is saved after each step, so a killed probe resumes where it was
        for lo in range(0, len(missing), step):
            part = missing[lo : lo + step]
            for pair, ranked in zip(part, answer_ranks(lm, part), strict=True):
                cache[json.dumps(pair)] = list(ranked)
            write_text_atomically(cache_path, json.dumps({"model": args.model, "ranks": cache}))
            log.info("probed %d of %d", min(lo + step, len(missing)), len(missing))
    write_text_atomically(cache_path, json.dumps({"model": args.model, "ranks": cache}))
    probed: list[tuple[FactRecord, list[tuple[str, int, int]]]] = []
    for r in records:
        probed.append((r, [(q, *cache[json.dumps((q, r.object))]) for q in r.queries[: args.probe_queries]]))

    # per relation × language, over every probed query: top-1 / top-10, and the majority baseline (answering
    # every query with the cell's most frequent first answer token)
    cells: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)
    for r, scored in probed:
        cells[(r.relation, r.language)].extend((rank, token) for _, rank, token in scored)
    table: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for (rel, lang), values in sorted(cells.items()):
        tokens = Counter(token for _, token in values)
        table[rel][lang] = {
            "queries": len(values),
            "top1": sum(rank == 0 for rank, _ in values) / len(values),
            "top10": sum(rank < 10 for rank, _ in values) / len(values),
            "majority": tokens.most_common(1)[0][1] / len(values),
        }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(Path(args.output + ".probe.json"), json.dumps(table, indent=1))
    for rel, row in table.items():
        log.info(
            "%-6s %s",
            rel,
            "  ".join(
                f"{lang}:{v['top1']:.2f}/{v['top10']:.2f}/maj{v['majority']:.2f}" for lang, v in row.items()
            ),
        )

    # relations that beat their majority baseline in most languages; languages that beat it on those relations
    def beats(rel: str, lang: str) -> bool:
        return table[rel][lang]["top1"] > table[rel][lang]["majority"]

    good_relations = [
        rel for rel in table if sum(beats(rel, lang) for lang in languages) > len(languages) / 2
    ]
    good_relations.sort(key=lambda rel: -sum(table[rel][lang]["top1"] for lang in languages))
    kept_languages = auto_languages = [
        lang
        for lang in languages
        if sum(table[rel][lang]["top1"] for rel in good_relations)
        > sum(table[rel][lang]["majority"] for rel in good_relations)
    ]
    if args.keep_languages:
        kept_languages = args.keep_languages.split(",")
    kept_relations = (
        args.keep_relations.split(",") if args.keep_relations else good_relations[: args.max_relations]
    )
    log.info("relations above chance (best first): %s; kept %s", good_relations, kept_relations)
    log.info("languages above chance: %s; kept %s", auto_languages, kept_languages)

    min_known = args.min_known_languages or len(kept_languages)
    by_fact: dict[str, dict[str, FactRecord]] = defaultdict(dict)
    seen: dict[str, dict[str, FactRecord]] = defaultdict(dict)  # every kept-language record, known or not
    for r, scored in probed:
        if r.relation not in kept_relations or r.language not in kept_languages:
            continue
        seen[r.uuid][r.language] = r
        known = [q for q, rank, _ in scored if rank < args.known_rank][: args.queries]
        if known:
            by_fact[r.uuid][r.language] = replace(r, queries=known)
    per_relation: Counter[str] = Counter()
    per_language: Counter[str] = Counter()
    out: list[FactRecord] = []
    for uuid in sorted(by_fact):
        fact = by_fact[uuid]
        relation = next(iter(fact.values())).relation
        if len(fact) >= min_known and per_relation[relation] < args.facts:
            per_relation[relation] += 1
            langs = [lang for lang in kept_languages if lang in fact]
            per_language.update(langs)
            out.extend(fact[lang] for lang in langs)
    unknown: list[FactRecord] = []
    unknown_per_relation: Counter[str] = Counter()
    for uuid in sorted(seen):
        fact = seen[uuid]
        relation = next(iter(fact.values())).relation
        complete = len(fact) == len(kept_languages)
        if uuid not in by_fact and complete and unknown_per_relation[relation] < args.unknown_facts:
            unknown_per_relation[relation] += 1
            unknown.extend(
                replace(fact[lang], queries=fact[lang].queries[: args.queries]) for lang in kept_languages
            )
    manifest["knowledge_filter"] = {
        "model": args.model,
        "probe": f"first {args.probe_queries} queries of up to {args.probe_facts} facts per relation",
        "known": f"answer's first token within {args.model}'s top {args.known_rank}",
        "kept_languages": kept_languages,
        "kept_relations": kept_relations,
        "min_known_languages": min_known,
        "facts_per_relation": dict(per_relation),
        "facts_per_language": {lang: per_language[lang] for lang in kept_languages},
        "queries_per_record": args.queries,
    }
    write_records(args.output, out, manifest)
    log.info("wrote %d records (%s) to %s", len(out), dict(per_relation), args.output)
    log.info("known facts per language: %s", dict(per_language))
    if args.unknown_facts:
        target = args.output.removesuffix(".jsonl") + ".unknown.jsonl"
        manifest_unknown = dict(manifest, knowledge_filter=dict(
            manifest["knowledge_filter"], selection="facts known in none of the kept languages",
            facts_per_relation=dict(unknown_per_relation),
        ))  # fmt: skip
        write_records(target, unknown, manifest_unknown)
        log.info("wrote %d unknown-fact records (%s) to %s", len(unknown), dict(unknown_per_relation), target)
        joined = args.output.removesuffix(".jsonl") + ".all.jsonl"  # claims about known and unknown facts
        write_records(joined, [*out, *unknown], dict(manifest, joined=[args.output, target]))


def read_ranks_cache(path: Path, model: str) -> dict[str, list[int]]:
    """The cached probe ranks of ``model`` (empty when there is no cache); a cache of another model is refused."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if "ranks" not in data:  # written before the cache named its model: the Gemma runs of issue 9
        data = {"model": "gemma3-270m", "ranks": data}
    if data["model"] != model:
        raise SystemExit(
            f"{path}: probe ranks of {data['model']!r}, not {model!r}; pass another --ranks_cache or delete it"
        )
    return data["ranks"]


if __name__ == "__main__":
    main()
