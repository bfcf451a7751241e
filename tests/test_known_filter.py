"""The knowledge filter: only the (fact, language, query) the model knows enter selection, and the neuron file,
LIKN and the summary say which were left out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from knlight.cli import console_main
from knlight.neurons.neuron_file import read_neuron_file
from knlight.selection import KnOptions, SelectionError, run_selection
from knlight.selection.options import KnownOptions
from knlight.selection.summary import summarize

# (uuid, language, query_id, rank, prob, neurons). F1 is known in en (every query), in fr through one query of
# two (rank 3), and not in de (rank 500, P ~ 0); F2 is known nowhere.
ROWS = [
    ("F1", "en", 0, 1, 0.60, [[1, 2, 1.0], [0, 1, 0.5]]),
    ("F1", "en", 1, 2, 0.40, [[1, 2, 0.9], [0, 1, 0.6]]),
    ("F1", "fr", 0, 800, 0.0001, [[0, 3, 1.0]]),  # not known: its neuron must not reach fr's set
    ("F1", "fr", 1, 3, 0.02, [[1, 2, 1.0], [0, 1, 0.4]]),
    ("F1", "de", 0, 500, 0.0002, [[1, 2, 1.0], [1, 3, 0.9]]),
    ("F1", "de", 1, 700, 0.0001, [[1, 2, 1.0], [1, 3, 0.8]]),
    ("F2", "en", 0, 40, 0.001, [[0, 0, 1.0]]),
    ("F2", "de", 0, 90, 0.0005, [[0, 0, 1.0]]),
]
KN = KnOptions(p=0.7, adaptive=False)


def _run(root: Path, rows: list = ROWS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"uuid": u, "language": g, "relation": "P36", "query_id": q, "query": f"{g} q{q} [Y]",
                    "answer": "Paris", "prob": p, "rank": r, "neurons": n})
        for u, g, q, r, p, n in rows
    ]  # fmt: skip
    (root / "attributions.jsonl").write_text("\n".join(lines) + "\n", "utf-8")
    hparams = {"model": "tiny:none", "threshold": 0.2, "language_thresholds": None, "top_k": None}
    (root / "run.json").write_text(json.dumps({"hparams": hparams}), "utf-8")
    return root


def test_the_filter_drops_unknown_languages_and_facts_and_records_why(tmp_path: Path) -> None:
    out = tmp_path / "neurons.json"
    result = run_selection(str(_run(tmp_path / "attr")), str(out), num_layers=2, d_ff=4, kn=KN)
    f1, f2 = result.facts["F1"], result.facts["F2"]
    assert sorted(f1.languages) == ["en", "fr"]  # de is not known: no neurons listed for it
    assert f1.languages["fr"] == [(1, 2), (0, 1)]  # only the passing query: (0, 3) of query 0 is left out
    assert f1.known["de"].known is False and f1.known["de"].query_ids == [] and f1.known["de"].of == 2
    assert f1.known["fr"].known is True and f1.known["fr"].query_ids == [1]
    assert f1.known["en"].query_ids == [0, 1]
    # LIKN over the known languages (en, fr), not over every language of the run: de would have emptied it.
    assert f1.likn_languages == ["en", "fr"]
    assert sorted(f1.language_independent) == [(0, 1), (1, 2)]
    assert f2.languages == {} and f2.language_independent == [] and f2.likn_languages == []
    assert not any(status.known for status in f2.known.values())
    # The file keeps all of it, and the readers honour it.
    again = read_neuron_file(out, 2, 4).facts["F1"]
    assert again.known["fr"].query_ids == [1] and again.likn_languages == ["en", "fr"]
    assert again.is_known("en") and not again.is_known("de") and not again.is_known("fr", 0)
    assert again.known_languages() == ["en", "fr"]
    entry = json.loads(out.read_text("utf-8"))["facts"]["F1"]
    assert entry["known"]["de"] == {"known": False, "passed": 0, "of": 2, "query_ids": []}
    assert json.loads(out.read_text("utf-8"))["method"]["known"]["max_rank"] == 10


def test_the_summary_marks_unknown_languages_instead_of_listing_neurons(tmp_path: Path) -> None:
    text = summarize(_run(tmp_path / "attr"), p=0.7)
    de_line = next(
        line for line in text.splitlines() if line.strip().startswith("de") and "q" not in line[:4]
    )
    assert "NOT KNOWN (0 of 2 queries pass gold rank <= 10 or P >= 0.1): no neurons" in de_line
    assert "top:" not in de_line
    assert "L1.3" not in text  # de's neuron is never listed
    assert "(1 known)" in next(line for line in text.splitlines() if line.strip().startswith("fr"))
    assert "language-independent: L0.1, L1.2  (over 2 of 3 languages; known in: en, fr)" in text
    f2 = text.split("F2")[1]
    assert "language-independent: none" in f2 and "needs the fact known in at least two languages" in f2
    # Off: every language is listed (de's neurons appear).
    assert "L1.3" in summarize(tmp_path / "attr", p=0.7, known=KnownOptions(enabled=False))


def test_filter_off_keeps_every_query_and_still_records_the_status(tmp_path: Path) -> None:
    result = run_selection(str(_run(tmp_path / "attr")), None, num_layers=2, d_ff=4, kn=KN,
                           known=KnownOptions(enabled=False))  # fmt: skip
    f1 = result.facts["F1"]
    assert sorted(f1.languages) == ["de", "en", "fr"]
    assert f1.known["de"].known is False  # recorded whatever the switch says
    assert (1, 3) in f1.languages["de"]


def test_rank_and_probability_bounds_are_configurable(tmp_path: Path) -> None:
    run = str(_run(tmp_path / "attr"))
    # Rank only, up to 50: F2's en query (rank 40) passes; fr's rank-3 query passes, P is not looked at.
    by_rank = run_selection(
        run, None, num_layers=2, d_ff=4, kn=KN, known=KnownOptions(max_rank=50, min_prob=None)
    )
    assert sorted(by_rank.facts["F2"].languages) == ["en"]
    # P only, at least 0.5: only F1's en query 0 passes; with min_queries 2 en is not known either.
    by_prob = run_selection(
        run, None, num_layers=2, d_ff=4, kn=KN, known=KnownOptions(max_rank=None, min_prob=0.5)
    )
    assert by_prob.facts["F1"].known["en"].query_ids == [0]
    strict = KnownOptions(max_rank=None, min_prob=0.5, min_queries=2)
    assert run_selection(run, None, num_layers=2, d_ff=4, kn=KN, known=strict).facts["F1"].languages == {}


def test_a_query_without_rank_or_probability_is_not_judged(tmp_path: Path) -> None:
    rows = [("F1", "en", 0, None, None, [[1, 2, 1.0]])]
    result = run_selection(str(_run(tmp_path / "attr", rows)), None, num_layers=2, d_ff=4, kn=KN)
    assert result.facts["F1"].languages == {"en": [(1, 2)]}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (KnownOptions(max_rank=None, min_prob=None), "--known.enabled false"),
        (KnownOptions(max_rank=0), "known.max_rank=0"),
        (KnownOptions(min_prob=1.5), "known.min_prob=1.5"),
        (KnownOptions(min_queries=0), "known.min_queries=0"),
    ],
)
def test_bad_filter_options_are_named(tmp_path: Path, options: KnownOptions, message: str) -> None:
    with pytest.raises(SelectionError, match=message.replace(".", r"\.")):
        run_selection(str(_run(tmp_path / "attr")), None, num_layers=2, d_ff=4, known=options)


def test_select_help_documents_the_filter_and_the_carriers(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        console_main(["select", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    known = ("--known.enabled", "--known.max_rank", "--known.min_prob", "--known.min_queries")
    carriers = ("--carriers.enabled", "--carriers.method", "--carriers.threshold", "--carriers.min_effect")
    for option in (*known, *carriers):
        assert option in text
    assert "rank (1 = the model's top token) is at most this" in text
    assert "a patched forward per candidate" in text


def test_interventions_skip_what_the_neuron_file_records_as_not_known() -> None:
    """With the filter on at selection, a (fact, language) recorded as not known gets no intervention rows for
    that file's neurons (any set), a known one does (the clean rows are always there)."""
    from knlight.neurons.intervention_plan import ItemPool, PlanOptions, plan_item
    from knlight.neurons.neuron_annotations import KnownStatus
    from knlight.neurons.neuron_file import FactNeurons, NeuronFile

    fact = FactNeurons(relation="P36", languages={"en": [(0, 1)]}, language_independent=[(0, 1)])
    fact.known = {"en": KnownStatus(True, [0], 1), "de": KnownStatus(False, [], 1)}
    file = NeuronFile("tiny", 2, 4, {"known": {"enabled": True}}, {"F1": fact})
    items = [{"uuid": "F1", "language": g, "relation": "P36", "query_id": 0, "query": f"{g} [Y]",
              "answer": "Paris"} for g in ("en", "de")]  # fmt: skip
    pool = ItemPool(items)
    options = PlanOptions(("suppress",), 2.0, 0, "other", False, False, 0)
    methods = {"likn": (file, "language_independent")}
    _, en_rows = plan_item(items[0], pool, methods, options, ["de", "en"], 4)
    _, de_rows = plan_item(items[1], pool, methods, options, ["de", "en"], 4)
    assert [r.neurons for r in en_rows if r.method == 0] == [[(0, 1)]]
    assert [r for r in de_rows if r.method == 0] == []
    assert len(de_rows) == 1  # only the clean row
    # Selected with the filter off, the status was only recorded: every item is tested.
    file.method["known"]["enabled"] = False
    _, de_rows = plan_item(items[1], pool, methods, options, ["de", "en"], 4)
    assert [r.neurons for r in de_rows if r.method == 0] == [[(0, 1)]]
