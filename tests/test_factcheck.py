"""`knlight validate|test` with the tiny fact-checking config, in-process: tables, thresholds, TensorBoard."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from knlight.cli import main
from knlight.factcheck.claims import FALSE_CLAIM, TRUE_CLAIM, Claim
from knlight.factcheck.detectors import COLUMN, DETECTORS, FEATURES
from knlight.lm.options import LMOptions
from knlight.metrics.factcheck import binary_metrics, choose_threshold
from knlight.tasks.factcheck import FactCheckModule

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny" / "factcheck.yaml"
FIXTURE = REPO / "tests" / "fixtures" / "rml_small.jsonl"
TRAIN_UUIDS = {"P36:Q23169:Q34217", "P37:Q505064:Q1412"}  # split (0.5, 0.25, 0.25), seed 5
VAL_UUID, TEST_UUID = "P36:Q118903:Q216", "P37:Q485207:Q7850"


def args(stage: str, root: Path, *extra: str) -> list[str]:
    return [stage, "--config", str(CONFIG), "--trainer.logger.init_args.save_dir", str(root / "runs"),
            "--data.init_args.path", str(FIXTURE), *extra]  # fmt: skip


def out_dir(root: Path, split: str) -> Path:
    (version,) = (root / "runs" / "tiny-factcheck").glob("version_*")
    return version / "factcheck" / split


def results(root: Path, split: str) -> dict:
    return json.loads((out_dir(root, split) / "results.json").read_text("utf-8"))


def claim_rows(root: Path, split: str) -> list[dict]:
    with (out_dir(root, split) / "claims.csv").open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def tested(one_thread: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("test")
    main(args("test", root))
    return root


@pytest.fixture(scope="module")
def validated(one_thread: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("validate")
    main(args("validate", root))
    return root


def test_test_run_writes_the_tables_for_every_detector(tested: Path) -> None:
    doc = results(tested, "test")
    assert doc["positive_class"] == "false claim" and doc["split"] == "test"
    assert doc["counts"] == {"facts": 1, "claims": 9, "false_claims": 6, "true_claims": 3, "rows_received": 9,
                             "world_size": 1}  # fmt: skip
    table = doc["table"]
    assert {r["detector"] for r in table} == set(DETECTORS)
    groups = {(r["group_by"], r["group"]) for r in table}
    assert groups == {("all", "all"), ("language", "de"), ("language", "en"), ("language", "zh-hans"),
                      ("relation", "P37")}  # fmt: skip
    assert (out_dir(tested, "test") / "results.csv").read_text("utf-8").startswith("split,detector,group_by")
    rows = claim_rows(tested, "test")
    assert len(rows) == 9 and {r["uuid"] for r in rows} == {TEST_UUID}
    assert sum(int(r["label"]) == FALSE_CLAIM for r in rows) == 6


def test_relation_sets_come_from_the_train_split(tested: Path) -> None:
    doc = results(tested, "test")
    sets = {s["relation"]: s for s in doc["relation_sets"]}
    assert set(sets) == {"P36", "P37"}
    for s in sets.values():
        assert s["train_claims"] == 3  # one true claim per language of the relation's one training fact
        assert s["neurons"] and s["source"] in ("dkn", "top")
        counts = s["counts"]
        assert all(c > 0.7 * max(counts) for c in counts)


def test_table_agrees_with_the_per_claim_scores(tested: Path) -> None:
    """Recompute every 'all' row from claims.csv with the recorded thresholds (positive = false claim)."""
    doc = results(tested, "test")
    rows = claim_rows(tested, "test")
    labels = torch.tensor([int(r["label"]) for r in rows])
    for row in (r for r in doc["table"] if r["group_by"] == "all"):
        d = row["detector"]
        scores = torch.tensor([float(r[f"score_{d}"]) for r in rows], dtype=torch.float64)
        again = binary_metrics(scores, labels, doc["thresholds"][d])
        assert {k: again[k] for k in ("tp", "fp", "fn", "tn")} == {
            k: row[k] for k in ("tp", "fp", "fn", "tn")
        }
        flagged = [int(r[f"flagged_{d}"]) for r in rows]
        assert sum(f and y == FALSE_CLAIM for f, y in zip(flagged, labels.tolist())) == row["tp"]
        if row["tp"] + row["fp"]:
            assert row["precision"] == pytest.approx(row["tp"] / (row["tp"] + row["fp"]))
        assert row["recall"] == pytest.approx(row["tp"] / (row["tp"] + row["fn"]))


def test_test_thresholds_are_the_validation_optimum(tested: Path, validated: Path) -> None:
    """The test run's thresholds are what max-F1 picks on the validation claims (seen in the validate run)."""
    test_doc, val_doc = results(tested, "test"), results(validated, "val")
    assert set(test_doc["threshold_source"].values()) == {"val"}
    assert set(val_doc["threshold_source"].values()) == {"val (in-sample)"}
    val_rows = claim_rows(validated, "val")
    assert {r["uuid"] for r in val_rows} == {VAL_UUID}
    labels = torch.tensor([int(r["label"]) for r in val_rows])
    for d in DETECTORS:
        scores = torch.tensor([float(r[f"score_{d}"]) for r in val_rows], dtype=torch.float64)
        assert test_doc["thresholds"][d] == pytest.approx(
            choose_threshold(scores, labels), rel=1e-9, abs=1e-12
        )
        assert val_doc["thresholds"][d] == test_doc["thresholds"][d]
    assert test_doc["lambda_amig"] == -test_doc["thresholds"]["amig"]


def test_tensorboard_has_pr_and_roc_images_and_scalars(tested: Path, validated: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for root, split in ((tested, "test"), (validated, "val")):
        events = EventAccumulator(
            str(out_dir(root, split).parents[1]), size_guidance={"images": 0, "scalars": 0}
        )
        events.Reload()
        tags = events.Tags()
        assert {f"factcheck/{split}/pr_curve", f"factcheck/{split}/roc_curve"} <= set(tags["images"])
        image = events.Images(f"factcheck/{split}/roc_curve")[0]
        assert image.encoded_image_string.startswith(b"\x89PNG")
        assert {f"factcheck/{split}/{d}/f1" for d in DETECTORS} <= set(tags["scalars"])
        assert f"factcheck/{split}/amig/f1/en" in tags["scalars"]


def _synthetic(self: FactCheckModule, claim: Claim, amig: bool = True) -> torch.Tensor:
    """Features where validation and test want different thresholds: val log P = -1 (true) / -3 (false),
    test log P = -5 (true) / -7 (false)."""
    row = torch.full((len(FEATURES),), float("nan"), dtype=torch.float64)
    shift = 0.0 if claim.uuid == VAL_UUID else 4.0
    row[COLUMN["log_prob"]] = -(1.0 if claim.label == TRUE_CLAIM else 3.0) - shift
    row[COLUMN["rank"]] = 1.0
    return row


def test_lambda_is_chosen_on_validation_not_on_test(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FactCheckModule, "score_claim", _synthetic)
    main(args("test", tmp_path, "--model.init_args.detectors", "[prob]"))
    doc = results(tmp_path, "test")
    assert doc["thresholds"]["prob"] == pytest.approx(2.0)  # val: falseness 1 (true) vs 3 (false)
    row = next(r for r in doc["table"] if r["group_by"] == "all")
    # Test falseness 5 (true) vs 7 (false): the test split would pick 6 (F1 = 1); with λ from val every claim
    # is flagged.
    assert (row["tp"], row["fp"], row["fn"], row["tn"]) == (6, 3, 0, 0)
    assert row["precision"] == pytest.approx(6 / 9) and row["recall"] == 1.0 and row["auroc"] == 1.0


def test_given_thresholds_are_used_as_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FactCheckModule, "score_claim", _synthetic)
    main(args("test", tmp_path, "--model.init_args.detectors", "[prob]", "--model.init_args.thresholds",
              "{prob: 6.0}"))  # fmt: skip
    doc = results(tmp_path, "test")
    assert doc["thresholds"] == {"prob": 6.0} and doc["threshold_source"] == {"prob": "given"}
    row = next(r for r in doc["table"] if r["group_by"] == "all")
    assert (row["precision"], row["recall"]) == (1.0, 1.0)


def test_masked_model_runs(tmp_path: Path) -> None:
    main(args("test", tmp_path, "--model.init_args.lm.model", "tiny:bert", "--model.init_args.detectors",
              "[amig,prob,fast]"))  # fmt: skip
    doc = results(tmp_path, "test")
    assert doc["counts"]["claims"] == 9 and doc["settings"]["model"] == "tiny:bert"
    assert {r["detector"] for r in doc["table"]} == {"amig", "prob", "fast"}


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="detectors"):
        FactCheckModule(LMOptions("tiny:gpt2"), detectors=["oracle"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="t must be in"):
        FactCheckModule(LMOptions("tiny:gpt2"), t=1.5)
    with pytest.raises(ValueError, match="thresholds for unknown"):
        FactCheckModule(LMOptions("tiny:gpt2"), thresholds={"oracle": 0.0})


def test_relation_sets_from_a_neuron_file_use_train_facts_only(tmp_path: Path) -> None:
    from knlight.neurons.neuron_file import FactNeurons, NeuronFile, write_neuron_file

    facts = {
        "P36:Q23169:Q34217": FactNeurons("P36", {"en": [(2, 5)]}, degenerate_pairs=[((2, 5), (1, 3))]),
        "P37:Q505064:Q1412": FactNeurons(
            "P37", {"en": [(0, 7)]}, degenerate_pairs=[((2, 5), (0, 7)), ((0, 7), (1, 1))]
        ),
        TEST_UUID: FactNeurons("P37", {"en": [(2, 60)]}, degenerate_pairs=[((2, 60), (2, 61))]),  # not train
    }
    path = write_neuron_file(tmp_path / "neurons.json", NeuronFile("tiny:gpt2", 3, 64, facts=facts))
    main(args("test", tmp_path, "--model.init_args.neurons", str(path), "--model.init_args.detectors",
              "[prob,fast]"))  # fmt: skip
    sets = {s["relation"]: s for s in results(tmp_path, "test")["relation_sets"]}
    assert sets["P36"]["neurons"] == [[1, 3], [2, 5]] and sets["P36"]["source"] == "dkn"
    assert sets["P37"]["neurons"] == [[0, 7]] and sets["P37"]["counts"] == [2]  # 1 is not > 0.7 x 2
    assert sets["P37"]["train_claims"] == 1 and sets["P37"]["pairs"] == 2


def test_no_validation_split_needs_given_thresholds(tmp_path: Path) -> None:
    from knlight.data import DataError

    split = ["--data.init_args.split_fractions", "[0.5, 0.0, 0.5]", "--model.init_args.detectors", "[prob]"]
    with pytest.raises(DataError, match="validation split has no claim"):
        main(args("test", tmp_path / "a", *split))
    main(args("test", tmp_path / "b", *split, "--model.init_args.thresholds", "{prob: 50.0}"))
    assert results(tmp_path / "b", "test")["threshold_source"] == {"prob": "given"}


def _tiny_claims():
    from knlight.tasks.factcheck import FactCheckDataModule

    data = FactCheckDataModule(str(FIXTURE), split_fractions=(0.5, 0.25, 0.25), seed=5, model_kind="causal",
                               queries_per_fact=1, max_wrong=2)  # fmt: skip
    data.setup("test")
    return data


def test_logistic_detectors_are_fit_on_the_train_split_only(tested: Path) -> None:
    """The LR's standardisation is the train claims' feature statistics, computed here from plain activations."""
    from knlight import load_lm
    from knlight.lm.hooks import capture_activations

    doc = results(tested, "test")
    lm = load_lm("tiny:gpt2")
    sets = {s["relation"]: [tuple(n) for n in s["neurons"]] for s in doc["relation_sets"]}

    def act_features(claims: list[Claim]) -> torch.Tensor:
        rows = []
        for claim in claims:
            encoded = lm.encode(claim.query, claim.candidate)
            store: dict[int, torch.Tensor] = {}
            with torch.no_grad(), capture_activations(lm.sites.out_projs, store):
                lm.model(input_ids=torch.tensor([encoded.input_ids]))
            positions = [p for p, _ in encoded.targets]
            values = torch.stack(
                [store[layer][0, positions, index].mean() for layer, index in sets[claim.relation]]
            )
            rows.append([float(values.double().mean()), float(values.min()), float(values.max())])
        return torch.tensor(rows, dtype=torch.float64)

    data = _tiny_claims()
    train = act_features(data.claims("train"))
    held_out = act_features(data.claims("val") + data.claims("test"))
    fitted = doc["logistic"]["act_lr"]
    assert fitted["columns"] == ["act_mean", "act_min", "act_max"]
    assert torch.allclose(
        torch.tensor(fitted["mean"], dtype=torch.float64), train.mean(0), rtol=1e-5, atol=1e-7
    )
    assert torch.allclose(
        torch.tensor(fitted["std"], dtype=torch.float64), train.std(0, unbiased=False), rtol=1e-4
    )
    everything = torch.cat([train, held_out]).mean(0)
    assert not torch.allclose(torch.tensor(fitted["mean"], dtype=torch.float64), everything, rtol=1e-3)


def test_probability_detectors_equal_a_plain_forward(tested: Path) -> None:
    """prob = -log P(candidate), prob_mean = -log P / tokens, rank = 1 + tokens scored above its first token."""
    from knlight import load_lm

    lm = load_lm("tiny:gpt2")
    by_id = {c.claim_id: c for c in _tiny_claims().claims("test")}
    rows = claim_rows(tested, "test")
    assert len(rows) == len(by_id) == 9
    lengths = set()
    for row in rows:
        claim = by_id[int(row["claim_id"])]
        encoded = lm.encode(claim.query, claim.candidate)
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([encoded.input_ids])).logits[0].float()
        positions = [p for p, _ in encoded.targets]
        tokens = torch.tensor([t for _, t in encoded.targets])
        log_p = torch.log_softmax(logits[positions], -1).gather(1, tokens[:, None]).sum()
        rank = 1 + int((logits[positions[0]] > logits[positions[0], tokens[0]]).sum())
        assert float(row["score_prob"]) == pytest.approx(-float(log_p), rel=1e-5)
        assert float(row["score_prob_mean"]) == pytest.approx(-float(log_p) / len(tokens), rel=1e-5)
        assert float(row["score_rank"]) == rank and int(float(row["n_tokens"])) == len(tokens)
        lengths.add(len(tokens))
    assert len(lengths) > 1  # candidates of different lengths: prob and prob_mean really differ
