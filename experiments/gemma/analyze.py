"""Tables (markdown) and layer-distribution plots (PNG) of the Gemma 3 270M experiments.

Reads what exists under ``experiments/gemma/`` (probe table, neuron files, intervention, editing and
fact-checking outputs copied to ``results/``) and writes ``results/tables.md`` and ``layers_*.png``:

    .venv/bin/python experiments/gemma/analyze.py
"""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = Path(__file__).parent
RESULTS = HERE / "results"
NUM_LAYERS = 18


def fmt(x: Any, signed: bool = True) -> str:
    if x is None or x == "":
        return "–"
    x = float(x)
    if x != x:
        return "nan"
    if abs(x) >= 100:
        return f"{x:+.0f}" if signed else f"{x:.0f}"
    return f"{x:+.2f}" if signed else f"{x:.2f}"


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def probe_section(
    out: list[str], path: Path | None = None, title: str = "Gemma 3 270M", facts: int = 40
) -> None:
    path = path or HERE / "data" / "gemma_multi.jsonl.probe.json"
    if not path.exists():
        return
    table = json.loads(path.read_text())
    languages = sorted({lang for row in table.values() for lang in row})
    out += [
        f"## Probe: what {title} knows (first answer token, up to 4 queries × {facts} facts per cell)\n",
        "top-1 / top-10 accuracy, and in brackets the majority baseline (always answer the cell's most frequent "
        "first answer token). **Bold** = top-1 above the majority baseline.\n",
        "| relation | " + " | ".join(languages) + " |",
        "|---|" + "---|" * len(languages),
    ]
    for rel, row in sorted(table.items()):
        cells = []
        for lang in languages:
            v = row[lang]
            text = f"{v['top1']:.2f} / {v['top10']:.2f} ({v['majority']:.2f})"
            cells.append(f"**{text}**" if v["top1"] > v["majority"] else text)
        out.append(f"| {rel} | " + " | ".join(cells) + " |")
    out.append("")


def layer_counts(facts: dict[str, Any], kind: str) -> Counter[int]:
    counts: Counter[int] = Counter()
    for fact in facts.values():
        if kind == "language":
            for neurons in fact.get("languages", {}).values():
                counts.update(layer for layer, _ in neurons)
        elif kind == "degenerate":
            dkn = fact.get("degenerate") or {}
            for group in [*dkn.get("pairs", []), *dkn.get("sets", [])]:
                counts.update(layer for layer, _ in group)
        else:
            counts.update(layer for layer, _ in fact.get(kind, []))
    return counts


def plot_layers(files: dict[str, Path]) -> None:
    """One row per baseline (zero = Dai, AMIG): per-language KN, strict LIKN, LIKN in >= 3 of 4, uncertainty."""
    rows = [(name, files.get(name), files.get(f"{name}, LIKN ≥3 of 4")) for name in ("zero (Dai)", "AMIG")]
    rows = [row for row in rows if row[1] is not None]
    if not rows:
        return
    fig, axes = plt.subplots(len(rows), 4, figsize=(15, 2.8 * len(rows)), squeeze=False, sharex=True)
    for r, (name, path, relaxed) in enumerate(rows):
        facts = json.loads(path.read_text())["facts"]
        panels = [
            ("per-language KN", layer_counts(facts, "language")),
            ("LIKN, all 4 languages", layer_counts(facts, "language_independent")),
            (
                "LIKN, ≥3 of 4 languages",
                layer_counts(json.loads(relaxed.read_text())["facts"], "language_independent")
                if relaxed
                else Counter(),
            ),
            ("uncertainty-aware (top 5)", layer_counts(facts, "uncertainty")),
        ]
        for c, (title, counts) in enumerate(panels):
            ax = axes[r][c]
            ax.bar(range(NUM_LAYERS), [counts.get(i, 0) for i in range(NUM_LAYERS)], color=f"C{c}")
            ax.set_title(f"{name}: {title} (n={sum(counts.values())})", fontsize=9)
            ax.set_xlabel("layer")
    fig.suptitle(
        "Gemma 3 270M, mParaRel P1376/P27/P30 in en/es/fr/ru (27 facts): layers of the selected neurons"
    )
    fig.tight_layout()
    fig.savefig(HERE / "layers.png", dpi=100)


def neurons_section(out: list[str], files: dict[str, Path]) -> None:
    files = {name: path for name, path in files.items() if path.exists()}
    if not files:
        return
    out += [
        "## Neurons per fact (mean) and their layers\n",
        "| neuron file | facts | per-language KN per fact-language (by language) | LIKN per fact (facts with ≥1) | "
        "uncertainty per fact | top layers of per-language KN |",
        "|---|---|---|---|---|---|",
    ]
    kinds = {
        "language": "per-language KN",
        "language_independent": "LIKN",
        "uncertainty": "uncertainty",
        "degenerate": "DKN members",
    }
    for name, path in files.items():
        doc = json.loads(path.read_text())
        facts = doc["facts"]
        per_language = [len(v) for f in facts.values() for v in f.get("languages", {}).values()]
        by_language: dict[str, list[int]] = defaultdict(list)
        for f in facts.values():
            for lang, neurons in f.get("languages", {}).items():
                by_language[lang].append(len(neurons))
        by_language_text = ", ".join(
            f"{lang} {sum(v) / len(v):.0f}" for lang, v in sorted(by_language.items())
        )
        likn = [len(f.get("language_independent", [])) for f in facts.values()]
        unc = [len(f.get("uncertainty", [])) for f in facts.values()]
        top_layers = ", ".join(f"{layer}" for layer, _ in layer_counts(facts, "language").most_common(4))
        out.append(
            f"| {name} | {len(facts)} | {sum(per_language) / max(len(per_language), 1):.1f} ({by_language_text}) | "
            f"{sum(likn) / len(facts):.2f} ({sum(n > 0 for n in likn)}) | {sum(unc) / len(facts):.1f} | "
            f"{top_layers} |"
        )
    plot_layers(files)
    out += [
        "",
        "![layer distributions](../layers.png)",
        "",
        "### Are the neurons fact-specific? Sharing of LIKN and uncertainty neurons across facts\n",
        "| neuron file | kind | memberships | distinct neurons | most shared neurons (facts: relations) |",
        "|---|---|---|---|---|",
    ]
    for name, path in files.items():
        facts = json.loads(path.read_text())["facts"]
        for kind in ("language_independent", "uncertainty"):
            owners: dict[tuple[int, int], list[str]] = defaultdict(list)
            for fact in facts.values():
                for layer, index in fact.get(kind, []):
                    owners[(layer, index)].append(fact["relation"])
            total = sum(len(v) for v in owners.values())
            shared = sorted(owners.items(), key=lambda item: -len(item[1]))[:3]
            described = "; ".join(
                f"L{layer}.{index} ({len(rels)}: {dict(Counter(rels))})" for (layer, index), rels in shared
            )
            out.append(f"| {name} | {kinds[kind]} | {total} | {len(owners)} | {described} |")
    out.append("")


def intervention_section(out: list[str], directory: Path) -> None:
    path = directory / "intervention.csv"
    if not path.exists():
        return
    rows = read_csv(path)
    by = {(r["method"], r["neurons"], r["operation"], r["group_by"], r["group"]): r for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    operations = list(dict.fromkeys(r["operation"] for r in rows))
    groups = list(
        dict.fromkeys((r["group_by"], r["group"]) for r in rows if r["group_by"] in ("all", "language"))
    )
    out += [
        "## Intervention: ΔP = P_after / P_before − 1 of the answer's first token (mean over fact × language units)\n",
        "rel = the fact's own queries, unrel = queries of facts of *other relations* in the same language; "
        "SR = ΔP rel / ΔP unrel; random = as many random neurons per layer as the set.\n",
        "| method | group | units | #neurons | "
        + " | ".join(f"{op} rel / unrel (SR)" for op in operations)
        + " | random: "
        + " / ".join(f"{op} rel" for op in operations)
        + " |",
        "|---|---|---|---|" + "---|" * (len(operations) + 1),
    ]
    facts_rows = read_csv(directory / "facts.csv") if (directory / "facts.csv").exists() else []
    sizes: dict[tuple[str, str], list[int]] = defaultdict(list)
    for r in facts_rows:
        if r["neurons"] == "selected" and r["operation"] == operations[0]:
            sizes[(r["method"], r["language"])].append(int(r["num_neurons"]))
            sizes[(r["method"], "all")].append(int(r["num_neurons"]))
    for method in methods:
        for group_by, group in groups:
            first = by.get((method, "selected", operations[0], group_by, group))
            if first is None:
                continue
            size = sizes.get((method, group), [])
            cells = []
            for op in operations:
                r = by.get((method, "selected", op, group_by, group))
                median = (
                    f" [median {fmt(r['dp_related_median'])} / {fmt(r['dp_unrelated_median'])}]"
                    if r is not None and r.get("dp_related_median") not in (None, "")
                    else ""
                )
                cells.append(
                    "–"
                    if r is None
                    else f"{fmt(r['dp_related'])} / {fmt(r['dp_unrelated'])} ({fmt(r['sr'], False)}){median}"
                )
            randoms = [by.get((method, "random", op, group_by, group)) for op in operations]
            random_cell = " / ".join("–" if r is None else fmt(r["dp_related"]) for r in randoms)
            out.append(
                f"| {method} | {group} | {first['units']} | {sum(size) / max(len(size), 1):.1f} | "
                + " | ".join(cells)
                + f" | {random_cell} |"
            )
    out.append("")
    cross = directory / "cross_lingual.csv"
    rows = read_csv(cross) if cross.exists() else []
    if rows:  # a one-language run has no cross-lingual rows
        languages = list(dict.fromkeys(r["target"] for r in rows))
        out += [
            "### Cross-lingual suppression: neurons of the source language, ΔP on the same fact's target-language "
            "queries\n",
            "| method | source | " + " | ".join(languages) + " |",
            "|---|---|" + "---|" * len(languages),
        ]
        table = {(r["method"], r["source"], r["target"]): r for r in rows}
        for method, source in dict.fromkeys((r["method"], r["source"]) for r in rows):
            cells = [
                fmt(table[(method, source, t)]["dp"]) if (method, source, t) in table else "–"
                for t in languages
            ]
            out.append(f"| {method} | {source} | " + " | ".join(cells) + " |")
        out.append("")


def editing_section(out: list[str], directory: Path, title: str | None = None) -> None:
    order = [
        "edit-language_independent", "edit-language-en", "edit-carriers", "edit-uncertainty", "edit-amig-language-en",
        "edit-amig-language_independent", "edit-random",
        "edit-ffn", "inject-language_independent", "inject-random", "inject-ffn",
    ]  # fmt: skip
    runs = sorted(directory.glob("*/editing_test.json")) or sorted(directory.glob("*/editing_val.json"))
    runs.sort(key=lambda path: order.index(path.parent.name) if path.parent.name in order else len(order))
    if not runs:
        return
    out += [
        title
        or "## Editing (12 facts, edit language en, new object = a wrong object of the same relation)\n",
        "Cells: top-1 rate of the new object's first token / share where log P(new) > log P(old). "
        "Locality: share of held-out queries whose top-1 is unchanged / mean KL(edited ‖ unedited). "
        "`unedited` = before any edit; `direct` = Dai et al.'s training-free W_out edit of the same neurons.\n",
    ]
    languages: list[str] | None = None
    for path in runs:
        rows = json.loads(path.read_text())["rows"]
        values = {(r["method"], r["role"], r["measure"], r["language"]): r["value"] for r in rows}
        if languages is None:  # the header, once (a one-language run has no cross-lingual columns)
            languages = sorted(
                {r["language"] for r in rows if r["role"] == "generality_cross" and r["language"] != "all"}
            )
            columns = ["neuron rule", "#neurons", "method", "reliability (en)", "other en rephrasing"]
            columns += [*languages, "locality"]
            out += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        size = json.loads(path.read_text()).get("num_neurons", "")
        for method in ("unedited", "edited", "direct"):
            if (method, "reliability", "top1", "all") not in values:
                continue

            def cell(role: str, language: str, method: str = method, values: dict = values) -> str:
                top1, wins = (
                    values.get((method, role, "top1", language)),
                    values.get((method, role, "rank", language)),
                )
                return f"{fmt(top1, False)} / {fmt(wins, False)}"

            locality = (
                "–"
                if method == "unedited"
                else f"{fmt(values.get((method, 'locality', 'top1', 'all')), False)} / "
                f"{fmt(values.get((method, 'locality', 'kl', 'all')), False)}"
            )
            rule = path.parent.name.removeprefix("edit-").removeprefix("inject-")
            cells = [rule, str(size), method, cell("reliability", "all"), cell("generality_lang", "all")]
            cells += [*(cell("generality_cross", lang) for lang in languages), locality]
            out.append("| " + " | ".join(cells) + " |")
    out.append("")


def factcheck_section(out: list[str], directory: Path) -> None:
    path = directory / "results.csv"
    if not path.exists():
        return
    rows = read_csv(path)
    doc = json.loads((directory / "results.json").read_text())
    languages = list(dict.fromkeys(r["group"] for r in rows if r["group_by"] == "language"))
    relations = list(dict.fromkeys(r["group"] for r in rows if r["group_by"] == "relation"))
    counts, reference = doc["counts"], doc["reference"]
    out += [
        f"## Fact-checking (test split: {counts['facts']} facts, {counts['claims']} claims, "
        f"{counts['false_claims']} false)\n",
        "Positive class = false claim; thresholds chosen on the validation split. Reference: flagging every claim "
        f"gives F1 {reference['f1_flag_all']:.2f}; chance AUROC {reference['auroc_chance']:.2f}.\n",
        "| detector | F1 | AUROC | " + " | ".join(f"AUROC {g}" for g in languages + relations) + " |",
        "|---|---|---|" + "---|" * (len(languages) + len(relations)),
    ]
    by = {(r["detector"], r["group_by"], r["group"]): r for r in rows}
    for detector in dict.fromkeys(r["detector"] for r in rows):
        overall = by[(detector, "all", "all")]
        groups = [by.get((detector, "language", g)) for g in languages]
        groups += [by.get((detector, "relation", g)) for g in relations]
        out.append(
            f"| {detector} | {fmt(overall['f1'], False)} | {fmt(overall['auroc'], False)} | "
            + " | ".join("–" if g is None else fmt(g["auroc"], False) for g in groups)
            + " |"
        )
    out += ["", "Relation DKN sets (from the train split):", ""]
    for rset in doc.get("relation_sets", []):
        neurons = ", ".join(f"L{layer}.{index}" for layer, index in rset["neurons"])
        out.append(
            f"* {rset['relation']}: {len(rset['neurons'])} neurons ({rset['source']}, {rset['pairs']} DKN pairs "
            f"from {rset['train_claims']} claims): {neurons}"
        )
    out.append("")


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return "." in text


def main() -> None:
    out: list[str] = ["# Gemma 3 270M experiment tables (generated by experiments/gemma/analyze.py)\n"]
    probe_section(out)
    neurons_section(
        out,
        {
            "zero (Dai)": RESULTS / "neurons-zero.json",
            "zero (Dai), LIKN ≥3 of 4": RESULTS / "neurons-zero-likn3.json",
            "AMIG": RESULTS / "neurons-amig.json",
            "AMIG, LIKN ≥3 of 4": RESULTS / "neurons-amig-likn3.json",
        },
    )
    intervention_section(out, RESULTS / "intervention")
    editing_section(out, RESULTS / "editing")
    factcheck_section(out, RESULTS / "factcheck" / "test")
    (RESULTS / "tables.md").write_text("\n".join(out) + "\n", encoding="utf-8")
    print("\n".join(out))


if __name__ == "__main__":
    main()
