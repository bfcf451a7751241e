"""`knlight test --config configs/tiny/intervene.yaml` in-process: tables, numbers, TensorBoard, bad input."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

import knlight.tasks.intervention as intervention_task
from knlight import load_lm
from knlight.cli import main
from knlight.errors import ConfigError
from knlight.lm.options import LMOptions
from knlight.neurons.interventions import Outcome, intervene
from knlight.neurons.neuron_file import NeuronFileError, read_neuron_file, write_neuron_file

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny" / "intervene.yaml"
TABLES = ("intervention", "success_rate", "cross_lingual", "jaccard", "facts", "layers")


def intervene_args(root: Path, *extra: str) -> list[str]:
    """The tiny intervention run: 2 facts (28 items), 2 unrelated queries per item, writing under ``root``."""
    return [
        "test", "--config", str(CONFIG),
        "--trainer.logger.init_args.save_dir", str(root / "runs"),
        "--trainer.enable_progress_bar", "false",
        "--data.init_args.max_facts", "2",
        "--model.init_args.unrelated_per_query", "2",
        "--model.init_args.output_dir", str(root / "out"),
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def in_repo() -> Iterator[None]:
    """The config's paths (fixture, neuron files) are relative to the repository root."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        yield


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, in_repo: None) -> Path:
    root = tmp_path_factory.mktemp("intervene")
    main(intervene_args(root))
    return root


def table(root: Path, name: str) -> list[dict[str, str]]:
    with open(root / "out" / f"{name}.csv", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_every_table_is_written_and_complete(finished: Path) -> None:
    for name in TABLES:
        assert (finished / "out" / f"{name}.csv").is_file()
    document = json.loads((finished / "out" / "intervention.json").read_text("utf-8"))
    assert set(document) == {"settings", "counts", *TABLES}
    assert document["settings"]["methods"]["likn"] == {"neurons": "configs/tiny/neurons/amig.json",
                                                       "kind": "language_independent"}  # fmt: skip
    rows = table(finished, "intervention")
    assert len(rows) == len(document["intervention"])
    methods = ("dai", "amig", "likn", "uncertainty")
    groups = {
        ("all", "all"),
        ("language", "de"),
        ("language", "en"),
        ("language", "zh-hans"),
        ("relation", "P36"),
    }
    for method in methods:
        for kind in ("selected", "random"):
            for op in ("suppress", "enhance", "erase"):
                found = {(r["group_by"], r["group"]) for r in rows
                         if (r["method"], r["neurons"], r["operation"]) == (method, kind, op)}  # fmt: skip
                assert found == groups, (method, kind, op)
    dai = [r for r in rows if r["method"] == "dai" and r["group_by"] == "all"]
    assert {r["units"] for r in dai} == {"6"} and {r["related"] for r in dai} == {"28"}
    assert {r["unrelated"] for r in dai} == {"56"} and {r["nan_related"] for r in dai} == {"0"}
    summary = json.loads((finished / "out" / "summary.json").read_text("utf-8"))
    assert summary["items"] == 28 and summary["world_size"] == 1 and summary["items_skipped_no_neurons"] == 0


def test_numbers_agree_with_a_direct_computation(finished: Path, in_repo: None) -> None:
    lm = load_lm("tiny:gpt2")
    neurons = read_neuron_file(REPO / "configs" / "tiny" / "neurons" / "dai.json")
    facts = [r for r in table(finished, "facts") if r["method"] == "dai" and r["neurons"] == "selected"]
    records = [
        json.loads(line)
        for line in (REPO / "tests" / "fixtures" / "rml_small.jsonl").read_text().splitlines()
    ]
    checked = 0
    for row in facts:
        if row["operation"] not in ("suppress", "enhance"):
            continue
        record = next(r for r in records if (r["uuid"], r["language"]) == (row["uuid"], row["language"]))
        # The data module drops queries with nothing before the slot for causal models.
        encoded = [lm.encode(q, record["object"]) for q in record["queries"] if not q.startswith("[Y]")]
        factor = 0.0 if row["operation"] == "suppress" else 2.0
        selected = neurons.facts[row["uuid"]].languages[row["language"]]
        log_p = [intervene(lm, [(e, [], 1.0), (e, selected, factor)]).log_prob.double() for e in encoded]
        expected = sum(math.expm1(float(lp[1] - lp[0])) for lp in log_p) / len(log_p)
        assert float(row["dp_related"]) == pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert int(row["num_neurons"]) == len(selected) and int(row["queries"]) == len(encoded)
        checked += 1
    assert checked == 12  # 2 facts × 3 languages × 2 operations
    random = {(r["uuid"], r["language"], r["operation"]): r["num_neurons"] for r in table(finished, "facts")
              if r["method"] == "dai" and r["neurons"] == "random"}  # fmt: skip
    assert random == {(r["uuid"], r["language"], r["operation"]): r["num_neurons"] for r in facts}


def test_cross_lingual_jaccard_and_layers(finished: Path) -> None:
    cross = table(finished, "cross_lingual")
    dai = {(r["source"], r["target"]) for r in cross if r["method"] == "dai"}
    languages = ("de", "en", "zh-hans")
    assert {(a, b) for a in languages for b in languages} <= dai
    assert {("LIKN", b) for b in languages} & dai  # LIKN rows where the fact has LIKN
    jaccard = {
        (r["language_a"], r["language_b"]): r for r in table(finished, "jaccard") if r["method"] == "dai"
    }
    assert all(float(jaccard[(g, g)]["jaccard"]) == 1.0 for g in languages)
    assert jaccard[("de", "en")]["jaccard"] == jaccard[("en", "de")]["jaccard"]
    layers = table(finished, "layers")
    assert {r["kind"] for r in layers} == {"KN", "LIKN", "uncertainty", "DKN"}
    kn = sum(int(r["neurons"]) for r in layers if r["first_method"] == "dai" and r["kind"] == "KN")
    file = read_neuron_file(REPO / "configs" / "tiny" / "neurons" / "dai.json")
    assert kn == sum(len(ns) for f in file.facts.values() for ns in f.languages.values())


def test_tensorboard_has_images_and_scalars(finished: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (version,) = (finished / "runs" / "tiny-intervene").glob("version_*")
    events = EventAccumulator(str(version), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    images = set(events.Tags()["images"])
    assert {"intervention/delta_p", "intervention/success_rate", "intervention/layers",
            "intervention/jaccard/dai", "intervention/cross_lingual/dai"} <= images  # fmt: skip
    assert events.Images("intervention/delta_p")[0].encoded_image_string.startswith(b"\x89PNG")
    scalars = set(events.Tags()["scalars"])
    assert {"intervention/dai/sr", "intervention/dai/sr_random", "intervention/likn/suppress/dp_related",
            "intervention/dai/selected/suppress/dp_related/de"} <= scalars  # fmt: skip
    sr = {r["method"]: float(r["sr"]) for r in table(finished, "success_rate")
          if r["group_by"] == "all" and r["neurons"] == "selected"}  # fmt: skip
    assert events.Scalars("intervention/dai/sr")[0].value == pytest.approx(sr["dai"], rel=1e-6)


def test_zero_probability_baselines_are_counted_not_fatal(
    tmp_path: Path, in_repo: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def zero_first_query(lm, rows, **kwargs):
        outcome = intervene(lm, rows, **kwargs)
        log_prob = outcome.log_prob.clone()
        first = rows[0][0]  # the related item's clean row comes first
        if first.input_ids[-1] % 2 == 0:  # about half of the items: P_before = 0
            log_prob[0] = -math.inf
        return Outcome(log_prob, outcome.top1)

    monkeypatch.setattr(intervention_task, "intervene", zero_first_query)
    only_dai = '{"dai": {"neurons": "configs/tiny/neurons/dai.json"}}'
    main(
        intervene_args(
            tmp_path, "--model.init_args.methods", only_dai, "--model.init_args.random_control", "false"
        )
    )
    rows = [r for r in table(tmp_path, "intervention") if r["group_by"] == "all"]
    assert {r["method"] for r in rows} == {"dai"} and len(rows) == 3
    nan = {int(r["nan_related"]) for r in rows}
    assert len(nan) == 1 and 0 < nan.pop() < 28
    assert all(math.isfinite(float(r["dp_related"])) for r in rows)


def test_a_neuron_file_of_another_model_is_refused(tmp_path: Path, in_repo: None) -> None:
    neurons = read_neuron_file(REPO / "configs" / "tiny" / "neurons" / "dai.json")
    neurons.d_ff = 128
    other = write_neuron_file(tmp_path / "other.json", neurons)
    with pytest.raises(
        NeuronFileError, match=r"other\.json was selected on 'tiny:gpt2' with d_ff=128.*d_ff=64"
    ):
        main(
            intervene_args(
                tmp_path, "--model.init_args.methods", json.dumps({"dai": {"neurons": str(other)}})
            )
        )


def test_fact_specific_needs_specificity_labels(tmp_path: Path, in_repo: None) -> None:
    neurons = read_neuron_file(REPO / "configs" / "tiny" / "neurons" / "dai.json")
    for fact in neurons.facts.values():
        fact.specificity = {}  # a file selected without --specificity.enabled true
    unlabelled = write_neuron_file(tmp_path / "dai.json", neurons)
    methods = {"dai_fact": {"neurons": str(unlabelled), "kind": "fact_specific"}}
    with pytest.raises(
        ConfigError, match=r"methods\.dai_fact\.kind=fact_specific: .*dai\.json has no specificity"
    ):
        main(intervene_args(tmp_path, "--model.init_args.methods", json.dumps(methods)))
    # With labels: the rows test only the neurons labelled `fact`.
    labelled = str(REPO / "configs" / "tiny" / "neurons" / "dai.json")
    methods = {"f": {"neurons": labelled, "kind": "fact_specific"}}
    main(intervene_args(tmp_path, "--model.init_args.methods", json.dumps(methods)))
    file = read_neuron_file(labelled)
    for row in table(tmp_path, "facts"):
        fact = file.facts[row["uuid"]]
        expected = fact.neurons("fact_specific", row["language"])
        assert int(row["num_neurons"]) == len(expected) > 0
        assert all(fact.specificity[n].label == "fact" for n in expected)


def test_no_methods_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="needs at least one method"):
        intervention_task.InterventionModule(LMOptions("tiny:gpt2"), methods={})
    with pytest.raises(ValueError, match="choose among suppress, enhance, erase"):
        intervention_task.InterventionModule(
            LMOptions("tiny:gpt2"), methods={"a": {"neurons": "x"}}, operations=["boost"]
        )


def test_unrelated_sample_is_other_facts_same_language_and_seeded() -> None:
    from knlight.neurons.intervention_plan import ItemPool

    facts = {"F1": "P36", "F2": "P36", "F3": "P37"}
    items = [{"uuid": u, "language": g, "query_id": q, "relation": r, "query": "x [Y]", "answer": "y"}
             for u, r in facts.items() for g in ("en", "de") for q in range(4)]  # fmt: skip
    pool = ItemPool(items)
    sample = pool.unrelated(items[0], 5, "any", seed=3)
    assert len(sample) == 5 and all(i["uuid"] != "F1" and i["language"] == "en" for i in sample)
    assert pool.unrelated(items[0], 5, "any", seed=3) == sample
    assert any(pool.unrelated(items[0], 5, "any", seed=s) != sample for s in range(4, 12))  # the seed matters
    assert len(pool.unrelated(items[0], 50, "any", seed=3)) == 8  # every other fact's query in that language
    assert {i["uuid"] for i in pool.unrelated(items[0], 50, "same", seed=3)} == {"F2"}
    assert {i["uuid"] for i in pool.unrelated(items[0], 50, "other", seed=3)} == {"F3"}
    assert len(pool.unrelated(items[0], 3, "other", seed=3)) == 3
    with pytest.raises(ValueError, match="choose any, same or other"):
        intervention_task.InterventionModule(
            LMOptions("tiny:gpt2"), methods={"a": {"neurons": "x"}}, unrelated_relations="all"
        )


@pytest.fixture(scope="module")
def every_unrelated(tmp_path_factory: pytest.TempPathFactory, in_repo: None) -> Path:
    """The tiny run with every other fact's query as the unrelated set (no sampling: checkable by hand)."""
    root = tmp_path_factory.mktemp("intervene-all")
    main(intervene_args(root, "--model.init_args.unrelated_per_query", "100"))
    return root


def _direct(lm, encoded: list, neurons: list, factor: float) -> float:
    """Mean ΔP over queries, each computed alone: P_after / P_before - 1."""
    changes = []
    for e in encoded:
        lp = intervene(lm, [(e, [], 1.0), (e, list(neurons), factor)]).log_prob.double()
        changes.append(math.expm1(float(lp[1] - lp[0])))
    return sum(changes) / len(changes)


def test_erase_unrelated_cross_lingual_and_jaccard_values(every_unrelated: Path, in_repo: None) -> None:
    lm = load_lm("tiny:gpt2")
    neurons = read_neuron_file(REPO / "configs" / "tiny" / "neurons" / "dai.json")
    records = [
        json.loads(line)
        for line in (REPO / "tests" / "fixtures" / "rml_small.jsonl").read_text().splitlines()
    ]
    facts = table(every_unrelated, "facts")
    tested = sorted({r["uuid"] for r in facts})
    assert len(tested) == 2

    def queries(uuid: str, language: str) -> list:
        record = next(r for r in records if (r["uuid"], r["language"]) == (uuid, language))
        return [lm.encode(q, record["object"]) for q in record["queries"] if not q.startswith("[Y]")]

    erase_differs = 0
    for row in facts:
        if row["method"] != "dai" or row["neurons"] != "selected":
            continue
        uuid, language = row["uuid"], row["language"]
        fact = neurons.facts[uuid]
        own = fact.languages[language]
        union = list(dict.fromkeys(n for lang in sorted(fact.languages) for n in fact.languages[lang]))
        chosen = union if row["operation"] == "erase" else own
        factor = 2.0 if row["operation"] == "enhance" else 0.0
        # erase = the fact's neurons of every language suppressed together
        assert float(row["dp_related"]) == pytest.approx(_direct(lm, queries(uuid, language), chosen, factor),
                                                         rel=1e-4, abs=1e-6)  # fmt: skip
        erase_differs += row["operation"] == "erase" and set(union) != set(own)
        # unrelated: every query of the other tested fact in the same language
        others = [q for other in tested if other != uuid for q in queries(other, language)]
        assert float(row["dp_unrelated"]) == pytest.approx(
            _direct(lm, others, chosen, factor), rel=1e-4, abs=1e-6
        )
    assert erase_differs > 0  # the union is larger than a language's own set somewhere: erase is not suppress

    cross = {(r["source"], r["target"]): float(r["dp"]) for r in table(every_unrelated, "cross_lingual")
             if r["method"] == "dai"}  # fmt: skip
    checked = 0
    for source in ("de", "en", "zh-hans"):
        for target in ("de", "en", "zh-hans"):
            units = [
                u
                for u in tested
                if neurons.facts[u].languages.get(source) and neurons.facts[u].languages.get(target)
            ]
            if source == target or not units:
                continue
            expected = sum(
                _direct(lm, queries(u, target), neurons.facts[u].languages[source], 0.0) for u in units
            )
            assert cross[(source, target)] == pytest.approx(expected / len(units), rel=1e-4, abs=1e-6)
            checked += 1
    assert checked == 6

    jaccard = {(r["language_a"], r["language_b"]): float(r["jaccard"]) for r in table(every_unrelated, "jaccard")
               if r["method"] == "dai"}  # fmt: skip
    off_diagonal = []
    for a, b in (("de", "en"), ("de", "zh-hans"), ("en", "zh-hans")):
        sets = [(set(neurons.facts[u].languages[a]), set(neurons.facts[u].languages[b])) for u in tested]
        expected = sum(len(x & y) / len(x | y) for x, y in sets) / len(sets)
        assert jaccard[(a, b)] == pytest.approx(expected) == pytest.approx(jaccard[(b, a)])
        off_diagonal.append(expected)
    assert any(v < 1.0 for v in off_diagonal)  # the languages' sets differ: the table is not trivially 1
