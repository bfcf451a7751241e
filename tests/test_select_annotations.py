"""``knlight select`` with the annotations: specificity labels and consistency in the neuron file by default,
fact-specific neurons listed first, LAPE from the command line on a tiny model; every option in ``--help``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from knlight.cli import main
from knlight.neurons.neuron_file import read_neuron_file
from knlight.selection import KnOptions, run_selection


def _line(uuid: str, relation: str, language: str, query_id: int, neurons: list, query: str) -> str:
    return json.dumps({"uuid": uuid, "language": language, "relation": relation, "query_id": query_id,
                       "query": query, "answer": "Paris", "prob": 0.5, "rank": 1, "neurons": neurons})  # fmt: skip


def _predict_output(root: Path, model: str) -> Path:
    """Three facts (F1, F2 of R0; F3 of R1); neuron [2, 7] selected for F1 and F3, [2, 5] for F1 and F2."""
    en = ["The capital of France is [Y].", "France has its capital in [Y].", "The French capital is [Y]."]
    de = ["Die Hauptstadt von Frankreich ist [Y].", "Frankreichs Hauptstadt ist [Y]."]
    per_query = {
        ("F1", "en"): [[[2, 7, 1.0], [2, 5, 0.9], [0, 1, 0.8]], [[2, 7, 1.0], [2, 5, 0.9], [0, 1, 0.8]],
                       [[2, 7, 1.0], [2, 5, 0.9], [0, 1, 0.8]]],
        ("F1", "de"): [[[0, 1, 1.0], [2, 7, 0.9], [2, 5, 0.8]], [[0, 1, 1.0], [2, 7, 0.9], [2, 5, 0.8]]],
        ("F2", "en"): [[[2, 5, 1.0], [1, 3, 0.9]], [[2, 5, 1.0], [1, 3, 0.9]],
                       [[1, 3, 1.0], [2, 7, 0.9], [2, 5, 0.5]]],
        ("F3", "en"): [[[2, 7, 1.0], [1, 9, 0.9]], [[2, 7, 1.0], [0, 4, 0.9]], [[2, 7, 1.0], [0, 5, 0.9]]],
    }  # fmt: skip
    lines = []
    for (uuid, language), queries in per_query.items():
        relation = "R1" if uuid == "F3" else "R0"
        texts = en if language == "en" else de
        lines += [_line(uuid, relation, language, q, n, texts[q]) for q, n in enumerate(queries)]
    root.mkdir(parents=True)
    (root / "attributions.jsonl").write_text("\n".join(lines) + "\n", "utf-8")
    hparams = {"model": model, "threshold": 0.2, "language_thresholds": None, "top_k": None}
    (root / "run.json").write_text(json.dumps({"hparams": hparams}), "utf-8")
    return root


def test_select_labels_and_measures_consistency_by_default(tmp_path: Path) -> None:
    folder = _predict_output(tmp_path / "attributions", "tiny:gpt2")
    out = tmp_path / "neurons.json"
    # p = 1: a neuron must be coarse in every query of the language (no adaptive move).
    run_selection(str(folder), str(out), num_layers=3, d_ff=64, kn=KnOptions(p=1.0, adaptive=False))
    neurons = read_neuron_file(out, num_layers=3, d_ff=64)
    f1, f2 = neurons.facts["F1"], neurons.facts["F2"]
    # F1 en: [2, 7] (also F3's: two relations -> generic), [2, 5] (F2's too, same relation), [0, 1] (F1 only).
    assert {n: s.label for n, s in f1.specificity.items()} == {
        (0, 1): "fact",
        (2, 5): "relation",
        (2, 7): "generic",
    }
    assert f1.languages["en"] == [
        (0, 1),
        (2, 5),
        (2, 7),
    ]  # fact-specific first although [2, 7] scores highest
    assert f1.specificity[(2, 7)].facts == 2 and f1.specificity[(2, 7)].relations == 2
    assert f2.languages["en"] == [(1, 3), (2, 5)]
    # Consistency: F1's sets are identical in both languages (Jaccard 1); F2 en: J = 1, 2/3, 2/3 -> 7/9; F3 en:
    # 1/3 each. Otsu on [1/3, 7/9, 1, 1]: the cut after 1/3 (.1875 · (1/3 - .926)² = .066 beats .049, .016).
    assert f1.consistency["en"]["jaccard"] == 1.0 and f1.consistency["de"]["jaccard"] == 1.0
    assert f2.consistency["en"]["jaccard"] == pytest.approx(7 / 9, abs=1e-6)
    assert neurons.facts["F3"].consistency["en"]["jaccard"] == pytest.approx(1 / 3, abs=1e-6)
    analysis = neurons.analysis["consistency"]
    assert analysis["pairs"] == 4 and analysis["threshold"] == pytest.approx((1 / 3 + 7 / 9) / 2, abs=1e-6)
    assert f1.consistency["en"]["consistent"] and not neurons.facts["F3"].consistency["en"]["consistent"]
    assert set(analysis["by_relation"]) == {"R0", "R1"}
    assert neurons.analysis["specificity"]["labels"]["generic"] >= 1
    assert "lape" not in neurons.analysis  # off by default (it runs the model)


def test_lape_from_the_command_line_on_a_tiny_model(tmp_path: Path) -> None:
    folder = _predict_output(tmp_path / "attributions", "tiny:gpt2")
    out = tmp_path / "neurons.json"
    main(["select", "--attributions", str(folder), "--output", str(out), "--lape.enabled", "true",
          "--lape.entropy_share", "0.05"])  # fmt: skip
    lape = read_neuron_file(out, num_layers=3, d_ff=64).analysis["lape"]
    assert set(lape["neurons"]) == {"de", "en"}
    assert sum(len(v) for v in lape["neurons"].values()) >= 1
    assert lape["tokens"]["en"] > 0 and lape["tokens"]["de"] > 0
    assert set(lape["overlap"]) == {"kn", "likn", "likn_any_language"}
    assert lape["options"]["entropy_share"] == 0.05


def test_select_help_documents_the_new_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["select", "--help"])
    text = capsys.readouterr().out
    for option in ("--specificity.min_facts", "--specificity.suppression", "--consistency.enabled",
                   "--lape.enabled", "--lape.entropy_share", "--lape.prob_quantile"):  # fmt: skip
        assert option in text
    assert "Shared by facts of at least this many relations" in text  # attribute docstrings
