"""Summarise the Gemma 3 270M experiment: neuron counts/layers (+ PNG) and intervention tables (markdown).

    .venv/bin/python experiments/gemma/analyze.py NEURONS.json INTERVENTION_DIR > experiments/gemma/results/tables.md
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = Path(__file__).parent


def fmt(x):
    if x is None:
        return "–"
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    if x != x:
        return "nan"
    return f"{x:+.3f}" if abs(x) < 100 else f"{x:+.1f}"


def neurons_section(path: Path) -> None:
    doc = json.loads(path.read_text())
    facts = doc["facts"]
    L = doc["num_layers"]
    print(f"## Neurons ({path.name}; {len(facts)} facts, {L} layers × {doc['d_ff']})\n")
    print("| fact | per-language KN (en/es/ja…) | LIKN | LIKN layers | uncertainty | uncertainty layers |")
    print("|---|---|---|---|---|---|")
    layers = {"Dai KN (per language)": Counter(), "LIKN": Counter(), "uncertainty": Counter()}
    for uuid, f in facts.items():
        langs = f.get("languages", {})
        for ns in langs.values():
            layers["Dai KN (per language)"].update(n[0] for n in ns)
        likn = f.get("language_independent", [])
        unc = f.get("uncertainty", [])
        layers["LIKN"].update(n[0] for n in likn)
        layers["uncertainty"].update(n[0] for n in unc)
        per = "/".join(f"{k}:{len(v)}" for k, v in sorted(langs.items()))
        print(f"| {uuid} | {per} | {len(likn)} | {sorted(n[0] for n in likn)} | {len(unc)} | "
              f"{sorted(n[0] for n in unc)} |")
    nl = [len(f.get("language_independent", [])) for f in facts.values()]
    print(f"\nLIKN per fact: mean {sum(nl)/max(len(nl),1):.2f}, facts with ≥1 LIKN: "
          f"{sum(n > 0 for n in nl)}/{len(nl)}\n")
    print("Layer counts: " + "; ".join(f"{k}: {dict(sorted(c.items()))}" for k, c in layers.items()) + "\n")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5), sharex=True)
    for ax, (name, c) in zip(axes, layers.items()):
        ax.bar(range(L), [c.get(i, 0) for i in range(L)], color="tab:blue")
        ax.set_title(f"{name} (n={sum(c.values())})")
        ax.set_xlabel("layer")
    axes[0].set_ylabel("neurons")
    fig.suptitle("Gemma 3 270M, capitals (P36) en/es/ja, zero-baseline IG: layer distribution of selected neurons")
    fig.tight_layout()
    fig.savefig(HERE / f"layer_distribution_{path.stem}.png", dpi=110)


def intervention_section(d: Path) -> None:
    doc = json.loads((d / "intervention.json").read_text())
    print("## Intervention (mean over fact×language units; ΔP = P_after/P_before − 1)\n")
    print("| method | neurons | op | group | units | ΔP related | ΔP unrelated | SR | acc before→after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in doc["intervention"]:
        if r["group_by"] == "relation":
            continue
        print(f"| {r['method']} | {r['neurons']} | {r['operation']} | {r['group']} | {r['units']} "
              f"(+{r['units_without_neurons']} empty) | {fmt(r['dp_related'])} | {fmt(r['dp_unrelated'])} | "
              f"{fmt(r['sr'])} | {fmt(r['acc_before'])}→{fmt(r['acc_after'])} |")
    print("\n## Cross-lingual suppression (neurons of `source`, ΔP on `target` queries of the same fact)\n")
    print("| method | source | target | units | ΔP |")
    print("|---|---|---|---|---|")
    for r in doc["cross_lingual"]:
        print(f"| {r['method']} | {r['source']} | {r['target']} | {r['units']} | {fmt(r['dp'])} |")
    print("\n## Counts\n")
    print("```")
    print(json.dumps(doc.get("counts"), indent=1, ensure_ascii=False)[:2000])
    print("```")


if __name__ == "__main__":
    neurons_section(Path(sys.argv[1]))
    if len(sys.argv) > 2:
        intervention_section(Path(sys.argv[2]))
