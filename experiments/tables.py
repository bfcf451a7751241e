"""Tables (markdown) and figures (PNG) of an issue-18 experiment folder (experiments/gemma-large, experiments/smollm2).

Reads what exists under the folder (probe table, data manifest, neuron files, intervention, enhancement, editing,
injection and fact-checking outputs copied to ``results/`` by its ``run.sh``) and writes ``results/tables.md``,
``layers.png`` (layers of every neuron set) and ``enhance.png`` (accuracy per language before / after
amplifying the language-independent neurons, and random neurons):

    python experiments/tables.py experiments/gemma-large
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

sys.path.insert(0, str(Path(__file__).parent / "gemma"))
from analyze import editing_section, factcheck_section, fmt, intervention_section, probe_section

KINDS = {
    "language": "per-language KN (Dai)",
    "language_independent": "LIKN",
    "uncertainty": "uncertainty-aware",
    "carriers": "carriers",
    "upstream": "upstream",
}


def neuron_sets(fact: dict[str, Any], kind: str) -> list[list[tuple[int, int]]]:
    """The fact's sets of one kind: one per language (per-language kinds) or one for the fact."""
    if kind == "language":
        return [[tuple(n) for n in ns] for ns in fact.get("languages", {}).values()]
    value = fact.get(kind)
    if isinstance(value, dict):  # carriers / upstream: {"languages": ..., "fact": [...]}
        return [[tuple(n) for n in value.get("fact", [])]]
    return [[tuple(n) for n in value or []]]


def known_section(out: list[str], folder: Path, neurons: dict[str, Any] | None) -> None:
    manifests = sorted((folder / "data").glob("*.manifest.json"))
    main = [m for m in manifests if ".unknown." not in m.name and ".all." not in m.name]
    if main:
        kf = json.loads(main[0].read_text()).get("knowledge_filter", {})
        out += [
            "## Data: the facts the model knows\n",
            f"Known = {kf.get('known')}; kept relations {', '.join(kf.get('kept_relations', []))}; a fact is kept "
            f"when known in ≥ {kf.get('min_known_languages')} of the languages.\n",
            "| language | " + " | ".join(kf.get("facts_per_language", {})) + " | facts | per relation |",
            "|---|" + "---|" * (len(kf.get("facts_per_language", {})) + 2),
            "| known facts | "
            + " | ".join(str(v) for v in kf.get("facts_per_language", {}).values())
            + f" | {sum(kf.get('facts_per_relation', {}).values())} | {kf.get('facts_per_relation')} |",
            "",
        ]
    if neurons:
        passed: Counter[str] = Counter()
        total: Counter[str] = Counter()
        for fact in neurons["facts"].values():
            for lang, status in fact.get("known", {}).items():
                total[lang] += 1
                passed[lang] += bool(status.get("known"))
        if total:
            out += [
                "Knowledge filter of the selection (`knlight select`, default on): (fact, language) known / present",
                "",
                "| " + " | ".join(sorted(total)) + " |",
                "|" + "---|" * len(total),
                "| " + " | ".join(f"{passed[lang]} / {total[lang]}" for lang in sorted(total)) + " |",
                "",
            ]


def neurons_section(out: list[str], folder: Path, name: str, doc: dict[str, Any]) -> None:
    facts = doc["facts"]
    num_layers = int(doc["num_layers"])
    labels: dict[tuple[int, int], str] = {}
    for fact in facts.values():
        for entry in fact.get("specificity", []):
            labels[tuple(entry["neuron"])] = entry["label"]
    out += [
        f"## Neuron sets ({name}: {len(facts)} facts)\n",
        "Sizes are means over the sets (per fact-language for the per-language KN, per fact otherwise); "
        "specificity labels: `fact` = selected for one fact, `relation` = shared by facts of one relation, "
        "`generic` = shared across relations (knlight select --specificity.enabled true).\n",
        "| set | sets (non-empty) | mean size | top layers | labels fact / relation / generic |",
        "|---|---|---|---|---|",
    ]
    layer_counts: dict[str, Counter[int]] = {}
    for kind, title in KINDS.items():
        sets = [s for fact in facts.values() for s in neuron_sets(fact, kind)]
        members = [n for s in sets for n in s]
        if not sets:
            continue
        layer_counts[title] = Counter(layer for layer, _ in members)
        label_counts = Counter(labels.get(n, "–") for n in set(members))
        top = ", ".join(str(layer) for layer, _ in layer_counts[title].most_common(4))
        out.append(
            f"| {title} | {len(sets)} ({sum(bool(s) for s in sets)}) | "
            f"{statistics.fmean(len(s) for s in sets):.1f} | {top or '–'} | "
            f"{label_counts['fact']} / {label_counts['relation']} / {label_counts['generic']} |"
        )
    out.append("")
    shared: dict[tuple[int, int], set[str]] = defaultdict(set)
    for uuid, fact in facts.items():
        for s in neuron_sets(fact, "language_independent"):
            for n in s:
                shared[n].add(uuid)
    if shared:
        top = sorted(shared.items(), key=lambda item: -len(item[1]))[:5]
        out += [
            "Most shared LIKN neurons (facts): "
            + ", ".join(f"L{layer}.{index} ({len(owners)})" for (layer, index), owners in top),
            "",
        ]
    analysis = doc.get("analysis", {})
    consistency = analysis.get("consistency")
    if consistency and consistency.get("threshold") is not None:
        out += [
            f"Consistency across queries (mean pairwise Jaccard of per-query neuron sets; Otsu threshold "
            f"{consistency['threshold']:.3f}): {consistency['consistent']} of {consistency['pairs']} "
            "(fact, language) consistent.",
            "",
            "| group | consistent / all |",
            "|---|---|",
        ]
        for key in ("by_language", "by_relation"):
            for group, row in sorted(consistency.get(key, {}).items()):
                out.append(f"| {group} | {row.get('consistent')} / {row.get('pairs', row.get('all'))} |")
        out.append("")
    if layer_counts:
        fig, axes = plt.subplots(1, len(layer_counts), figsize=(3.2 * len(layer_counts), 2.8), squeeze=False)
        for c, (title, counts) in enumerate(layer_counts.items()):
            ax = axes[0][c]
            ax.bar(range(num_layers), [counts.get(i, 0) for i in range(num_layers)], color=f"C{c}")
            ax.set_title(f"{title} (n={sum(counts.values())})", fontsize=9)
            ax.set_xlabel("layer")
        fig.suptitle(f"{doc['model']}: layers of the selected neurons ({len(facts)} facts)")
        fig.tight_layout()
        image = "layers.png" if name == "neurons.json" else f"layers-{name.removesuffix('.json')}.png"
        fig.savefig(folder / image, dpi=100)
        plt.close(fig)
        out += [f"![layers of the selected neurons](../{image})", ""]


def enhance_section(out: list[str], folder: Path) -> None:
    path = folder / "results" / "enhance" / "editing_val.json"
    if not path.exists():
        return
    rows = json.loads(path.read_text())["rows"]
    top1 = {
        (r["method"], r["language"]): r["value"]
        for r in rows
        if r["measure"] == "top1" and r["role"] in ("facts", "reliability")
    }
    methods = list(dict.fromkeys(m for m, _ in top1))
    languages = [*sorted({lang for _, lang in top1 if lang != "all"}), "all"]
    out += [
        "## Knowledge enhancement: top-1 accuracy per language, before / after amplifying (×2)\n",
        "| method | " + " | ".join(languages) + " |",
        "|---|" + "---|" * len(languages),
    ]
    for method in methods:
        out.append(
            f"| {method} | " + " | ".join(fmt(top1.get((method, lang)), False) for lang in languages) + " |"
        )
    out.append("")
    fig, ax = plt.subplots(figsize=(1.2 * len(languages) + 2, 3))
    width = 0.8 / max(len(methods), 1)
    for k, method in enumerate(methods):
        ax.bar(
            [i + k * width for i in range(len(languages))],
            [top1.get((method, lang), 0.0) for lang in languages],
            width,
            label=method,
        )
    ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(languages))], languages)
    ax.set_ylabel("top-1 accuracy")
    ax.legend(fontsize=8)
    ax.set_title("knowledge enhancement per language")
    fig.tight_layout()
    fig.savefig(folder / "enhance.png", dpi=100)
    plt.close(fig)
    out += ["![enhancement per language](../enhance.png)", ""]


def auroc(scores: list[float], labels: list[int]) -> float | None:
    """Area under the ROC curve (Mann-Whitney; ties count half); None without both classes."""
    positive = [x for x, y in zip(scores, labels) if y]
    negative = [x for x, y in zip(scores, labels) if not y]
    if not positive or not negative:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def known_unknown_section(out: list[str], folder: Path) -> None:
    """Fact-checking AUROC on claims about facts the model knows vs facts it knows in no language."""
    claims = folder / "results" / "factcheck" / "test" / "claims.csv"
    unknown_files = sorted((folder / "data").glob("*.unknown.jsonl"))
    if not claims.exists() or not unknown_files:
        return
    unknown = {json.loads(line)["uuid"] for f in unknown_files for line in f.read_text().splitlines() if line}
    with claims.open() as fh:
        rows = list(csv.DictReader(fh))
    detectors = [c.removeprefix("score_") for c in rows[0] if c.startswith("score_")]
    groups = {"known facts": [r for r in rows if r["uuid"] not in unknown]}
    groups["unknown facts"] = [r for r in rows if r["uuid"] in unknown]
    out += [
        "Fact-checking AUROC by whether the model knows the fact (unknown = known in none of the languages; "
        "positive class = false claim):",
        "",
        "| detector | " + " | ".join(f"{g} ({len(r)} claims)" for g, r in groups.items()) + " |",
        "|---|" + "---|" * len(groups),
    ]
    for detector in detectors:
        cells = []
        for group in groups.values():
            value = auroc([float(r[f"score_{detector}"]) for r in group], [int(r["label"]) for r in group])
            cells.append("–" if value is None else f"{value:.2f}")
        out.append(f"| {detector} | " + " | ".join(cells) + " |")
    out.append("")


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "experiments/gemma-large")
    results = folder / "results"
    out = [f"# {folder.name} experiment tables (generated by experiments/tables.py)\n"]
    for probe in sorted((folder / "data").glob("*.probe.json")):
        manifest = probe.parent / probe.name.replace(".jsonl.probe.json", ".manifest.json")
        probed = (
            json.loads(manifest.read_text()).get("knowledge_filter", {}).get("probe", "")
            if manifest.exists()
            else ""
        )
        facts = int(probed.split("up to ")[1].split()[0]) if "up to " in probed else 40
        probe_section(out, probe, title=folder.name, facts=facts)
    neurons = (
        json.loads((results / "neurons.json").read_text()) if (results / "neurons.json").exists() else None
    )
    known_section(out, folder, neurons)
    for name in ("neurons.json", "neurons-amig.json"):
        if (results / name).exists():
            neurons_section(out, folder, name, json.loads((results / name).read_text()))
    intervention_section(out, results / "intervention")
    enhance_section(out, folder)
    editing_section(out, results / "editing")
    editing_section(
        out,
        results / "injection",
        title="## New-knowledge injection (facts unknown in every language, trained in en through relation LIKN)\n",
    )
    factcheck_section(out, results / "factcheck" / "test")
    known_unknown_section(out, folder)
    results.mkdir(parents=True, exist_ok=True)
    (results / "tables.md").write_text("\n".join(out) + "\n", encoding="utf-8")
    print("\n".join(out))


if __name__ == "__main__":
    main()
